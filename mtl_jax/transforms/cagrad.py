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


def _support_solve(g, b, s, sup):
    """Exact stationary point of the problem restricted to the support ``sup`` (0/1 mask).

    On S the conditions ``b_S + lam G_SS w_S = mu 1`` with ``lam = s / sqrt(w^T G w)`` and
    ``1^T w = 1`` reduce, with ``p = G_SS^-1 1`` and ``q = G_SS^-1 b_S``, to
    ``(1^T p) mu^2 - 2 (1^T q) mu + b_S^T q - s^2 = 0``; the root with ``lam > 0`` is
    ``lam = sqrt(disc)``, ``mu = (1^T q + lam) / 1^T p``, and ``w_S = (mu p - q) / lam``.
    The linear solves are Jacobi-scaled (unit diagonal), which matters when the task
    gradients' norms span orders of magnitude.

    Returns:
      ``(w, mu, lam, ok)``.
    """
    m = g * jnp.outer(sup, sup) + jnp.diag(1.0 - sup)
    d = jnp.diag(m)
    d = jnp.where(d > 0, d, 1.0)
    r = 1.0 / jnp.sqrt(d)
    ms = m * jnp.outer(r, r)
    rhs = jnp.stack([sup, b * sup], axis=1) * r[:, None]
    sol = jnp.linalg.solve(ms, rhs) * r[:, None]
    p, q = sol[:, 0], sol[:, 1]
    a2, a1, a0 = jnp.sum(p), jnp.sum(q), jnp.dot(b * sup, q) - s * s
    disc = a1 * a1 - a2 * a0
    lam = jnp.sqrt(jnp.maximum(disc, 0.0))
    mu = (a1 + lam) / jnp.where(a2 > 0, a2, 1.0)
    w = (mu * p - q) / jnp.where(lam > 0, lam, 1.0) * sup
    ok = (a2 > 0) & (disc > 0) & jnp.all(jnp.isfinite(w)) & jnp.isfinite(mu)
    return w, mu, lam, ok


def _active_set(g, b, s, w0, max_iter, support_tol=1e-7):
    """Primal active-set refinement from the support of ``w0`` (drop negative, add violating).

    Returns the first support solution satisfying the KKT conditions (feasible, and
    ``grad_i >= mu`` off the support) if its objective is not worse than ``w0``'s; else
    ``w0``.
    """
    k = g.shape[0]
    f0 = _objective(g, b, s, w0)

    def body(_, carry):
        sup, best, done = carry
        w, mu, lam, ok = _support_solve(g, b, s, sup)
        on = sup > 0
        neg = on & (w < -1e-9 * jnp.max(jnp.abs(w)))
        grad = b + lam * (g @ w)
        viol = jnp.where(on, 0.0, mu - grad)
        tol = 1e-5 * (jnp.abs(grad) + jnp.abs(mu)) + 1e-30
        any_neg = jnp.any(neg)
        any_viol = jnp.any(viol > tol)
        kkt = ok & ~any_neg & ~any_viol
        cand = project_simplex(jnp.maximum(w, 0.0))
        accept = ~done & kkt & (_objective(g, b, s, cand) <= f0 + 1e-6 * jnp.abs(f0))
        best = jnp.where(accept, cand, best)
        drop = jnp.argmin(jnp.where(neg, w, jnp.inf))
        add = jnp.argmax(jnp.where(viol > tol, viol, -jnp.inf))
        new_sup = jnp.where(any_neg, sup.at[drop].set(0.0), sup.at[add].set(1.0))
        new_sup = jnp.where(jnp.sum(new_sup) > 0, new_sup, sup)
        done = done | kkt | ~ok
        return jnp.where(done, sup, new_sup), best, done

    sup0 = (w0 > support_tol).astype(g.dtype)
    _, best, _ = jax.lax.fori_loop(0, max_iter, body, (sup0, w0, jnp.asarray(k < 2)))
    return best


def cagrad_weights(
    gramian: jax.Array, c: float = 0.4, norm_eps: float = 1e-4, max_iter: int = 300
) -> jax.Array:
    """CAGrad's weights: the CAGrad direction is ``w^T J``.

    Solves the dual of CAGrad over the simplex,
    ``min_w  w^T G 1/K + c ||g0|| sqrt(w^T G w)`` (``g0`` the mean gradient), on the
    trace-normalized Gramian, by projected gradient with backtracking (``max_iter`` steps)
    followed by a primal active-set refinement (exact KKT solves on supports, at most 3K).
    The weights are
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
    w = _active_set(g, b, s, w, 3 * k)
    gw_norm = jnp.sqrt(jnp.maximum(w @ g @ w, 0.0))
    weights = uniform + s / jnp.where(gw_norm > 0, gw_norm, 1.0) * w
    weights = jnp.where(gw_norm >= norm_eps, weights, 0.0)
    return jnp.where(jnp.all(jnp.isfinite(weights)), weights, jnp.zeros_like(weights))


def cagrad(c: float = 0.4, norm_eps: float = 1e-4) -> optax.GradientTransformationExtraArgs:
    """CAGrad: maximize the worst-task improvement within a ball around the mean gradient.

    The update is ``d = g0 + c ||g0|| g_w / ||g_w||`` with ``g0`` the mean gradient and ``w``
    the solution of the dual ``min_{w in simplex} g_w^T g0 + c ||g0|| ||g_w||``; returned as
    ``diag(weights) J`` (`cagrad_weights`), so ``sum_tasks`` gives ``d``. The dual is solved in
    K-space with a fixed budget (projected gradient with backtracking, then an active-set
    refinement with exact, Jacobi-scaled KKT solves on the support).

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
