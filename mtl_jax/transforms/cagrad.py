"""CAGrad (Conflict-Averse Gradient descent), solved in K-space on the Gramian."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mtl_jax.solvers import project_simplex
from mtl_jax.transforms.base import gramian_weighting


def _objective(g, b, s, w):
    return b @ w + s * jnp.sqrt(jnp.maximum(w @ g @ w, 0.0))


def _pgd(g, b, s, w0, max_iter):
    """Projected gradient with backtracking on ``b^T w + s sqrt(w^T G w)`` over the simplex."""
    dtype = g.dtype
    floor = jnp.asarray(1e-30, dtype)

    def grad(w):
        gw = g @ w
        return b + s * gw / jnp.maximum(jnp.sqrt(jnp.maximum(w @ gw, 0.0)), floor)

    def body(_, carry):
        w, t = carry
        f0, d0 = _objective(g, b, s, w), grad(w)

        def bt_cond(c):
            it, t, cand = c
            diff = cand - w
            bound = f0 + d0 @ diff + (diff @ diff) / (2.0 * t)
            return (it < 40) & (_objective(g, b, s, cand) > bound + 1e-12 * jnp.abs(f0))

        def bt_body(c):
            it, t, _ = c
            t = 0.5 * t
            return it + 1, t, project_simplex(w - t * d0)

        _, t, cand = jax.lax.while_loop(bt_cond, bt_body, (0, t, project_simplex(w - t * d0)))
        better = _objective(g, b, s, cand) <= f0
        return jnp.where(better, cand, w), jnp.minimum(2.0 * t, 1e6)

    w, _ = jax.lax.fori_loop(0, max_iter, body, (w0, jnp.asarray(1.0, dtype)))
    return w


def _polish(g, b, s, w, support_tol=1e-7):
    """Exact KKT solve on the support of ``w``; kept only if feasible, optimal and not worse.

    On the support S the stationarity conditions ``b_S + (s/n) G_SS w_S = mu 1`` with
    ``n = sqrt(w^T G w)``, ``1^T w = 1`` reduce to a quadratic in ``mu`` (using
    ``p = G_SS^-1 1``, ``q = G_SS^-1 b_S``): ``(1^T p) mu^2 - 2 (1^T q) mu + b_S^T q - s^2 = 0``,
    then ``lam = s/n = mu 1^T p - 1^T q`` and ``w_S = (mu p - q) / lam``.
    """
    k = g.shape[0]
    sup = (w > support_tol).astype(g.dtype)
    m = g * jnp.outer(sup, sup) + jnp.diag(1.0 - sup)
    p = jnp.linalg.solve(m, sup)
    q = jnp.linalg.solve(m, b * sup)
    a2, a1, a0 = jnp.sum(p), jnp.sum(q), jnp.dot(b * sup, q) - s * s
    disc = jnp.maximum(a1 * a1 - a2 * a0, 0.0)
    safe_a2 = jnp.where(jnp.abs(a2) > 0, a2, 1.0)
    best = w
    best_f = _objective(g, b, s, w)
    for sign in (1.0, -1.0):
        mu = (a1 + sign * jnp.sqrt(disc)) / safe_a2
        lam = mu * a2 - a1
        cand = (mu * p - q) / jnp.where(jnp.abs(lam) > 0, lam, 1.0) * sup
        f = _objective(g, b, s, cand)
        grad = b + lam * (g @ cand)
        kkt = jnp.all(grad >= mu - 1e-5 * (jnp.abs(mu) + jnp.max(jnp.abs(b)) + s))
        ok = (
            jnp.all(jnp.isfinite(cand))
            & (lam > 0)
            & jnp.all(cand >= -1e-9)
            & (jnp.abs(jnp.sum(cand) - 1.0) < 1e-5)
            & (f <= best_f + 1e-7 * (jnp.abs(best_f) + s))
            & kkt
            & (k > 1)
        )
        best = jnp.where(ok, project_simplex(jnp.maximum(cand, 0.0)), best)
        best_f = jnp.where(ok, _objective(g, b, s, best), best_f)
    return best


def cagrad_weights(
    gramian: jax.Array, c: float = 0.4, norm_eps: float = 1e-4, max_iter: int = 300
) -> jax.Array:
    """CAGrad's weights: the CAGrad direction is ``w^T J``.

    Solves the dual of CAGrad over the simplex,
    ``min_w  w^T G 1/K + c ||g0|| sqrt(w^T G w)`` (``g0`` the mean gradient), on the
    trace-normalized Gramian, by projected gradient with backtracking (``max_iter`` steps)
    followed by an exact KKT solve on the detected support. The weights are
    ``1/K + c ||g0|| / ||g_w|| * w``: ``d = g0 + c ||g0|| g_w / ||g_w||``.

    Args:
      gramian: [K, K] Gramian.
      c: radius of the ball around ``g0`` (non-negative); ``c = 0`` gives the mean.
      norm_eps: if ``||g_w||`` of the trace-normalized problem is below this (the mean
        gradient is about Pareto-stationary, or ``trace(G) < norm_eps``), the weights are zero
        (TorchJD's rule).
      max_iter: iteration budget of the first-order phase.

    Returns:
      [K] weights (float32 or wider).
    """
    k = gramian.shape[0]
    dtype = jnp.result_type(gramian.dtype, jnp.float32)
    g = gramian.astype(dtype)
    g = 0.5 * (g + g.T)
    trace = jnp.trace(g)
    finite = jnp.isfinite(trace)
    g = jnp.where(finite & (trace >= norm_eps), g / jnp.where(trace > 0, trace, 1.0), 0.0)
    uniform = jnp.full((k,), 1.0 / k, dtype)
    b = g @ uniform
    s = c * jnp.sqrt(jnp.maximum(uniform @ b, 0.0))
    w = _pgd(g, b, s, uniform, max_iter)
    w = _polish(g, b, s, w)
    gw_norm = jnp.sqrt(jnp.maximum(w @ g @ w, 0.0))
    weights = uniform + s / jnp.where(gw_norm > 0, gw_norm, 1.0) * w
    weights = jnp.where(gw_norm >= norm_eps, weights, 0.0)
    return jnp.where(jnp.all(jnp.isfinite(weights)), weights, jnp.zeros_like(weights))


def cagrad(c: float = 0.4, norm_eps: float = 1e-4) -> optax.GradientTransformationExtraArgs:
    """CAGrad: maximize the worst-task improvement within a ball around the mean gradient.

    The update is ``d = g0 + c ||g0|| g_w / ||g_w||`` with ``g0`` the mean gradient and ``w``
    the solution of the dual ``min_{w in simplex} g_w^T g0 + c ||g0|| ||g_w||``; returned as
    ``diag(weights) J`` (`cagrad_weights`), so ``sum_tasks`` gives ``d``. The dual is solved in
    K-space with a fixed budget (projected gradient with backtracking + exact support polish).

    Args:
      c: radius scale of the ball constraint, ``c >= 0``. TorchJD has no default; 0.4 is the
        value the CAGrad authors used on NYUv2 and Cityscapes (LibMTL's ``calpha`` default is
        0.5). ``c = 0`` is the mean gradient.
      norm_eps: threshold on the trace-normalized ``||g_w||`` below which the update is zero
        (TorchJD's ``norm_eps``; this includes ``trace(G) < norm_eps``, i.e. tiny gradients).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` mapping a Jacobian to a Jacobian.

    Example:
      >>> import jax.numpy as jnp, optax, mtl_jax as mtl
      >>> jac = jnp.array([[1.0, 0.0], [-0.5, 1.0]])
      >>> tx = optax.chain(mtl.cagrad(c=0.0), mtl.sum_tasks())
      >>> d, _ = tx.update(jac, tx.init(jnp.zeros(2)))
      >>> [round(float(x), 4) for x in d]
      [0.25, 0.5]

    References:
      Liu, Liu, Jin, Stone, Liu. Conflict-Averse Gradient Descent for Multi-task Learning.
      NeurIPS 2021.

      Checked against: TorchJD 0.18 ``CAGrad`` (``aggregation/_cagrad.py``, cvxpy/CLARABEL)
      on 60 random Jacobians (see ``tests/test_reference_part_b.py``). LibMTL
      (``weighting/CAGrad.py``) returns the same direction divided by ``1 + c^2`` by default
      (``rescale=1``); multiply the learning rate accordingly to reproduce LibMTL runs.
    """
    if not c >= 0:
        raise ValueError(f"cagrad: c must be non-negative, got {c}.")
    if not norm_eps >= 0:
        raise ValueError(f"cagrad: norm_eps must be non-negative, got {norm_eps}.")
    return gramian_weighting(lambda g: cagrad_weights(g, c=c, norm_eps=norm_eps))
