"""Stochastic multi-objective methods with tracked state: MoCo, SDMGrad and MoDo.

These methods come with convergence guarantees for *stochastic* gradients, and two of them
(SDMGrad, MoDo) need task gradients from independent mini-batches for their weight update:

* ``updates`` (the Jacobian passed to ``tx.update``) is the Jacobian that gets re-weighted and
  becomes the parameter update.
* The extra argument ``weight_jacobians=(jac_a, jac_b)`` gives two Jacobians computed on two
  other, independent mini-batches; the weight update then uses the cross matrix
  ``A = J_a J_b^T`` (`cross_gramian`), an unbiased estimate of the Gramian. This is the
  three-batch form of LibMTL and of the official MoDo code (``three_grads``). For the
  two-batch form of the MoDo paper, pass ``updates = (J_a + J_b) / 2``.
* Without ``weight_jacobians`` the weight update uses the Gramian of ``updates`` itself: the
  single-batch (biased) variant, which is what you get from a standard training loop.

From a harness: compute the extra Jacobians with `mtl.value_and_jacobian` on the extra
batches in the same jitted step and pass them by name; other transforms in the chain ignore
the argument.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_jax import jacobian as jac_lib
from mtl_jax.solvers import project_simplex
from mtl_jax.transforms import base
from mtl_jax.transforms.base import check_num_tasks, check_task_losses

PyTree = Any


def cross_gramian(jac_a: PyTree, jac_b: PyTree) -> jax.Array:
    """``J_a J_b^T`` (K x K) for two Jacobians of the same structure, summed over leaves.

    Accumulates in float32 (or wider), like `mtl.gramian`.
    """
    k = jac_lib.num_tasks(jac_a)
    if jac_lib.num_tasks(jac_b) != k or jax.tree.structure(jac_a) != jax.tree.structure(jac_b):
        raise ValueError("cross_gramian: the two Jacobians must have the same structure and K.")
    leaves_a, leaves_b = jax.tree.leaves(jac_a), jax.tree.leaves(jac_b)
    acc = jnp.result_type(jnp.float32, *[leaf.dtype for leaf in leaves_a + leaves_b])
    out = jnp.zeros((k, k), acc)
    for a, b in zip(leaves_a, leaves_b, strict=True):
        if a.shape != b.shape:
            raise ValueError(f"cross_gramian: leaf shapes differ: {a.shape} vs {b.shape}.")
        ra, rb = jnp.reshape(a, (k, -1)), jnp.reshape(b, (k, -1))
        out = out + jnp.matmul(
            ra, rb.T, preferred_element_type=acc, precision=jax.lax.Precision.HIGHEST
        )
    return out


def _weight_matrix(name: str, updates: PyTree, weight_jacobians: Any) -> jax.Array:
    if weight_jacobians is None:
        return jac_lib.gramian(updates)
    if not (isinstance(weight_jacobians, (tuple, list)) and len(weight_jacobians) == 2):
        raise ValueError(
            f"{name}: weight_jacobians must be a pair (jac_a, jac_b) of Jacobians from two "
            "independent mini-batches."
        )
    jac_a, jac_b = weight_jacobians
    if jax.tree.structure(jac_a) != jax.tree.structure(updates):
        raise ValueError(f"{name}: weight_jacobians must have the structure of the Jacobian.")
    return cross_gramian(jac_a, jac_b)


def _finite_or(x: jax.Array, fallback: jax.Array) -> jax.Array:
    return jnp.where(jnp.all(jnp.isfinite(x)), x, fallback)


# ----------------------------------------------------------------------------------------------
# MoDo


class MoDoState(NamedTuple):
    """State of `modo`: the task weights ``lambda`` on the simplex."""

    weights: jax.Array


def modo_step(matrix: jax.Array, weights: jax.Array, gamma: float, rho: float) -> jax.Array:
    """MoDo's weight update: ``lambda <- proj_simplex(lambda - gamma (A lambda + rho lambda))``.

    Args:
      matrix: [K, K] ``A = J_a J_b^T`` (or a Gramian).
      weights: [K] current weights on the simplex.
      gamma: step size.
      rho: l2 regularization.

    Returns:
      [K] new weights; the old ones if the update is not finite.
    """
    a = matrix.astype(jnp.result_type(matrix.dtype, jnp.float32))
    w = weights.astype(a.dtype)
    new = project_simplex(w - gamma * (a @ w + rho * w))
    return _finite_or(new, w)


def modo(
    num_tasks: int, gamma: float = 0.1, rho: float = 0.1
) -> optax.GradientTransformationExtraArgs:
    """MoDo (Multi-objective gradient with Double sampling).

    One projected-gradient step on the MGDA objective per update, with the task weights
    ``lambda`` tracked in the state (uniform at start):
    ``lambda <- proj_simplex(lambda - gamma (J_a J_b^T lambda + rho lambda))``, then returns
    ``diag(lambda) J``. Pass ``weight_jacobians=(J_a, J_b)`` from two independent
    mini-batches (see the module docstring); without them ``J J^T`` of the update Jacobian is
    used.

    Args:
      num_tasks: K.
      gamma: step size of the weight update, ``> 0``. TorchJD's default 0.1 is used; LibMTL's
        ``MoDo_gamma`` default is 1e-3.
      rho: l2 regularization of the weight update, ``>= 0`` (0.1 in both references).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` mapping a Jacobian to a Jacobian; its update
      takes the optional extra argument ``weight_jacobians``.

    Example:
      >>> import jax.numpy as jnp, optax, mtl_jax as mtl
      >>> tx = optax.chain(mtl.modo(num_tasks=2), mtl.sum_tasks())
      >>> jac = jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> d, state = tx.update(jac, tx.init(jnp.zeros(2)))
      >>> [round(float(x), 3) for x in d]
      [0.575, 0.85]

    References:
      Chen, Fernando, Ying, Chen. Three-Way Trade-Off in Multi-Objective Learning:
      Optimization, Generalization and Conflict-Avoidance. NeurIPS 2023 (JMLR 2024).

      Checked against: TorchJD 0.18 ``MoDoWeighting`` (``aggregation/_modo.py``) over 25
      consecutive steps, and LibMTL ``weighting/MoDo.py`` (same update).
    """
    if num_tasks < 1:
        raise ValueError(f"modo: num_tasks must be a positive integer, got {num_tasks}.")
    if not gamma > 0:
        raise ValueError(f"modo: gamma must be positive, got {gamma}.")
    if not rho >= 0:
        raise ValueError(f"modo: rho must be non-negative, got {rho}.")

    def init_fn(params):
        del params
        return MoDoState(weights=jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32))

    def weights_fn(updates, state, params=None, *, weight_jacobians=None, **extra_args):
        del extra_args
        k = jac_lib.num_tasks(updates, params)
        check_num_tasks("modo", num_tasks, k)
        a = _weight_matrix("modo", updates, weight_jacobians)
        w = modo_step(a, state.weights, gamma, rho)
        return w, MoDoState(weights=w.astype(state.weights.dtype))

    return base.row_weighting(init_fn, weights_fn)


# ----------------------------------------------------------------------------------------------
# SDMGrad


class SDMGradState(NamedTuple):
    """State of `sdmgrad`: the inner weights ``w`` on the simplex (warm start across steps)."""

    weights: jax.Array


def sdmgrad_step(
    matrix: jax.Array,
    weights: jax.Array,
    lr: float = 10.0,
    momentum: float = 0.5,
    n_iter: int = 20,
    lambda_: float = 0.3,
    pref_vector: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """SDMGrad's weight solve: ``n_iter`` steps of projected SGD with momentum.

    ``A`` is scale-normalized by the squared mean of ``sqrt(max(diag(A), 0))`` (plus 1e-8);
    each step takes ``v <- momentum v + A (w + lambda_ w~)``, ``w <- proj(w - lr v)`` with
    ``w~`` the preference vector (uniform by default).

    Returns:
      ``(new_w, combination)``: the inner weights to keep, and the final weights
      ``(w + lambda_ w~) / (1 + lambda_)`` of the update.
    """
    a = matrix.astype(jnp.result_type(matrix.dtype, jnp.float32))
    k = a.shape[0]
    w0 = weights.astype(a.dtype)
    pref = jnp.full((k,), 1.0 / k, a.dtype) if pref_vector is None else pref_vector.astype(a.dtype)
    scale = jnp.mean(jnp.sqrt(jnp.maximum(jnp.diag(a), 0.0)))
    a = a / (scale * scale + 1e-8)
    a = jnp.where(jnp.all(jnp.isfinite(a)), a, 0.0)

    def body(_, carry):
        w, v = carry
        v = momentum * v + a @ (w + lambda_ * pref)
        return project_simplex(w - lr * v), v

    w, _ = jax.lax.fori_loop(0, n_iter, body, (w0, jnp.zeros_like(w0)))
    w = _finite_or(w, w0)
    return w, (w + lambda_ * pref) / (1.0 + lambda_)


def sdmgrad(
    num_tasks: int,
    lr: float = 10.0,
    momentum: float = 0.5,
    n_iter: int = 20,
    lambda_: float = 0.3,
    pref_vector: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """SDMGrad (Stochastic Direction-oriented Multi-objective Gradient descent).

    Solves ``min_{w in simplex} ||g_w + lambda_ g~||^2 / 2`` (``g~ = w~^T J``, the preference
    direction, the mean gradient by default) approximately with ``n_iter`` steps of projected
    momentum SGD, warm-started from the previous step's ``w`` (kept in the state), then returns
    ``diag((w + lambda_ w~) / (1 + lambda_)) J``. The inner problem uses ``A = J_a J_b^T``
    from ``weight_jacobians=(J_a, J_b)`` (two independent mini-batches, see the module
    docstring); without them ``J J^T`` of the update Jacobian.

    Args:
      num_tasks: K.
      lr: inner step size, ``> 0``. TorchJD default 10.0; LibMTL hard-codes 5.
      momentum: inner momentum in [0, 1) (0.5 in both references; reset at every step).
      n_iter: inner iterations, ``>= 1`` (20 in both; LibMTL ``SDMGrad_niter``).
      lambda_: pull toward the preference direction, ``>= 0`` (0.3 in both references and the
        authors' experiments; LibMTL ``SDMGrad_lamda``).
      pref_vector: optional [K] preference vector ``w~`` (default uniform).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` mapping a Jacobian to a Jacobian; its update
      takes the optional extra argument ``weight_jacobians``.

    Example:
      >>> import jax.numpy as jnp, optax, mtl_jax as mtl
      >>> tx = optax.chain(mtl.sdmgrad(num_tasks=2), mtl.sum_tasks())
      >>> jac = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> d, _ = tx.update(jac, tx.init(jnp.zeros(2)))
      >>> [round(float(x), 3) for x in d]
      [0.5, 0.5]

    References:
      Xiao, Ban, Ji. Direction-oriented Multi-objective Learning: Simple and Provable
      Stochastic Algorithms. NeurIPS 2023.

      Checked against: TorchJD 0.18 ``SDMGradWeighting`` (``aggregation/_sdmgrad.py``): exact
      over 25 consecutive steps at ``lr=1``; at the default ``lr=10`` the inner solver is not
      contractive and float32/float64 runs drift apart (TorchJD's own too), so there each
      step is checked from synced weights, within 2x TorchJD-float32's deviation. LibMTL
      ``weighting/SDMGrad.py`` has the same rule with ``lr=5``.
    """
    if num_tasks < 1:
        raise ValueError(f"sdmgrad: num_tasks must be a positive integer, got {num_tasks}.")
    if not lr > 0:
        raise ValueError(f"sdmgrad: lr must be positive, got {lr}.")
    if not 0 <= momentum < 1:
        raise ValueError(f"sdmgrad: momentum must be in [0, 1), got {momentum}.")
    if int(n_iter) != n_iter or n_iter < 1:
        raise ValueError(f"sdmgrad: n_iter must be a positive integer, got {n_iter}.")
    if not lambda_ >= 0:
        raise ValueError(f"sdmgrad: lambda_ must be non-negative, got {lambda_}.")
    pref = None
    if pref_vector is not None:
        pref = jnp.asarray(pref_vector, jnp.float32)
        if pref.shape != (num_tasks,):
            raise ValueError(
                f"sdmgrad: pref_vector must have shape ({num_tasks},), got {pref.shape}."
            )

    def init_fn(params):
        del params
        return SDMGradState(weights=jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32))

    def weights_fn(updates, state, params=None, *, weight_jacobians=None, **extra_args):
        del extra_args
        k = jac_lib.num_tasks(updates, params)
        check_num_tasks("sdmgrad", num_tasks, k)
        a = _weight_matrix("sdmgrad", updates, weight_jacobians)
        w, comb = sdmgrad_step(a, state.weights, lr, momentum, int(n_iter), lambda_, pref)
        new_state = SDMGradState(weights=w.astype(state.weights.dtype))
        return comb, new_state

    return base.row_weighting(init_fn, weights_fn)


# ----------------------------------------------------------------------------------------------
# MoCo


class MoCoState(NamedTuple):
    """State of `moco`: tracked task gradients ``y`` (Jacobian-shaped), weights, step count."""

    y: PyTree
    weights: jax.Array
    step: jax.Array


def moco(
    num_tasks: int,
    beta: float = 0.5,
    beta_sigma: float = 0.5,
    gamma: float = 0.1,
    gamma_sigma: float = 0.5,
    rho: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    """MoCo: MGDA with tracked (bias-corrected) task gradients.

    At step t (from 1): each task gradient is normalized and scaled by its loss,
    ``h_k = g_k / (||g_k|| + 1e-8) * loss_k``; the tracking variable moves toward it,
    ``y <- y - beta / t^beta_sigma (y - h)``; the weights take a softmax step,
    ``lambda <- softmax(lambda - gamma / t^gamma_sigma (y y^T + rho I) lambda)``; the update is
    ``y^T lambda``, returned as ``diag(lambda) y`` (the rows are the tracked gradients, not
    the input ones; a `RowCombination` of y, so ``mtl.chain(mtl.moco(K), mtl.sum_tasks())``
    reduces it in one ``lambda @ y`` without writing ``diag(lambda) y``). ``y`` has the shape
    of the Jacobian and lives in the state (K times the parameter memory). Needs
    ``task_losses``.

    Args:
      num_tasks: K.
      beta: step size of the tracking variable (LibMTL ``MoCo_beta``, default 0.5).
      beta_sigma: decay exponent of ``beta`` (``MoCo_beta_sigma``, 0.5).
      gamma: step size of the weights (``MoCo_gamma``, 0.1).
      gamma_sigma: decay exponent of ``gamma`` (``MoCo_gamma_sigma``, 0.5).
      rho: l2 regularization of the weight update (``MoCo_rho``, 0).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` mapping a Jacobian to a Jacobian; its update
      needs ``task_losses``.

    Example:
      >>> import jax.numpy as jnp, optax, mtl_jax as mtl
      >>> tx = optax.chain(mtl.moco(num_tasks=2), mtl.sum_tasks())
      >>> jac = jnp.array([[2.0, 0.0], [0.0, 1.0]])
      >>> d, _ = tx.update(jac, tx.init(jnp.zeros(2)), task_losses=jnp.array([1.0, 1.0]))
      >>> d.shape
      (2,)

    References:
      Fernando, Shen, Liu, Chaudhury, Murugesan, Chen. Mitigating Gradient Bias in
      Multi-objective Learning: A Provably Convergent Approach. ICLR 2023.

      Checked against: LibMTL ``weighting/MoCo.py`` (TorchJD has no MoCo), re-derived in
      PyTorch in ``tests/test_reference_part_b.py`` over 25 consecutive steps.
    """
    if num_tasks < 1:
        raise ValueError(f"moco: num_tasks must be a positive integer, got {num_tasks}.")
    for name, value in (("beta", beta), ("gamma", gamma)):
        if not value > 0:
            raise ValueError(f"moco: {name} must be positive, got {value}.")
    for name, value in (("beta_sigma", beta_sigma), ("gamma_sigma", gamma_sigma), ("rho", rho)):
        if not value >= 0:
            raise ValueError(f"moco: {name} must be non-negative, got {value}.")

    def init_fn(params):
        y = jax.tree.map(
            lambda p: jnp.zeros((num_tasks, *jnp.shape(p)), jnp.asarray(p).dtype), params
        )
        return MoCoState(
            y=y,
            weights=jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32),
            step=jnp.zeros((), jnp.int32),
        )

    def combination(updates, state, params=None, *, task_losses=None, **extra_args):
        del extra_args
        k = jac_lib.num_tasks(updates, params)
        check_num_tasks("moco", num_tasks, k)
        losses = check_task_losses("moco", task_losses, k).astype(jnp.float32)
        if jax.tree.structure(state.y) != jax.tree.structure(updates):
            raise ValueError("moco: the Jacobian's structure differs from the parameters'.")
        step = state.step + 1
        t = step.astype(jnp.float32)
        # Row norms from the rows' squares: the Gramian's diagonal without its K^2 P matmul.
        sq_norms = sum(
            jnp.sum(jnp.square(jnp.reshape(leaf, (k, -1)).astype(jnp.float32)), axis=1)
            for leaf in jax.tree.leaves(updates)
        )
        norms = jnp.sqrt(sq_norms)
        scale = _finite_or(losses / (norms + 1e-8), jnp.zeros_like(losses))
        h = jac_lib.scale_rows(updates, scale)
        b = beta / t**beta_sigma
        # The new y is finite when the Jacobian is (its rows' squared norms are finite, short of
        # entries above ~1e19 whose squares overflow: then the old y is kept too), since the old
        # y is and h's rows are normalized. Deciding from the norms lets the selection fuse into
        # the y update: one K x P write (a select after the Gramian of y wrote a second one, and
        # a lax.cond copied y: MoCo's K=40 update 148 -> 61 ms on 1.1M parameters).
        y_ok = jnp.all(jnp.isfinite(sq_norms))

        def track(yl, hl):
            y32 = yl.astype(jnp.float32)
            return jnp.where(y_ok, y32 - b * (y32 - hl.astype(jnp.float32)), y32).astype(yl.dtype)

        y = jax.tree.map(track, state.y, h)
        gy = jac_lib.gramian(y)
        lam = state.weights.astype(gy.dtype)
        step_size = gamma / t**gamma_sigma
        new_lam = jax.nn.softmax(lam - step_size * (gy + rho * jnp.eye(k, dtype=gy.dtype)) @ lam)
        new_lam = _finite_or(new_lam, lam)
        new_state = MoCoState(y=y, weights=new_lam.astype(state.weights.dtype), step=step)
        return y, new_lam, new_state

    def update_fn(updates, state, params=None, **extra_args):
        y, lam, new_state = combination(updates, state, params, **extra_args)
        out = jax.tree.map(lambda yl, u: yl.astype(u.dtype), jac_lib.scale_rows(y, lam), updates)
        return out, new_state

    # A RowCombination of the tracked rows y: `mtl.chain` reduces diag(lambda) y in one w @ y.
    return base.RowCombination(init_fn, combination, update_fn)
