"""Task-axis reducers, fixed scalarization, and the shared machinery of balancing transforms.

Every balancing method in mtl_jax is an ``optax.GradientTransformationExtraArgs`` whose update
maps a per-task Jacobian pytree (leaves ``[K, *param.shape]``) to a Jacobian pytree of the same
shapes and dtypes. A reducer (`sum_tasks`, `mean_tasks`) then removes the task axis and any
optax optimizer takes it from there::

    tx = optax.chain(mtl.upgrad(), mtl.sum_tasks(), optax.adam(1e-3))

Methods whose result is a single combined direction ``d = w^T J`` return ``diag(w) J`` (rows
scaled by the method's weights), so ``sum_tasks`` gives ``d`` and a later Jacobian-level method
in the chain sees the weighted task gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_jax import jacobian as jac_lib

PyTree = Any
WeightFn = Callable[[jax.Array], jax.Array]


class EmptyState(NamedTuple):
    """State of a stateless transform."""


def sum_tasks() -> optax.GradientTransformationExtraArgs:
    """Reduces the task axis by summing: Jacobian ``[K, ...]`` -> gradient ``[...]``.

    ``optax.chain(mtl.sum_tasks(), opt)`` on the output of `mtl.value_and_jacobian` equals
    ``jax.grad`` of the summed losses (equal weighting, EW).

    References:
      Checked against: TorchJD ``Sum`` aggregator.
    """

    def init_fn(params):
        del params
        return EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if not jax.tree.leaves(updates):  # an empty group of `shared_only` (a model w/o heads)
            return updates, state
        k = jac_lib.num_tasks(updates, params)
        return _reduce(updates, jnp.ones((k,), jnp.float32)), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _reduce(jac, weights):
    # A contraction with a weight vector (tensordot), not `jnp.sum(axis=0)`: XLA's CPU reduction
    # over a leading axis of a [40, 4096, 256] leaf took 920 ms against 13 ms for the dot.
    return jac_lib.weighted_sum(jac, weights)


def mean_tasks() -> optax.GradientTransformationExtraArgs:
    """Reduces the task axis by averaging: Jacobian ``[K, ...]`` -> gradient ``[...]``.

    References:
      Checked against: TorchJD ``Mean`` aggregator.
    """

    def init_fn(params):
        del params
        return EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if not jax.tree.leaves(updates):  # an empty group of `shared_only` (a model w/o heads)
            return updates, state
        k = jac_lib.num_tasks(updates, params)
        return _reduce(updates, jnp.full((k,), 1.0 / k, jnp.float32)), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scalarize(weights: Any) -> optax.GradientTransformationExtraArgs:
    """Fixed linear scalarization: row k of the Jacobian is multiplied by ``weights[k]``.

    With `sum_tasks` this gives the gradient of ``sum_k weights[k] * loss_k``: a fixed loss
    weighting, or a preference vector on the simplex when sweeping a Pareto front.

    Args:
      weights: [K] array-like of task weights.

    Raises:
      ValueError: at update time if K does not match the Jacobian's task axis.
    """
    w = jnp.asarray(weights, dtype=jnp.float32)
    if w.ndim != 1:
        raise ValueError(f"scalarize: weights must be a 1-D vector [K], got shape {w.shape}.")

    def init_fn(params):
        del params
        return EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        k = jac_lib.num_tasks(updates, params)
        if k != w.shape[0]:
            raise ValueError(f"scalarize: got {w.shape[0]} weights for a Jacobian with K={k}.")
        return jac_lib.scale_rows(updates, w), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gramian_weighting(weight_fn: WeightFn) -> optax.GradientTransformationExtraArgs:
    """A stateless Gramian-based method from a pure weighting function.

    ``weight_fn`` maps the K x K Gramian to K weights; the transform returns ``diag(w) J``.
    This is the shape of MGDA, IMTL-G, UPGrad's aggregated weights, etc., and how a user can
    turn their own Gramian-to-weights rule into a balancer.

    Args:
      weight_fn: ``[K, K] -> [K]``, jit-safe.
    """

    def init_fn(params):
        del params
        return EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        jac_lib.num_tasks(updates, params)
        weights = weight_fn(jac_lib.gramian(updates))
        return jac_lib.scale_rows(updates, weights), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


SHARED = "shared"
TASK_SPECIFIC = "task_specific"


def shared_only(
    balancer: optax.GradientTransformation,
    param_labels: PyTree | Callable[[PyTree], PyTree],
    *,
    task_specific: optax.GradientTransformation | None = None,
    reducer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Applies ``balancer`` to the shared parameters only; heads get their own task gradients.

    This is the setting of LibMTL and TorchJD's ``mtl_backward``: a task-specific parameter
    only receives its own task's gradient (its Jacobian has a single non-zero row), so
    balancing it is pointless and would only rescale it. The output is a gradient pytree
    (task axis reduced) ready for an optax optimizer::

        labels = {'encoder': 'shared', 'heads': 'task_specific'}   # same structure as params
        tx = optax.chain(mtl.shared_only(mtl.upgrad(), labels), optax.adam(1e-3))

    Built on ``optax.partition``.

    Args:
      balancer: a Jacobian -> Jacobian transform (or chain) for the shared parameters.
      param_labels: pytree of ``'shared'`` / ``'task_specific'`` labels with the structure of
        the parameters, or a function of the parameters returning it.
      task_specific: Jacobian -> Jacobian transform for the task-specific parameters (default
        identity, i.e. plain per-task gradients). Pass e.g. a loss-weighting method here if its
        weights should reach the heads too.
      reducer: the task-axis reducer for both groups (default `sum_tasks`).
    """
    reducer = reducer if reducer is not None else sum_tasks()
    heads = optax.chain(task_specific, reducer) if task_specific is not None else reducer
    return optax.partition(
        {SHARED: optax.chain(balancer, reducer), TASK_SPECIFIC: heads}, param_labels
    )


def label_by_path(
    params: PyTree, task_specific: Callable[[str], bool] | str | tuple[str, ...]
) -> PyTree:
    """Labels each parameter ``'shared'`` or ``'task_specific'`` from its path.

    Args:
      params: the parameter pytree.
      task_specific: a predicate on the path string (``jax.tree_util.keystr``), or one or more
        substrings: a leaf whose path contains any of them is task specific.
    """
    if isinstance(task_specific, str):
        task_specific = (task_specific,)
    if isinstance(task_specific, tuple):
        subs = task_specific
        pred = lambda path: any(s in path for s in subs)
    else:
        pred = task_specific
    return jax.tree_util.tree_map_with_path(
        lambda p, _: TASK_SPECIFIC if pred(jax.tree_util.keystr(p)) else SHARED, params
    )


def check_num_tasks(name: str, expected: int, got: int) -> None:
    """Trace-time check that a transform built for ``expected`` tasks sees ``got``."""
    if expected != got:
        raise ValueError(f"{name}: built with num_tasks={expected} but the Jacobian has K={got}.")


def check_task_losses(name: str, task_losses: Any, num_tasks: int) -> jax.Array:
    """Trace-time check of the ``task_losses`` extra arg: present and of shape [K]."""
    if task_losses is None:
        raise ValueError(
            f"{name} needs the per-task losses: call tx.update(jac, state, params, "
            "task_losses=losses) with the losses from mtl.value_and_jacobian."
        )
    task_losses = jnp.asarray(task_losses)
    if task_losses.shape != (num_tasks,):
        raise ValueError(
            f"{name}: task_losses has shape {task_losses.shape}, expected ({num_tasks},) "
            "(one loss per task)."
        )
    return task_losses
