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
import numpy as np
import optax

from mtl_jax import jacobian as jac_lib

PyTree = Any
WeightFn = Callable[[jax.Array], jax.Array]


class EmptyState(NamedTuple):
    """State of a stateless transform."""


def _empty_init(params):
    del params
    return EmptyState()


class TaskReducer(optax.GradientTransformationExtraArgs):
    """A task-axis reducer: Jacobian ``[K, ...]`` -> gradient ``r @ J`` for a fixed vector r.

    An ``optax.GradientTransformationExtraArgs`` that also exposes ``task_weights(k) -> [K]``
    (its r, a concrete NumPy vector, so that a fused reduction may specialize on it), so that
    `mtl.chain` can fuse it with a preceding `Reducible` method.
    """

    def __new__(cls, task_weights: Callable[[int], jax.Array]):
        def init_fn(params):
            del params
            return EmptyState()

        def update_fn(updates, state, params=None, **extra_args):
            del extra_args
            if not jax.tree.leaves(updates):  # an empty group of `shared_only` (no heads)
                return updates, state
            k = jac_lib.num_tasks(updates, params)
            return _reduce(updates, task_weights(k)), state

        self = super().__new__(cls, init_fn, update_fn)
        self.task_weights = task_weights
        return self


def sum_tasks() -> TaskReducer:
    """Reduces the task axis by summing: Jacobian ``[K, ...]`` -> gradient ``[...]``.

    ``optax.chain(mtl.sum_tasks(), opt)`` on the output of `mtl.value_and_jacobian` equals
    ``jax.grad`` of the summed losses (equal weighting, EW). After a balancer, prefer
    ``mtl.chain(balancer, mtl.sum_tasks(), opt)``: same result, and for balancers that
    re-combine rows (most of them) no K x P intermediate (see `mtl.chain`).

    References:
      Checked against: TorchJD ``Sum`` aggregator.
    """
    return TaskReducer(lambda k: np.ones((k,), np.float32))


def _reduce(jac, weights):
    # A contraction with a weight vector (tensordot), not `jnp.sum(axis=0)`: XLA's CPU reduction
    # over a leading axis of a [40, 4096, 256] leaf took 920 ms against 13 ms for the dot.
    return jac_lib.weighted_sum(jac, weights)


def mean_tasks() -> TaskReducer:
    """Reduces the task axis by averaging: Jacobian ``[K, ...]`` -> gradient ``[...]``.

    References:
      Checked against: TorchJD ``Mean`` aggregator.
    """
    return TaskReducer(lambda k: np.full((k,), 1.0 / k, np.float32))


# A fused reduction rule: (updates, state, params, r, **extra) -> (gradient, new_state), where
# gradient is ``r @ update(updates)`` for the task weights r ([K], NumPy) of the next reducer.
ReductionFn = Callable[..., tuple[PyTree, PyTree]]


class Reducible(optax.GradientTransformationExtraArgs):
    """A balancer that can also return its output already reduced over the task axis.

    An ``optax.GradientTransformationExtraArgs`` (its ``update`` maps a Jacobian to a Jacobian,
    as every balancer) that also exposes ``reduction(updates, state, params, r, **extra) ->
    (gradient, new_state)``: ``r @ update(updates)`` (same state) without forming the K x P
    output. `mtl.chain` calls it where the method is followed by `sum_tasks` / `mean_tasks`
    (``r``: their task weights, a NumPy [K]). On XLA CPU writing a fresh K x P array costs
    several reads of it (an in-place update of a donated one about one), so for the elementwise
    methods (GradDrop, TrimmedMean, FULLER's row scaling) the reduction is several times cheaper
    than the update (`benchmarks/methods.py`). `RowCombination` is the common case.

    Args:
      init: the optax init function.
      update: the optax update function (Jacobian -> Jacobian).
      reduction: the rule above; jit-safe, the same state as ``update``.
    """

    def __new__(
        cls,
        init: Callable[[PyTree], PyTree],
        update: Callable[..., tuple[PyTree, PyTree]],
        reduction: ReductionFn,
    ):
        self = super().__new__(cls, init, update)
        self.reduction = reduction
        return self


# A row-combination rule: (updates, state, params, **extra) -> (rows, c, new_state), where the
# method's output is ``c @ rows`` (c: [K_out, K]) or ``diag(c) @ rows`` (c: [K]).
CombinationFn = Callable[..., tuple[PyTree, jax.Array, PyTree]]


def apply_combination(rows: PyTree, c: jax.Array) -> PyTree:
    """``diag(c) @ rows`` for a vector c, ``c @ rows`` for a matrix c."""
    return jac_lib.scale_rows(rows, c) if c.ndim == 1 else jac_lib.combine_rows(rows, c)


class RowCombination(Reducible):
    """A balancer whose output is a re-combination of Jacobian rows: ``C @ J`` or ``diag(w) J``.

    A `Reducible` balancer that also exposes ``combination(updates, state, params, **extra) ->
    (rows, c, new_state)``: the rows the combination applies to (the input itself for a single
    method, an intermediate Jacobian for a chain ending in one, a Jacobian-shaped state for
    MoCo / DB-MTL) and ``c`` ([K] weights or a [K_out, K] matrix). Most methods are of this kind
    (every Gramian method, every loss-level method, PCGrad, GradVac); its reduction is the one
    contraction ``(r C) @ rows`` instead of writing and re-reading ``diag(w) J``.

    Args:
      init: the optax init function.
      combination: the rule above; jit-safe.
      update: optional ``update`` (default ``apply_combination`` of ``combination``'s result).
    """

    def __new__(
        cls,
        init: Callable[[PyTree], PyTree],
        combination: CombinationFn,
        update: Callable[..., tuple[PyTree, PyTree]] | None = None,
    ):
        if update is None:

            def update(updates, state, params=None, **extra_args):
                rows, c, new_state = combination(updates, state, params, **extra_args)
                return apply_combination(rows, c), new_state

        def reduction(updates, state, params, r, **extra_args):
            rows, c, new_state = combination(updates, state, params, **extra_args)
            r = jnp.asarray(r, c.dtype)
            return _reduce(rows, r @ c if c.ndim == 2 else r * c), new_state

        self = super().__new__(cls, init, update, reduction)
        self.combination = combination
        return self


def row_weighting(
    init: Callable[[PyTree], PyTree],
    weights: Callable[..., tuple[jax.Array, PyTree]],
) -> RowCombination:
    """A `RowCombination` from ``weights(updates, state, params, **extra) -> (c, new_state)``
    whose combination applies to the transform's own input rows."""

    def combination(updates, state, params=None, **extra_args):
        c, new_state = weights(updates, state, params, **extra_args)
        return updates, c, new_state

    return RowCombination(init, combination)


def chain(*transforms: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``optax.chain`` with a fused method + reduction.

    Same updates, same state (a tuple of the inner states, as ``optax.chain``), same extra-args
    forwarding. Where a `Reducible` method is directly followed by a `TaskReducer`
    (`sum_tasks`, `mean_tasks`), the pair becomes the method's fused ``reduction``: for a
    `RowCombination` (a method whose output is ``C @ J``) one contraction ``(r @ C) @ J``, for
    GradDrop / TrimmedMean a pass that sums the kept entries; the balanced K x P Jacobian is
    never written. On XLA CPU that write and re-read costs about as much as the Gramian itself
    at K=40 (`benchmarks/methods.py`)::

        tx = mtl.chain(mtl.upgrad(), mtl.sum_tasks(), optax.adam(1e-3))

    A chain whose last transform is a `RowCombination` (a `Reducible`) is itself one (so
    ``mtl.chain(mtl.chain(mtl.uncertainty_weighting(3), mtl.pcgrad()), mtl.sum_tasks())`` and
    ``shared_only(chain(...), labels)`` fuse too).

    Args:
      *transforms: optax transforms, Jacobian-level methods, reducers, optimizers.
    """
    txs = tuple(optax.with_extra_args_support(t) for t in transforms)
    n = len(txs)

    def fusable(i):
        return i + 1 < n and isinstance(txs[i], Reducible) and isinstance(txs[i + 1], TaskReducer)

    def init_fn(params):
        return tuple(t.init(params) for t in txs)

    def run(updates, state, params, extra_args, stop):
        new_state = list(state)
        i = 0
        while i < stop:
            # An empty group of `shared_only` has no task axis to reduce: run it plainly.
            if fusable(i) and i + 1 < stop and jax.tree.leaves(updates):
                r = txs[i + 1].task_weights(jac_lib.num_tasks(updates, params))
                updates, new_state[i] = txs[i].reduction(updates, state[i], params, r, **extra_args)
                i += 2
            else:
                updates, new_state[i] = txs[i].update(updates, state[i], params, **extra_args)
                i += 1
        return updates, new_state

    def update_fn(updates, state, params=None, **extra_args):
        updates, new_state = run(updates, state, params, extra_args, n)
        return updates, tuple(new_state)

    if n and isinstance(txs[-1], RowCombination):

        def combination(updates, state, params=None, **extra_args):
            rows, new_state = run(updates, state, params, extra_args, n - 1)
            rows, c, new_state[-1] = txs[-1].combination(rows, state[-1], params, **extra_args)
            return rows, c, tuple(new_state)

        return RowCombination(init_fn, combination, update_fn)
    if n and isinstance(txs[-1], Reducible):

        def reduction(updates, state, params, r, **extra_args):
            rows, new_state = run(updates, state, params, extra_args, n - 1)
            out, new_state[-1] = txs[-1].reduction(rows, state[-1], params, r, **extra_args)
            return out, tuple(new_state)

        return Reducible(init_fn, update_fn, reduction)
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scalarize(weights: Any) -> RowCombination:
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

    def weights(updates, state, params=None, **extra_args):
        del extra_args
        k = jac_lib.num_tasks(updates, params)
        if k != w.shape[0]:
            raise ValueError(f"scalarize: got {w.shape[0]} weights for a Jacobian with K={k}.")
        return w, state

    return row_weighting(_empty_init, weights)


def gramian_weighting(weight_fn: WeightFn) -> RowCombination:
    """A stateless Gramian-based method from a pure weighting function.

    ``weight_fn`` maps the K x K Gramian to K weights; the transform returns ``diag(w) J``.
    This is the shape of MGDA, IMTL-G, UPGrad's aggregated weights, etc., and how a user can
    turn their own Gramian-to-weights rule into a balancer.

    Args:
      weight_fn: ``[K, K] -> [K]``, jit-safe.
    """

    def weights(updates, state, params=None, **extra_args):
        del extra_args
        jac_lib.num_tasks(updates, params)
        return weight_fn(jac_lib.gramian(updates)), state

    return row_weighting(_empty_init, weights)


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
    heads = chain(task_specific, reducer) if task_specific is not None else reducer
    return optax.partition({SHARED: chain(balancer, reducer), TASK_SPECIFIC: heads}, param_labels)


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
