"""Task mixing for multi-dataset training: which task each batch or example comes from.

Data-side, plain NumPy, jit-free. In LLM-style multi-task finetuning the examples of different
tasks live in different datasets, and the balance between tasks is set by how often each is
sampled rather than by loss weights. This module gives the sampling probabilities and a
seeded sampler::

    from mtl_jax import mixing
    probs = mixing.temperature_probs([1_000_000, 20_000, 5_000], temperature=5.0)
    sampler = mixing.TaskSampler(probs, seed=0)
    task_ids = sampler.example_tasks(step, batch_size=64)   # one task id per example
    task = sampler.batch_task(step)                          # or one task per batch

Probabilities:

* `proportional_probs`: ``p_k = n_k / sum_j n_j`` (examples-proportional mixing).
* `temperature_probs`: ``p_k ∝ n_k^(1/T)`` (T = 1 proportional, T -> inf uniform).
* `order_matters_probs`: high-resource tasks only until ``switch_step``, then a temperature
  mixture of all tasks (Order Matters in the Presence of Dataset Imbalance).
* `ratio_preserving_counts`: exact per-batch task counts for target ratios (MT-GRPO's
  ratio-preserving sampler), and `ratio_preserving_select` to fill those quotas from
  candidates after filtering (e.g. zero-advantage prompts).

Determinism: the draws of step ``t`` depend only on ``(seed, t)``, so a resumed run sees the
same task sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

ProbsLike = Sequence[float] | np.ndarray | Callable[[int], np.ndarray]


def _sizes(dataset_sizes: Any) -> np.ndarray:
    n = np.asarray(dataset_sizes, dtype=np.float64)
    if n.ndim != 1 or n.size == 0:
        raise ValueError(f"dataset_sizes must be a non-empty 1-D sequence, got shape {n.shape}.")
    if not np.all(np.isfinite(n)) or np.any(n < 0) or n.sum() <= 0:
        raise ValueError(f"dataset_sizes must be finite, >= 0 and not all 0, got {n.tolist()}.")
    return n


def _check_probs(probs: Any) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"task probabilities must be a non-empty 1-D vector, got shape {p.shape}.")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise ValueError(f"task probabilities must be finite, >= 0, not all 0, got {p.tolist()}.")
    return p / p.sum()


def proportional_probs(dataset_sizes: Sequence[float]) -> np.ndarray:
    """Examples-proportional mixing: ``p_k = n_k / sum_j n_j``."""
    n = _sizes(dataset_sizes)
    return n / n.sum()


def temperature_probs(dataset_sizes: Sequence[float], temperature: float = 1.0) -> np.ndarray:
    """Temperature-scaled mixing: ``p_k = n_k^(1/T) / sum_j n_j^(1/T)``.

    Args:
      dataset_sizes: [K] number of examples per task.
      temperature: T >= 1 flattens towards uniform (T = 1: proportional; ``np.inf``: uniform).
        0 < T < 1 sharpens towards the largest task.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}.")
    n = _sizes(dataset_sizes)
    if np.isinf(temperature):
        p = (n > 0).astype(np.float64)
        return p / p.sum()
    # In log space: n^(1/T) for huge n and small T would overflow.
    with np.errstate(divide="ignore"):
        logits = np.log(n) / temperature
    logits = logits - np.max(logits)
    p = np.exp(logits)
    return p / p.sum()


def _high_resource_mask(n: np.ndarray, high_resource: Any) -> np.ndarray:
    mask = np.zeros(n.shape, dtype=bool)
    if high_resource is None:
        mask[np.argmax(n)] = True
        return mask
    idx = np.atleast_1d(np.asarray(high_resource))
    if idx.dtype == bool:
        if idx.shape != n.shape:
            raise ValueError(f"high_resource mask has shape {idx.shape}, expected {n.shape}.")
        mask = idx.copy()
    else:
        if idx.size == 0 or np.any(idx < 0) or np.any(idx >= n.size):
            raise ValueError(f"high_resource indices must be in [0, {n.size}), got {idx.tolist()}.")
        mask[idx.astype(int)] = True
    if not np.any(mask & (n > 0)):
        raise ValueError("high_resource must select at least one task with examples.")
    return mask


def order_matters_phases(
    dataset_sizes: Sequence[float],
    high_resource: Any = None,
    temperature: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """The two mixtures of the Order-Matters schedule: (pre-training, mixed).

    Pre-training: temperature mixing restricted to the high-resource tasks (zero elsewhere).
    Mixed: temperature mixing of all tasks.
    """
    n = _sizes(dataset_sizes)
    mask = _high_resource_mask(n, high_resource)
    pre = temperature_probs(np.where(mask, n, 0.0), temperature)
    mixed = temperature_probs(n, temperature)
    return pre, mixed


def order_matters_probs(
    step: int,
    dataset_sizes: Sequence[float],
    high_resource: Any = None,
    switch_step: int = 0,
    temperature: float = 1.0,
) -> np.ndarray:
    """Order-Matters schedule: high-resource tasks first, then a mixture of all tasks.

    Args:
      step: training step (0-indexed).
      dataset_sizes: [K] examples per task.
      high_resource: indices (or a [K] bool mask) of the high-resource tasks; default the
        largest task.
      switch_step: steps of pre-training on the high-resource tasks only.
      temperature: temperature of both mixtures (`temperature_probs`).

    Returns:
      [K] task probabilities at ``step``.

    References:
      Choi, Xin, et al. Order Matters in the Presence of Dataset Imbalance for Multilingual
      Learning. NeurIPS 2023. Derived from the paper's description (pre-train on
      high-resource tasks, then fine-tune on the high/low-resource mixture); the within-phase
      temperature mixing and defaults are our choices.
    """
    if switch_step < 0:
        raise ValueError(f"switch_step must be >= 0, got {switch_step!r}.")
    pre, mixed = order_matters_phases(dataset_sizes, high_resource, temperature)
    return pre if step < switch_step else mixed


def ratio_preserving_counts(probs: Sequence[float], batch_size: int) -> np.ndarray:
    """Exact per-batch task counts for target ratios (largest-remainder rounding).

    ``counts[k]`` is ``floor(p_k B)`` or ``ceil(p_k B)``, the counts sum to ``B``, and the
    remaining ``B - sum floor(p_k B)`` slots go to the largest fractional parts (ties to the
    lower task index). This is how MT-GRPO's ratio-preserving sampler makes each batch's task
    composition follow the adapted task weights exactly.
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 0:
        raise ValueError(f"batch_size must be an int >= 0, got {batch_size!r}.")
    p = _check_probs(probs)
    exact = p * batch_size
    counts = np.floor(exact).astype(np.int64)
    rest = int(batch_size - counts.sum())
    if rest > 0:
        order = np.lexsort((np.arange(p.size), -(exact - counts)))
        counts[order[:rest]] += 1
    return counts


def ratio_preserving_select(
    task_ids: Sequence[int],
    keep: Sequence[bool],
    probs: Sequence[float],
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Fills a batch with task quotas from filtered candidates (MT-GRPO RP-sampler step).

    Candidates are examples with ``task_ids`` that survived a filter (``keep``, e.g. prompts
    whose rollouts do not all get the same reward). Takes the first ``counts[k]`` kept
    candidates of each task, ``counts = ratio_preserving_counts(probs, batch_size)``.

    Returns:
      ``(indices, missing)``: the selected candidate indices (in candidate order) and, per
      task, how many more kept candidates are needed to meet the quota (draw more and call
      again).
    """
    t = np.asarray(task_ids, dtype=np.int64)
    kp = np.asarray(keep, dtype=bool)
    if t.shape != kp.shape or t.ndim != 1:
        raise ValueError(f"task_ids and keep must be 1-D of one length, got {t.shape}, {kp.shape}.")
    counts = ratio_preserving_counts(probs, batch_size)
    if t.size and (t.min() < 0 or t.max() >= counts.size):
        raise ValueError(f"task_ids must be in [0, {counts.size}).")
    chosen = []
    missing = np.zeros_like(counts)
    for k, c in enumerate(counts):  # K is small: one pass per task
        idx = np.flatnonzero(kp & (t == k))[:c]
        chosen.append(idx)
        missing[k] = c - idx.size
    indices = np.sort(np.concatenate(chosen)) if chosen else np.zeros((0,), np.int64)
    return indices, missing


class TaskSampler:
    """Seeded sampler of task ids, per batch or per example.

    Args:
      probs: [K] task probabilities, or a function ``step -> [K]`` (e.g. a schedule built
        with `order_matters_probs` via ``functools.partial``).
      seed: the draws at step ``t`` depend only on ``(seed, t)``.
      ratio_preserving: per-example draws use exact quotas (`ratio_preserving_counts`,
        shuffled) instead of i.i.d. categorical draws.

    Example:
      >>> s = TaskSampler(proportional_probs([300, 100]), seed=0)
      >>> ids = s.example_tasks(step=0, batch_size=8)   # array of 8 task ids in {0, 1}
    """

    def __init__(self, probs: ProbsLike, seed: int = 0, ratio_preserving: bool = False):
        if callable(probs):
            self._probs_fn = probs
        else:
            fixed = _check_probs(probs)
            self._probs_fn = lambda step: fixed
        self.seed = int(seed)
        self.ratio_preserving = bool(ratio_preserving)

    def probs(self, step: int) -> np.ndarray:
        """The task probabilities at ``step``."""
        return _check_probs(self._probs_fn(step))

    def _rng(self, step: int) -> np.random.Generator:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step!r}.")
        return np.random.default_rng([self.seed, int(step)])

    def batch_task(self, step: int) -> int:
        """The task of the whole batch at ``step`` (one dataset per batch)."""
        p = self.probs(step)
        return int(self._rng(step).choice(p.size, p=p))

    def example_tasks(self, step: int, batch_size: int) -> np.ndarray:
        """[batch_size] task ids, one per example, for the batch at ``step``."""
        p = self.probs(step)
        rng = self._rng(step)
        if self.ratio_preserving:
            counts = ratio_preserving_counts(p, batch_size)
            ids = np.repeat(np.arange(p.size), counts)
            return rng.permutation(ids)
        return rng.choice(p.size, size=batch_size, p=p)
