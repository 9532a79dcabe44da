"""Non-finite guards: skip a step whose task losses, Jacobian or update are not finite.

One exploding task (a NaN or inf loss, or an overflowing gradient) must not ruin a run: the
step is skipped instead, inside jit and without a host sync, and the task is reported. The
pieces are pure functions, used by the harness (`mtl_jax.train`) and by `skip_if_nonfinite`,
the optax wrapper for custom training loops::

    tx = mtl.skip_if_nonfinite(optax.chain(mtl.upgrad(), mtl.sum_tasks(), optax.adam(1e-3)), 3)
    updates, state = tx.update(jac, state, params, task_losses=losses)
    # any NaN/inf loss, Jacobian row or inner update: zero updates, inner state unchanged;
    # state.bad_tasks says which tasks, state.consecutive_bad_steps how long it has lasted.

Unlike `optax.apply_if_finite`, the check is per task (rows of the Jacobian and the task
losses, so the offending task is known) and the inner state is never updated from a bad step,
however many there are in a row: stopping the run is the caller's decision (the harness raises
after ``config.max_consecutive_bad_steps``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def all_finite(tree: PyTree) -> jax.Array:
    """True (a scalar bool array) when every floating-point entry of ``tree`` is finite.

    Integer, boolean and PRNG-key leaves are ignored.
    """
    flags = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def task_finite(task_losses: jax.Array | None = None, jacobian: PyTree | None = None) -> jax.Array:
    """Per-task finiteness ``[K]`` bool; all True exactly when every loss and Jacobian entry is.

    A non-finite loss usually makes every Jacobian row non-finite too (its backward pass
    multiplies the other tasks' zero cotangents by NaN, ``0 * nan = nan``, in the shared
    layers), so the blame goes to the losses first: when some loss is not finite, ``ok[k]`` is
    ``isfinite(task_losses[k])``; otherwise ``ok[k]`` says whether row ``k`` of every leaf of
    ``jacobian`` is finite.

    Args:
      task_losses: ``[K]`` losses, or None.
      jacobian: per-task Jacobian pytree (leaves ``[K, ...]``), or None.

    Returns:
      ``[K]`` bool. At least one of the arguments must be given.
    """
    if task_losses is None and jacobian is None:
        raise ValueError("task_finite needs task_losses or a Jacobian.")
    losses_ok = None if task_losses is None else jnp.isfinite(jnp.asarray(task_losses)).ravel()
    if jacobian is None:
        return losses_ok
    leaves = jax.tree.leaves(jacobian)
    rows = jnp.ones((leaves[0].shape[0],), bool)
    for x in leaves:
        if jnp.issubdtype(x.dtype, jnp.inexact):
            rows = rows & jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)
    if losses_ok is None:
        return rows
    return jnp.where(jnp.all(losses_ok), rows, losses_ok)


def select_tree(ok: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    """``new`` where the scalar ``ok`` is True, else ``old`` (leafwise `jnp.where`; bitwise)."""
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


class SkipIfNonfiniteState(NamedTuple):
    """State of `skip_if_nonfinite`.

    Attributes:
      inner_state: the wrapped transformation's state (untouched by bad steps).
      bad_steps: number of skipped steps so far (int32).
      consecutive_bad_steps: skipped steps since the last good one (int32).
      bad_tasks: ``[K]`` bool, the tasks whose loss or Jacobian row was not finite at the last
        step (all False when it was good, or when only the inner update was not finite).
    """

    inner_state: Any
    bad_steps: jax.Array
    consecutive_bad_steps: jax.Array
    bad_tasks: jax.Array


def skip_if_nonfinite(
    inner: optax.GradientTransformation, num_tasks: int
) -> optax.GradientTransformationExtraArgs:
    """Wraps a transformation of per-task Jacobians so that non-finite steps are skipped.

    A step is bad when a task loss (the ``task_losses`` extra argument, if given), an entry of
    the incoming Jacobian, or an entry of the inner transformation's output or new state is
    NaN or infinite. A bad step returns zero updates and keeps the inner state as it was
    (``jnp.where`` inside jit: no host sync); `SkipIfNonfiniteState` counts bad steps and names
    the bad tasks. The inner transformation still runs on a bad step (its result is discarded),
    so it must terminate on non-finite input, as every `mtl.BALANCERS` method does.

    Args:
      inner: a transformation taking the Jacobian (leaves ``[K, ...]``), e.g.
        ``optax.chain(mtl.upgrad(), mtl.sum_tasks(), optax.adam(1e-3))``. Its output may have
        any structure (a gradient after `mtl.sum_tasks`).
      num_tasks: K (the size of ``bad_tasks``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; extra arguments are passed to ``inner``.

    Example:
      >>> import jax.numpy as jnp, optax, mtl_jax as mtl
      >>> tx = mtl.skip_if_nonfinite(optax.chain(mtl.sum_tasks(), optax.sgd(1.0)), 2)
      >>> params = {"w": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> jac = {"w": jnp.array([[1.0, 2.0, 3.0], [jnp.nan, 0.0, 0.0]])}
      >>> updates, state = tx.update(jac, state, params, task_losses=jnp.array([0.5, 1.0]))
      >>> updates["w"].tolist(), state.bad_tasks.tolist(), int(state.bad_steps)
      ([0.0, 0.0, 0.0], [False, True], 1)
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return SkipIfNonfiniteState(
            inner_state=inner.init(params),
            bad_steps=jnp.zeros((), jnp.int32),
            consecutive_bad_steps=jnp.zeros((), jnp.int32),
            bad_tasks=jnp.zeros((num_tasks,), bool),
        )

    def update_fn(updates, state, params=None, **extra_args):
        task_ok = task_finite(extra_args.get("task_losses"), updates)
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        ok = jnp.all(task_ok) & all_finite((new_updates, new_inner))
        new_updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), new_updates)
        bad = jnp.logical_not(ok).astype(jnp.int32)
        return new_updates, SkipIfNonfiniteState(
            inner_state=select_tree(ok, new_inner, state.inner_state),
            bad_steps=state.bad_steps + bad,
            consecutive_bad_steps=(state.consecutive_bad_steps + 1) * bad,
            bad_tasks=jnp.logical_not(task_ok),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
