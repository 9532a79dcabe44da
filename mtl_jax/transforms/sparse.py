"""Sparse training (ST): update only a selected subset of the shared parameters.

Zhang et al. (2024) show that updating only part of the shared parameters lowers the incidence
of gradient conflict, and that it combines with any gradient-manipulation method. Here it is a
Jacobian -> Jacobian transform that zeroes the columns of the Jacobian outside a mask, so the
methods after it in the chain see the task gradients restricted to the trainable subset (their
Gramian, conflicts and weights are those of the sparse sub-network)::

    tx = optax.chain(mtl.sparse_training(sparsity=0.5), mtl.upgrad(), mtl.sum_tasks(),
                     optax.adam(1e-3))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_jax import jacobian as jac_lib
from mtl_jax.transforms import _seed_utils as tu
from mtl_jax.transforms import base

PyTree = Any
SCORES = ("fisher", "agreement", "random")


class SparseTrainingState(NamedTuple):
    """State of `sparse_training`.

    Attributes:
      count: number of updates so far (int32).
      key: PRNG key (``score='random'``).
      scores: per-parameter selection scores accumulated since the last refresh (float32,
        parameter-shaped for the eligible leaves, a scalar placeholder for the others).
      mask: per-parameter bool mask of the parameters that are updated (all True until the
        first refresh; scalar True placeholder for leaves that are not sparsified).
    """

    count: jax.Array
    key: jax.Array
    scores: PyTree
    mask: PyTree


def _step_scores(jac_leaf: jax.Array, score: str) -> jax.Array:
    rows = jac_leaf.astype(jnp.float32)
    # Task-axis sums as fused row chains, not jnp.sum(axis=0) (slow on XLA CPU).
    total = jac_lib.reduce_rows(rows)
    if score == "fisher":
        return jnp.square(total)
    if score == "agreement":
        # (sum_k g_k)^2 - sum_k g_k^2 = 2 sum_{i<j} g_i g_j: positive where tasks cooperate.
        return jnp.square(total) - jac_lib.reduce_rows(rows, jnp.square)
    return jnp.zeros_like(total)  # random: scores drawn at refresh


def top_fraction_mask(scores: list[jax.Array], keep: float) -> list[jax.Array]:
    """Bool masks selecting exactly ``round(keep * n)`` (>= 1) entries with the largest scores.

    The selection is global over all the given arrays (``n`` their total size); ties are
    broken by position (earlier leaves and indices first), so the count is exact.
    """
    sizes = [s.size for s in scores]
    n = sum(sizes)
    k = min(n, max(1, int(round(keep * n))))
    flat = jnp.concatenate([jnp.ravel(s) for s in scores])
    flat = jnp.where(jnp.isnan(flat), -jnp.inf, flat)
    order = jnp.argsort(-flat, stable=True)
    chosen = jnp.zeros((n,), bool).at[order[:k]].set(True)
    out, start = [], 0
    for s, size in zip(scores, sizes, strict=True):
        out.append(jnp.reshape(chosen[start : start + size], s.shape))
        start += size
    return out


def sparse_training(
    sparsity: float = 0.5,
    *,
    score: str = "fisher",
    score_steps: int = 1,
    refresh_every: int | None = None,
    param_mask: PyTree | Callable[[PyTree], PyTree] | None = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Sparse training: only a fraction ``1 - sparsity`` of the shared parameters is updated.

    Every Jacobian column (parameter coordinate) outside the mask is zeroed for all tasks, so
    those parameters keep their values (with Adam/SGD; decoupled weight decay still moves
    them) and the next method in the chain balances the restricted task gradients.

    Mask selection (global top-k over all eligible parameters, exact count):

    * ``score='fisher'`` (default, the paper's choice, following the FISH mask of Sung et al.
      2021): empirical Fisher information of the multi-task loss, the squared gradient of the
      summed task losses ``(sum_k g_k)^2``, accumulated over ``score_steps`` steps.
    * ``score='agreement'`` (task-conflict-aware, an mtl_jax extension):
      ``(sum_k g_k)^2 - sum_k g_k^2 = 2 sum_{i<j} g_i g_j`` accumulated; selects the
      coordinates where the tasks' gradients agree the most, leaving conflicting ones frozen.
    * ``score='random'``: a uniformly random subset (the paper's random-mask baseline).

    Schedule: scores are accumulated from the first update; the mask is chosen at update
    ``score_steps - 1`` (until then all parameters are updated) and then kept fixed, or
    re-chosen every ``refresh_every`` updates from the scores accumulated since the last
    choice.

    Args:
      sparsity: fraction of the eligible parameters that are frozen, in [0, 1).
      score: ``'fisher'``, ``'agreement'`` or ``'random'``.
      score_steps: number of updates whose scores choose the first mask (>= 1).
      refresh_every: re-choose the mask every this many updates (None: fixed mask).
      param_mask: which parameters may be sparsified: a pytree of bools with the structure
        of the parameters, a function of the parameters returning one, or a regular
        expression searched in each leaf's path (None: all). Use it
        to keep the task heads dense when the transform sees all parameters; inside
        `mtl.shared_only` it already sees only the shared ones.
      seed: PRNG seed for ``score='random'``.

    Returns:
      A `Reducible` ``optax.GradientTransformationExtraArgs`` mapping a Jacobian to a Jacobian
      of the same shapes and dtypes; followed by ``sum_tasks`` in `mtl.chain`, it masks the
      summed gradient instead of writing the masked Jacobian.

    Example:
      >>> import jax.numpy as jnp, optax, mtl_jax as mtl
      >>> params = {'w': jnp.zeros((4, 3))}
      >>> jac = {'w': jnp.arange(24.0).reshape(2, 4, 3)}
      >>> tx = mtl.sparse_training(sparsity=0.75)
      >>> out, _ = tx.update(jac, tx.init(params), params)
      >>> int((out['w'][0] != 0).sum())
      3

    References:
      Zhang, Shen, Cao, Dai, Zhou, Zhang, Zhang, Shutova. Proactive Gradient Conflict
      Mitigation in Multi-Task Learning: A Sparse Training Perspective, arXiv 2411.18615
      (2024). Sung, Nair, Raffel. Training Neural Networks with Fixed Sparse Masks, NeurIPS
      2021.

      Checked against: paper (no official code found). Deliberate choices: the mask is
      chosen from the training Jacobians inside the transform (``score_steps`` batches)
      instead of a separate pass over held-out samples before training.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparse_training: sparsity must be in [0, 1), got {sparsity}.")
    if score not in SCORES:
        raise ValueError(f"sparse_training: score must be one of {SCORES}, got {score!r}.")
    if int(score_steps) != score_steps or score_steps < 1:
        raise ValueError(f"sparse_training: score_steps must be an int >= 1, got {score_steps}.")
    if refresh_every is not None and (int(refresh_every) != refresh_every or refresh_every < 1):
        raise ValueError(
            f"sparse_training: refresh_every must be None or an int >= 1, got {refresh_every}."
        )
    keep = 1.0 - sparsity
    first = int(score_steps) - 1

    def init_fn(params):
        leaves, treedef = tu.flatten(params)
        elig = tu.aligned_leaves(param_mask, params, params, True, "param_mask")
        scores, masks = [], []
        for p, e in zip(leaves, elig, strict=True):
            if tu.is_masked(p):
                scores.append(p)
                masks.append(p)
            elif e:
                scores.append(jnp.zeros(jnp.shape(p), jnp.float32))
                masks.append(jnp.ones(jnp.shape(p), bool))
            else:
                scores.append(jnp.zeros((), jnp.float32))
                masks.append(jnp.ones((), bool))
        return SparseTrainingState(
            count=jnp.zeros((), jnp.int32),
            key=jax.random.key(seed),
            scores=treedef.unflatten(scores),
            mask=treedef.unflatten(masks),
        )

    def step(updates, state, params):
        """This step's masks: (Jacobian leaves, masks, masked leaf indices, treedef, state)."""
        jac_lib.num_tasks(updates)
        leaves, treedef = tu.flatten(updates)
        elig = tu.aligned_leaves(param_mask, updates, params, True, "param_mask")
        s_leaves = treedef.flatten_up_to(state.scores)
        m_leaves = treedef.flatten_up_to(state.mask)
        idx = [
            i
            for i, (u, e) in enumerate(zip(leaves, elig, strict=True))
            if e and not tu.is_masked(u)
        ]

        acc = list(s_leaves)
        for i in idx:
            acc[i] = s_leaves[i] + _step_scores(leaves[i], score)

        t = state.count
        if refresh_every is None:
            refresh = t == first
        else:
            refresh = (t == first) | ((t > first) & ((t - first) % refresh_every == 0))
        key, sub = jax.random.split(state.key)

        def choose(_):
            if score == "random":
                n = sum(acc[i].size for i in idx)
                draws = jax.random.uniform(sub, (n,))
                sc, start = [], 0
                for i in idx:
                    sc.append(jnp.reshape(draws[start : start + acc[i].size], acc[i].shape))
                    start += acc[i].size
            else:
                sc = [acc[i] for i in idx]
            return top_fraction_mask(sc, keep)

        def keep_old(_):
            return [m_leaves[i] for i in idx]

        if idx:
            new_masks = jax.lax.cond(refresh, choose, keep_old, None)
        else:
            new_masks = []
        masks = list(m_leaves)
        scores = list(acc)
        for j, i in enumerate(idx):
            masks[i] = new_masks[j]
            scores[i] = jnp.where(refresh, jnp.zeros_like(acc[i]), acc[i])

        new_state = SparseTrainingState(
            count=jnp.minimum(t, jnp.iinfo(jnp.int32).max - 1) + 1,
            key=key,
            scores=treedef.unflatten(scores),
            mask=treedef.unflatten(masks),
        )
        return leaves, masks, idx, treedef, new_state

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        leaves, masks, idx, treedef, new_state = step(updates, state, params)
        out = list(leaves)
        for i in idx:
            out[i] = jnp.where(masks[i][None], leaves[i], jnp.zeros((), leaves[i].dtype))
        return treedef.unflatten(out), new_state

    def reduction(updates, state, params, r, **extra_args):
        del extra_args
        leaves, masks, idx, treedef, new_state = step(updates, state, params)
        # The mask is shared by the tasks: r @ (mask * J) = mask * (r @ J), one dot per leaf.
        out = [
            leaf if tu.is_masked(leaf) else jac_lib.weighted_sum(leaf, jnp.asarray(r))
            for leaf in leaves
        ]
        for i in idx:
            out[i] = jnp.where(masks[i], out[i], jnp.zeros((), out[i].dtype))
        return treedef.unflatten(out), new_state

    # Reducible: `mtl.chain(mtl.sparse_training(...), mtl.sum_tasks())` masks the summed
    # gradient instead of writing the masked Jacobian.
    return base.Reducible(init_fn, update_fn, reduction)
