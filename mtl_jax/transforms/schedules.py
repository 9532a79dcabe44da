"""Step-dependent task weights: the loss-side twin of `mtl_jax.mixing`'s task schedules.

`task_schedule` weights task k's loss at step t by the probability with which a data-side
mixture would sample it (the expected gradient of sampling task k with probability ``p_k``
is ``sum_k p_k grad L_k``), so the Order-Matters schedule can be run on batches that already
hold every task, or combined with any Jacobian-level method.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax import mixing
from mtl_jax.transforms.loss_base import LossWeighting, from_loss_weighting

_F32 = jnp.float32
Schedule = Callable[[jax.Array], jax.Array]


class TaskScheduleState(NamedTuple):
    """State of `task_schedule`: the step counter."""

    step: jax.Array  # int32


def task_schedule_weighting(
    num_tasks: int,
    dataset_sizes: Sequence[float] | None = None,
    high_resource: Any = None,
    switch_step: int = 0,
    temperature: float = 1.0,
    schedule: Schedule | None = None,
) -> LossWeighting:
    """Step-dependent task weights as a pure `LossWeighting` (see `task_schedule`)."""
    name = "task_schedule"
    if not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"{name}: num_tasks must be a positive int, got {num_tasks!r}.")
    if not isinstance(switch_step, int) or switch_step < 0:
        raise ValueError(f"{name}: switch_step must be an int >= 0, got {switch_step!r}.")
    k = num_tasks
    if schedule is None:
        sizes = np.ones(k) if dataset_sizes is None else np.asarray(dataset_sizes, np.float64)
        if sizes.shape != (k,):
            raise ValueError(
                f"{name}: dataset_sizes has shape {sizes.shape}, expected ({k},) (num_tasks)."
            )
        pre, mixed = mixing.order_matters_phases(sizes, high_resource, temperature)
        pre_j, mixed_j = jnp.asarray(pre, _F32), jnp.asarray(mixed, _F32)

        def schedule(step):
            return jnp.where(step < switch_step, pre_j, mixed_j)

    elif dataset_sizes is not None or high_resource is not None:
        raise ValueError(f"{name}: pass either schedule or dataset_sizes/high_resource, not both.")

    def init() -> TaskScheduleState:
        return TaskScheduleState(jnp.zeros((), jnp.int32))

    def update(losses, state: TaskScheduleState, **extra):
        del losses, extra
        w = jnp.asarray(schedule(state.step), _F32)
        if w.shape != (k,):
            raise ValueError(f"{name}: schedule returned shape {w.shape}, expected ({k},).")
        return w, TaskScheduleState(state.step + 1)

    return LossWeighting(init, update, k, name)


def task_schedule(
    num_tasks: int,
    dataset_sizes: Sequence[float] | None = None,
    high_resource: Any = None,
    switch_step: int = 0,
    temperature: float = 1.0,
    schedule: Schedule | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Step-dependent task weights; by default the Order-Matters schedule.

    Order Matters (high-resource first, then mix): for ``step < switch_step`` only the
    high-resource tasks get weight, ``p ∝ n_k^(1/T)`` over them; afterwards ``p ∝ n_k^(1/T)``
    over all tasks. The weights are these probabilities (they sum to 1), exactly
    `mtl_jax.mixing.order_matters_probs` at the same step, so the loss-weighted and the
    data-sampled versions agree in expectation.

    Args:
      num_tasks: K.
      dataset_sizes: [K] examples per task (default equal sizes).
      high_resource: indices or [K] bool mask of the high-resource tasks (default: the
        largest task).
      switch_step: number of high-resource-only steps (0: mix from the start).
      temperature: mixing temperature T (1: proportional to the sizes).
      schedule: alternatively, any jit-traceable ``step (int32 scalar) -> [K] weights``;
        the step counts updates from 0.

    Returns:
      An optax transform; its update takes ``task_losses`` (for the common contract).

    Example:
      >>> tx = mtl.task_schedule(3, dataset_sizes=[1e6, 1e4, 1e3], switch_step=10_000,
      ...                        temperature=5.0)

    References:
      Choi, Xin, Dadkhahi, Gilmer, Garg, Firat, Yeh, Dai, Ghorbani. Order Matters in the
      Presence of Dataset Imbalance for Multilingual Learning. NeurIPS 2023.
      Checked against: the paper's description (no public reference code); the temperature
      mixing within each phase is the standard multilingual sampling rule, our choice.
    """
    return from_loss_weighting(
        task_schedule_weighting(
            num_tasks, dataset_sizes, high_resource, switch_step, temperature, schedule
        )
    )
