"""Loss-level weighting methods from LibMTL: UW, DWA, RLW, GLS, IMTL-L, STCH.

Each method is defined once as a pure `LossWeighting` (``<method>_weighting``) and exported as an
optax transform (``<method>``, Jacobian rows scaled by the weights) built with
`from_loss_weighting`. The loss-scalarizing one-backward path is
``mtl.weighted_value_and_grad(loss_fn, mtl.<method>_weighting(...))``.

Conventions shared by the methods of this module:

* Weights are the coefficients of the per-task losses in the gradient the reference takes, so
  ``optax.chain(mtl.<method>(K), mtl.sum_tasks())`` equals the gradient LibMTL's ``backward``
  leaves in the shared parameters.
* Learned quantities (UW log-variances, IMTL-L scales) are trained inside ``update`` by their
  own optax optimizer with the analytic gradient of the method's objective; the default is
  LibMTL's default optimizer (Adam, lr 1e-4, L2 weight decay 1e-5, as ``torch.optim.Adam``),
  since LibMTL trains these parameters with the model's optimizer.
* Epoch-level methods (DWA, STCH) take an optional ``epoch=`` extra arg (int, may be traced).
  Pass the current epoch at every step, as LibMTL's trainer does; a change of ``epoch`` closes
  the previous epoch (its mean loss over the calls of that epoch enters the history). Epochs
  are 0-based as in LibMTL (it matters for STCH's ``warmup_epoch``). Without ``epoch``, every
  call counts as one epoch.
* Methods that take logs of losses (GLS, STCH) clamp losses to ``max(loss, 0)`` before adding
  their ``eps`` (the reference's epsilon), so zero or negative losses give finite weights;
  for positive losses this is exactly the reference formula.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_jax.transforms.loss_base import LossWeighting, from_loss_weighting

_F32 = jnp.float32


def check_num_tasks_arg(name: str, num_tasks: int) -> int:
    """Construction-time check of ``num_tasks`` (a positive int)."""
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"{name}: num_tasks must be a positive int, got {num_tasks!r}.")
    return num_tasks


def check_positive(name: str, arg: str, value: float, *, allow_zero: bool = False) -> float:
    """Construction-time check that a hyper-parameter is > 0 (or >= 0)."""
    ok = value >= 0 if allow_zero else value > 0
    if not ok or value != value:  # also rejects NaN
        rng = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: {arg} must be {rng}, got {value!r}.")
    return float(value)


def libmtl_default_optimizer(
    learning_rate: float = 1e-4, weight_decay: float = 1e-5
) -> optax.GradientTransformation:
    """LibMTL's default optimizer: ``torch.optim.Adam(lr=1e-4, weight_decay=1e-5)``.

    Torch's Adam ``weight_decay`` is an L2 term added to the gradient before the moments, i.e.
    ``optax.chain(optax.add_decayed_weights(wd), optax.adam(lr))``.
    """
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))


def positive(losses: jax.Array, eps: float) -> jax.Array:
    """``max(losses, 0) + eps``: the guarded argument of a log / denominator."""
    return jnp.maximum(losses, 0.0) + eps


def current_epoch(epoch, step: jax.Array) -> jax.Array:
    """The ``epoch`` extra arg as an int32 scalar, or the call counter when it is absent."""
    if epoch is None:
        return step
    return jnp.asarray(epoch, jnp.int32).reshape(())


def safe_div(a: jax.Array, b: jax.Array, tiny: float = 1e-30) -> jax.Array:
    """``a / b`` with ``|b|`` floored at ``tiny`` (sign kept): finite for b = 0."""
    b = jnp.where(jnp.abs(b) < tiny, jnp.where(b < 0, -tiny, tiny), b)
    return a / b


def _learned_step(optimizer, grad, opt_state, param):
    updates, opt_state = optimizer.update(grad, opt_state, param)
    return optax.apply_updates(param, updates), opt_state


# --------------------------------------------------------------------------------------------
# Uncertainty weighting (Kendall et al., CVPR 2018)


class UncertaintyWeightingState(NamedTuple):
    """State of `uncertainty_weighting`: log-variances ``s`` and their optimizer state."""

    log_vars: jax.Array  # [K] float32, s_k = log sigma_k^2
    opt_state: optax.OptState


def uncertainty_weighting_weighting(
    num_tasks: int,
    init_log_var: float = -0.5,
    optimizer: optax.GradientTransformation | None = None,
) -> LossWeighting:
    """Uncertainty weighting as a pure loss weighting: ``w_k = 1 / (2 exp(s_k))``.

    The objective is LibMTL's form ``sum_k L_k / (2 exp(s_k)) + s_k / 2`` (Kendall et al.'s
    regression likelihood with ``s = log sigma^2``). Each ``update`` returns the weights at the
    current ``s`` and then takes one ``optimizer`` step on ``s`` with the analytic gradient
    ``d/ds_k = 1/2 - L_k / (2 exp(s_k))``, whose fixed point is ``exp(s_k) = L_k`` (the task's
    noise variance for a mean-squared-error loss).

    Args:
      num_tasks: K.
      init_log_var: initial ``s_k`` (LibMTL: -0.5).
      optimizer: optax transform training ``s`` (default: LibMTL's Adam(1e-4), L2 1e-5; with a
        model optimizer of a higher learning rate, pass the same one here).

    Returns:
      A `LossWeighting`; its state is `UncertaintyWeightingState`.

    Example:
      >>> lw = mtl.uncertainty_weighting_weighting(2, optimizer=optax.adam(1e-2))
      >>> w, state = lw.update(jnp.array([1.0, 4.0]), lw.init())

    References:
      Kendall, Gal, Cipolla. Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
      Geometry and Semantics. CVPR 2018.

      Checked against: LibMTL ``LibMTL/weighting/UW.py`` (weights ``1/(2 exp(s))``, ``+s/2``,
      init -0.5, ``s`` trained by the model's Adam). The paper's classification form
      (``1/sigma^2`` weight, ``log sigma`` term) is not used: LibMTL applies the regression
      form to every task, and so do we.
    """
    name = "uncertainty_weighting"
    k = check_num_tasks_arg(name, num_tasks)
    opt = optimizer if optimizer is not None else libmtl_default_optimizer()
    init_s = float(init_log_var)

    def init():
        s = jnp.full((k,), init_s, _F32)
        return UncertaintyWeightingState(s, opt.init(s))

    def update(losses, state, **extra_args):
        del extra_args
        losses = losses.astype(_F32)
        s = state.log_vars
        inv_var = jnp.exp(-s)
        weights = 0.5 * inv_var
        grad = 0.5 - 0.5 * losses * inv_var
        s, opt_state = _learned_step(opt, grad, state.opt_state, s)
        return weights, UncertaintyWeightingState(s, opt_state)

    return LossWeighting(init, update, k, name)


def uncertainty_weighting(
    num_tasks: int,
    init_log_var: float = -0.5,
    optimizer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Uncertainty weighting (UW): Jacobian rows scaled by ``1 / (2 exp(s_k))``.

    See `uncertainty_weighting_weighting` for the rule and arguments. Update extra args:
    ``task_losses`` ([K], required).

    Example:
      >>> tx = optax.chain(mtl.uncertainty_weighting(3), mtl.sum_tasks(), optax.adam(1e-3))

    References:
      Kendall, Gal, Cipolla. Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
      Geometry and Semantics. CVPR 2018.

      Checked against: LibMTL ``LibMTL/weighting/UW.py``.
    """
    return from_loss_weighting(uncertainty_weighting_weighting(num_tasks, init_log_var, optimizer))


# --------------------------------------------------------------------------------------------
# Dynamic Weight Average (Liu et al., CVPR 2019)


class DWAState(NamedTuple):
    """State of `dwa`: the loss history of the last two finished epochs."""

    step: jax.Array  # int32, number of calls so far
    epoch: jax.Array  # int32, epoch of the last call (-1 before the first)
    loss_sum: jax.Array  # [K], sum of the losses of the current epoch
    count: jax.Array  # float32, number of calls in the current epoch
    prev1: jax.Array  # [K], mean loss of the last finished epoch
    prev2: jax.Array  # [K], mean loss of the epoch before
    finished: jax.Array  # int32, number of finished epochs


def dwa_weighting(num_tasks: int, T: float = 2.0) -> LossWeighting:  # noqa: N803 (paper's name)
    """Dynamic Weight Average as a pure loss weighting.

    ``w_k = K softmax_k(r / T)`` with ``r_k = Lbar_k(e-1) / Lbar_k(e-2)`` the ratio of the mean
    losses of the two previous epochs; ``w = 1`` until two epochs have finished.

    Per-epoch use (as LibMTL): pass ``epoch=`` (the current epoch index) at every update; the
    weights stay fixed within an epoch and each epoch's mean loss is the mean over its calls.
    Without ``epoch``, each call is one epoch, so the weights at call t use the losses of calls
    t-1 and t-2 (the per-step variant).

    Args:
      num_tasks: K.
      T: softmax temperature (> 0; MTAN and LibMTL: 2).

    Returns:
      A `LossWeighting`; its state is `DWAState`; update extra args: ``epoch`` (optional).

    References:
      Liu, Johns, Davison. End-to-End Multi-Task Learning with Attention. CVPR 2019.

      Checked against: LibMTL ``LibMTL/weighting/DWA.py`` with the trainer's epoch-mean
      ``train_loss_buffer``.
    """
    name = "dwa"
    k = check_num_tasks_arg(name, num_tasks)
    temp = check_positive(name, "T", T)

    def init():
        z = jnp.zeros((k,), _F32)
        i = jnp.zeros((), jnp.int32)
        return DWAState(i, i - 1, z, jnp.zeros((), _F32), z, z, i)

    def update(losses, state, *, epoch=None, **extra_args):
        del extra_args
        losses = losses.astype(_F32)
        e = current_epoch(epoch, state.step)
        close = (e != state.epoch) & (state.count > 0)
        mean = state.loss_sum / jnp.maximum(state.count, 1.0)
        prev1 = jnp.where(close, mean, state.prev1)
        prev2 = jnp.where(close, state.prev1, state.prev2)
        finished = state.finished + close.astype(jnp.int32)
        loss_sum = jnp.where(close, 0.0, state.loss_sum) + losses
        count = jnp.where(close, 0.0, state.count) + 1.0
        ratio = safe_div(prev1, prev2)
        weights = jnp.where(finished >= 2, k * jax.nn.softmax(ratio / temp), jnp.ones((k,), _F32))
        new = DWAState(state.step + 1, e, loss_sum, count, prev1, prev2, finished)
        return weights, new

    return LossWeighting(init, update, k, name)


def dwa(num_tasks: int, T: float = 2.0) -> optax.GradientTransformationExtraArgs:  # noqa: N803
    """Dynamic Weight Average (DWA): rows scaled by ``K softmax(Lbar(e-1) / Lbar(e-2) / T)``.

    See `dwa_weighting`. Update extra args: ``task_losses`` (required), ``epoch`` (optional:
    pass the epoch index at every step for LibMTL's once-per-epoch weights; without it each
    call counts as one epoch).

    Example:
      >>> tx = optax.chain(mtl.dwa(3), mtl.sum_tasks(), optax.adam(1e-3))
      >>> # updates, state = tx.update(jac, state, params, task_losses=losses, epoch=epoch)

    References:
      Liu, Johns, Davison. End-to-End Multi-Task Learning with Attention. CVPR 2019.

      Checked against: LibMTL ``LibMTL/weighting/DWA.py``.
    """
    return from_loss_weighting(dwa_weighting(num_tasks, T))


# --------------------------------------------------------------------------------------------
# Random Loss Weighting (Lin et al., TMLR 2022)


class RLWState(NamedTuple):
    """State of `rlw`: the PRNG key."""

    key: jax.Array


def rlw_weighting(num_tasks: int, seed: int = 0) -> LossWeighting:
    """Random Loss Weighting as a pure loss weighting: ``w = softmax(z)``, ``z ~ N(0, I_K)``.

    A fresh draw at every update (from the key in the state); the weights sum to 1.

    Args:
      num_tasks: K.
      seed: seed of the PRNG key kept in the state.

    Returns:
      A `LossWeighting`; its state is `RLWState`.

    References:
      Lin, Ye, Xu, Shi, Zhang, Kwok. Reasonable Effectiveness of Random Weighting: A Litmus
      Test for Multi-Task Learning. TMLR 2022.

      Checked against: TorchJD 0.18 ``Random`` (``softmax(randn(K))``) and LibMTL
      ``LibMTL/weighting/RLW.py`` (same distribution; the draws differ, being another RNG).
    """
    name = "rlw"
    k = check_num_tasks_arg(name, num_tasks)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"rlw: seed must be an int, got {seed!r}.")

    def init():
        return RLWState(jax.random.key(seed))

    def update(losses, state, **extra_args):
        del losses, extra_args
        key, sub = jax.random.split(state.key)
        weights = jax.nn.softmax(jax.random.normal(sub, (k,), _F32))
        return weights, RLWState(key)

    return LossWeighting(init, update, k, name)


def rlw(num_tasks: int, seed: int = 0) -> optax.GradientTransformationExtraArgs:
    """Random Loss Weighting (RLW): rows scaled by ``softmax(z)``, ``z ~ N(0, I)`` per step.

    See `rlw_weighting`. ``task_losses`` is checked for shape but does not enter the weights.

    Example:
      >>> tx = optax.chain(mtl.rlw(3, seed=0), mtl.sum_tasks(), optax.adam(1e-3))

    References:
      Lin et al. Reasonable Effectiveness of Random Weighting. TMLR 2022.

      Checked against: TorchJD 0.18 ``Random``, LibMTL ``LibMTL/weighting/RLW.py``.
    """
    return from_loss_weighting(rlw_weighting(num_tasks, seed))


# --------------------------------------------------------------------------------------------
# Geometric Loss Strategy (Chennupati et al., CVPRW 2019)


class GLSState(NamedTuple):
    """State of `gls` (stateless)."""


def gls_weighting(num_tasks: int, eps: float = 1e-8) -> LossWeighting:
    """Geometric Loss Strategy as a pure loss weighting.

    The objective is the geometric mean ``(prod_k L_k)^(1/K)``; its gradient is
    ``sum_k w_k grad L_k`` with ``w_k = GM(L) / (K L_k)``, computed in log space.

    Args:
      num_tasks: K.
      eps: losses are used as ``max(L, 0) + eps`` (LibMTL has no epsilon; 1e-8 changes the
        weights of O(1) losses by ~1e-8 relative and keeps zero/negative losses finite).

    Returns:
      A `LossWeighting` (stateless).

    References:
      Chennupati, Sistu, Yogamani, Rawashdeh. MultiNet++: Multi-Stream Feature Aggregation
      and Geometric Loss Strategy for Multi-Task Learning. CVPR Workshops 2019.

      Checked against: LibMTL ``LibMTL/weighting/GLS.py`` (the gradient of its loss; the
      ``batch_weight`` LibMTL returns for logging, ``L / (K prod L)``, is not that gradient's
      weights and is not reproduced).
    """
    name = "gls"
    k = check_num_tasks_arg(name, num_tasks)
    eps = check_positive(name, "eps", eps)

    def init():
        return GLSState()

    def update(losses, state, **extra_args):
        del extra_args
        logs = jnp.log(positive(losses.astype(_F32), eps))
        # GM / (K L_k) = exp(mean(log L) - log L_k) / K
        weights = jnp.exp(jnp.mean(logs) - logs) / k
        return weights, state

    return LossWeighting(init, update, k, name)


def gls(num_tasks: int, eps: float = 1e-8) -> optax.GradientTransformationExtraArgs:
    """Geometric Loss Strategy (GLS): rows scaled by ``GM(L) / (K L_k)``.

    The gradient of the geometric mean of the task losses. See `gls_weighting`.

    Example:
      >>> tx = optax.chain(mtl.gls(3), mtl.sum_tasks(), optax.adam(1e-3))

    References:
      Chennupati et al. MultiNet++. CVPR Workshops 2019.

      Checked against: LibMTL ``LibMTL/weighting/GLS.py``.
    """
    return from_loss_weighting(gls_weighting(num_tasks, eps))


# --------------------------------------------------------------------------------------------
# IMTL-L (Liu et al., ICLR 2021)


class IMTLLState(NamedTuple):
    """State of `imtl_l`: log loss scales ``s`` and their optimizer state."""

    log_scales: jax.Array  # [K] float32
    opt_state: optax.OptState


def imtl_l_weighting(
    num_tasks: int, optimizer: optax.GradientTransformation | None = None
) -> LossWeighting:
    """IMTL-L (loss balance) as a pure loss weighting: ``w_k = exp(s_k)``.

    The scaled loss is ``exp(s_k) L_k - s_k``; each ``update`` returns the weights at the
    current ``s`` and takes one ``optimizer`` step on ``s`` with the gradient
    ``exp(s_k) L_k - 1`` (fixed point ``exp(s_k) L_k = 1``: all scaled losses equal).

    Args:
      num_tasks: K.
      optimizer: optax transform training ``s`` (default LibMTL's Adam(1e-4), L2 1e-5).

    Returns:
      A `LossWeighting`; its state is `IMTLLState`.

    References:
      Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang. Towards Impartial Multi-task Learning.
      ICLR 2021.

      Checked against: LibMTL ``LibMTL/weighting/IMTL.py`` (its loss-scale half: ``s`` init 0,
      scaled loss ``exp(s) L - s``, ``s`` trained by the model's Adam; the IMTL-G half is
      `imtl_g`).
    """
    name = "imtl_l"
    k = check_num_tasks_arg(name, num_tasks)
    opt = optimizer if optimizer is not None else libmtl_default_optimizer()

    def init():
        s = jnp.zeros((k,), _F32)
        return IMTLLState(s, opt.init(s))

    def update(losses, state, **extra_args):
        del extra_args
        s = state.log_scales
        weights = jnp.exp(s)
        grad = weights * losses.astype(_F32) - 1.0
        s, opt_state = _learned_step(opt, grad, state.opt_state, s)
        return weights, IMTLLState(s, opt_state)

    return LossWeighting(init, update, k, name)


def imtl_l(
    num_tasks: int, optimizer: optax.GradientTransformation | None = None
) -> optax.GradientTransformationExtraArgs:
    """IMTL-L: rows scaled by learned loss scales ``exp(s_k)``.

    See `imtl_l_weighting`. Chain with `imtl_g` for the full IMTL:
    ``optax.chain(mtl.imtl_l(K), mtl.imtl_g(), mtl.sum_tasks(), ...)``.

    Example:
      >>> tx = optax.chain(mtl.imtl_l(3), mtl.sum_tasks(), optax.adam(1e-3))

    References:
      Liu et al. Towards Impartial Multi-task Learning. ICLR 2021.

      Checked against: LibMTL ``LibMTL/weighting/IMTL.py`` (loss-scale half).
    """
    return from_loss_weighting(imtl_l_weighting(num_tasks, optimizer))


# --------------------------------------------------------------------------------------------
# Smooth Tchebycheff scalarization (Lin et al., ICML 2024)


class STCHState(NamedTuple):
    """State of `stch`: call counter and the nadir point collected in the warm-up epoch."""

    step: jax.Array  # int32
    nadir_sum: jax.Array  # [K]
    nadir_count: jax.Array  # float32


def stch_weighting(
    num_tasks: int, mu: float = 1.0, warmup_epoch: int = 4, eps: float = 1e-20
) -> LossWeighting:
    """Smooth Tchebycheff scalarization as a pure loss weighting.

    As LibMTL: before ``warmup_epoch`` the objective is ``sum_k log L_k`` (weights ``1/L_k``);
    during epoch ``warmup_epoch`` too, while the mean losses of that epoch are collected as the
    nadir point ``z``; afterwards the objective is
    ``K mu log sum_k exp(log(L_k / z_k) / mu)``, whose weights are
    ``w_k = K softmax_k(log(L / z) / mu) / L_k``.

    Epochs: pass the 0-based ``epoch=`` at every update (as LibMTL's trainer); without it each
    call is one epoch. If no call fell in epoch ``warmup_epoch``, the first later call provides
    the nadir point.

    Args:
      num_tasks: K.
      mu: smoothing parameter (> 0; LibMTL default 1.0).
      warmup_epoch: number of warm-up epochs (>= 0; LibMTL default 4).
      eps: LibMTL's 1e-20 inside the logs; losses are used as ``max(L, 0) + eps``.

    Returns:
      A `LossWeighting`; its state is `STCHState`; update extra args: ``epoch`` (optional).

    References:
      Lin, Zhang, Liu, Yang, Zhang. Smooth Tchebycheff Scalarization for Multi-Objective
      Optimization. ICML 2024.

      Checked against: LibMTL ``LibMTL/weighting/STCH.py`` (incl. its log-loss warm-up).
    """
    name = "stch"
    k = check_num_tasks_arg(name, num_tasks)
    mu = check_positive(name, "mu", mu)
    if isinstance(warmup_epoch, bool) or not isinstance(warmup_epoch, int) or warmup_epoch < 0:
        raise ValueError(f"stch: warmup_epoch must be an int >= 0, got {warmup_epoch!r}.")
    eps = check_positive(name, "eps", eps)

    def init():
        return STCHState(jnp.zeros((), jnp.int32), jnp.zeros((k,), _F32), jnp.zeros((), _F32))

    def update(losses, state, *, epoch=None, **extra_args):
        del extra_args
        losses = losses.astype(_F32)
        e = current_epoch(epoch, state.step)
        collect = (e == warmup_epoch) | ((e > warmup_epoch) & (state.nadir_count == 0))
        nadir_sum = state.nadir_sum + jnp.where(collect, losses, 0.0)
        nadir_count = state.nadir_count + collect.astype(_F32)
        l_pos = positive(losses, eps)
        log_weights = 1.0 / l_pos
        nadir = jnp.maximum(nadir_sum / jnp.maximum(nadir_count, 1.0), eps)
        rel = jnp.maximum(losses, 0.0) / nadir + eps
        soft = jax.nn.softmax(jnp.log(rel) / mu)
        # floored like the warm-up's 1 / (L + eps): weights <= K / eps, finite for L <= 0.
        stch_weights = k * soft / jnp.maximum(nadir * rel, eps)
        weights = jnp.where(e > warmup_epoch, stch_weights, log_weights)
        return weights, STCHState(state.step + 1, nadir_sum, nadir_count)

    return LossWeighting(init, update, k, name)


def stch(
    num_tasks: int, mu: float = 1.0, warmup_epoch: int = 4, eps: float = 1e-20
) -> optax.GradientTransformationExtraArgs:
    """Smooth Tchebycheff scalarization (STCH): rows scaled by ``K softmax(log(L/z)/mu) / L``.

    See `stch_weighting`. Update extra args: ``task_losses`` (required), ``epoch`` (optional).

    Example:
      >>> tx = optax.chain(mtl.stch(3), mtl.sum_tasks(), optax.adam(1e-3))
      >>> # updates, state = tx.update(jac, state, params, task_losses=losses, epoch=epoch)

    References:
      Lin et al. Smooth Tchebycheff Scalarization for Multi-Objective Optimization. ICML 2024.

      Checked against: LibMTL ``LibMTL/weighting/STCH.py``.
    """
    return from_loss_weighting(stch_weighting(num_tasks, mu, warmup_epoch, eps))
