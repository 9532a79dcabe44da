"""Representation-level balancing (MGDA-UB): weights from the Jacobian w.r.t. shared features.

Sener & Koltun's MGDA-UB replaces the Jacobian w.r.t. the shared parameters by the Jacobian
w.r.t. the shared representation ``z = encoder(x)``: K backward passes through the task heads
only (cheap), a K x K Gramian, the weights of any Gramian-based method, and then ONE ordinary
backward pass of the weighted loss ``sum_k w_k L_k`` through heads and encoder. The cost is
about that of an equal-weight step, even for many tasks (FACTS.md: 1.04x at K=2, 1.28x at K=40).

Any Gramian-to-weights function works: `mtl.mgda_weights` (MGDA-UB), `mtl.upgrad_weights`,
`mtl.dualproj_weights`, `mtl.imtl_g_weights`, `mtl.aligned_mtl_weights`,
`mtl.conflict_free_weights`, or your own.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax import jacobian as jac_lib

PyTree = Any


class RepresentationStep(NamedTuple):
    """Output of `representation_value_and_grad`.

    Attributes:
      losses: [K] per-task losses.
      weights: [K] task weights from ``weight_fn`` (no gradient flows through them).
      grads: gradient of ``sum_k weights[k] * losses[k]`` w.r.t. the parameters.
      gramian: [K, K] Gramian of the representation-level Jacobian.
      aux: auxiliary output of ``loss_fn`` (``None`` unless ``has_aux=True``).
    """

    losses: jax.Array
    weights: jax.Array
    grads: PyTree
    gramian: jax.Array
    aux: Any = None


def _accepts_task_losses(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "task_losses" or p.kind is p.VAR_KEYWORD for p in params)


def representation_value_and_grad(
    features_fn: Callable[..., PyTree],
    loss_fn: Callable[..., Any],
    weight_fn: Callable[..., jax.Array],
    *,
    has_aux: bool = False,
    strategy: jac_lib.Strategy = "auto",
    chunk_size: int | None = None,
) -> Callable[..., RepresentationStep]:
    """Balances tasks with the Jacobian w.r.t. the shared representation (MGDA-UB style).

    Builds ``step(params, *args) -> RepresentationStep`` which

    1. runs the shared encoder once: ``z = features_fn(params, *args)`` (kept for one VJP);
    2. evaluates the heads ``losses = loss_fn(params, z, *args)`` (shape [K]);
    3. computes the representation-level Jacobian ``dL_k/dz`` with K backward passes through
       the heads only (`mtl.jacobian_rows`), and its K x K Gramian;
    4. gets the weights ``w = weight_fn(G)`` (``weight_fn(G, task_losses=losses)`` when
       ``weight_fn`` takes a ``task_losses`` keyword, e.g. `mtl.mgda_weights` with
       ``'loss'`` normalization);
    5. takes one backward pass of ``sum_k w_k L_k`` through heads and encoder.

    Feed ``grads`` to any optax optimizer (no balancing transform needed: the balancing is in
    the weights). Heads receive ``w_k`` times their task's gradient, as in LibMTL's
    ``rep_grad`` mode.

    Args:
      features_fn: ``(params, *args) -> z``, the shared encoder (z any pytree of arrays).
      loss_fn: ``(params, z, *args) -> losses [K]`` (or ``(losses, aux)`` with ``has_aux``).
      weight_fn: Gramian ``[K, K]`` -> weights ``[K]``, jit-safe.
      has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
      strategy: how the K head VJPs are laid out (see `mtl.value_and_jacobian`).
      chunk_size: compute the K rows ``chunk_size`` at a time.

    Returns:
      ``step(params, *args) -> RepresentationStep(losses, weights, grads, gramian, aux)``.

    Example:
      >>> import functools, jax, jax.numpy as jnp, mtl_jax as mtl
      >>> params = {"enc": jnp.ones((3, 4)), "heads": jnp.ones((2, 4))}
      >>> features = lambda p, x: jnp.tanh(x @ p["enc"])
      >>> losses = lambda p, z, x: jnp.mean((z @ p["heads"].T) ** 2, axis=0)
      >>> step = mtl.representation_value_and_grad(features, losses, mtl.mgda_weights)
      >>> out = jax.jit(step)(params, jnp.ones((5, 3)))
      >>> out.weights.shape, out.grads["enc"].shape
      ((2,), (3, 4))

    References:
      Sener, Koltun. Multi-Task Learning as Multi-Objective Optimization. NeurIPS 2018
      (MGDA-UB, Section 3.3).
      Checked against: LibMTL ``weighting/abstract_weighting.py`` (``rep_grad=True``: weights
      from the representation gradients, then one backward of the weighted representation
      gradients) -- equal to ours except LibMTL's MGDA drops the normalizers in that path.
    """
    pass_losses = _accepts_task_losses(weight_fn)

    def weigh(rep_jac, _, losses):
        gram = jac_lib.gramian(rep_jac)
        weights = weight_fn(gram, task_losses=losses) if pass_losses else weight_fn(gram)
        return weights, gram

    def features(params, *args):
        return features_fn(params, *args), None

    split = split_value_and_grad(
        features,
        loss_fn,
        weigh,
        has_aux=has_aux,
        strategy=strategy,
        chunk_size=chunk_size,
        name="representation_value_and_grad",
        weights_from="weight_fn",
    )

    def step(params: PyTree, *args: Any) -> RepresentationStep:
        losses, weights, grads, gram, aux = split(params, *args)
        return RepresentationStep(losses, weights, grads, gram, aux)

    return step


def split_value_and_grad(
    features_fn: Callable[..., tuple[PyTree, Any]],
    loss_fn: Callable[..., Any],
    weigh: Callable[[PyTree, Any, jax.Array], tuple[jax.Array, Any]],
    *,
    has_aux: bool,
    strategy: jac_lib.Strategy,
    chunk_size: int | None,
    name: str,
    weights_from: str,
) -> Callable[..., tuple[jax.Array, jax.Array, PyTree, Any, Any]]:
    """The engine of the split-model paths: weights from a cut's Jacobian, then one backward.

    Shared by `representation_value_and_grad` and `mtl.gradnorm_dense_value_and_grad`.
    ``step(params, *args)`` runs ``(z, side) = features_fn(params, *args)`` and
    ``loss_fn(params, z, *args)`` once each (kept for their VJPs), takes the Jacobian
    ``dL_k/dz`` with K backward passes through ``loss_fn`` only, calls
    ``weigh(jac_z, side, stop_gradient(losses)) -> (weights [K], extra)`` and back-propagates
    ``sum_k w_k L_k`` once through both functions. ``side`` (e.g. the input of a layer inside
    ``features_fn``) is not differentiated.

    Returns:
      ``step(params, *args) -> (losses, weights, grads, extra, aux)``; ``name`` and
      ``weights_from`` (what produced the weights) label its errors.
    """

    def step(params: PyTree, *args: Any):
        feats, enc_vjp, side = jax.vjp(lambda p: features_fn(p, *args), params, has_aux=True)

        def heads(p, z):
            out = loss_fn(p, z, *args)
            if has_aux:
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise ValueError(
                        f"{name}(has_aux=True): loss_fn must return (losses, aux); got "
                        f"{type(out).__name__}."
                    )
                losses, aux = out
            else:
                losses, aux = out, None
            jac_lib.check_losses(losses)
            return losses, aux

        losses, head_vjp, aux = jax.vjp(heads, params, feats, has_aux=True)
        k = losses.shape[0]
        rep_jac = jac_lib.jacobian_rows(
            lambda ct: head_vjp(ct)[1], k, losses.dtype, strategy, chunk_size
        )
        weights, extra = weigh(rep_jac, side, jax.lax.stop_gradient(losses))
        weights = jax.lax.stop_gradient(jnp.asarray(weights))
        if weights.shape != (k,):
            raise ValueError(
                f"{name}: {weights_from} returned shape {weights.shape}, expected ({k},)."
            )
        g_heads, g_feats = head_vjp(weights.astype(losses.dtype))
        (g_enc,) = enc_vjp(g_feats)
        grads = jax.tree.map(jnp.add, g_heads, g_enc)
        return losses, weights, grads, extra, aux

    return step
