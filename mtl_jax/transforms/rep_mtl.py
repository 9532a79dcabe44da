"""Rep-MTL: regularization of representation-level task saliency.

The *task saliency* of task k is the gradient of its loss with respect to the shared
representation ``z`` (shape ``[B, *features]``): ``S_k = dL_k / dz``, i.e. row k of the
representation-level Jacobian ``S`` (``[K, B, *features]``). Rep-MTL adds to the task losses
a regularizer on ``S`` with two terms:

* Task-specific Saliency Regulation (TSR): an entropy penalty on how each representation
  element's saliency is shared among the tasks, ``P_k(e) = a_k(e) / sum_j a_j(e)`` with
  ``a_k = |S_k|`` (averaged over channels), ``TSR = mean_e -sum_k P_k(e) log P_k(e) / log K``.
  Lower entropy keeps task-specific signals separate (less negative transfer).
* Cross-task Saliency Alignment (CSA): a sample-wise contrastive (InfoNCE) loss aligning
  the saliency patterns of the same sample across tasks: for every ordered pair of tasks
  (i, j), the cosine similarities between ``a_i(b)`` and ``a_j(b')`` over the batch, divided
  by a temperature, are classified to the positive ``b' = b``. It promotes complementary
  information sharing.

Because the regularizer depends on how the representation gradients change with the
parameters (second-order information), it is **not** a Jacobian -> Jacobian transform of the
parameter Jacobian. It is a loss term: `rep_mtl_loss` computes the saliency differentiably
inside the loss, and ``jax.grad`` of the result gives the exact regularized gradient (one
extra backward pass through the heads per task, differentiated once more).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mtl_jax import jacobian as jac_lib

PyTree = Any


def _saliency_maps(saliency: jax.Array, channel_axis: int | None) -> jax.Array:
    """|S| averaged over the channel axis: [K, B, *spatial] (float32)."""
    a = jnp.abs(saliency.astype(jnp.float32))
    if channel_axis is not None:
        a = jnp.mean(a, axis=channel_axis)
    return a


def tsr_penalty(saliency: jax.Array, *, channel_axis: int | None = -1, eps: float = 1e-12):
    """Task-specific Saliency Regulation: normalized entropy of the saliency shares, in [0, 1].

    Args:
      saliency: representation Jacobian ``[K, B, *features]``.
      channel_axis: feature axis averaged out before comparing tasks (None: none). Counted
        on the full ``[K, B, ...]`` array; -1 is the channel-last axis of a Flax feature map.
      eps: guard for elements with zero saliency in every task (they contribute 0).

    Returns:
      A scalar: 0 when every element is salient for a single task, 1 when all tasks share
      every element equally.
    """
    k = saliency.shape[0]
    if k < 2:
        return jnp.zeros((), jnp.float32)
    a = _saliency_maps(saliency, channel_axis)
    total = jnp.sum(a, axis=0, keepdims=True)
    p = a / jnp.maximum(total, eps)
    ent = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=0)
    return jnp.mean(ent) / jnp.log(k)


def csa_loss(
    saliency: jax.Array,
    *,
    temperature: float = 0.1,
    channel_axis: int | None = -1,
    eps: float = 1e-12,
) -> jax.Array:
    """Cross-task Saliency Alignment: sample-wise InfoNCE between the tasks' saliency maps.

    Args:
      saliency: representation Jacobian ``[K, B, *features]``.
      temperature: softmax temperature of the contrastive logits (> 0).
      channel_axis: as in `tsr_penalty`.
      eps: guard for zero-norm saliency maps.

    Returns:
      A scalar, the mean over ordered task pairs (i != j) and samples of
      ``-log softmax_b'(cos(a_i(b), a_j(b')) / temperature)[b]``. Zero when K < 2.
    """
    k, b = saliency.shape[0], saliency.shape[1]
    if k < 2:
        return jnp.zeros((), jnp.float32)
    a = jnp.reshape(_saliency_maps(saliency, channel_axis), (k, b, -1))
    a = a - jnp.mean(a, axis=-1, keepdims=True)
    v = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), eps)
    sims = jnp.einsum("ibd,jcd->ijbc", v, v) / temperature  # [K, K, B, B]
    logp = jax.nn.log_softmax(sims, axis=-1)
    diag = jnp.diagonal(logp, axis1=2, axis2=3)  # [K, K, B]
    off = 1.0 - jnp.eye(k)
    return -jnp.sum(jnp.mean(diag, axis=-1) * off) / (k * (k - 1))


def rep_mtl_regularizer(
    saliency: jax.Array,
    *,
    tsr_weight: float = 1.0,
    csa_weight: float = 1.0,
    temperature: float = 0.1,
    channel_axis: int | None = -1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The Rep-MTL regularizer ``tsr_weight * TSR + csa_weight * CSA`` of a saliency tensor.

    Differentiable with respect to ``saliency``; its gradient (``jax.grad``) is how the
    regularizer acts on the representation gradients.

    Args:
      saliency: representation Jacobian ``[K, B, *features]`` (e.g. from
        `mtl.jacobian_rows` on the heads' VJP, or `rep_mtl_loss`).
      tsr_weight: weight of `tsr_penalty` (>= 0).
      csa_weight: weight of `csa_loss` (>= 0).
      temperature: CSA temperature (> 0).
      channel_axis: as in `tsr_penalty`.

    Returns:
      ``(value, {'tsr': ..., 'csa': ...})``.
    """
    _check(tsr_weight, csa_weight, temperature)
    tsr = tsr_penalty(saliency, channel_axis=channel_axis)
    csa = csa_loss(saliency, temperature=temperature, channel_axis=channel_axis)
    return tsr_weight * tsr + csa_weight * csa, {"tsr": tsr, "csa": csa}


def _check(tsr_weight, csa_weight, temperature):
    if not tsr_weight >= 0:
        raise ValueError(f"rep_mtl: tsr_weight must be >= 0, got {tsr_weight}.")
    if not csa_weight >= 0:
        raise ValueError(f"rep_mtl: csa_weight must be >= 0, got {csa_weight}.")
    if not temperature > 0:
        raise ValueError(f"rep_mtl: temperature must be > 0, got {temperature}.")


def rep_mtl_loss(
    heads_fn: Callable[[jax.Array], jax.Array],
    features: jax.Array,
    *,
    tsr_weight: float = 1.0,
    csa_weight: float = 1.0,
    temperature: float = 0.1,
    channel_axis: int | None = -1,
    task_weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Rep-MTL training loss: ``sum_k w_k L_k + regularizer(dL/dz)``, to be differentiated.

    Call it inside the loss function, after the shared encoder, with the heads as a function
    of the shared features; ``jax.grad`` then differentiates through the saliency (second
    order), giving the regularizer's exact effect on the encoder and the heads::

        def loss_fn(params, batch):
            z = encoder(params['encoder'], batch['x'])                     # [B, ...]
            heads = lambda z: task_losses(params['heads'], z, batch)       # [K]
            return mtl.rep_mtl_loss(heads, z)

        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)

    To pair Rep-MTL with a balancing method, balance the Jacobian of ``parts['losses']`` and
    add the gradient of ``parts['regularizer']`` (computed the same way) to the result.

    Args:
      heads_fn: ``z -> [K]`` per-task losses (closes over head parameters and targets).
      features: the shared representation ``z``, ``[B, *features]`` (batch first).
      tsr_weight: weight of the entropy (TSR) term.
      csa_weight: weight of the alignment (CSA) term.
      temperature: CSA temperature.
      channel_axis: feature axis of the saliency averaged out, counted on ``[K, B, ...]``
        (-1: channel-last feature maps; None: treat every feature as an element).
      task_weights: optional [K] weights of the task losses (default equal weighting, 1).

    Returns:
      ``(total, parts)`` with ``parts = {'losses': [K], 'regularizer', 'tsr', 'csa'}``.

    References:
      Wang, Li, Xu. Rep-MTL: Unleashing the Power of Representation-level Task Saliency for
      Multi-Task Learning, ICCV 2025.

      Checked against: paper (the authors' repository github.com/Jacky1128/Rep-MTL holds only
      a README; code "being cleaned"). The exact normalizations (saliency share by sum,
      entropy divided by log K, cosine InfoNCE with mean-centred maps) are mtl_jax choices.
    """
    _check(tsr_weight, csa_weight, temperature)
    losses, vjp_fn = jax.vjp(heads_fn, features)
    jac_lib.check_losses(losses)
    k = losses.shape[0]
    saliency = jac_lib.jacobian_rows(lambda c: vjp_fn(c)[0], k, losses.dtype, "vmap")
    reg, terms = rep_mtl_regularizer(
        saliency,
        tsr_weight=tsr_weight,
        csa_weight=csa_weight,
        temperature=temperature,
        channel_axis=channel_axis,
    )
    w = jnp.ones((k,), losses.dtype) if task_weights is None else jnp.asarray(task_weights)
    total = jnp.sum(w * losses) + reg.astype(losses.dtype)
    return total, {"losses": losses, "regularizer": reg, **terms}
