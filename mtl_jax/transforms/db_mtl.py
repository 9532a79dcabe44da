"""DB-MTL: dual-balancing multi-task learning (Lin et al., 2023)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_jax import jacobian as jac_lib
from mtl_jax.transforms import base
from mtl_jax.transforms.gradnorm import task_grad_norms
from mtl_jax.transforms.loss_base import LossWeighting
from mtl_jax.transforms.loss_weighting import check_num_tasks_arg, check_positive, positive

PyTree = Any
_F32 = jnp.float32


class DBMTLWeightingState(NamedTuple):
    """State of `db_mtl_weighting` (stateless)."""


def db_mtl_alpha(norms: jax.Array) -> jax.Array:
    """DB-MTL's gradient balance: ``alpha_k = max_j n_j / (n_k + 1e-8)``."""
    return jnp.max(norms) / (norms + 1e-8)


def db_mtl_weighting(num_tasks: int, eps: float = 1e-8) -> LossWeighting:
    """DB-MTL without gradient momentum (``beta = 0``) as a pure loss weighting.

    Loss balance: the task losses enter as ``log(L_k + eps)``, whose gradients are
    ``g_k / (L_k + eps)``; gradient balance: each is rescaled to the largest norm. With
    ``grad_norms`` ``n_k = ||g_k||`` (raw-loss gradients, e.g. `task_grad_norms`) the weights
    on the raw losses are ``w_k = alpha_k / (L_k + eps)``, ``alpha = max(u) / (u + 1e-8)``,
    ``u_k = n_k / (L_k + eps)``. The full method keeps an EMA of the log-loss gradients
    (``beta = 0.9``), which needs the per-task gradients: `db_mtl`.

    Args:
      num_tasks: K.
      eps: the reference's 1e-8 in ``log(L + eps)``; losses are used as ``max(L, 0) + eps``.

    Returns:
      A `LossWeighting` (stateless); update extra args: ``grad_norms`` ([K], required).

    References:
      Lin, Ye, Xu, Lin, Zhang, Kwok. Dual-Balancing for Multi-Task Learning. arXiv 2023.

      Checked against: LibMTL ``LibMTL/weighting/DB_MTL.py`` (with ``DB_beta=0``).
    """
    name = "db_mtl"
    k = check_num_tasks_arg(name, num_tasks)
    eps = check_positive(name, "eps", eps)

    def init():
        return DBMTLWeightingState()

    def update(losses, state, *, grad_norms=None, **extra_args):
        del extra_args
        if grad_norms is None:
            raise ValueError("db_mtl_weighting needs grad_norms=[K] (per-task gradient norms).")
        inv = 1.0 / positive(losses.astype(_F32), eps)
        alpha = db_mtl_alpha(jnp.asarray(grad_norms, _F32) * inv)
        return alpha * inv, state

    return LossWeighting(init, update, k, name)


class DBMTLState(NamedTuple):
    """State of `db_mtl`: EMA of the per-task log-loss gradients (Jacobian-shaped) + step."""

    grad_buffer: PyTree  # like the Jacobian, float32
    step: jax.Array  # int32


def db_mtl(
    num_tasks: int, beta: float = 0.9, beta_sigma: float = 0.0, eps: float = 1e-8
) -> optax.GradientTransformationExtraArgs:
    """DB-MTL: log-loss gradients, EMA-smoothed, each rescaled to the largest norm.

    At step t (from 1): ``g_k = J_k / (L_k + eps)`` (gradient of ``log(L_k + eps)``),
    ``m_k <- g_k + (beta / t^beta_sigma) (m_k - g_k)``, ``alpha_k = max_j ||m_j|| /
    (||m_k|| + 1e-8)``; the output rows are ``alpha_k m_k`` (so `sum_tasks` gives LibMTL's
    new shared gradient). Unlike the other loss-level methods the rows are not a rescaling of
    this step's Jacobian when ``beta > 0``; as a `RowCombination` of the buffer,
    ``mtl.chain(mtl.db_mtl(K), mtl.sum_tasks())`` reduces them in one dot. The state holds a
    float32 buffer the size of the Jacobian; use inside `shared_only` to restrict it to the
    shared parameters (as LibMTL).

    Args:
      num_tasks: K.
      beta: EMA coefficient (in [0, 1); LibMTL default 0.9).
      beta_sigma: decay exponent of ``beta / t^beta_sigma`` (>= 0; LibMTL default 0).
      eps: the reference's 1e-8 in ``log(L + eps)``; losses are used as ``max(L, 0) + eps``,
        so zero or negative losses give finite (large) scales instead of NaN.

    Update extra args: ``task_losses`` ([K], required).

    Example:
      >>> tx = optax.chain(mtl.db_mtl(3), mtl.sum_tasks(), optax.adam(1e-3))

    References:
      Lin, Ye, Xu, Lin, Zhang, Kwok. Dual-Balancing for Multi-Task Learning. arXiv 2023.

      Checked against: LibMTL ``LibMTL/weighting/DB_MTL.py``.
    """
    name = "db_mtl"
    k = check_num_tasks_arg(name, num_tasks)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"db_mtl: beta must be in [0, 1), got {beta!r}.")
    beta_sigma = check_positive(name, "beta_sigma", beta_sigma, allow_zero=True)
    eps = check_positive(name, "eps", eps)

    def init_fn(params):
        if params is None:
            raise ValueError("db_mtl: init needs params (to size the gradient buffer).")
        buf = jax.tree.map(lambda p: jnp.zeros((k, *jnp.shape(p)), _F32), params)
        return DBMTLState(buf, jnp.zeros((), jnp.int32))

    def combination(updates, state, params=None, *, task_losses=None, **extra_args):
        del extra_args
        kk = jac_lib.num_tasks(updates, params)
        base.check_num_tasks(name, k, kk)
        losses = jax.lax.stop_gradient(base.check_task_losses(name, task_losses, k))
        inv = 1.0 / positive(losses.astype(_F32), eps)
        step = state.step + 1
        coef = beta / step.astype(_F32) ** beta_sigma

        def ema(j, m):
            g = jac_lib.scale_rows(j.astype(_F32), inv)
            return g + coef * (m - g)

        buf = jax.tree.map(ema, updates, state.grad_buffer)
        alpha = db_mtl_alpha(task_grad_norms(buf))
        return buf, alpha, DBMTLState(buf, step)

    def update_fn(updates, state, params=None, **extra_args):
        buf, alpha, new_state = combination(updates, state, params, **extra_args)
        out = jax.tree.map(lambda m, j: jac_lib.scale_rows(m, alpha).astype(j.dtype), buf, updates)
        return out, new_state

    # A RowCombination of the gradient buffer: `mtl.chain` reduces diag(alpha) buf in one dot.
    return base.RowCombination(init_fn, combination, update_fn)
