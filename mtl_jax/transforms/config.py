"""ConFIG: conflict-free updates from the pseudo-inverse of the unit task gradients."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from mtl_jax.transforms import base


def conflict_free_weights(gramian: jax.Array, pref_vector: Any = None) -> jax.Array:
    """ConFIG weights from the Gramian alone.

    With unit rows ``U = D^{-1} J`` (``D = diag ||J_k||``, zero rows stay zero), ConFIG's
    direction ``b = U^+ p = U^T (U U^T)^+ p = J^T c`` with ``c = D^{-1} (D^{-1} G D^{-1})^+ p``;
    the update is ``(sum_k J_k . b_hat) b_hat`` with ``b_hat = b / max(||b||, 1e-12)``, so it is
    ``J^T w`` with ``w = c * sum(G c) / max(||b||, 1e-12)^2`` and ``||b||^2 = c^T G c``.

    Args:
      gramian: [K, K] Gramian ``J J^T``.
      pref_vector: [K] weights ``p`` (default all ones, TorchJD's default).

    Returns:
      [K] weights.
    """
    k = gramian.shape[0]
    dtype = jnp.result_type(gramian.dtype, jnp.float32)
    g = gramian.astype(dtype)
    finite = jnp.all(jnp.isfinite(g))
    g = jnp.where(finite, 0.5 * (g + g.T), 0.0)
    if pref_vector is None:
        p = jnp.ones((k,), dtype)
    else:
        p = jnp.asarray(pref_vector, dtype)
        if p.shape != (k,):
            raise ValueError(f"conflict_free: pref_vector has shape {p.shape}, Jacobian has K={k}.")
    diag = jnp.diag(g)
    nonzero = diag > 0
    inv_norm = jnp.where(nonzero, 1.0 / jnp.sqrt(jnp.where(nonzero, diag, 1.0)), 0.0)
    g_unit = g * jnp.outer(inv_norm, inv_norm)
    # Cutoff on the unit Gramian's eigenvalues: the float rounding of G is ~eps relative.
    pinv = jnp.linalg.pinv(g_unit, rtol=10 * k * jnp.finfo(dtype).eps, hermitian=True)
    c = inv_norm * (pinv @ p)
    norm_b = jnp.sqrt(jnp.maximum(c @ g @ c, 0.0))
    unit = c / jnp.maximum(norm_b, 1e-12)
    w = jnp.sum(g @ unit) * unit
    return jnp.where(jnp.all(jnp.isfinite(w)), w, 0.0)


def conflict_free(pref_vector: Any = None) -> optax.GradientTransformationExtraArgs:
    """ConFIG: the direction with equal positive cosine to all task gradients, rescaled.

    The direction is ``U^+ p`` (``U``: unit task gradients), whose inner product with every
    unit gradient is ``p_k`` (for linearly independent rows); its length is the sum of the
    projections of the task gradients on it. Returns ``diag(w) J`` with
    `conflict_free_weights`; ``optax.chain(mtl.conflict_free(), mtl.sum_tasks())`` gives
    TorchJD's ``ConFIG()(J)``.

    Args:
      pref_vector: [K] positive weights of the unit gradients (default ones).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` mapping a Jacobian to a Jacobian.

    Example:
      >>> import jax.numpy as jnp, optax, mtl_jax as mtl
      >>> tx = optax.chain(mtl.conflict_free(), mtl.sum_tasks())
      >>> d, _ = tx.update({"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}, tx.init(None))
      >>> [round(x, 4) for x in d["w"].tolist()]
      [1.5, 1.5]

    References:
      Liu, Chu, Thuerey. ConFIG: Towards Conflict-free Training of Physics Informed Neural
      Networks. ICLR 2025.
      Checked against: TorchJD 0.18 ``aggregation/_config.py`` (which works on the matrix).
      Computed Gramian-first here; the pseudo-inverse cutoff is applied to the eigenvalues of
      the unit Gramian (``10 K eps``) rather than to the singular values of ``U``
      (``max(K, n) eps``): this only matters for numerically rank-deficient Jacobians.
    """
    if pref_vector is not None and jnp.ndim(pref_vector) != 1:
        raise ValueError(
            f"conflict_free: pref_vector must be a 1-D vector [K], got shape "
            f"{jnp.shape(pref_vector)}."
        )
    return base.gramian_weighting(lambda g: conflict_free_weights(g, pref_vector))
