"""Nash-MTL: the Nash bargaining solution ``G alpha = 1 / alpha``, solved in K-space.

Also hosts the solver shared with FairGrad: positive solutions of ``G x = x^(-p)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_jax import jacobian as jac_lib
from mtl_jax.transforms import base
from mtl_jax.transforms.base import check_num_tasks


def _phi(x: jax.Array, p: float) -> jax.Array:
    """Concave potential with ``phi'(x) = x^-p``."""
    if p == 1.0:
        return jnp.log(x)
    return x ** (1.0 - p) / (1.0 - p)


def solve_power_balance(
    gramian: jax.Array,
    power: float = 1.0,
    *,
    init: jax.Array | None = None,
    max_iter: int = 100,
    tol: float = 1e-6,
) -> tuple[jax.Array, jax.Array]:
    """The positive solution of ``G x = x^(-power)`` (elementwise power), by damped Newton.

    For ``power > 0`` it is the unique minimizer of the strictly convex
    ``h(x) = x^T G x / 2 - sum_i phi(x_i)`` with ``phi'(x) = x^-power`` over ``x > 0`` (when a
    minimizer exists: it does not when a non-negative combination of the task gradients is
    zero, e.g. two opposite gradients). The solve runs on ``G / s`` (``s`` the mean of the
    diagonal) and rescales ``x`` by ``s^(-1/(1+power))``; Newton steps keep ``x > 0``
    (fraction to the boundary) and decrease ``h`` (Armijo backtracking) or, near the
    solution, the gradient norm.

    Args:
      gramian: [K, K] Gramian.
      power: the exponent ``p > 0`` (1 for Nash-MTL, ``1/alpha`` for FairGrad).
      init: optional positive warm start, in the original scale.
      max_iter: Newton iteration budget.
      tol: convergence tolerance on the elementwise relative residual
        ``max_i |(G x)_i - x_i^-p| / x_i^-p`` (scale free).

    Returns:
      ``(x, converged)``: x is [K] (float32 or wider), ``converged`` a bool scalar: finite
      and residual below ``max(tol, 1e-3)``. When not converged, x is undefined: use a fallback.
    """
    k = gramian.shape[0]
    dtype = jnp.result_type(gramian.dtype, jnp.float32)
    g = gramian.astype(dtype)
    g = 0.5 * (g + g.T)
    scale = jnp.mean(jnp.diag(g))
    good_scale = jnp.isfinite(scale) & (scale > 0)
    scale = jnp.where(good_scale, scale, 1.0)
    g = g / scale
    g = jnp.where(jnp.all(jnp.isfinite(g)), g, jnp.eye(k, dtype=dtype))
    unscale = scale ** (-1.0 / (1.0 + power))
    if init is None:
        x0 = jnp.ones((k,), dtype)
    else:
        x0 = init.astype(dtype) / unscale
        x0 = jnp.where(jnp.all(jnp.isfinite(x0)) & jnp.all(x0 > 0), x0, jnp.ones((k,), dtype))

    def h(x):
        return 0.5 * x @ g @ x - jnp.sum(_phi(x, power))

    def residual(x):
        target = x ** (-power)
        return jnp.max(jnp.abs(g @ x - target) / jnp.maximum(target, 1e-30))

    def cond(carry):
        it, _, res = carry
        return (it < max_iter) & (res > tol)

    def body(carry):
        it, x, _ = carry
        grad = g @ x - x ** (-power)
        hess = g + jnp.diag(power * x ** (-power - 1.0))
        dx = -jnp.linalg.solve(hess, grad)
        dx = jnp.where(jnp.all(jnp.isfinite(dx)), dx, -grad)
        ratio = jnp.where(dx < 0, -x / jnp.where(dx < 0, dx, -1.0), jnp.inf)
        t0 = jnp.minimum(1.0, 0.99 * jnp.min(ratio))
        h0, slope = h(x), grad @ dx
        gnorm = jnp.linalg.norm(grad)

        def accept(t):
            # Armijo on h, or (near the solution, where float32 cannot resolve changes of h)
            # a decrease of the gradient norm.
            x_t = x + t * dx
            armijo = h(x_t) <= h0 + 1e-4 * t * slope
            g_t = jnp.linalg.norm(g @ x_t - x_t ** (-power))
            return jnp.all(x_t > 0) & (armijo | (g_t <= (1.0 - 1e-4 * t) * gnorm))

        def ls_cond(c):
            j, t = c
            return (j < 40) & ~accept(t)

        _, t = jax.lax.while_loop(ls_cond, lambda c: (c[0] + 1, 0.5 * c[1]), (0, t0))
        x_new = x + t * dx
        x_new = jnp.where(jnp.all(jnp.isfinite(x_new)) & jnp.all(x_new > 0), x_new, x)
        return it + 1, x_new, residual(x_new)

    _, x, res = jax.lax.while_loop(cond, body, (0, x0, residual(x0)))
    x = x * unscale
    converged = good_scale & jnp.isfinite(res) & (res <= max(tol, 1e-3)) & jnp.all(jnp.isfinite(x))
    return x, converged


def nash_mtl_weights(
    gramian: jax.Array, init: jax.Array | None = None, max_iter: int = 100
) -> jax.Array:
    """Nash-MTL's weights: the positive solution of ``G alpha = 1 / alpha`` (no norm clipping).

    Args:
      gramian: [K, K] Gramian.
      init: optional warm start (e.g. the previous step's weights).
      max_iter: Newton iteration budget.

    Returns:
      [K] weights; ``init`` (or ones) when the equation has no positive solution.
    """
    k = gramian.shape[0]
    alpha, ok = solve_power_balance(gramian, 1.0, init=init, max_iter=max_iter)
    fallback = jnp.ones((k,), alpha.dtype) if init is None else init.astype(alpha.dtype)
    return jnp.where(ok, alpha, fallback)


class NashMTLState(NamedTuple):
    """State of `nash_mtl`: the last solved weights (warm start and reuse) and a step count."""

    alpha: jax.Array
    step: jax.Array


def nash_mtl(
    num_tasks: int,
    max_norm: float = 1.0,
    update_weights_every: int = 1,
    optim_niter: int = 20,
) -> optax.GradientTransformationExtraArgs:
    """Nash-MTL: weights from the Nash bargaining solution ``G alpha = 1 / alpha``.

    Every ``update_weights_every`` steps, solves ``alpha_i (G alpha)_i = 1`` (the bargaining
    solution, i.e. the minimizer of ``alpha^T G alpha / 2 - sum log alpha``) by damped Newton in
    K-space, warm-started from the previous weights; in between, the previous weights are
    reused. If ``max_norm > 0`` and ``||alpha^T J|| > max_norm`` the weights are scaled down to
    that norm. Returns ``diag(alpha) J``. When no positive solution exists (e.g. two opposite
    gradients) or the solve fails, the previous weights are kept, as the reference does when
    its solver fails.

    Args:
      num_tasks: K.
      max_norm: maximum norm of the update ``alpha^T J`` (0 disables clipping). Note that at
        the solution ``||alpha^T J||^2 = K``, so the default 1.0 always clips for K > 1.
      update_weights_every: solve every this many steps (reuse the weights in between).
      optim_niter: iteration budget. The reference runs up to this many convex (CCP)
        sub-problems; here each step runs up to ``5 * optim_niter`` Newton iterations (100
        by default; typically fewer than 15 are needed).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` mapping a Jacobian to a Jacobian.

    Example:
      >>> import jax.numpy as jnp, optax, mtl_jax as mtl
      >>> jac = jnp.array([[2.0, 0.0], [0.0, 0.5]])
      >>> tx = optax.chain(mtl.nash_mtl(num_tasks=2, max_norm=0.0), mtl.sum_tasks())
      >>> d, _ = tx.update(jac, tx.init(jnp.zeros(2)))
      >>> [round(float(x), 4) for x in d]  # alpha_i = 1 / ||g_i|| for orthogonal gradients
      [1.0, 1.0]

    References:
      Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya. Multi-Task Learning as a
      Bargaining Game. ICML 2022.

      Checked against: TorchJD 0.18 ``NashMTL`` (``aggregation/_nash_mtl.py``, the authors'
      cvxpy/ECOS sequence of convex problems, AvivNavon/nash-mtl ``methods/weight_methods.py``)
      over consecutive steps; see ``tests/test_reference_part_b.py`` for the tolerance.
      Deliberate difference: Newton on the optimality equation instead of the CCP sequence
      (same fixed point; no cvxpy). LibMTL (``weighting/Nash_MTL.py``) clips the gradient norm
      of the shared parameters, the same when the whole Jacobian is balanced.
    """
    if num_tasks < 1:
        raise ValueError(f"nash_mtl: num_tasks must be a positive integer, got {num_tasks}.")
    if not max_norm >= 0:
        raise ValueError(f"nash_mtl: max_norm must be non-negative, got {max_norm}.")
    if int(update_weights_every) != update_weights_every or update_weights_every < 1:
        raise ValueError(
            "nash_mtl: update_weights_every must be a positive integer, "
            f"got {update_weights_every}."
        )
    if int(optim_niter) != optim_niter or optim_niter < 1:
        raise ValueError(f"nash_mtl: optim_niter must be a positive integer, got {optim_niter}.")
    max_iter = 5 * int(optim_niter)

    def init_fn(params):
        del params
        return NashMTLState(
            alpha=jnp.ones((num_tasks,), jnp.float32), step=jnp.zeros((), jnp.int32)
        )

    def weights_fn(updates, state, params=None, **extra_args):
        del extra_args
        k = jac_lib.num_tasks(updates, params)
        check_num_tasks("nash_mtl", num_tasks, k)
        g = jac_lib.gramian(updates)
        prev = state.alpha.astype(g.dtype)
        solved, ok = solve_power_balance(g, 1.0, init=prev, max_iter=max_iter)
        refresh = (state.step % update_weights_every) == 0
        alpha = jnp.where(refresh & ok, solved, prev)
        weights = alpha
        if max_norm > 0:
            norm = jnp.sqrt(jnp.maximum(alpha @ g @ alpha, 0.0))
            clip = jnp.isfinite(norm) & (norm > max_norm)
            weights = jnp.where(clip, alpha * (max_norm / jnp.where(clip, norm, 1.0)), alpha)
        new_state = NashMTLState(alpha=alpha.astype(state.alpha.dtype), step=state.step + 1)
        return weights, new_state

    return base.row_weighting(init_fn, weights_fn)
