"""IMTL-G: impartial gradient weighting (Liu et al., 2021), in TorchJD's generalized form."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mtl_jax.transforms import base


def imtl_g_weights(gramian: jax.Array) -> jax.Array:
    """IMTL-G weights: ``v = G^+ sqrt(diag G)``, normalized to sum to 1.

    The update ``J^T w`` has equal projections on every unit task gradient (for linearly
    independent rows); ``G^+`` (pseudo-inverse, cutoff ``K * eps`` relative, like
    ``torch.linalg.pinv``) extends it to linearly dependent rows. For a nonsingular ``G`` the
    inverse is applied through the unit-diagonal Gramian ``D^{-1} G D^{-1}``, which keeps
    float32 accurate when task gradient norms differ by orders of magnitude. When ``sum(v)`` is
    numerically zero (``|sum(v)| < 1e-12``) the weights are zero, as in TorchJD.

    Args:
      gramian: [K, K] Gramian ``J J^T``.

    Returns:
      [K] weights (float32, or float64 for float64 input).

    Example:
      >>> import jax.numpy as jnp, mtl_jax as mtl
      >>> [round(x, 4) for x in mtl.imtl_g_weights(jnp.array([[1.0, 0.0], [0.0, 4.0]])).tolist()]
      [0.6667, 0.3333]
    """
    k = gramian.shape[0]
    dtype = jnp.result_type(gramian.dtype, jnp.float32)
    g = gramian.astype(dtype)
    finite = jnp.all(jnp.isfinite(g))
    g = jnp.where(finite, 0.5 * (g + g.T), 0.0)
    d = jnp.sqrt(jnp.maximum(jnp.diag(g), 0.0))
    eps = jnp.finfo(dtype).eps
    # Nonsingular G: G^{-1} d = D^{-1} C^{-1} 1 with the unit Gramian C = D^{-1} G D^{-1}
    # (D = diag d). C stays well conditioned when only the row norms differ (e.g. 1e-3..1e3),
    # where G's own eigendecomposition loses ~eps * cond(G) relative accuracy.
    nonzero = d > 0
    d_safe = jnp.where(nonzero, d, 1.0)
    lam_c, q_c = jnp.linalg.eigh(g / jnp.outer(d_safe, d_safe))
    invertible = jnp.all(nonzero) & (lam_c[0] > 10 * k * eps * lam_c[-1])
    lam_c = jnp.where(lam_c > 0, lam_c, 1.0)
    v_scaled = (q_c @ ((q_c.T @ jnp.ones((k,), dtype)) / lam_c)) / d_safe
    # Singular G (dependent or zero rows): TorchJD's pseudo-inverse (cutoff K * eps).
    v_pinv = jnp.linalg.pinv(g, rtol=k * eps, hermitian=True) @ d
    v = jnp.where(invertible, v_scaled, v_pinv)
    total = jnp.sum(v)
    ok = (jnp.abs(total) >= 1e-12) & jnp.all(jnp.isfinite(v))
    return jnp.where(ok, v / jnp.where(ok, total, 1.0), 0.0)


def imtl_g() -> optax.GradientTransformationExtraArgs:
    """IMTL-G: the update whose projections on all unit task gradients are equal.

    Returns ``diag(w) J`` with `imtl_g_weights`; ``optax.chain(mtl.imtl_g(), mtl.sum_tasks())``
    gives TorchJD's ``IMTLG()(J)``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` mapping a Jacobian to a Jacobian.

    Example:
      >>> import jax.numpy as jnp, optax, mtl_jax as mtl
      >>> tx = optax.chain(mtl.imtl_g(), mtl.sum_tasks())
      >>> d, _ = tx.update({"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}, tx.init(None))
      >>> [round(x, 4) for x in d["w"].tolist()]
      [0.6667, 0.6667]

    References:
      Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang. Towards Impartial Multi-task Learning.
      ICLR 2021.
      Quinton, Rey. Jacobian Descent for Multi-Objective Optimization. arXiv:2406.16232, 2024
      (the generalization to linearly dependent rows).
      Checked against: TorchJD 0.18 ``aggregation/_imtl_g.py``. LibMTL's ``IMTL`` (gradient
      part) solves the same equal-projection system for independent rows, applied to the
      shared-parameter gradients together with IMTL-L's loss scaling (`imtl_l` in mtl_jax).
    """
    return base.gramian_weighting(imtl_g_weights)
