"""Aligned-MTL: align the principal components of the task gradients (Senushkin et al., 2023)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from mtl_jax.transforms import base

SCALE_MODES = ("min", "median", "rmse")


def aligned_mtl_weights(
    gramian: jax.Array, pref_vector: Any = None, scale_mode: str = "min"
) -> jax.Array:
    """Aligned-MTL weights ``alpha = B p`` with the balance transformation ``B`` of the Gramian.

    ``G = V diag(lambda) V^T``; over the numerical rank (eigenvalues above
    ``max(lambda) * K * eps``), ``B = sqrt(s) V diag(lambda)^{-1/2} V^T`` with ``s`` the smallest
    (``'min'``), lower-median (``'median'``) or mean (``'rmse'``) retained eigenvalue. The
    aligned gradients ``B J`` have orthogonal rows of equal norm ``sqrt(s)``. A zero Gramian
    gives ``B = I``.

    Args:
      gramian: [K, K] Gramian ``J J^T``.
      pref_vector: [K] preference weights (default ``1/K``, TorchJD's default).
      scale_mode: ``'min'`` (default), ``'median'`` or ``'rmse'``.

    Returns:
      [K] weights.
    """
    if scale_mode not in SCALE_MODES:
        raise ValueError(
            f"aligned_mtl: scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}."
        )
    k = gramian.shape[0]
    dtype = jnp.result_type(gramian.dtype, jnp.float32)
    g = gramian.astype(dtype)
    finite = jnp.all(jnp.isfinite(g))
    g = jnp.where(finite, 0.5 * (g + g.T), 0.0)
    if pref_vector is None:
        p = jnp.full((k,), 1.0 / k, dtype)
    else:
        p = jnp.asarray(pref_vector, dtype)
        if p.shape != (k,):
            raise ValueError(f"aligned_mtl: pref_vector has shape {p.shape}, Jacobian has K={k}.")
    lam, vecs = jnp.linalg.eigh(g)  # ascending
    tol = jnp.max(lam) * k * jnp.finfo(dtype).eps
    keep = lam > tol
    rank = jnp.sum(keep)
    safe = jnp.where(keep, lam, 1.0)
    if scale_mode == "min":
        scale = jnp.min(jnp.where(keep, lam, jnp.inf))
    elif scale_mode == "rmse":
        scale = jnp.sum(jnp.where(keep, lam, 0.0)) / jnp.maximum(rank, 1)
    else:  # torch.median: the lower median of the retained (largest) eigenvalues.
        scale = lam[k - rank + (rank - 1) // 2]
    inv_sqrt = jnp.where(keep, 1.0 / jnp.sqrt(safe), 0.0)
    b = jnp.sqrt(jnp.where(rank > 0, scale, 1.0)) * (vecs * inv_sqrt) @ vecs.T
    b = jnp.where(rank > 0, b, jnp.eye(k, dtype=dtype))
    alpha = b @ p
    return jnp.where(jnp.all(jnp.isfinite(alpha)), alpha, p)


def aligned_mtl(
    pref_vector: Any = None, scale_mode: str = "min"
) -> optax.GradientTransformationExtraArgs:
    """Aligned-MTL: combine the task gradients after making them orthogonal and equal in norm.

    Returns ``diag(alpha) J`` with `aligned_mtl_weights`;
    ``optax.chain(mtl.aligned_mtl(), mtl.sum_tasks())`` gives TorchJD's ``AlignedMTL()(J)``.

    Args:
      pref_vector: [K] preference weights of the aligned gradients (default ``1/K``).
      scale_mode: ``'min'`` (default: smallest eigenvalue, the paper's Algorithm 1),
        ``'median'`` or ``'rmse'`` (mean eigenvalue).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` mapping a Jacobian to a Jacobian.

    Example:
      >>> import jax.numpy as jnp, optax, mtl_jax as mtl
      >>> tx = optax.chain(mtl.aligned_mtl(), mtl.sum_tasks())
      >>> d, _ = tx.update({"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}, tx.init(None))
      >>> [round(x, 4) for x in d["w"].tolist()]
      [0.5, 0.5]

    References:
      Senushkin, Patakin, Kuznetsov, Konushin. Independent Component Alignment for Multi-Task
      Learning. CVPR 2023.
      Checked against: TorchJD 0.18 ``aggregation/_aligned_mtl.py``. LibMTL's
      ``weighting/Aligned_MTL.py`` uses ``alpha = B 1`` (``pref_vector = 1``), i.e. K times our
      default output: pass ``pref_vector=jnp.ones(K)`` to reproduce LibMTL. LibMTL also takes
      the rank tolerance from float32's eps whatever the dtype.
    """
    if scale_mode not in SCALE_MODES:
        raise ValueError(
            f"aligned_mtl: scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}."
        )
    if pref_vector is not None and jnp.ndim(pref_vector) != 1:
        raise ValueError(
            "aligned_mtl: pref_vector must be a 1-D vector [K], got shape "
            f"{jnp.shape(pref_vector)}."
        )
    return base.gramian_weighting(lambda g: aligned_mtl_weights(g, pref_vector, scale_mode))
