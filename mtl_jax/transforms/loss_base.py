"""Shared machinery of loss-level methods: weights from losses, in three interchangeable forms.

A loss-level method (uncertainty weighting, DWA, FAMO, ...) is defined once as a pure
`LossWeighting`: ``init() -> state`` and ``update(losses, state, **extra) -> (weights, state)``.
From it:

1. `from_loss_weighting` makes the optax transform (Jacobian in, rows scaled by the weights
   out), so the method chains with every Jacobian-level method::

       optax.chain(mtl.uncertainty_weighting(3), mtl.pcgrad(), mtl.sum_tasks(), optax.adam(1e-3))

2. `weighted_value_and_grad` is the loss-scalarizing path: one forward and ONE backward pass
   of ``sum_k stop_gradient(w_k) * loss_k`` -- no Jacobian at all, about the cost of an
   equal-weight step, which is the main appeal of these methods.

3. ``weighting.update`` itself is the pure weighting function, for any training loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_jax import jacobian as jac_lib
from mtl_jax.transforms import base

PyTree = Any


class LossWeighting(NamedTuple):
    """A pure loss-level weighting rule.

    Attributes:
      init: ``() -> state``, a pytree of arrays.
      update: ``(losses [K], state, **extra_args) -> (weights [K], new_state)``; must accept and
        ignore unknown keyword arguments, and must not differentiate through ``losses``.
      num_tasks: K, checked against the losses at trace time.
      name: the method's name, for error messages.
    """

    init: Callable[[], PyTree]
    update: Callable[..., tuple[jax.Array, PyTree]]
    num_tasks: int
    name: str


def _checked_update(weighting: LossWeighting, losses: Any, state: PyTree, extra: dict):
    losses = base.check_task_losses(weighting.name, losses, weighting.num_tasks)
    losses = jax.lax.stop_gradient(losses)
    return weighting.update(losses, state, **extra)


def from_loss_weighting(weighting: LossWeighting) -> optax.GradientTransformationExtraArgs:
    """The optax transform of a `LossWeighting`: Jacobian rows scaled by the weights.

    The update takes ``task_losses`` (and whatever else the method needs) as keyword extra args.
    """

    def init_fn(params):
        del params
        return weighting.init()

    def weights_fn(updates, state, params=None, *, task_losses=None, **extra_args):
        k = jac_lib.num_tasks(updates, params)
        base.check_num_tasks(weighting.name, weighting.num_tasks, k)
        weights, state = _checked_update(weighting, task_losses, state, extra_args)
        return weights, state

    return base.row_weighting(init_fn, weights_fn)


def weighted_value_and_grad(
    fun: Callable[..., Any],
    weighting: LossWeighting,
    argnums: int = 0,
    has_aux: bool = False,
) -> Callable[..., Any]:
    """Loss-scalarizing path: gradient of ``sum_k w_k * loss_k`` in one backward pass.

    The weights come from ``weighting.update`` on the (stop-gradient) losses of this same
    forward pass, so the step costs about as much as an equal-weight step.

    Args:
      fun: returns per-task losses [K] (or ``(losses, aux)`` with ``has_aux``).
      weighting: the method's `LossWeighting`.
      argnums: which positional argument to differentiate.
      has_aux: as in ``jax.value_and_grad``.

    Returns:
      A function ``(weighting_state, *args, **extra_args)`` returning
      ``((losses, weights, new_weighting_state[, aux]), grad)``. Keyword arguments are passed
      to ``weighting.update`` (e.g. validation losses), not to ``fun``.

    Example:
      >>> lw = mtl.uncertainty_weighting_weighting(num_tasks=2)  # doctest: +SKIP
      >>> vg = mtl.weighted_value_and_grad(loss_fn, lw)           # doctest: +SKIP
      >>> (losses, w, lw_state), grads = vg(lw_state, params, batch)  # doctest: +SKIP
    """

    def wrapped(state, *args, **extra_args):
        def scalar(*diff_and_rest):
            out = fun(*diff_and_rest)
            losses, aux = out if has_aux else (out, None)
            jac_lib.check_losses(losses)
            weights, new_state = _checked_update(weighting, losses, state, extra_args)
            weights = jax.lax.stop_gradient(weights)
            total = jnp.sum(weights.astype(losses.dtype) * losses)
            return total, (losses, weights, new_state, aux)

        (_, (losses, weights, new_state, aux)), grad = jax.value_and_grad(
            scalar, argnums=argnums, has_aux=True
        )(*args)
        out = (losses, weights, new_state, aux) if has_aux else (losses, weights, new_state)
        return out, grad

    return wrapped
