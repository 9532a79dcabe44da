"""UPGrad and DualProj: projections onto the dual cone of the task gradients.

Both solve, in K-space, the box-constrained QP ``min_v v^T G v  s.t.  v >= u`` whose solution
``v`` gives the projection ``J^T v`` of ``J^T u`` onto the dual cone ``{x : J x >= 0}``
(`mtl_jax.solvers.project_dual_cone`). UPGrad projects every row of ``J`` (``u = e_k p_k``)
and adds the projections; DualProj projects the weighted average ``J^T p`` once. Either way
the update ``d`` satisfies ``J d >= 0``: no task's loss increases to first order.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from mtl_jax import solvers
from mtl_jax.transforms import base


def _check_eps(name: str, norm_eps: float, reg_eps: float, max_iter: int) -> None:
    if not norm_eps >= 0:
        raise ValueError(f"{name}: norm_eps must be non-negative, got {norm_eps}.")
    if not reg_eps >= 0:
        raise ValueError(f"{name}: reg_eps must be non-negative, got {reg_eps}.")
    if int(max_iter) < 1:
        raise ValueError(f"{name}: max_iter must be a positive integer, got {max_iter}.")


def _pref(name: str, pref_vector: Any, k: int, dtype: Any) -> jax.Array:
    """The preference weights u: ``pref_vector`` or the mean weights 1/K (TorchJD default)."""
    if pref_vector is None:
        return jnp.full((k,), 1.0 / k, dtype)
    p = jnp.asarray(pref_vector, dtype)
    if p.shape != (k,):
        raise ValueError(f"{name}: pref_vector has shape {p.shape} but the Jacobian has K={k}.")
    return p


def _check_pref_vector(name: str, pref_vector: Any) -> None:
    if pref_vector is not None and jnp.ndim(pref_vector) != 1:
        raise ValueError(
            f"{name}: pref_vector must be a 1-D vector [K], got shape {jnp.shape(pref_vector)}."
        )


def upgrad_weights(
    gramian: jax.Array,
    pref_vector: Any = None,
    *,
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
    max_iter: int = 300,
) -> jax.Array:
    """UPGrad's task weights from the Gramian: ``w = sum_k v_k``, ``v_k = proj(p_k e_k)``.

    The aggregated update is ``J^T w``: the sum of the projections of the K weighted rows
    ``p_k J_k`` onto the dual cone of the rows of ``J``.

    Args:
      gramian: [K, K] Gramian ``J J^T``.
      pref_vector: [K] preference weights (default ``1/K`` each, TorchJD's default).
      norm_eps: Gramians with trace below it are treated as zero (TorchJD's ``norm_eps``).
      reg_eps: ridge added to the trace-normalized Gramian (TorchJD's ``reg_eps``).
      max_iter: first-order budget of the QP solver (an exact active-set polish follows).

    Returns:
      [K] weights (float32, or float64 for float64 input).

    Example:
      >>> import jax.numpy as jnp, mtl_jax as mtl
      >>> w = mtl.upgrad_weights(jnp.array([[1.0, -0.5], [-0.5, 1.0]]))
      >>> bool(jnp.all(jnp.array([[1.0, -0.5], [-0.5, 1.0]]) @ w >= 0))
      True
    """
    k = gramian.shape[0]
    dtype = jnp.result_type(gramian.dtype, jnp.float32)
    u = _pref("upgrad_weights", pref_vector, k, dtype)
    v = solvers.project_dual_cone(
        gramian.astype(dtype), jnp.diag(u), norm_eps=norm_eps, reg_eps=reg_eps, max_iter=max_iter
    )
    return jnp.sum(v, axis=0)


def dualproj_weights(
    gramian: jax.Array,
    pref_vector: Any = None,
    *,
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
    max_iter: int = 300,
) -> jax.Array:
    """DualProj's task weights: ``w = proj(p)``, the projection of ``J^T p`` on the dual cone.

    Args:
      gramian: [K, K] Gramian ``J J^T``.
      pref_vector: [K] weights of the combination to project (default ``1/K`` each).
      norm_eps: as in `upgrad_weights`.
      reg_eps: as in `upgrad_weights`.
      max_iter: as in `upgrad_weights`.

    Returns:
      [K] weights.
    """
    k = gramian.shape[0]
    dtype = jnp.result_type(gramian.dtype, jnp.float32)
    u = _pref("dualproj_weights", pref_vector, k, dtype)
    return solvers.project_dual_cone(
        gramian.astype(dtype), u, norm_eps=norm_eps, reg_eps=reg_eps, max_iter=max_iter
    )


def upgrad(
    pref_vector: Any = None,
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
    max_iter: int = 300,
) -> optax.GradientTransformationExtraArgs:
    """UPGrad: project each task gradient onto the dual cone of all of them, then add.

    Returns ``diag(w) J`` with `upgrad_weights`, so ``optax.chain(mtl.upgrad(), mtl.sum_tasks())``
    gives TorchJD's ``UPGrad()(J)``. The update never conflicts with any task (``J d >= 0``),
    is permutation-equivariant and (up to ``reg_eps``) linear under scaling of the rows. As in
    TorchJD, ``reg_eps`` is relative to ``|J|_F^2``: a task whose squared gradient norm is
    below ~``reg_eps * |J|_F^2`` can see a tiny conflict; pass ``reg_eps=0`` for exact
    non-conflict when ``J`` has full row rank.

    Args:
      pref_vector: [K] weights of the projected rows (default ``1/K``: TorchJD's default).
      norm_eps: a Jacobian whose squared Frobenius norm is below it is treated as zero (its
        update is then ``J^T pref_vector``), as in TorchJD.
      reg_eps: ridge added to the trace-normalized Gramian so the QP is strictly convex.
      max_iter: first-order iteration budget of the K-space QP solver (then an exact polish).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` mapping a Jacobian to a Jacobian.

    Example:
      >>> import jax.numpy as jnp, optax, mtl_jax as mtl
      >>> tx = optax.chain(mtl.upgrad(), mtl.sum_tasks())
      >>> jac = {"w": jnp.array([[1.0, 0.0], [-0.5, 1.0]])}
      >>> d, _ = tx.update(jac, tx.init({"w": jnp.zeros(2)}))
      >>> bool(jnp.all(jac["w"] @ d["w"] >= 0))
      True

    References:
      Quinton, Rey. Jacobian Descent for Multi-Objective Optimization. arXiv:2406.16232, 2024.
      Checked against: TorchJD 0.18 ``aggregation/_upgrad.py`` with its default
      ``QuadprogProjector(norm_eps=1e-4, reg_eps=1e-4)`` (``_linalg/_dual_cone.py``). Our QP
      solver is a jit-safe first-order method plus an exact active-set polish instead of
      quadprog; the answers agree to solver precision (see tests/test_reference_torchjd.py).
    """
    _check_pref_vector("upgrad", pref_vector)
    _check_eps("upgrad", norm_eps, reg_eps, max_iter)
    return base.gramian_weighting(
        lambda g: upgrad_weights(
            g, pref_vector, norm_eps=norm_eps, reg_eps=reg_eps, max_iter=max_iter
        )
    )


def dualproj(
    pref_vector: Any = None,
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
    max_iter: int = 300,
) -> optax.GradientTransformationExtraArgs:
    """DualProj: project the (preference-weighted) mean gradient onto the dual cone.

    The GEM projection (Lopez-Paz & Ranzato, eq. 11) applied to multi-task learning: the
    closest vector to ``J^T p`` that conflicts with no task. Returns ``diag(w) J`` with
    `dualproj_weights`; ``optax.chain(mtl.dualproj(), mtl.sum_tasks())`` gives TorchJD's
    ``DualProj()(J)``.

    Args:
      pref_vector: [K] weights of the combination to project (default ``1/K``).
      norm_eps: as in `upgrad`.
      reg_eps: as in `upgrad`.
      max_iter: as in `upgrad`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` mapping a Jacobian to a Jacobian.

    Example:
      >>> import jax.numpy as jnp, optax, mtl_jax as mtl
      >>> tx = optax.chain(mtl.dualproj(), mtl.sum_tasks())
      >>> jac = {"w": jnp.array([[1.0, 0.0], [-0.5, 1.0]])}
      >>> d, _ = tx.update(jac, tx.init({"w": jnp.zeros(2)}))

    References:
      Lopez-Paz, Ranzato. Gradient Episodic Memory for Continual Learning. NeurIPS 2017.
      Quinton, Rey. Jacobian Descent for Multi-Objective Optimization. arXiv:2406.16232, 2024.
      Checked against: TorchJD 0.18 ``aggregation/_dualproj.py`` (same QP and preprocessing as
      `upgrad`; jit-safe solver instead of quadprog).
    """
    _check_pref_vector("dualproj", pref_vector)
    _check_eps("dualproj", norm_eps, reg_eps, max_iter)
    return base.gramian_weighting(
        lambda g: dualproj_weights(
            g, pref_vector, norm_eps=norm_eps, reg_eps=reg_eps, max_iter=max_iter
        )
    )
