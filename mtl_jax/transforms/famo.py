"""FAMO: Fast Adaptive Multitask Optimization (Liu et al., NeurIPS 2023)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_jax.transforms.loss_base import LossWeighting, from_loss_weighting
from mtl_jax.transforms.loss_weighting import check_num_tasks_arg, check_positive, positive

_F32 = jnp.float32


class FAMOState(NamedTuple):
    """State of `famo`: task logits, their optimizer state and the previous step's losses."""

    logits: jax.Array  # [K] float32, FAMO's ``w``
    opt_state: optax.OptState
    prev_losses: jax.Array  # [K] float32
    has_prev: jax.Array  # bool scalar


def famo_weighting(
    num_tasks: int,
    w_lr: float = 0.025,
    gamma: float = 1e-3,
    min_losses: jax.Array | float = 0.0,
    eps: float = 1e-8,
    optimizer: optax.GradientTransformation | None = None,
) -> LossWeighting:
    """FAMO as a pure loss weighting.

    The weighted objective is ``sum_k z_k log(D_k) / c`` with ``z = softmax(w)``,
    ``D = L - min_losses + eps`` and ``c = sum_k z_k / D_k`` (held constant), so the weights
    on the raw losses are ``w_k = (z_k / D_k) / sum_j (z_j / D_j)`` (they sum to 1).

    The logits ``w`` are learned from the log-loss decrease: the authors call
    ``update(curr_losses)`` after each model step with the losses re-evaluated after the step,
    and take one Adam step on ``w`` along the gradient of ``softmax(w)`` contracted with
    ``delta = log D(prev) - log D(curr)``. Here a single ``update(losses)`` per step does it
    with a one-step offset: the call at step t first updates ``w`` with ``prev = losses of
    step t-1`` and ``curr = losses of step t`` (the current batch, after the step t-1 update,
    instead of a second forward pass on batch t-1), then returns the weights for step t.
    Feeding the re-evaluated losses as the next call's ``losses`` reproduces the authors'
    sequence exactly; the first call only records the losses.

    Args:
      num_tasks: K.
      w_lr: learning rate of the logits (LibMTL and authors: 0.025).
      gamma: L2 weight decay of the logits, as ``torch.optim.Adam(weight_decay=gamma)``
        (LibMTL default 1e-3; the authors' scripts use 1e-3 to 1e-2 depending on the dataset).
      min_losses: per-task lower bounds of the losses (scalar or [K]; authors: 0).
      eps: the reference's 1e-8; ``D = max(L - min_losses, 0) + eps`` so losses at or below
        their minimum give finite weights.
      optimizer: overrides the default ``chain(add_decayed_weights(gamma), adam(w_lr))``.

    Returns:
      A `LossWeighting`; its state is `FAMOState`.

    References:
      Liu, Liu, Jin, Stone, Liu. FAMO: Fast Adaptive Multitask Optimization. NeurIPS 2023.

      Checked against: LibMTL ``LibMTL/weighting/FAMO.py`` + its trainer's ``update_w`` call,
      and the authors' ``famo.py`` (github.com/Cranial-XIX/FAMO); difference: the one-step
      offset above.
    """
    name = "famo"
    k = check_num_tasks_arg(name, num_tasks)
    w_lr = check_positive(name, "w_lr", w_lr)
    gamma = check_positive(name, "gamma", gamma, allow_zero=True)
    eps = check_positive(name, "eps", eps)
    mins = jnp.broadcast_to(jnp.asarray(min_losses, _F32), (k,))
    if optimizer is None:
        optimizer = optax.chain(optax.add_decayed_weights(gamma), optax.adam(w_lr))

    def init():
        w = jnp.zeros((k,), _F32)
        z = jnp.zeros((k,), _F32)
        return FAMOState(w, optimizer.init(w), z, jnp.zeros((), bool))

    def update(losses, state, **extra_args):
        del extra_args
        losses = losses.astype(_F32)
        log_d = jnp.log(positive(losses - mins, eps))
        delta = jnp.log(positive(state.prev_losses - mins, eps)) - log_d
        z = jax.nn.softmax(state.logits)
        grad = z * (delta - jnp.dot(z, delta))  # (d softmax / d w)^T delta
        updates, opt_state = optimizer.update(grad, state.opt_state, state.logits)
        stepped = optax.apply_updates(state.logits, updates)
        logits = jnp.where(state.has_prev, stepped, state.logits)
        opt_state = jax.tree.map(
            lambda new, old: jnp.where(state.has_prev, new, old), opt_state, state.opt_state
        )
        # z_k / D_k normalized, via logs: finite however small D gets.
        weights = jax.nn.softmax(jax.nn.log_softmax(logits) - log_d)
        return weights, FAMOState(logits, opt_state, losses, jnp.ones((), bool))

    return LossWeighting(init, update, k, name)


def famo(
    num_tasks: int,
    w_lr: float = 0.025,
    gamma: float = 1e-3,
    min_losses: jax.Array | float = 0.0,
    eps: float = 1e-8,
    optimizer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
    """FAMO: rows scaled by ``(z_k / D_k) / sum_j (z_j / D_j)``, logits ``z`` learned online.

    See `famo_weighting` for the rule, the one-step offset and the arguments. Update extra
    args: ``task_losses`` ([K], required). FAMO's appeal is its O(1) cost: prefer the
    one-backward path ``mtl.weighted_value_and_grad(loss_fn, mtl.famo_weighting(K))``.

    Example:
      >>> tx = optax.chain(mtl.famo(3), mtl.sum_tasks(), optax.adam(1e-3))

    References:
      Liu et al. FAMO: Fast Adaptive Multitask Optimization. NeurIPS 2023.

      Checked against: LibMTL ``LibMTL/weighting/FAMO.py``, authors' ``famo.py``.
    """
    return from_loss_weighting(famo_weighting(num_tasks, w_lr, gamma, min_losses, eps, optimizer))
