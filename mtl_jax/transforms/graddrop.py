"""GradDrop (Gradient Sign Dropout): elementwise, leaf-wise sign-consistency masks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_jax import jacobian as jac_lib

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


def graddrop_rows(
    rows: jax.Array,
    uniform: jax.Array,
    leak: jax.Array,
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
    # Task-axis sums as fused row chains, not jnp.sum(axis=0) (slow on XLA CPU).
    total = jac_lib.reduce_rows(x)
    mass = jac_lib.reduce_rows(x, jnp.abs)
    # An all-zero column has no sign: TorchJD gets NaN there and keeps nothing (the rows are 0).
    purity = 0.5 * (1.0 + total / jnp.where(mass > 0, mass, 1.0))
    fp = f(purity)
    u = uniform.astype(dtype)
    keep = ((fp > u) & (x > 0)) | ((fp < u) & (x < 0))
    lk = jnp.reshape(leak.astype(dtype), (-1,) + (1,) * (x.ndim - 1))
    return (lk + (1.0 - lk) * keep.astype(dtype)) * x


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
      An ``optax.GradientTransformationExtraArgs`` mapping a Jacobian to a Jacobian.

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
        leak_arr = jnp.asarray(leak, jnp.float32)
        if leak_arr.ndim > 1:
            raise ValueError(
                f"graddrop: leak must be a float or a [K] vector, got {leak_arr.shape}."
            )
        if bool(jnp.any((leak_arr < 0) | (leak_arr > 1))):
            raise ValueError("graddrop: leak values must be in [0, 1].")
    else:
        leak_arr = None
    if not callable(f):
        raise ValueError("graddrop: f must be a callable (a monotonically increasing function).")

    def init_fn(params):
        del params
        return GradDropState(key=jax.random.key(seed))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        k = jac_lib.num_tasks(updates, params)
        if leak_arr is None:
            lk = jnp.zeros((k,), jnp.float32)
        elif leak_arr.ndim == 0:
            lk = jnp.full((k,), leak_arr)
        elif leak_arr.shape[0] != k:
            raise ValueError(f"graddrop: got {leak_arr.shape[0]} leak values for K={k} tasks.")
        else:
            lk = leak_arr
        key, sub = jax.random.split(state.key)
        uniforms = graddrop_uniforms(sub, updates)
        out = jax.tree.map(
            lambda x, u: graddrop_rows(x, u, lk, f).astype(x.dtype), updates, uniforms
        )
        return out, GradDropState(key=key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
