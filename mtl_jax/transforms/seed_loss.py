"""Loss-level methods from the seed papers: IGB, CoBa, MT-GRPO, MedGRPO, ARL, VisATB, Muppet.

Each method is defined once as a pure `LossWeighting` (``<method>_weighting``) and exported as
an optax transform (``<method>``, Jacobian rows scaled by the weights). The weighting also runs
the one-backward loss-scalarizing path, `mtl.weighted_value_and_grad`::

    lw = mtl.coba_weighting(num_tasks=3)
    vg = mtl.weighted_value_and_grad(loss_fn, lw)
    (losses, w, lw_state), grads = vg(lw_state, params, batch, val_losses=val_losses)

All K-space arithmetic is float32. Histories are fixed-size ring buffers, so every update is
jit-safe with static shapes. Divisions are guarded by a documented ``eps``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_jax.transforms.loss_base import LossWeighting, from_loss_weighting

_F32 = jnp.float32
# Clip for ratios fed to softmax: keeps huge-but-finite inputs from overflowing to inf.
_BIG = 1e30
# Bound of worst_task's logit-gradient signal: its square stays finite in float32.
_SIGNAL_MAX = 1e15


def _check_num_tasks(name: str, num_tasks: int) -> None:
    if not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"{name}: num_tasks must be a positive int, got {num_tasks!r}.")


def _check_positive(name: str, arg: str, value: float, strict: bool = True) -> None:
    ok = value > 0 if strict else value >= 0
    if not ok:
        rel = "> 0" if strict else ">= 0"
        raise ValueError(f"{name}: {arg} must be {rel}, got {value!r}.")


def _safe_div(a: jax.Array, b: jax.Array) -> jax.Array:
    """a / b, and 0 where b == 0 (no NaN in either branch's gradient)."""
    nz = b != 0
    return jnp.where(nz, a / jnp.where(nz, b, 1.0), 0.0)


def _clip_big(x: jax.Array) -> jax.Array:
    return jnp.clip(jnp.nan_to_num(x, nan=0.0, posinf=_BIG, neginf=-_BIG), -_BIG, _BIG)


def _extra_vector(name: str, arg: str, value: Any, num_tasks: int, dtype=_F32) -> jax.Array:
    value = jnp.asarray(value, dtype)
    if value.shape != (num_tasks,):
        raise ValueError(f"{name}: {arg} has shape {value.shape}, expected ({num_tasks},).")
    return value


# --------------------------------------------------------------------------------------------
# IGB: Improvable Gap Balancing (v1)
# --------------------------------------------------------------------------------------------


class IGBState(NamedTuple):
    """State of `igb`: step counter, running sum of the base-epoch losses, base losses."""

    step: jax.Array  # int32 scalar: updates done so far
    loss_sum: jax.Array  # [K] sum of the losses seen during the base epoch
    base_losses: jax.Array  # [K] mean loss of the base epoch (1 until set)


def igb_weighting(
    num_tasks: int,
    steps_per_epoch: int,
    base_epoch: int = 1,
    log_losses: bool = True,
    eps: float = 1e-8,
) -> LossWeighting:
    """IGBv1 as a pure `LossWeighting` (see `igb`)."""
    name = "igb"
    _check_num_tasks(name, num_tasks)
    if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ValueError(
            f"{name}: steps_per_epoch must be a positive int, got {steps_per_epoch!r}."
        )
    if not isinstance(base_epoch, int) or base_epoch < 0:
        raise ValueError(f"{name}: base_epoch must be an int >= 0, got {base_epoch!r}.")
    _check_positive(name, "eps", eps)
    k = num_tasks
    start = base_epoch * steps_per_epoch
    end = start + steps_per_epoch

    def init() -> IGBState:
        return IGBState(jnp.zeros((), jnp.int32), jnp.zeros((k,), _F32), jnp.ones((k,), _F32))

    def update(losses, state: IGBState, **extra):
        del extra
        loss = losses.astype(_F32)
        active = state.step >= end
        ratio = _clip_big(loss / jnp.maximum(state.base_losses, eps))
        gap_w = jnp.where(active, k * jax.nn.softmax(ratio), jnp.ones((k,), _F32))
        in_base = (state.step >= start) & (state.step < end)
        loss_sum = state.loss_sum + jnp.where(in_base, _clip_big(loss), 0.0)
        base = jnp.where(state.step + 1 == end, loss_sum / steps_per_epoch, state.base_losses)
        if log_losses:
            # d(w log L)/d theta = (w / L) dL/d theta: the weight on the loss gradient.
            weights = gap_w / jnp.maximum(loss, eps)
        else:
            weights = gap_w
        return weights, IGBState(state.step + 1, loss_sum, base)

    return LossWeighting(init, update, k, name)


def igb(
    num_tasks: int,
    steps_per_epoch: int,
    base_epoch: int = 1,
    log_losses: bool = True,
    eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    """Improvable Gap Balancing, IGBv1: weights ``K softmax(L_k / L_k^base)`` on log-losses.

    Until the end of epoch ``base_epoch`` the weights are 1 on the log-losses (scale-invariant
    loss); the mean training loss of that epoch becomes ``L^base``; afterwards task k gets
    ``w_k = K * softmax(L / L^base)_k``, so tasks far from their base loss (large improvable
    gap) get more weight. The reference minimises ``sum_k w_k log L_k``; its gradient is
    ``sum_k (w_k / L_k) grad L_k``, so the weights returned here (and scaling the Jacobian rows)
    are ``w_k / L_k`` (set ``log_losses=False`` for ``w_k`` on the raw losses).

    Args:
      num_tasks: K.
      steps_per_epoch: updates per epoch (the reference sets the base losses per epoch).
      base_epoch: which epoch's mean training loss becomes the base (0-indexed; reference
        ``--base_epoch`` default 1, i.e. the second epoch).
      log_losses: weight the log-losses as the reference does (default) or the raw losses.
      eps: floor for losses and base losses in divisions: non-positive losses get a finite
        (large, ``w / eps``) weight on the log path.

    Returns:
      An optax transform; its update takes ``task_losses``.

    Example:
      >>> tx = optax.chain(mtl.igb(3, steps_per_epoch=100), mtl.sum_tasks(), optax.adam(1e-3))

    References:
      Dai, Fei, Lu. Improvable Gap Balancing for Multi-Task Learning. UAI 2023.
      Checked against: authors' code YanqiDai/IGB4MTL ``methods/loss_weight_methods.py``
      (``ImprovableGapBalancing_v1``) and ``experiments/nyuv2/trainer.py`` (base losses = mean
      training loss of epoch ``base_epoch``, set after it ends). Difference: the epoch
      boundary is given as ``steps_per_epoch`` (jit-safe counter) instead of the trainer's
      epoch loop. IGBv2 (SAC agent choosing the weights) is not implemented.
    """
    return from_loss_weighting(
        igb_weighting(num_tasks, steps_per_epoch, base_epoch, log_losses, eps)
    )


# --------------------------------------------------------------------------------------------
# CoBa: Convergence Balancer
# --------------------------------------------------------------------------------------------


class CoBaState(NamedTuple):
    """State of `coba`: validation-loss history and slope histories (ring buffers)."""

    count: jax.Array  # int32: validation samples seen (= the reference's completed steps)
    init_val: jax.Array  # [K] first non-zero validation loss per task (the normaliser)
    history: jax.Array  # [history_length, K] normalised validation losses, 0 = missing
    slopes: jax.Array  # [history_length - warmup_steps + 1, K] per-task slopes since warm-up
    total_slopes: jax.Array  # [divergence_history] slopes of the max-over-tasks loss
    num_slopes: jax.Array  # int32: slope vectors computed so far
    weights: jax.Array  # [K] last weights


def _ordered_window(buf: jax.Array, count: jax.Array) -> jax.Array:
    """Ring buffer -> chronological order (oldest first; unwritten slots come first)."""
    return jnp.roll(buf, -(count % buf.shape[0]), axis=0)


def _coba_dtype():
    """float64 when x64 is enabled (matches the float64 reference to ~1e-12), else float32."""
    return jnp.float64 if jax.config.jax_enable_x64 else _F32


def _masked_slope(y: jax.Array) -> jax.Array:
    """Least-squares slope of the non-zero entries of y [T, ...] against their rank (axis 0).

    Zeros are missing values, dropped and the remaining entries re-indexed 0, 1, ... as in the
    reference's ``fit_window_slope``; fewer than two points give slope 0.
    """
    mask = (y != 0).astype(y.dtype)
    x = jnp.cumsum(mask, axis=0) - 1.0
    n = jnp.sum(mask, axis=0)
    n_safe = jnp.maximum(n, 1.0)
    xm = jnp.sum(mask * x, axis=0) / n_safe
    ym = jnp.sum(mask * y, axis=0) / n_safe
    dx = mask * (x - xm)
    sxy = jnp.sum(dx * (y - ym), axis=0)
    sxx = jnp.sum(dx * dx, axis=0)
    return jnp.where(n >= 2, _safe_div(sxy, sxx), 0.0)


def coba_weighting(
    num_tasks: int,
    warmup_steps: int = 100,
    history_length: int = 200,
    tau: float = 5.0,
    divergence_history: int = 10_000,
) -> LossWeighting:
    """CoBa as a pure `LossWeighting` (see `coba`); update takes ``val_losses=``."""
    name = "coba"
    _check_num_tasks(name, num_tasks)
    if not isinstance(warmup_steps, int) or warmup_steps < 1:
        raise ValueError(f"{name}: warmup_steps must be an int >= 1, got {warmup_steps!r}.")
    if not isinstance(history_length, int) or history_length < warmup_steps:
        raise ValueError(
            f"{name}: history_length must be an int >= warmup_steps ({warmup_steps}), "
            f"got {history_length!r}."
        )
    _check_positive(name, "tau", tau)
    if not isinstance(divergence_history, int) or divergence_history < 1:
        raise ValueError(
            f"{name}: divergence_history must be a positive int, got {divergence_history!r}."
        )
    k = num_tasks
    acs_len = history_length - warmup_steps + 1
    min_weight = 1.0 / (k * 10)

    def init() -> CoBaState:
        dt = _coba_dtype()
        return CoBaState(
            count=jnp.zeros((), jnp.int32),
            init_val=jnp.zeros((k,), dt),
            history=jnp.zeros((history_length, k), dt),
            slopes=jnp.zeros((acs_len, k), dt),
            total_slopes=jnp.zeros((divergence_history,), dt),
            num_slopes=jnp.zeros((), jnp.int32),
            weights=jnp.full((k,), 1.0 / k, dt),
        )

    def update(losses, state: CoBaState, *, val_losses=None, **extra):
        del losses, extra
        if val_losses is None:
            raise ValueError(
                "coba needs the per-task validation losses of this step: pass "
                "val_losses=[K] (e.g. tx.update(jac, state, params, task_losses=l, "
                "val_losses=v))."
            )
        v = _clip_big(_extra_vector(name, "val_losses", val_losses, k, _coba_dtype()))
        init_val = jnp.where(state.init_val == 0, v, state.init_val)
        vn = _clip_big(_safe_div(v, init_val))
        history = state.history.at[state.count % history_length].set(vn)
        count = state.count + 1
        window = _ordered_window(history, count)  # [L, K], last min(count, L) entries valid

        slope = _masked_slope(window)  # [K]
        total = _masked_slope(jnp.max(window, axis=1))  # scalar

        # Slope histories (only once warm-up is over).
        ready = count >= warmup_steps
        slopes = jnp.where(
            ready, state.slopes.at[state.num_slopes % acs_len].set(slope), state.slopes
        )
        totals = jnp.where(
            ready,
            state.total_slopes.at[state.num_slopes % divergence_history].set(total),
            state.total_slopes,
        )
        num_slopes = state.num_slopes + ready.astype(jnp.int32)

        # Relative convergence score: across tasks, at this step.
        rcs = jax.nn.softmax(k * _safe_div(slope, jnp.sum(jnp.abs(slope))))
        # Absolute convergence score: each task's slope against its own recent slopes.
        n_acs = jnp.minimum(num_slopes, acs_len).astype(v.dtype)
        acs = jax.nn.softmax(-n_acs * _safe_div(slope, jnp.sum(jnp.abs(slopes), axis=0)))
        # Divergence factor: the current total slope against all previous ones.
        m = jnp.minimum(num_slopes, divergence_history)
        valid = jnp.arange(divergence_history) < m
        mf = m.astype(v.dtype)
        z = -mf * _safe_div(totals, jnp.sum(jnp.abs(totals))) * tau
        z = jnp.where(valid, z, -_BIG)  # finite: no inf - inf before the first slope
        cur = (num_slopes - 1) % divergence_history
        df = jnp.exp(z[cur] - jax.nn.logsumexp(z)) * mf

        logits = df * rcs + (1.0 - df) * acs
        w = jax.nn.softmax(k * logits)
        w = jnp.where(jnp.any(w < min_weight), w * (1.0 - min_weight * k) + min_weight, w)
        weights = jnp.where(ready, w, state.weights)
        new_state = CoBaState(count, init_val, history, slopes, totals, num_slopes, weights)
        return weights, new_state

    return LossWeighting(init, update, k, name)


def coba(
    num_tasks: int,
    warmup_steps: int = 100,
    history_length: int = 200,
    tau: float = 5.0,
    divergence_history: int = 10_000,
) -> optax.GradientTransformationExtraArgs:
    """CoBa: Convergence Balancer, task weights from the slopes of the validation losses.

    Every update takes this step's per-task validation losses (``val_losses=[K]``, e.g. one
    validation batch, as the reference samples one per step). They are normalised by the first
    non-zero value per task and kept in a window of ``history_length``; a zero entry means "task
    absent from the validation batch" and is skipped. From ``warmup_steps`` samples on, with
    ``s`` the least-squares slopes of the window and ``S`` that of the max-over-tasks curve:

    * RCS = softmax(K s / sum_k |s_k|) (relative convergence: slow tasks up);
    * ACS = softmax(-N s / sum_t |s_t|) per task over its last N slopes (absolute convergence);
    * DF = M softmax(-M tau S_t / sum_t |S_t|)[last] over the M total slopes (divergence
      factor: near 1 while the total loss still falls, then shifts weight to ACS);
    * w = softmax(K (DF RCS + (1 - DF) ACS)), floored at 1 / (10 K).

    Before warm-up the weights are 1/K. Weights sum to 1 (the reference's loss is
    ``sum_k w_k L_k / sum_k w_k``).

    Precision: DF exponentiates ``M tau`` times a ratio of slopes, so float32 rounding of the
    slopes (~1e-7) is amplified by up to ``M tau`` (1e-5 relative on the weights after ~15
    slopes; more on long runs). The reference is float64; with ``jax.enable_x64`` the state
    and arithmetic here are float64 too and match it to ~1e-12.

    Args:
      num_tasks: K.
      warmup_steps: validation samples before the first CoBa weights (reference
        ``coba_warmup_steps``, 100).
      history_length: window of validation losses for the slopes (``coba_history_length``,
        200; must be >= warmup_steps).
      tau: divergence-factor temperature (``coba_tau``, 5).
      divergence_history: capacity of the total-slope buffer for DF. The reference keeps the
        whole run; results are identical for runs shorter than this.

    Returns:
      An optax transform; its update takes ``task_losses`` (unused, for the common contract)
      and ``val_losses`` (required).

    Example:
      >>> tx = optax.chain(mtl.coba(3), mtl.sum_tasks(), optax.adam(1e-4))
      >>> # updates, s = tx.update(jac, s, params, task_losses=l, val_losses=v)

    References:
      Gong et al. CoBa: Convergence Balancer for Multitask Finetuning of Large Language
      Models. EMNLP 2024.
      Checked against: codefuse-ai/MFTCoder ``mftcoder_accelerate/src/utils/loss_utils.py``
      (``CoBaStatus.compute_per_task_weight``, ``fit_window_slope``) and
      ``src/mpt/mpt_trainer.py``. Differences: history bookkeeping -- the reference drops the
      validation samples taken before the first and right after the first update and
      normalises by a separate full evaluation; here every ``val_losses`` passed is kept and
      the first non-zero one per task is the normaliser; ``coba_update_interval`` is 1
      (pass the validation losses every step); DF's total-slope history is capped at
      ``divergence_history``.
    """
    return from_loss_weighting(
        coba_weighting(num_tasks, warmup_steps, history_length, tau, divergence_history)
    )


# --------------------------------------------------------------------------------------------
# MT-GRPO: improvement-aware worst-task reweighting
# --------------------------------------------------------------------------------------------


class WorstTaskState(NamedTuple):
    """State of `worst_task`: task logits and their optimizer, previous losses, reward EMA."""

    step: jax.Array  # int32
    logits: jax.Array  # [K]
    opt_state: Any
    prev_losses: jax.Array  # [K]
    reward_ema: jax.Array  # [K]


def worst_task_weighting(
    num_tasks: int,
    lr: float = 0.025,
    weight_decay: float = 1e-5,
    lambda_bias: float = 0.2,
    improvement_clip: float = 0.1,
    reward_decay: float = 0.5,
    optimizer: optax.GradientTransformation | None = None,
) -> LossWeighting:
    """MT-GRPO task reweighting as a pure `LossWeighting` (see `worst_task`)."""
    name = "worst_task"
    _check_num_tasks(name, num_tasks)
    _check_positive(name, "lr", lr)
    _check_positive(name, "weight_decay", weight_decay, strict=False)
    _check_positive(name, "lambda_bias", lambda_bias, strict=False)
    _check_positive(name, "improvement_clip", improvement_clip)
    if not 0.0 <= reward_decay < 1.0:
        raise ValueError(f"{name}: reward_decay must be in [0, 1), got {reward_decay!r}.")
    if optimizer is None:
        # torch.optim.Adam(lr, weight_decay): L2 term added to the gradient before the moments.
        optimizer = optax.chain(
            optax.add_decayed_weights(weight_decay), optax.scale_by_adam(), optax.scale(-lr)
        )
    k = num_tasks

    def init() -> WorstTaskState:
        logits = jnp.zeros((k,), _F32)
        return WorstTaskState(
            jnp.zeros((), jnp.int32),
            logits,
            optimizer.init(logits),
            jnp.zeros((k,), _F32),
            jnp.zeros((k,), _F32),
        )

    def update(losses, state: WorstTaskState, *, task_rewards=None, **extra):
        del extra
        loss = _clip_big(losses.astype(_F32))
        if task_rewards is None:
            reward = -loss
        else:
            reward = _clip_big(_extra_vector(name, "task_rewards", task_rewards, k))
        reward_ema = reward_decay * state.reward_ema + (1.0 - reward_decay) * reward
        improvement = jnp.clip(state.prev_losses - loss, -improvement_clip, improvement_clip)
        # Bounded so the optimizer's second moments (signal^2) stay finite on absurd rewards.
        signal = jnp.clip(improvement + lambda_bias * reward_ema, -_SIGNAL_MAX, _SIGNAL_MAX)
        p = jax.nn.softmax(state.logits)
        grad = p * (signal - jnp.dot(p, signal))  # VJP of softmax at the logits, cotangent signal
        upd, opt_state = optimizer.update(grad, state.opt_state, state.logits)
        logits = _clip_big(optax.apply_updates(state.logits, upd))
        first = state.step == 0  # no improvement signal yet
        logits = jnp.where(first, state.logits, logits)
        opt_state = jax.tree.map(lambda a, b: jnp.where(first, a, b), state.opt_state, opt_state)
        weights = jax.nn.softmax(logits)
        return weights, WorstTaskState(state.step + 1, logits, opt_state, loss, reward_ema)

    return LossWeighting(init, update, k, name)


def worst_task(
    num_tasks: int,
    lr: float = 0.025,
    weight_decay: float = 1e-5,
    lambda_bias: float = 0.2,
    improvement_clip: float = 0.1,
    reward_decay: float = 0.5,
    optimizer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
    """MT-GRPO improvement-aware worst-task reweighting: weights on the simplex, softmax(z).

    At each update after the first, with ``I_k = clip(L_k(t-1) - L_k(t), +-improvement_clip)``
    the improvement of task k since the previous update and ``r_k`` an EMA (decay
    ``reward_decay``) of its reward, the logits z take one optimizer step on the gradient of
    ``sum_k softmax(z)_k (I_k + lambda_bias r_k)``, descending: tasks that improve least and
    score lowest gain weight (the Lagrangian relaxation of max-min task reward). Weights sum
    to 1; use them as loss weights or as sampling ratios for `mtl.mixing`'s ratio-preserving
    sampler (the paper's RP-sampler).

    Args:
      num_tasks: K.
      lr: step size of the logits' Adam (reference ``bandit.lr`` 0.025 in the MT-GRPO runs).
      weight_decay: torch-Adam-style L2 on the logits (reference ``bandit.gamma`` 1e-5).
      lambda_bias: weight of the reward term (reference ``lambda_bias`` 0.2 in exp-1).
      improvement_clip: clip of the per-task improvement (reference threshold 0.1 at the
        reference learning rate).
      reward_decay: EMA decay of the rewards (reference ``batch_acc_decay_rate`` 0.5).
      optimizer: optax transform for the logits (overrides ``lr`` and ``weight_decay``).
        The signal it sees is clipped to +-1e15 (finite Adam moments on absurd rewards).

    Returns:
      An optax transform; its update takes ``task_losses`` and optionally
      ``task_rewards=[K]`` (higher is better, e.g. batch accuracy); without rewards the
      reward is ``-task_losses``.

    Example:
      >>> tx = optax.chain(mtl.worst_task(3), mtl.sum_tasks(), optax.adam(1e-3))

    References:
      Ramesh et al. Multi-Task GRPO: Reliable LLM Reasoning Across Tasks. 2026 (arXiv
      2602.05547).
      Checked against: rsshyam/MT-GRPO ``verl/verl/utils/auto_curriculum/priority_decay.py``
      (``FamoPriorityDecay.update``, ``update_object='task_diff_bias'``, ``combine`` with
      ``lambda_bias_type='add'``, ``update_batch_acc``) and ``scripts/exp-1/main``. Differences:
      the improvement is the change of each task's loss between consecutive updates (the
      reference measures it before/after the policy update on the same batch, and scales the
      clip by the model's learning rate); the reference's convergence masks/soft masks
      (``decay_type``) are not implemented.
    """
    return from_loss_weighting(
        worst_task_weighting(
            num_tasks, lr, weight_decay, lambda_bias, improvement_clip, reward_decay, optimizer
        )
    )


# --------------------------------------------------------------------------------------------
# MedGRPO / RouteFinder: cross-dataset normalisation
# --------------------------------------------------------------------------------------------


class MedianNormalizeState(NamedTuple):
    """State of `median_normalize`: a window of each task's signal, and a running mean."""

    count: jax.Array  # int32
    buffer: jax.Array  # [window, K]
    running: jax.Array  # [K] cumulative or exponential mean (statistic 'mean' / 'ema')


_STATISTICS = ("median", "mean", "ema")


def _window_median(buf: jax.Array, count: jax.Array) -> jax.Array:
    """Per-column median of the first min(count, W) rows written of a ring buffer [W, K]."""
    w = buf.shape[0]
    n = jnp.minimum(count, w)
    valid = (jnp.arange(w) < n)[:, None]
    s = jnp.sort(jnp.where(valid, buf, jnp.inf), axis=0)
    lo = jnp.take(s, (n - 1) // 2, axis=0)
    hi = jnp.take(s, n // 2, axis=0)
    return 0.5 * (lo + hi)


def median_normalize_weighting(
    num_tasks: int,
    target: float = 1.0,
    window: int = 256,
    statistic: str = "median",
    alpha: float = 0.1,
    eps: float = 1e-8,
) -> LossWeighting:
    """Cross-dataset normalisation as a pure `LossWeighting` (see `median_normalize`)."""
    name = "median_normalize"
    _check_num_tasks(name, num_tasks)
    _check_positive(name, "target", target)
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"{name}: window must be a positive int, got {window!r}.")
    if statistic not in _STATISTICS:
        raise ValueError(f"{name}: statistic must be one of {_STATISTICS}, got {statistic!r}.")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"{name}: alpha must be in (0, 1], got {alpha!r}.")
    _check_positive(name, "eps", eps)
    k = num_tasks

    def init() -> MedianNormalizeState:
        return MedianNormalizeState(
            jnp.zeros((), jnp.int32), jnp.zeros((window, k), _F32), jnp.zeros((k,), _F32)
        )

    def update(losses, state: MedianNormalizeState, *, task_rewards=None, **extra):
        del extra
        if task_rewards is None:
            x = losses.astype(_F32)
        else:
            x = _extra_vector(name, "task_rewards", task_rewards, k)
        x = _clip_big(x)
        buffer = state.buffer.at[state.count % window].set(x)
        count = state.count + 1
        c = state.count.astype(_F32)
        if statistic == "median":
            stat = _window_median(buffer, count)
            running = state.running
        elif statistic == "mean":  # RouteFinder CumulativeMean
            running = (c * state.running + x) / (c + 1.0)
            stat = running
        else:  # RouteFinder ExponentialMean
            running = jnp.where(state.count == 0, x, (1.0 - alpha) * state.running + alpha * x)
            stat = running
        weights = target / jnp.maximum(jnp.abs(stat), eps)
        return weights, MedianNormalizeState(count, buffer, running)

    return LossWeighting(init, update, k, name)


def median_normalize(
    num_tasks: int,
    target: float = 1.0,
    window: int = 256,
    statistic: str = "median",
    alpha: float = 0.1,
    eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    """Cross-dataset normalisation: each task's typical value is mapped to a common value.

    Task k's weight is ``target / |m_k|`` with ``m_k`` the median of its last ``window``
    values (this update's included), so ``w_k m_k = target`` for every task: datasets with
    very different reward or loss scales contribute on the same scale. The value tracked is
    ``task_rewards`` if given (MedGRPO normalises rewards; scaling a task's rewards by ``w_k``
    scales its policy-gradient loss by ``w_k``), else ``task_losses``.

    ``statistic='mean'`` / ``'ema'`` give RouteFinder's multi-variant reward normalisation
    (``CumulativeMean`` / ``ExponentialMean(alpha)``, ``norm_operation='div'``).

    Args:
      num_tasks: K.
      target: the common value each task's median maps to.
      window: number of recent values per task for the median.
      statistic: ``'median'`` (MedGRPO), ``'mean'`` or ``'ema'`` (RouteFinder).
      alpha: EMA rate for ``statistic='ema'`` (RouteFinder default 0.1).
      eps: floor of ``|m_k|``: a task whose median is 0 gets the finite weight
        ``target / eps``; raise it if medians can legitimately be ~0.

    Returns:
      An optax transform; its update takes ``task_losses`` and optionally
      ``task_rewards=[K]`` (this step's mean reward per task/dataset).

    Example:
      >>> tx = optax.chain(mtl.median_normalize(3), mtl.sum_tasks(), optax.adam(1e-3))

    References:
      Su et al. MedGRPO: Multi-Task Reinforcement Learning for Heterogeneous Medical Video
      Understanding. 2025. Berto et al. RouteFinder: Towards Foundation Models for Vehicle
      Routing Problems. TMLR 2025.
      Checked against: MedGRPO has no public training code; derived from the paper's
      description ("maps each dataset's median performance to a common reward value"): the
      median window and ``target`` are our choices. RouteFinder: ai4co/routefinder
      ``routefinder/models/reward_normalization.py`` (``CumulativeMean``,
      ``ExponentialMean``, ``div``), same update order (statistic updated, then used).
    """
    return from_loss_weighting(
        median_normalize_weighting(num_tasks, target, window, statistic, alpha, eps)
    )


# --------------------------------------------------------------------------------------------
# ARL: inverse-variance weighting
# --------------------------------------------------------------------------------------------


class InverseVarianceState(NamedTuple):
    """State of `inverse_variance`: exponentially weighted mean and variance of each loss."""

    count: jax.Array  # int32
    mean: jax.Array  # [K]
    var: jax.Array  # [K]


def inverse_variance_weighting(
    num_tasks: int,
    beta: float = 0.9,
    min_share: float | None = None,
    eps: float = 1e-8,
) -> LossWeighting:
    """ARL inverse-variance weighting as a pure `LossWeighting` (see `inverse_variance`)."""
    name = "inverse_variance"
    _check_num_tasks(name, num_tasks)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"{name}: beta must be in [0, 1), got {beta!r}.")
    k = num_tasks
    floor = 0.6 / k if min_share is None else min_share
    if not 0.0 <= floor < 1.0:
        raise ValueError(f"{name}: min_share must be in [0, 1), got {min_share!r}.")
    _check_positive(name, "eps", eps)

    def init() -> InverseVarianceState:
        return InverseVarianceState(
            jnp.zeros((), jnp.int32), jnp.zeros((k,), _F32), jnp.zeros((k,), _F32)
        )

    def update(losses, state: InverseVarianceState, *, task_variances=None, **extra):
        del extra
        loss = jnp.clip(losses.astype(_F32), -1e15, 1e15)  # squares stay finite
        first = state.count == 0
        # Exponentially weighted mean/variance (West's update: no cancellation, var >= 0),
        # started at the first loss with variance 0.
        delta = loss - state.mean
        mean = jnp.where(first, loss, state.mean + (1.0 - beta) * delta)
        ew_var = jnp.where(first, 0.0, beta * (state.var + (1.0 - beta) * delta * delta))
        if task_variances is None:
            var = ew_var
        else:
            var = jnp.maximum(
                _clip_big(_extra_vector(name, "task_variances", task_variances, k)), 0.0
            )
        var = jnp.clip(var, 0.0, _BIG / k)
        share = (var + eps) / jnp.sum(var + eps)
        inv = 1.0 / jnp.maximum(share, floor) if floor > 0 else 1.0 / share
        weights = inv / jnp.sum(inv)
        return weights, InverseVarianceState(state.count + 1, mean, ew_var)

    return LossWeighting(init, update, k, name)


def inverse_variance(
    num_tasks: int,
    beta: float = 0.9,
    min_share: float | None = None,
    eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    """ARL inverse-variance weighting: ``w_k ∝ 1 / max(v_k / sum_j v_j, min_share)``.

    ARL proves that the optimal dependence on each modality (task) is inversely proportional
    to its variance, and re-weights each modality's optimisation by ``1 / variance share``.
    The variances are ``task_variances=[K]`` when given (ARL uses the mean prediction entropy
    of each unimodal head in the batch); otherwise an estimate of each task loss's variance
    over training steps (exponentially weighted variance with decay ``beta``, 0 at the first
    step).
    Weights sum to 1, as in ARL.

    Args:
      num_tasks: K.
      beta: decay of the exponentially weighted loss variance (ours; the estimate is not used
        when ``task_variances`` is passed).
      min_share: floor of each normalised variance share before inverting (ARL clamps at
        0.3 with two modalities); default ``0.6 / K`` (= 0.3 for K = 2).
      eps: added to every variance: all-zero variances give equal weights.

    Returns:
      An optax transform; its update takes ``task_losses`` and optionally
      ``task_variances=[K]``.

    Example:
      >>> tx = optax.chain(mtl.inverse_variance(2), mtl.sum_tasks(), optax.adam(1e-3))

    References:
      Wei et al. Improving Multimodal Learning via Imbalanced Learning (ARL). ICCV 2025.
      Checked against: shicaiwei123/ICCV2025-ARL ``main_arl_variance.py`` (``train_epoch``:
      ``H_n = H / sum H``, ``clamp(H_n, 0.3)``, ``w = (1/H_n) / sum(1/H_n)``). Differences: the
      two-modality rule is generalised to K tasks; the loss-variance EMA used when no
      variances are passed is ours (ARL's auxiliary bias regularisers are model-side and not
      part of this weighting).
    """
    return from_loss_weighting(inverse_variance_weighting(num_tasks, beta, min_share, eps))


# --------------------------------------------------------------------------------------------
# VisATB: adaptive task balancing (inter-task contribution + intra-task difficulty)
# --------------------------------------------------------------------------------------------


class StaticWeightsState(NamedTuple):
    """State of a fixed-weight method: the weights."""

    weights: jax.Array  # [K]


def adaptive_task_balancing_weights(
    out_contributions: Any,
    in_contributions: Any,
    difficulties: Any,
    temperature: float = 0.5,
) -> jax.Array:
    """VisATB task weights from contributions and difficulties (all [K]).

    ``((K softmax(out / T) + K softmax(-in / T)) / 2 + K softmax((1 - difficulty) / T)) / 2``:
    tasks that contribute much to others, receive little from others, or are difficult (low
    validation score ``difficulty``, in [0, 1]) get more weight. Weights sum to K.
    """
    out_c = jnp.asarray(out_contributions, _F32)
    in_c = jnp.asarray(in_contributions, _F32)
    diff = jnp.asarray(difficulties, _F32)
    if out_c.ndim != 1 or out_c.shape != in_c.shape or out_c.shape != diff.shape:
        raise ValueError(
            "adaptive_task_balancing: out_contributions, in_contributions and difficulties "
            f"must be [K] vectors of one length, got {out_c.shape}, {in_c.shape}, {diff.shape}."
        )
    _check_positive("adaptive_task_balancing", "temperature", temperature)
    k = out_c.shape[0]
    out_w = k * jax.nn.softmax(out_c / temperature)
    in_w = k * jax.nn.softmax(-in_c / temperature)
    diff_w = k * jax.nn.softmax((1.0 - diff) / temperature)
    return ((out_w + in_w) / 2.0 + diff_w) / 2.0


def _static_weighting(name: str, weights: jax.Array) -> LossWeighting:
    weights = jnp.asarray(weights, _F32)

    def init() -> StaticWeightsState:
        return StaticWeightsState(weights)

    def update(losses, state: StaticWeightsState, **extra):
        del losses, extra
        return state.weights, state

    return LossWeighting(init, update, int(weights.shape[0]), name)


def adaptive_task_balancing_weighting(
    num_tasks: int,
    out_contributions: Any,
    in_contributions: Any,
    difficulties: Any,
    temperature: float = 0.5,
) -> LossWeighting:
    """VisATB as a pure `LossWeighting` (fixed weights; see `adaptive_task_balancing`)."""
    name = "adaptive_task_balancing"
    _check_num_tasks(name, num_tasks)
    w = adaptive_task_balancing_weights(
        out_contributions, in_contributions, difficulties, temperature
    )
    if w.shape != (num_tasks,):
        raise ValueError(f"{name}: got {w.shape[0]} tasks' statistics for num_tasks={num_tasks}.")
    return _static_weighting(name, w)


def adaptive_task_balancing(
    num_tasks: int,
    out_contributions: Any,
    in_contributions: Any,
    difficulties: Any,
    temperature: float = 0.5,
) -> optax.GradientTransformationExtraArgs:
    """Adaptive Task Balancing (VisATB): fixed weights from contribution and difficulty.

    The statistics come from a first stage (one model trained per task, evaluated on every
    validation set): ``out_contributions[k]`` how much training on task k helps the others,
    ``in_contributions[k]`` how much task k receives from the others, ``difficulties[k]`` its
    normalised validation score in [0, 1] (low = hard). The weights (see
    `adaptive_task_balancing_weights`) then stay fixed for the final multi-task run.

    Args:
      num_tasks: K.
      out_contributions: [K] inter-task contribution given.
      in_contributions: [K] inter-task contribution received.
      difficulties: [K] intra-task scores (1 - difficulty is the difficulty).
      temperature: softmax temperature (reference 0.5).

    Returns:
      An optax transform; rows scaled by the fixed weights (which sum to K).

    Example:
      >>> tx = mtl.adaptive_task_balancing(3, [.76, .35, 1.67], [1.29, .98, .52], [.8, .6, .3])

    References:
      Dai et al. Adaptive Task Balancing for Visual Instruction Tuning via Inter-Task
      Contribution and Intra-Task Difficulty. 2024 (arXiv 2403.04343).
      Checked against: YanqiDai/VisATB ``weighting_visatb.py`` (weights from the statistics)
      and ``weight_method.py`` (``set_weights``: fixed loss weights). Computing the
      contributions from the stage-one evaluation matrix is left to the caller.
    """
    return from_loss_weighting(
        adaptive_task_balancing_weighting(
            num_tasks, out_contributions, in_contributions, difficulties, temperature
        )
    )


# --------------------------------------------------------------------------------------------
# Muppet: loss scaling by log(number of classes)
# --------------------------------------------------------------------------------------------


def log_class_scaling_weighting(num_classes: Sequence[int | None]) -> LossWeighting:
    """Muppet loss scaling as a pure `LossWeighting` (see `log_class_scaling`)."""
    n = [None if c is None else int(c) for c in num_classes]
    if not n or any(c is not None and c < 2 for c in n):
        raise ValueError(
            "log_class_scaling: num_classes must be a non-empty list of ints >= 2 (None for a "
            f"regression task), got {list(num_classes)!r}."
        )
    weights = jnp.asarray([1.0 if c is None else 1.0 / math.log(c) for c in n], _F32)
    return _static_weighting("log_class_scaling", weights)


def log_class_scaling(num_classes: Sequence[int | None]) -> optax.GradientTransformationExtraArgs:
    """Muppet loss scaling: task k's loss is divided by ``log(num_classes[k])``.

    A cross-entropy over n classes starts near ``log n``; dividing by it puts classification
    tasks with different label-space sizes on one scale: every scaled loss is 1 for the
    uninformed (uniform) prediction.

    Regression tasks (``None`` in ``num_classes``) are left unscaled (weight 1). The paper
    gives the rule for classification and generation heads only; weight 1 keeps its
    principle for the usual MSE on a standardized target (the embedded datasets' convention),
    whose uninformed prediction (the mean) also has loss 1. For a target that is not
    standardized, pass ``1 / Var(target)``-style weights through `scalarize` instead.

    Args:
      num_classes: [K] number of classes of each task's output space (>= 2; for generation
        tasks use the vocabulary size or what the paper's setup prescribes), ``None`` for a
        regression task. The comparison runner reads it from the dataset's task specs
        (`mtl_jax.tasks.Task.num_classes`).

    Returns:
      An optax transform; rows scaled by ``1 / log(num_classes)`` (1 for regression tasks).

    Example:
      >>> tx = optax.chain(mtl.log_class_scaling([2, 3, 1000]), mtl.sum_tasks(), optax.adam(1e-5))
      >>> tx = mtl.log_class_scaling([3, 2, None])  # species, sex, body mass (regression)

    References:
      Aghajanyan et al. Muppet: Massive Multi-task Representations with Pre-Finetuning.
      EMNLP 2021.
      Checked against: the paper's loss-scaling formula ``L_i / log n(t_i)`` (no public
      reference code). The weight 1 of regression tasks is ours (see above).
    """
    return from_loss_weighting(log_class_scaling_weighting(num_classes))
