"""MGDA: the min-norm point of the convex hull of the task gradients (Sener & Koltun, 2018).

Gramian-first: the weights come from the K x K Gramian (optionally of normalized gradients), so
the same weighting serves the full-Jacobian path (`mgda`) and the representation-level MGDA-UB
path (`mtl_jax.representation`, with `mgda_weights`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from mtl_jax import jacobian as jac_lib
from mtl_jax import solvers
from mtl_jax.transforms import base

NORMALIZATIONS = ("none", "l2", "loss", "loss+")
SOLVERS = ("exact", "frank_wolfe")


def _check_args(normalization_type: str, solver: str, epsilon: float, max_iters: int) -> None:
    if normalization_type not in NORMALIZATIONS:
        raise ValueError(
            f"mgda: normalization_type must be one of {NORMALIZATIONS}, got {normalization_type!r}."
        )
    if solver not in SOLVERS:
        raise ValueError(f"mgda: solver must be one of {SOLVERS}, got {solver!r}.")
    if not epsilon > 0:
        raise ValueError(f"mgda: epsilon must be positive, got {epsilon}.")
    if int(max_iters) < 1:
        raise ValueError(f"mgda: max_iters must be a positive integer, got {max_iters}.")


def gradient_normalizers(
    gramian: jax.Array, normalization_type: str = "none", task_losses: Any = None
) -> jax.Array:
    """Sener & Koltun's per-task gradient normalizers ``gn`` (gradients are divided by them).

    ``'none'``: 1; ``'l2'``: ``||g_k||``; ``'loss'``: ``L_k``; ``'loss+'``: ``L_k ||g_k||``.
    A normalizer that is zero, negative or not finite is replaced by 1 (the reference code
    would divide by it).
    """
    k = gramian.shape[0]
    dtype = jnp.result_type(gramian.dtype, jnp.float32)
    norms = jnp.sqrt(jnp.maximum(jnp.diag(gramian).astype(dtype), 0.0))
    if normalization_type == "none":
        return jnp.ones((k,), dtype)
    if normalization_type == "l2":
        gn = norms
    else:
        if task_losses is None:
            raise ValueError(
                f"mgda: normalization_type={normalization_type!r} needs the per-task losses: "
                "pass task_losses=losses to tx.update (or to mgda_weights)."
            )
        losses = jnp.asarray(task_losses, dtype)
        if losses.shape != (k,):
            raise ValueError(f"mgda: task_losses has shape {losses.shape}, expected ({k},).")
        gn = losses if normalization_type == "loss" else losses * norms
    return jnp.where(jnp.isfinite(gn) & (gn > 0), gn, 1.0)


def mgda_weights(
    gramian: jax.Array,
    normalization_type: str = "none",
    *,
    task_losses: Any = None,
    solver: str = "exact",
    epsilon: float = 1e-3,
    max_iters: int = 100,
) -> jax.Array:
    """MGDA weights from the Gramian: ``w = alpha / gn`` with ``alpha`` the min-norm weights.

    ``alpha`` minimizes ``||sum_k alpha_k g_k / gn_k||`` over the simplex, where ``gn`` are the
    gradient normalizers (`gradient_normalizers`); the update is ``J^T w``.

    Args:
      gramian: [K, K] Gramian ``J J^T`` (of the full Jacobian or of the representation-level
        Jacobian for MGDA-UB).
      normalization_type: ``'none'`` (default), ``'l2'``, ``'loss'`` or ``'loss+'``.
      task_losses: [K] losses, needed by ``'loss'`` and ``'loss+'``.
      solver: ``'exact'`` (default: `mtl_jax.solvers.min_norm_simplex`, the exact minimizer)
        or ``'frank_wolfe'`` (TorchJD's approximate solver, `min_norm_frank_wolfe`).
      epsilon: Frank-Wolfe step-size tolerance (TorchJD default); ``solver='frank_wolfe'`` only.
      max_iters: Frank-Wolfe step budget (TorchJD default); ``solver='frank_wolfe'`` only.

    Returns:
      [K] non-negative weights (on the simplex for ``'none'``).

    Example:
      >>> import jax.numpy as jnp, mtl_jax as mtl
      >>> [round(x, 4) for x in mtl.mgda_weights(jnp.array([[1.0, 0.0], [0.0, 4.0]])).tolist()]
      [0.8, 0.2]
    """
    _check_args(normalization_type, solver, epsilon, max_iters)
    dtype = jnp.result_type(gramian.dtype, jnp.float32)
    g = gramian.astype(dtype)
    gn = gradient_normalizers(g, normalization_type, task_losses)
    g_norm = g / jnp.outer(gn, gn)
    if solver == "exact":
        alpha = solvers.min_norm_simplex(g_norm)
    else:
        alpha = solvers.min_norm_frank_wolfe(g_norm, epsilon=epsilon, max_iters=max_iters)
    return alpha.astype(dtype) / gn


def mgda(
    normalization_type: str = "none",
    *,
    solver: str = "exact",
    epsilon: float = 1e-3,
    max_iters: int = 100,
) -> optax.GradientTransformationExtraArgs:
    """MGDA: the minimum-norm convex combination of the (normalized) task gradients.

    Returns ``diag(w) J`` with `mgda_weights`. With the default ``normalization_type='none'``,
    ``optax.chain(mtl.mgda(), mtl.sum_tasks())`` is the exact min-norm element of the convex
    hull of the rows of ``J``, i.e. what TorchJD's ``MGDA()`` approximates with Frank-Wolfe;
    ``solver='frank_wolfe'`` reproduces TorchJD's iterates exactly. The update never conflicts
    with any task and is zero only at a Pareto-stationary point.

    MGDA-UB (the paper's cheap upper-bound variant: the Gramian of the gradients w.r.t. the
    shared representation instead of the shared parameters) is
    ``mtl.representation_value_and_grad(..., weight_fn=mtl.mgda_weights)``: see
    `mtl_jax.representation`.

    Args:
      normalization_type: gradient normalization before the min-norm solve, as in Sener &
        Koltun's code (``normalization_type``; LibMTL's ``mgda_gn``): ``'none'`` (default, as in
        TorchJD and LibMTL), ``'l2'`` (unit gradients), ``'loss'`` (divide by the loss),
        ``'loss+'`` (divide by loss times gradient norm; the paper's experiments). The last two
        need ``task_losses`` at update time.
      solver: ``'exact'`` (default) or ``'frank_wolfe'`` (TorchJD's Algorithm-2 solver).
      epsilon: TorchJD's Frank-Wolfe tolerance (default 1e-3); Frank-Wolfe only.
      max_iters: TorchJD's Frank-Wolfe budget (default 100); Frank-Wolfe only.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` mapping a Jacobian to a Jacobian.

    Example:
      >>> import jax.numpy as jnp, optax, mtl_jax as mtl
      >>> tx = optax.chain(mtl.mgda(), mtl.sum_tasks())
      >>> jac = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
      >>> d, _ = tx.update(jac, tx.init({"w": jnp.zeros(2)}))
      >>> [round(x, 4) for x in d["w"].tolist()]
      [0.8, 0.4]

    References:
      Sener, Koltun. Multi-Task Learning as Multi-Objective Optimization. NeurIPS 2018.
      Desideri. Multiple-gradient descent algorithm (MGDA) for multiobjective optimization.
      Comptes Rendus Mathematique, 2012.
      Checked against: TorchJD 0.18 ``aggregation/_mgda.py`` (exact solve vs its Frank-Wolfe:
      see tests/test_reference_torchjd.py for the tolerance) and LibMTL ``weighting/MGDA.py``
      (normalizations: the update is ``sum_k alpha_k g_k / gn_k``, as LibMTL's non-``rep_grad``
      path; LibMTL's ``rep_grad`` path drops the ``1 / gn_k`` at the end, we do not).
    """
    _check_args(normalization_type, solver, epsilon, max_iters)

    def init_fn(params):
        del params
        return base.EmptyState()

    def weights_fn(updates, state, params=None, *, task_losses=None, **extra_args):
        del extra_args
        k = jac_lib.num_tasks(updates, params)
        if normalization_type in ("loss", "loss+"):
            task_losses = base.check_task_losses("mgda", task_losses, k)
        weights = mgda_weights(
            jac_lib.gramian(updates),
            normalization_type,
            task_losses=task_losses,
            solver=solver,
            epsilon=epsilon,
            max_iters=max_iters,
        )
        return weights, state

    return base.row_weighting(init_fn, weights_fn)
