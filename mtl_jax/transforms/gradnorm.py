"""GradNorm: gradient normalization for adaptive loss balancing (Chen et al., ICML 2018)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_jax import jacobian as jac_lib
from mtl_jax.representation import split_value_and_grad
from mtl_jax.transforms import base
from mtl_jax.transforms.loss_base import LossWeighting, _checked_update, weighted_value_and_grad
from mtl_jax.transforms.loss_weighting import (
    check_num_tasks_arg,
    check_positive,
    current_epoch,
    libmtl_default_optimizer,
    safe_div,
)

PyTree = Any
_F32 = jnp.float32


def task_grad_norms(jac: PyTree, param_mask: PyTree | None = None) -> jax.Array:
    """Per-task gradient norms ``||J_k||`` over the parameters selected by ``param_mask``.

    Args:
      jac: Jacobian pytree (leaves ``[K, *param.shape]``).
      param_mask: ``None`` (all leaves) or a pytree of bools that is a prefix of ``jac``'s
        structure (e.g. ``{'encoder': {'last': True, 'rest': False}, 'heads': False}``).

    Returns:
      [K] float32 norms (accumulated in float32).
    """
    k = jac_lib.num_tasks(jac)
    total = jnp.zeros((k,), _F32)
    if param_mask is None:
        selected = jax.tree.leaves(jac)
    else:
        picked = jax.tree.map(lambda m, sub: jax.tree.leaves(sub) if m else [], param_mask, jac)
        selected = [
            leaf
            for group in jax.tree.leaves(picked, is_leaf=lambda x: isinstance(x, list))
            for leaf in group
        ]
    for leaf in selected:
        rows = jnp.reshape(leaf, (k, -1)).astype(_F32)
        total = total + jnp.sum(rows * rows, axis=1)
    return jnp.sqrt(total)


class GradNormState(NamedTuple):
    """State of `gradnorm`: weight logits, their optimizer state, initial (first-epoch) losses."""

    step: jax.Array  # int32, number of calls
    first_epoch: jax.Array  # int32, epoch of the first call
    init_loss_sum: jax.Array  # [K], sum of the first epoch's losses
    init_loss_count: jax.Array  # float32
    logits: jax.Array  # [K], LibMTL's ``loss_scale``; weights = K softmax(logits)
    opt_state: optax.OptState


def gradnorm_weighting(
    num_tasks: int,
    alpha: float = 1.5,
    optimizer: optax.GradientTransformation | None = None,
) -> LossWeighting:
    """GradNorm as a pure loss weighting; needs the per-task gradient norms as ``grad_norms``.

    Weights ``w = K softmax(p)`` (LibMTL's parametrization; they sum to K). During the first
    epoch the weights are 1 and the mean losses of that epoch are recorded as ``L(0)``; after
    it, each ``update`` returns ``w`` at the current ``p`` and takes one ``optimizer`` step on
    ``p`` with the gradient of GradNorm's loss
    ``sum_k |w_k n_k - mean(w n) r_k^alpha|`` (target held constant), where ``n_k`` are the
    unweighted per-task gradient norms over the chosen parameters and
    ``r_k = (L_k / L_k(0)) / mean_j (L_j / L_j(0))``.

    Epochs: pass ``epoch=`` at every call (as LibMTL); without it each call is one epoch, so
    the first call gives ``L(0)`` (the paper's initial loss) and GradNorm acts from call 2.

    Args:
      num_tasks: K.
      alpha: restoring-force strength (>= 0; paper and LibMTL: 1.5).
      optimizer: optax transform training ``p`` (default LibMTL's Adam(1e-4), L2 1e-5, the
        model optimizer that trains ``loss_scale`` in LibMTL).

    Returns:
      A `LossWeighting`; its state is `GradNormState`. Update extra args: ``grad_norms`` ([K],
      required: per-task gradient norms over the GradNorm parameter subset, e.g. the last
      shared layer, from `task_grad_norms` or K cheap backward passes to that layer) and
      ``epoch`` (optional).

    References:
      Chen, Badrinarayanan, Lee, Rabinovich. GradNorm: Gradient Normalization for Adaptive
      Loss Balancing in Deep Multitask Networks. ICML 2018.

      Checked against: LibMTL ``LibMTL/weighting/GradNorm.py`` (softmax parametrization,
      ``loss_scale`` init 1, EW during epoch 0, ``L(0)`` = epoch-0 mean training loss).
      Differences from the paper, which we follow LibMTL in: the paper learns the weights
      directly and renormalizes them to sum to K after each step (here ``K softmax(p)`` keeps
      them positive and summing to K), and takes ``L(0)`` from the first step (here: call
      without ``epoch``).
    """
    name = "gradnorm"
    k = check_num_tasks_arg(name, num_tasks)
    alpha = check_positive(name, "alpha", alpha, allow_zero=True)
    opt = optimizer if optimizer is not None else libmtl_default_optimizer()

    def init():
        p = jnp.ones((k,), _F32)
        i = jnp.zeros((), jnp.int32)
        z = jnp.zeros((k,), _F32)
        return GradNormState(i, i, z, jnp.zeros((), _F32), p, opt.init(p))

    def update(losses, state, *, grad_norms=None, epoch=None, **extra_args):
        del extra_args
        if grad_norms is None:
            raise ValueError(
                "gradnorm needs the per-task gradient norms: pass grad_norms=[K] (e.g. "
                "mtl.task_grad_norms(jac, param_mask)); the mtl.gradnorm transform does it."
            )
        norms = jnp.asarray(grad_norms, _F32)
        if norms.shape != (k,):
            raise ValueError(f"gradnorm: grad_norms has shape {norms.shape}, expected ({k},).")
        losses = losses.astype(_F32)
        e = current_epoch(epoch, state.step)
        first_epoch = jnp.where(state.step == 0, e, state.first_epoch)
        first = e == first_epoch
        init_sum = state.init_loss_sum + jnp.where(first, losses, 0.0)
        init_count = state.init_loss_count + first.astype(_F32)

        s = jax.nn.softmax(state.logits)
        w = k * s
        g = w * norms
        ratio = safe_div(losses, init_sum / jnp.maximum(init_count, 1.0))
        r = jnp.maximum(safe_div(ratio, jnp.mean(ratio)), 0.0)
        target = jnp.mean(g) * r**alpha
        grad_w = jnp.sign(g - target) * norms
        grad_p = k * s * (grad_w - jnp.dot(s, grad_w))
        updates, opt_state = opt.update(grad_p, state.opt_state, state.logits)
        stepped = optax.apply_updates(state.logits, updates)
        logits = jnp.where(first, state.logits, stepped)
        opt_state = jax.tree.map(lambda a, b: jnp.where(first, b, a), opt_state, state.opt_state)
        weights = jnp.where(first, jnp.ones((k,), _F32), w)
        new = GradNormState(state.step + 1, first_epoch, init_sum, init_count, logits, opt_state)
        return weights, new

    return LossWeighting(init, update, k, name)


def gradnorm(
    num_tasks: int,
    alpha: float = 1.5,
    optimizer: optax.GradientTransformation | None = None,
    param_mask: PyTree | Callable[[PyTree], PyTree] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """GradNorm: rows scaled by learned weights that equalize the tasks' training rates.

    The per-task gradient norms are read from the Jacobian restricted to ``param_mask``. The
    default (``None``) takes every parameter the transform sees, which is LibMTL's choice (all
    shared parameters: use it inside `shared_only`); the paper's choice is the last shared
    layer, which is also far cheaper in the one-backward path: pass a mask selecting it.

    Loss-only path (one backward pass of the weighted loss, no full Jacobian):
    `gradnorm_dense_value_and_grad` when the last shared layer is dense (norms from two
    B x B Gram matrices, about the cost of an equal-weight step), else
    `gradnorm_value_and_grad` (norms from a Jacobian w.r.t. the masked parameters).

    Args:
      num_tasks: K.
      alpha: restoring-force strength (paper and LibMTL: 1.5).
      optimizer: optax transform training the weight logits (default LibMTL's Adam(1e-4),
        L2 1e-5).
      param_mask: pytree of bools (a prefix of the parameter structure) selecting the
        parameters whose gradient norms GradNorm balances, or a function of ``params``
        returning it; ``None``: all of them.

    Update extra args: ``task_losses`` ([K], required), ``epoch`` (optional, see
    `gradnorm_weighting`).

    Example:
      >>> mask = {'encoder': {'conv1': False, 'last': True}, 'heads': False}
      >>> tx = optax.chain(mtl.gradnorm(3, param_mask=mask), mtl.sum_tasks(), optax.adam(1e-3))

    References:
      Chen et al. GradNorm. ICML 2018.

      Checked against: LibMTL ``LibMTL/weighting/GradNorm.py``.
    """
    lw = gradnorm_weighting(num_tasks, alpha, optimizer)

    def init_fn(params):
        del params
        return lw.init()

    def weights_fn(updates, state, params=None, *, task_losses=None, **extra_args):
        k = jac_lib.num_tasks(updates, params)
        base.check_num_tasks(lw.name, lw.num_tasks, k)
        mask = param_mask
        if callable(mask):
            if params is None:
                raise ValueError("gradnorm: a callable param_mask needs params in tx.update.")
            mask = mask(params)
        extra_args = dict(extra_args, grad_norms=task_grad_norms(updates, mask))
        weights, state = _checked_update(lw, task_losses, state, extra_args)
        return weights, state

    return base.row_weighting(init_fn, weights_fn)


def _full_mask(param_mask: PyTree, params: PyTree) -> list[bool]:
    """A prefix mask broadcast to one bool per leaf of ``params`` (flattening order)."""
    full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: bool(m), sub), param_mask, params)
    return jax.tree.leaves(full)


def gradnorm_value_and_grad(
    fun: Callable[..., Any],
    weighting: LossWeighting,
    param_mask: PyTree,
    argnums: int = 0,
    has_aux: bool = False,
) -> Callable[..., Any]:
    """GradNorm's loss-scalarizing path: subset gradient norms + one weighted backward pass.

    The per-task gradient norms over the parameters selected by ``param_mask`` (GradNorm's
    "last shared layer") come from a per-task Jacobian w.r.t. those parameters only, which
    back-propagates through the layers above them only (for the last shared layer: the task
    heads); the model gradient is then ``weighted_value_and_grad``'s single backward pass.
    Inside one ``jit`` XLA shares the two identical forward passes. The Jacobian costs K outer
    products of the layer's size; when the subset is one dense layer,
    `gradnorm_dense_value_and_grad` gets the same norms from two B x B Gram matrices instead
    (about the cost of an equal-weight step).

    Args:
      fun: returns per-task losses [K] (or ``(losses, aux)`` with ``has_aux``).
      weighting: a `gradnorm_weighting`.
      param_mask: pytree of bools, a prefix of the structure of ``args[argnums]``, selecting
        the GradNorm parameters (keep it small: the Jacobian is K x their size).
      argnums: which positional argument holds the parameters.
      has_aux: as in ``jax.value_and_grad``.

    Returns:
      ``(weighting_state, *args, **extra) -> ((losses, weights, new_state[, aux]), grad)``,
      as `weighted_value_and_grad`.

    Example:
      >>> lw = mtl.gradnorm_weighting(3)
      >>> mask = {'encoder': {'conv': False, 'dense': True}, 'heads': False}
      >>> vg = jax.jit(mtl.gradnorm_value_and_grad(loss_fn, lw, mask))
      >>> (losses, w, lw_state), grads = vg(lw_state, params, batch)
    """
    vg = weighted_value_and_grad(fun, weighting, argnums, has_aux)

    def wrapped(state, *args, **extra_args):
        params = args[argnums]
        leaves, treedef = jax.tree.flatten(params)
        selected = _full_mask(param_mask, params)
        if not any(selected):
            raise ValueError("gradnorm_value_and_grad: param_mask selects no parameter.")

        def subset_losses(sub):
            it = iter(sub)
            merged = [
                next(it) if m else jax.lax.stop_gradient(x)
                for x, m in zip(leaves, selected, strict=True)
            ]
            new_args = list(args)
            new_args[argnums] = jax.tree.unflatten(treedef, merged)
            out = fun(*new_args)
            return out[0] if has_aux else out

        sub = [x for x, m in zip(leaves, selected, strict=True) if m]
        _, jac = jac_lib.value_and_jacobian(subset_losses)(sub)
        norms = jax.lax.stop_gradient(task_grad_norms(jac))
        return vg(state, *args, grad_norms=norms, **extra_args)

    return wrapped


def dense_grad_norms(
    inputs: jax.Array, output_cotangents: jax.Array, bias: bool = True
) -> jax.Array:
    """Per-task gradient norms of a dense layer's parameters without forming its Jacobian.

    For ``y = x @ W + b`` (``x`` [..., in], ``W`` [in, out]) and ``g_k = dL_k/dy``, task k's
    gradient is ``(x^T g_k, sum g_k)`` over the flattened batch dims (N rows), so::

        ||dL_k/dW||^2 = <x x^T, g_k g_k^T>_F        ||dL_k/db||^2 = ||sum_n g_k[n]||^2

    which costs two N x N Gram products instead of K outer products of size in x out. When
    the outer products are cheaper (N^2 (in + K out) > K N in out, e.g. long sequences) they
    are used instead; the choice is static (from the shapes). Products run at
    ``Precision.HIGHEST`` and accumulate in float32.

    Args:
      inputs: ``x``, the layer's input, [..., in] (leading batch dims, e.g. [B, in] or
        [B, T, in], are flattened).
      output_cotangents: ``g``, the K rows of the Jacobian of the losses w.r.t. the layer's
        output ``y``, [K, ..., out] with the same batch dims as ``inputs`` (e.g.
        `mtl.jacobian_rows` of the heads' VJP).
      bias: whether the layer has a bias ``b`` (its norm is included).

    Returns:
      [K] float32 norms, equal to `task_grad_norms` of the per-task Jacobian w.r.t. ``(W, b)``.

    Example:
      >>> x, g = jnp.ones((8, 5)), jnp.ones((3, 8, 2))
      >>> mtl.dense_grad_norms(x, g).shape
      (3,)

    References:
      Chen et al. GradNorm. ICML 2018 (norms over the last shared layer).
      Goodfellow. Efficient Per-Example Gradient Computations. arXiv:1510.01799, 2015 (the
      same Gram identity for per-example gradient norms of a dense layer).
    """
    x, g = jnp.asarray(inputs), jnp.asarray(output_cotangents)
    if x.ndim < 1 or g.ndim != x.ndim + 1 or g.shape[1:-1] != x.shape[:-1]:
        raise ValueError(
            "dense_grad_norms: expected inputs [..., in] and output_cotangents [K, ..., out] with "
            f"the same batch dims; got inputs {x.shape} and output_cotangents {g.shape}."
        )
    k, d_in, d_out = g.shape[0], x.shape[-1], g.shape[-1]
    n = math.prod(x.shape[:-1])
    x = jnp.reshape(x, (n, d_in)).astype(_F32)
    g = jnp.reshape(g, (k, n, d_out)).astype(_F32)
    hi = jax.lax.Precision.HIGHEST
    if n * n * (d_in + k * d_out) <= k * n * d_in * d_out:
        gram_x = jnp.matmul(x, x.T, precision=hi)  # [N, N]
        sq = jnp.sum(jnp.einsum("nm,kmo->kno", gram_x, g, precision=hi) * g, axis=(1, 2))
    else:
        outer = jnp.einsum("ni,kno->kio", x, g, precision=hi)  # [K, in, out]
        sq = jnp.sum(outer * outer, axis=(1, 2))
    if bias:
        sq = sq + jnp.sum(jnp.sum(g, axis=1) ** 2, axis=-1)
    return jnp.sqrt(jnp.maximum(sq, 0.0))


def gradnorm_dense_value_and_grad(
    inputs_fn: Callable[..., jax.Array],
    dense_fn: Callable[[PyTree], tuple[jax.Array, jax.Array | None]],
    loss_fn: Callable[..., Any],
    weighting: LossWeighting,
    *,
    has_aux: bool = False,
    strategy: jac_lib.Strategy = "auto",
    chunk_size: int | None = None,
) -> Callable[..., Any]:
    """GradNorm's fast loss-scalarizing path when the last shared layer is dense.

    The model is split at its last shared dense layer ``y = x @ kernel + bias``: ``inputs_fn``
    gives ``x``, ``dense_fn`` selects ``(kernel, bias)`` from the parameters, and ``loss_fn``
    maps ``y`` to the K losses (the activation after the layer belongs to ``loss_fn``). Each
    step runs the model once, takes ``g_k = dL_k/dy`` with K backward passes through
    ``loss_fn`` only (`mtl.jacobian_rows`), gets GradNorm's norms over ``(kernel, bias)``
    from `dense_grad_norms` (two B x B Grams), updates the weighting, and back-propagates the
    weighted loss ``sum_k w_k L_k`` ONCE through the whole model. Same result as
    `gradnorm_value_and_grad` with a mask selecting ``(kernel, bias)``, without its
    K x (in x out) Jacobian: about the cost of an equal-weight step.

    Args:
      inputs_fn: ``(params, *args) -> x`` [..., in], the input of the dense layer (the shared
        layers below it).
      dense_fn: ``params -> (kernel [in, out], bias [out] or None)``, the dense layer's
        parameters (Flax / Haiku layout; for a PyTorch-style [out, in] weight return ``w.T``).
      loss_fn: ``(params, y, *args) -> losses [K]`` (or ``(losses, aux)`` with ``has_aux``),
        the rest of the model from the dense output ``y`` [..., out].
      weighting: a `gradnorm_weighting`.
      has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
      strategy: how the K VJPs through ``loss_fn`` are laid out (see `mtl.value_and_jacobian`).
      chunk_size: compute them ``chunk_size`` at a time.

    Returns:
      ``(weighting_state, params, *args, **extra) -> ((losses, weights, new_state[, aux]),
      grads)``, as `gradnorm_value_and_grad`; keyword arguments (``epoch=``) go to
      ``weighting.update``.

    Example:
      >>> params = {"enc": jnp.ones((3, 4)), "dense": {"w": jnp.ones((4, 4)), "b": jnp.zeros(4)},
      ...           "heads": jnp.ones((2, 4))}
      >>> inputs = lambda p, x: jnp.tanh(x @ p["enc"])
      >>> dense = lambda p: (p["dense"]["w"], p["dense"]["b"])
      >>> losses = lambda p, y, x: jnp.mean((jax.nn.relu(y) @ p["heads"].T) ** 2, axis=0)
      >>> lw = mtl.gradnorm_weighting(2)
      >>> vg = jax.jit(mtl.gradnorm_dense_value_and_grad(inputs, dense, losses, lw))
      >>> (l, w, lw_state), grads = vg(lw.init(), params, jnp.ones((5, 3)))
      >>> w.shape, grads["dense"]["w"].shape
      ((2,), (4, 4))

    References:
      Chen et al. GradNorm. ICML 2018.
      Checked against: `gradnorm_value_and_grad` with the dense layer as ``param_mask``
      (weights, state and gradients over consecutive steps, tests/test_loss_methods.py).
    """
    name = "gradnorm_dense_value_and_grad"

    def features(params, *args):
        x = inputs_fn(params, *args)
        kernel, bias = dense_fn(params)
        _check_dense(name, x, kernel, bias)
        y = jnp.matmul(x, kernel)
        return (y if bias is None else y + bias), x

    def wrapped(state, params, *args, **extra_args):
        has_bias = dense_fn(params)[1] is not None

        def weigh(out_cotangents, x, losses):
            norms = jax.lax.stop_gradient(dense_grad_norms(x, out_cotangents, bias=has_bias))
            return _checked_update(weighting, losses, state, dict(extra_args, grad_norms=norms))

        step = split_value_and_grad(
            features,
            loss_fn,
            weigh,
            has_aux=has_aux,
            strategy=strategy,
            chunk_size=chunk_size,
            name=name,
            weights_from="weighting.update",
        )
        losses, weights, grads, new_state, aux = step(params, *args)
        out = (losses, weights, new_state, aux) if has_aux else (losses, weights, new_state)
        return out, grads

    return wrapped


def _check_dense(name: str, x: Any, kernel: Any, bias: Any) -> None:
    x_shape, k_shape = jnp.shape(x), jnp.shape(kernel)
    ok = len(k_shape) == 2 and len(x_shape) >= 1 and x_shape[-1] == k_shape[0]
    if ok and bias is not None:
        ok = jnp.shape(bias) == (k_shape[1],)
    if not ok:
        b_shape = None if bias is None else jnp.shape(bias)
        raise ValueError(
            f"{name}: expected inputs_fn -> x [..., in] and dense_fn -> (kernel [in, out], "
            f"bias [out] or None); got x {x_shape}, kernel {k_shape}, bias {b_shape}."
        )
