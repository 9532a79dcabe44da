"""GradDrop (Gradient Sign Dropout): elementwise, leaf-wise sign-consistency masks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax import jacobian as jac_lib
from mtl_jax.transforms import base

PyTree = Any


class GradDropState(NamedTuple):
    """State of `graddrop`: the PRNG key for the uniform draws."""

    key: jax.Array


def _identity(p: jax.Array) -> jax.Array:
    return p


def graddrop_uniforms(key: jax.Array, jac: PyTree) -> PyTree:
    """The uniform draws GradDrop uses for ``jac``: one ``U(0, 1)`` per parameter entry.

    Leaf ``n`` (in ``jax.tree.leaves`` order) draws from ``jax.random.fold_in(key, n)``, float32,
    with the leaf's parameter shape (no task axis).
    """
    leaves, treedef = jax.tree.flatten(jac)
    draws = [
        jax.random.uniform(jax.random.fold_in(key, n), leaf.shape[1:], jnp.float32)
        for n, leaf in enumerate(leaves)
    ]
    return jax.tree.unflatten(treedef, draws)


def _sign_sums(x: jax.Array, coeffs: np.ndarray | None = None) -> tuple[jax.Array, jax.Array]:
    """Per entry, ``sum_k c_k max(J_k, 0)`` and ``sum_k c_k min(J_k, 0)`` (c = 1 by default).

    Row chains over the task axis (`jac_lib.reduce_rows`), which XLA fuses into one pass over
    the leaf (a reduction over the leading axis is slow on XLA CPU).
    """
    return (
        jac_lib.reduce_rows(x, lambda row: jnp.maximum(row, 0.0), weights=coeffs),
        jac_lib.reduce_rows(x, lambda row: jnp.minimum(row, 0.0), weights=coeffs),
    )


def _sign_choice(pos, neg, uniform, f):
    """The drawn sign per entry: (keep positives, keep negatives), from the sign sums."""
    total, mass = pos + neg, pos - neg
    # An all-zero column has no sign: TorchJD gets NaN there and keeps nothing (the rows are 0).
    purity = 0.5 * (1.0 + total / jnp.where(mass > 0, mass, 1.0))
    fp = f(purity)
    u = uniform.astype(total.dtype)
    return fp > u, fp < u


def graddrop_rows(
    rows: jax.Array,
    uniform: jax.Array,
    leak: np.ndarray,
    f: Callable[[jax.Array], jax.Array] = _identity,
) -> jax.Array:
    """GradDrop on one Jacobian leaf ``[K, ...]`` given its uniform draws ``[...]``.

    ``P = (1 + sum_k J_k / sum_k |J_k|) / 2`` is the positive-sign purity of each entry; an
    entry of task k is kept when its sign is the one drawn (positive if ``f(P) > U``,
    negative if ``f(P) < U``), and row k becomes ``(leak_k + (1 - leak_k) M_k) J_k``.

    Returns:
      ``[K, ...]`` masked rows, in float32 or wider.
    """
    dtype = jnp.result_type(rows.dtype, jnp.float32)
    x = rows.astype(dtype)
    keep_pos, keep_neg = _sign_choice(*_sign_sums(x), uniform, f)
    keep = (keep_pos & (x > 0)) | (keep_neg & (x < 0))
    lk = jnp.reshape(jnp.asarray(leak, dtype), (-1,) + (1,) * (x.ndim - 1))
    return (lk + (1.0 - lk) * keep.astype(dtype)) * x


def graddrop_reduced(
    rows: jax.Array,
    uniform: jax.Array,
    leak: np.ndarray,
    r: np.ndarray,
    f: Callable[[jax.Array], jax.Array] = _identity,
) -> jax.Array:
    """``r @ graddrop_rows(rows, uniform, leak, f)`` without forming the masked rows.

    Row k contributes ``r_k leak_k J_k`` plus ``r_k (1 - leak_k)`` times its entries of the drawn
    sign, so the sum needs only per-entry sums of the positive and the negative parts: one
    fused pass over the leaf (two when r or the leak differ across tasks), against a pass, a
    K x P write and a re-read for the masked rows and the reduction.
    """
    dtype = jnp.result_type(rows.dtype, jnp.float32)
    x = rows.astype(dtype)
    pos, neg = _sign_sums(x)
    keep_pos, keep_neg = _sign_choice(pos, neg, uniform, f)
    kept, lin = r * (1.0 - leak), r * leak
    if not np.all(kept == kept[0]):
        pos, neg = _sign_sums(x, kept)
    elif kept[0] != 1.0:
        pos, neg = kept[0] * pos, kept[0] * neg
    out = jnp.where(keep_pos, pos, 0.0) + jnp.where(keep_neg, neg, 0.0)
    if np.any(lin != 0.0):
        out = out + jac_lib.weighted_sum(x, lin)
    return out


def graddrop(
    leak: float | Sequence[float] | jax.Array | None = None,
    f: Callable[[jax.Array], jax.Array] = _identity,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """GradDrop: keep, per parameter entry, only the task gradients of one randomly drawn sign.

    Works elementwise on every Jacobian leaf (no Gramian): for each entry the sign purity
    ``P = (1 + sum_k g_k / sum_k |g_k|) / 2`` is computed, a uniform ``U`` is drawn, and the
    task gradients whose sign is the chosen one (positive if ``f(P) > U``) are kept; the
    others are multiplied by ``leak_k``. Returns the masked task gradients (a Jacobian), so
    ``sum_tasks`` gives the GradDrop update. The uniforms come from the key in the state
    (`graddrop_uniforms`), fresh every step.

    This is GradDrop applied to the parameter Jacobian, as TorchJD does. The paper and LibMTL
    apply it to the gradients w.r.t. a shared representation (LibMTL multiplies them by the
    sign of the representation and sums over the batch before computing ``P``); to do that
    here, compute the representation-level Jacobian (`mtl.jacobian_rows`), transform it with
    this method, and backpropagate the sum of the masked rows through the encoder.

    Args:
      leak: how much of each task's gradient always passes: a float (all tasks) or a [K]
        vector in [0, 1]; default no leak (TorchJD's ``leak=None``; LibMTL's ``leak=0.0``).
      f: monotonically increasing function applied to ``P`` (default identity), jit-safe.
      seed: seed of the PRNG key for the uniform draws.

    Returns:
      A `Reducible` ``optax.GradientTransformationExtraArgs`` mapping a Jacobian to a Jacobian;
      in ``mtl.chain(mtl.graddrop(), mtl.sum_tasks())`` the kept entries are summed in one pass
      (`graddrop_reduced`), without writing the masked Jacobian.

    Example:
      >>> import jax.numpy as jnp, optax, mtl_jax as mtl
      >>> jac = jnp.array([[1.0, 2.0], [3.0, -2.0]])
      >>> tx = optax.chain(mtl.graddrop(), mtl.sum_tasks())
      >>> d, _ = tx.update(jac, tx.init(jnp.zeros(2)))
      >>> float(d[0])   # both signs positive in column 0: always kept
      4.0

    References:
      Chen, Ngiam, Huang, Luong, Kretzschmar, Chai, Anguelov. Just Pick a Sign: Optimizing
      Deep Multitask Models with Gradient Sign Dropout. NeurIPS 2020.

      Checked against: TorchJD 0.18 ``GradDrop`` (``aggregation/_graddrop.py``), same uniforms
      injected: identical. Deliberate difference: an all-zero entry (``sum |g_k| = 0``) gets
      purity 1/2 instead of TorchJD's NaN; the output there is zero either way.
    """
    if leak is not None:
        leak_arr = np.asarray(leak, np.float32)
        if leak_arr.ndim > 1:
            raise ValueError(
                f"graddrop: leak must be a float or a [K] vector, got {leak_arr.shape}."
            )
        if np.any((leak_arr < 0) | (leak_arr > 1)) or not np.all(np.isfinite(leak_arr)):
            raise ValueError("graddrop: leak values must be in [0, 1].")
    else:
        leak_arr = None
    if not callable(f):
        raise ValueError("graddrop: f must be a callable (a monotonically increasing function).")

    def init_fn(params):
        del params
        return GradDropState(key=jax.random.key(seed))

    def draws(updates, state, params):
        """The [K] leak (NumPy), the uniforms of this step and the next state."""
        k = jac_lib.num_tasks(updates, params)
        if leak_arr is None:
            lk = np.zeros((k,), np.float32)
        elif leak_arr.ndim == 0:
            lk = np.full((k,), leak_arr, np.float32)
        elif leak_arr.shape[0] != k:
            raise ValueError(f"graddrop: got {leak_arr.shape[0]} leak values for K={k} tasks.")
        else:
            lk = leak_arr
        key, sub = jax.random.split(state.key)
        return lk, graddrop_uniforms(sub, updates), GradDropState(key=key)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        lk, uniforms, new_state = draws(updates, state, params)
        out = jax.tree.map(
            lambda x, u: graddrop_rows(x, u, lk, f).astype(x.dtype), updates, uniforms
        )
        return out, new_state

    def reduction(updates, state, params, r, **extra_args):
        del extra_args
        lk, uniforms, new_state = draws(updates, state, params)
        r = np.asarray(r, np.float32)
        out = jax.tree.map(
            lambda x, u: graddrop_reduced(x, u, lk, r, f).astype(x.dtype), updates, uniforms
        )
        return out, new_state

    # Reducible: `mtl.chain(mtl.graddrop(), mtl.sum_tasks())` sums the kept entries directly.
    return base.Reducible(init_fn, update_fn, reduction)
