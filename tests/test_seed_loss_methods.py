"""Seed-paper loss-level methods: IGB, CoBa, MT-GRPO (worst_task), median normalisation, ARL,
VisATB, Muppet log-class scaling and the Order-Matters task schedule.

Each method is compared with a NumPy re-derivation of its reference update rule (the file it
was read from is cited at each re-derivation) over >= 20 consecutive steps of a fixed loss
sequence, weights within 1e-5 relative; plus the method's defining property, bad input and
finite weights on zero / negative / huge losses. Everything goes through ``jax.jit``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_jax as mtl
from mtl_jax import mixing

RTOL = 1e-5  # float32 weights vs float64 re-derivations


def run(lw: mtl.LossWeighting, losses: np.ndarray, **extra_seq) -> np.ndarray:
    """Weights [T, K] of ``lw`` over the loss sequence [T, K] (extra args: [T, K] sequences)."""
    update = jax.jit(lw.update)
    state = lw.init()
    out = []
    for t, loss in enumerate(losses):
        extra = {k: jnp.asarray(v[t], jnp.float32) for k, v in extra_seq.items()}
        w, state = update(jnp.asarray(loss, jnp.float32), state, **extra)
        out.append(np.asarray(w, np.float64))
    return np.stack(out)


def loss_sequence(steps: int, k: int, seed: int = 0) -> np.ndarray:
    """Decreasing noisy per-task losses with different scales (float32-representable)."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps)[:, None]
    scale = np.geomspace(0.5, 20.0, k)[None, :]
    rate = np.linspace(0.01, 0.08, k)[None, :]
    noise = 1.0 + 0.05 * rng.standard_normal((steps, k))
    return (scale * np.exp(-rate * t) * noise).astype(np.float32).astype(np.float64)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


# ----------------------------------------------------------------------------------- IGB --


def igb_reference(losses: np.ndarray, steps_per_epoch: int, base_epoch: int) -> np.ndarray:
    """IGBv1 re-derived from YanqiDai/IGB4MTL: ``methods/loss_weight_methods.py``
    (``ImprovableGapBalancing_v1.get_weighted_losses``: ``w = K softmax(L / base)`` once base
    is set, loss ``w * log L``) and ``experiments/nyuv2/trainer.py`` (base = mean training loss
    of epoch ``base_epoch``, set at its end). Returns the weights on the raw loss gradients,
    ``w / L`` (d(w log L) = w / L dL)."""
    k = losses.shape[1]
    base = None
    epoch_sum = np.zeros(k)
    out = []
    for t, loss in enumerate(losses):
        w = k * softmax(loss / base) if base is not None else np.ones(k)
        out.append(w / loss)
        epoch, j = divmod(t, steps_per_epoch)
        if epoch == base_epoch:
            epoch_sum += loss / steps_per_epoch  # avg_cost[epoch] += cost / train_batch
            if j == steps_per_epoch - 1:
                base = epoch_sum.copy()
    return np.stack(out)


@pytest.mark.parametrize("base_epoch", [0, 1])
def test_igb_matches_reference(base_epoch):
    losses = loss_sequence(30, 3)
    ours = run(mtl.igb_weighting(3, steps_per_epoch=5, base_epoch=base_epoch), losses)
    ref = igb_reference(losses, 5, base_epoch)
    np.testing.assert_allclose(ours, ref, rtol=RTOL)
    # The improvable-gap phase is reached and differs from plain log-loss weighting.
    assert not np.allclose(ours[-1] * losses[-1], 1.0)


def test_igb_gradient_equals_reference_objective():
    """One-backward path: grad of sum w_k L_k with our weights == grad of IGB's sum w log L."""
    k = 3
    x = jnp.array([0.3, -0.2, 0.5])
    targets = jnp.array([[1.0, 2.0, 0.5], [3.0, -1.0, 2.0], [0.1, 0.4, -2.0]])

    def loss_fn(p):
        return jnp.sum((targets - p[None, :]) ** 2, axis=1) + 0.1

    lw = mtl.igb_weighting(k, steps_per_epoch=1, base_epoch=0)
    vg = jax.jit(mtl.weighted_value_and_grad(loss_fn, lw))
    state = lw.init()
    for _ in range(3):  # past the base epoch: softmax phase
        (losses, w, state), g = vg(state, x)
    base = np.asarray(state.base_losses)
    ref_w = k * softmax(np.asarray(losses, np.float64) / base)
    ref_g = jax.grad(lambda p: jnp.sum(jnp.asarray(ref_w, jnp.float32) * jnp.log(loss_fn(p))))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref_g), rtol=1e-5, atol=1e-6)


def test_igb_log_losses_false_gives_gap_weights():
    losses = loss_sequence(12, 3)
    ours = run(mtl.igb_weighting(3, steps_per_epoch=4, log_losses=False), losses)
    ref = igb_reference(losses, 4, 1) * losses
    np.testing.assert_allclose(ours, ref, rtol=RTOL)


# ---------------------------------------------------------------------------------- CoBa --


def _fit_window_slope(x: np.ndarray, y: np.ndarray) -> float:
    """MFTCoder ``CoBaStatus.fit_window_slope``: drop zeros, re-index x, unweighted LSQ."""
    y = y[y != 0]
    x = x[: len(y)]
    if len(y) < 2:
        return 0.0
    X = np.stack([x, np.ones_like(x)]).T.astype(np.float64)
    return float(np.linalg.solve(X.T @ X, X.T @ y)[0])


def coba_reference(val_losses: np.ndarray, warmup: int, hist_len: int, tau: float) -> np.ndarray:
    """CoBa re-derived from codefuse-ai/MFTCoder
    ``mftcoder_accelerate/src/utils/loss_utils.py`` (``CoBaStatus.compute_per_task_weight``)
    with this library's bookkeeping: the history holds every validation sample passed so far
    (normalised by the first non-zero one per task), and ``completed_steps`` is its length."""
    k = val_losses.shape[1]
    min_w = 1.0 / (k * 10)
    init = np.zeros(k)
    hist = []
    per_task_slopes, total_slopes = None, None
    weights = np.full(k, 1.0 / k)
    out = []
    for v in val_losses:
        init = np.where(init == 0, v, init)
        hist.append(np.where(init != 0, v / np.where(init != 0, init, 1), 0.0))
        c = len(hist)
        if c >= warmup:
            h = np.stack(hist, axis=1)  # [K, c] like history_task_valid_loss
            start = max(0, c - hist_len)
            steps = np.arange(start, c, dtype=np.float64)
            s = np.array([_fit_window_slope(steps, h[i][-len(steps) :]) for i in range(k)])
            total = _fit_window_slope(steps, np.max(h[:, -len(steps) :], axis=0))
            if c == warmup:
                per_task_slopes, total_slopes = s[:, None], np.array([total])
            else:
                per_task_slopes = np.concatenate([per_task_slopes, s[:, None]], axis=1)
                total_slopes = np.append(total_slopes, total)
            rcs = softmax(k * s / np.abs(s).sum())
            win = per_task_slopes[:, start:]
            rn = -win.shape[1] * win / np.abs(win).sum(axis=-1, keepdims=True)
            acs = softmax(rn[:, -1])
            m = len(total_slopes)
            df = softmax(-m * total_slopes / np.abs(total_slopes).sum() * tau)[-1] * m
            w = softmax(k * (df * rcs + (1 - df) * acs))
            if np.any(w < min_w):
                w = w * (1 - min_w * k) + min_w
            weights = w
        out.append(weights)
    return np.stack(out)


def coba_val_sequence(steps: int, k: int) -> np.ndarray:
    v = loss_sequence(steps, k, seed=3)
    v[:, 1] *= np.exp(0.012 * np.arange(steps))  # task 1 converges then diverges
    v[7, 2] = 0.0  # task 2 absent from one validation batch: skipped in its slope
    return v.astype(np.float32).astype(np.float64)


# (5, 8, 26): 26 slope vectors in 30 steps, so the capped DF history is still the full run.
@pytest.mark.parametrize("warmup,hist_len,div_hist", [(5, 8, 26), (3, 40, 10_000)])
def test_coba_matches_reference(warmup, hist_len, div_hist):
    k, steps = 3, 30
    val = coba_val_sequence(steps, k)
    lw = mtl.coba_weighting(
        k, warmup_steps=warmup, history_length=hist_len, tau=5.0, divergence_history=div_hist
    )
    ours = run(lw, loss_sequence(steps, k), val_losses=val)
    ref = coba_reference(val, warmup, hist_len, 5.0)
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=1e-7)
    np.testing.assert_allclose(ours.sum(axis=1), 1.0, rtol=1e-5)
    assert np.ptp(ours[-1]) > 1e-3  # not stuck at 1/K


def test_coba_needs_val_losses():
    lw = mtl.coba_weighting(2, warmup_steps=2, history_length=4)
    with pytest.raises(ValueError, match="val_losses"):
        jax.jit(lw.update)(jnp.ones(2), lw.init())
    with pytest.raises(ValueError, match="val_losses has shape"):
        jax.jit(lw.update)(jnp.ones(2), lw.init(), val_losses=jnp.ones(3))
    with pytest.raises(ValueError, match="history_length"):
        mtl.coba(2, warmup_steps=10, history_length=5)


def test_coba_slow_task_gets_more_weight():
    """RCS: the task whose validation loss falls slowest gets the most weight."""
    steps, k = 30, 3
    t = np.arange(steps)[:, None]
    val = np.exp(-np.array([[0.1, 0.1, 0.01]]) * t)
    w = run(
        mtl.coba_weighting(k, warmup_steps=5, history_length=10),
        np.ones((steps, k)),
        val_losses=val,
    )
    assert np.argmax(w[-1]) == 2


# ---------------------------------------------------------------------- MT-GRPO worst_task --


def worst_task_reference(losses, rewards, lr, wd, lam, clip, decay):
    """MT-GRPO re-derived from rsshyam/MT-GRPO
    ``verl/verl/utils/auto_curriculum/priority_decay.py``: ``FamoPriorityDecay.update`` with
    ``update_object='task_diff_bias'`` (delta = -(new - old loss) clipped, ``combine``:
    delta + lambda_bias * batch_acc), gradient of softmax(w) with grad_outputs=delta, then
    ``torch.optim.Adam(lr, weight_decay=gamma)``; ``update_batch_acc`` EMA. Improvement here
    is between consecutive updates (this library's convention)."""
    k = losses.shape[1]
    w = np.zeros(k)
    m = np.zeros(k)
    v = np.zeros(k)
    b1, b2, eps = 0.9, 0.999, 1e-8
    ema = np.zeros(k)
    prev = None
    n_opt = 0
    out = []
    for loss, r in zip(losses, rewards, strict=True):
        ema = decay * ema + (1 - decay) * r
        if prev is not None:
            delta = np.clip(prev - loss, -clip, clip) + lam * ema
            p = softmax(w)
            jac = np.diag(p) - np.outer(p, p)  # d softmax / d w
            g = jac.T @ delta + wd * w
            n_opt += 1
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            mhat, vhat = m / (1 - b1**n_opt), v / (1 - b2**n_opt)
            w = w - lr * mhat / (np.sqrt(vhat) + eps)
        prev = loss
        out.append(softmax(w))
    return np.stack(out)


def test_worst_task_matches_reference_with_rewards():
    steps, k = 25, 3
    losses = loss_sequence(steps, k)
    rewards = np.clip(1.0 - losses / 25.0, 0, 1).astype(np.float32).astype(np.float64)
    ours = run(mtl.worst_task_weighting(k), losses, task_rewards=rewards)
    ref = worst_task_reference(losses, rewards, 0.025, 1e-5, 0.2, 0.1, 0.5)
    np.testing.assert_allclose(ours, ref, rtol=RTOL)
    assert np.ptp(ours[-1]) > 1e-3


def test_worst_task_matches_reference_without_rewards():
    steps, k = 22, 4
    losses = loss_sequence(steps, k, seed=5) / 10
    lw = mtl.worst_task_weighting(k, lr=0.05, lambda_bias=0.5, improvement_clip=0.05)
    ours = run(lw, losses)
    ref = worst_task_reference(losses, -losses, 0.05, 1e-5, 0.5, 0.05, 0.5)
    np.testing.assert_allclose(ours, ref, rtol=RTOL)


def test_worst_task_upweights_least_improving_task():
    steps, k = 30, 3
    losses = np.ones((steps, k))
    losses[:, 1] -= 0.02 * np.arange(steps)
    losses[:, 2] -= 0.04 * np.arange(steps)
    rewards = np.full((steps, k), 0.5)  # equal scores: only the improvement differs
    w = run(mtl.worst_task_weighting(k), losses, task_rewards=rewards)
    assert np.argmax(w[-1]) == 0 and w[-1, 0] > 0.5
    assert np.all(np.diff(w[1:, 0]) > 0)  # the stagnating task keeps gaining weight
    # With a plain gradient step (no Adam normalisation) the order follows the improvement.
    w = run(mtl.worst_task_weighting(k, optimizer=optax.sgd(1.0)), losses, task_rewards=rewards)
    assert list(np.argsort(w[-1])) == [2, 1, 0]
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)


def test_worst_task_custom_optimizer():
    losses = loss_sequence(21, 2)
    lw = mtl.worst_task_weighting(2, optimizer=optax.sgd(0.5))
    ours = run(lw, losses)
    # Re-derive with plain SGD: w <- w - lr * J^T delta.
    w, ema, prev, ref = np.zeros(2), np.zeros(2), None, []
    for loss in losses:
        ema = 0.5 * ema + 0.5 * (-loss)
        if prev is not None:
            delta = np.clip(prev - loss, -0.1, 0.1) + 0.2 * ema
            p = softmax(w)
            w = w - 0.5 * (p * delta - p * (p @ delta))
        prev = loss
        ref.append(softmax(w))
    np.testing.assert_allclose(ours, np.stack(ref), rtol=RTOL)


# ---------------------------------------------------------------- median_normalize (MedGRPO) --


def test_median_normalize_matches_window_median():
    steps, k, window = 24, 3, 5
    losses = loss_sequence(steps, k)
    ours = run(mtl.median_normalize_weighting(k, target=2.0, window=window), losses)
    ref = np.stack(
        [2.0 / np.median(losses[max(0, t - window + 1) : t + 1], axis=0) for t in range(steps)]
    )
    np.testing.assert_allclose(ours, ref, rtol=RTOL)


def test_median_normalize_maps_each_median_to_the_common_value():
    """Defining property: w_k * median_k = target for every dataset, whatever its scale."""
    rng = np.random.default_rng(0)
    steps, k = 21, 3
    rewards = rng.uniform(0, 1, (steps, k)) * np.array([[1.0, 100.0, 0.01]])
    rewards = rewards.astype(np.float32).astype(np.float64)
    w = run(
        mtl.median_normalize_weighting(k, target=0.5, window=64),
        np.ones((steps, k)),
        task_rewards=rewards,
    )
    np.testing.assert_allclose(w[-1] * np.median(rewards, axis=0), 0.5, rtol=RTOL)


def routefinder_reference(rewards: np.ndarray, statistic: str, alpha: float) -> np.ndarray:
    """ai4co/routefinder ``routefinder/models/reward_normalization.py``: ``CumulativeMean``
    (``(n x + y) / (n + 1)``) / ``ExponentialMean`` (first value, then ``(1 - a) x + a y``),
    updated before use; ``div`` normalisation ``r / |norm_val|``."""
    norm = np.zeros(rewards.shape[1])
    out = []
    for n, r in enumerate(rewards):
        if statistic == "mean":
            norm = (n * norm + r) / (n + 1)
        else:
            norm = r if n == 0 else (1 - alpha) * norm + alpha * r
        out.append(1.0 / np.abs(norm))
    return np.stack(out)


@pytest.mark.parametrize("statistic", ["mean", "ema"])
def test_median_normalize_routefinder_statistics(statistic):
    rng = np.random.default_rng(1)
    rewards = (-rng.uniform(5, 50, (25, 3))).astype(np.float32).astype(np.float64)  # VRP costs
    lw = mtl.median_normalize_weighting(3, statistic=statistic, alpha=0.1)
    ours = run(lw, np.ones_like(rewards), task_rewards=rewards)
    np.testing.assert_allclose(ours, routefinder_reference(rewards, statistic, 0.1), rtol=RTOL)


# -------------------------------------------------------------------- inverse_variance (ARL) --


def arl_reference(variances: np.ndarray, floor: float) -> np.ndarray:
    """shicaiwei123/ICCV2025-ARL ``main_arl_variance.py`` (``train_epoch``): ``H_n = H / sum H``,
    ``clamp(H_n, min=0.3)``, ``w = (1 / H_n) / sum(1 / H_n)``, generalised to K tasks."""
    share = np.maximum(variances / variances.sum(axis=1, keepdims=True), floor)
    inv = 1.0 / share
    return inv / inv.sum(axis=1, keepdims=True)


def test_inverse_variance_matches_arl_with_given_variances():
    rng = np.random.default_rng(2)
    var = rng.uniform(0.05, 2.0, (25, 2)).astype(np.float32).astype(np.float64)
    var[3] = [1.0, 0.01]  # exercises ARL's 0.3 clamp
    ours = run(mtl.inverse_variance_weighting(2, eps=1e-12), np.ones_like(var), task_variances=var)
    np.testing.assert_allclose(ours, arl_reference(var, 0.3), rtol=RTOL)


def test_inverse_variance_loss_variance_estimate():
    steps, k, beta = 24, 3, 0.8
    losses = loss_sequence(steps, k, seed=7)
    ours = run(mtl.inverse_variance_weighting(k, beta=beta, min_share=0.1, eps=1e-12), losses)
    mean, var, ref = None, np.zeros(k), []
    for loss in losses:  # exponentially weighted mean / variance, started at the first loss
        if mean is None:
            mean = loss.copy()
        else:
            d = loss - mean
            mean = mean + (1 - beta) * d
            var = beta * (var + (1 - beta) * d * d)
        ref.append(arl_reference((var + 1e-12)[None], 0.1)[0])
    np.testing.assert_allclose(ours, np.stack(ref), rtol=2e-5)
    np.testing.assert_allclose(ours[0], 1.0 / k, rtol=1e-6)  # no variance yet: equal


def test_inverse_variance_downweights_noisy_task():
    rng = np.random.default_rng(3)
    losses = 1.0 + np.stack([0.01 * rng.standard_normal(40), 0.5 * rng.standard_normal(40)], 1)
    w = run(mtl.inverse_variance_weighting(2), losses)
    assert w[-1, 0] > w[-1, 1]


# ---------------------------------------------------- adaptive_task_balancing, log-class scaling --


def test_adaptive_task_balancing_matches_visatb_script():
    """YanqiDai/VisATB ``weighting_visatb.py``, block "llava v1" (T = 0.5)."""
    out_c, in_c, diff = [0.7601, 0.3496, 1.6727], [1.2890, 0.9779, 0.5156], [0.8636, 0.3534, 0.9593]
    k = 3
    out_w = k * softmax(np.array(out_c) / 0.5)
    in_w = k * softmax(-np.array(in_c) / 0.5)
    diff_w = k * softmax((1 - np.array(diff)) / 0.5)
    ref = ((out_w + in_w) / 2 + diff_w) / 2
    ours = run(mtl.adaptive_task_balancing_weighting(k, out_c, in_c, diff), np.ones((20, k)))
    np.testing.assert_allclose(ours, np.broadcast_to(ref, ours.shape), rtol=RTOL)
    np.testing.assert_allclose(ref.sum(), k, rtol=1e-6)
    # Task 1: least contribution given, hardest -> weight driven by its difficulty term.
    assert np.argmax(diff_w) == 1
    with pytest.raises(ValueError, match="num_tasks"):
        mtl.adaptive_task_balancing(4, out_c, in_c, diff)


def test_log_class_scaling():
    w = run(mtl.log_class_scaling_weighting([2, 10, 1000]), np.ones((3, 3)))
    np.testing.assert_allclose(w[-1], 1.0 / np.log([2, 10, 1000]), rtol=1e-6)
    with pytest.raises(ValueError, match="num_classes"):
        mtl.log_class_scaling([2, 1])
    # A regression task (None) is left unscaled: its standardized MSE is 1 at the mean, as a
    # scaled cross-entropy is at the uniform prediction.
    w = run(mtl.log_class_scaling_weighting([3, 2, None]), np.ones((2, 3)))
    np.testing.assert_allclose(w[-1], [1 / np.log(3), 1 / np.log(2), 1.0], rtol=1e-6)
    assert np.allclose(np.log([3, 2]) * w[-1][:2], 1.0)


# ----------------------------------------------------------------------------- task_schedule --


def test_task_schedule_matches_mixing_order_matters():
    sizes, hi, switch, temp = [5e5, 2e5, 3e3, 100.0], [0, 1], 7, 2.0
    lw = mtl.task_schedule_weighting(
        4, sizes, high_resource=hi, switch_step=switch, temperature=temp
    )
    ours = run(lw, np.ones((20, 4)))
    ref = np.stack([mixing.order_matters_probs(t, sizes, hi, switch, temp) for t in range(20)])
    np.testing.assert_allclose(ours, ref, rtol=RTOL)
    assert np.all(ours[:switch, 2:] == 0) and np.all(ours[switch:, 2:] > 0)


def test_task_schedule_custom_schedule():
    lw = mtl.task_schedule_weighting(2, schedule=lambda s: jnp.stack([1.0 / (1 + s), s / (1 + s)]))
    w = run(lw, np.ones((20, 2)))
    s = np.arange(20)
    np.testing.assert_allclose(w, np.stack([1 / (1 + s), s / (1 + s)], 1), rtol=RTOL)


# ------------------------------------------------------------------------- shared behaviour --


def _all_weightings(k: int) -> dict[str, mtl.LossWeighting]:
    return {
        "igb": mtl.igb_weighting(k, steps_per_epoch=2),
        "coba": mtl.coba_weighting(k, warmup_steps=2, history_length=4),
        "worst_task": mtl.worst_task_weighting(k),
        "median_normalize": mtl.median_normalize_weighting(k, window=4),
        "inverse_variance": mtl.inverse_variance_weighting(k),
        "adaptive_task_balancing": mtl.adaptive_task_balancing_weighting(
            k, np.linspace(0, 1, k), np.linspace(1, 0, k), np.linspace(0.2, 0.9, k)
        ),
        "task_schedule": mtl.task_schedule_weighting(k, [10.0] * k, switch_step=2),
        "log_class_scaling": mtl.log_class_scaling_weighting([2 + i for i in range(k)]),
    }


@pytest.mark.parametrize("name", list(_all_weightings(3)))
def test_finite_on_zero_negative_huge_losses(name):
    """Zero, negative, huge (1e30, float32 max) losses: finite weights and state.

    The documented eps floors keep divisions finite (e.g. IGB's ``w / max(L, eps)``,
    median_normalize's ``target / max(|m|, eps)``)."""
    k = 3
    lw = _all_weightings(k)[name]
    bad = np.array(
        [
            [0.0, 0.0, 0.0],
            [-1.0, 2.0, 0.0],
            [1e30, 1.0, -1e30],
            [3.4e38, 0.5, 1e-30],
            [1.0, 1.0, 1.0],
            [0.0, -5.0, 1e20],
            [2.0, 1.0, 0.5],
            [1.0, 1.0, 1.0],
        ],
        np.float32,
    )
    update = jax.jit(lw.update)
    state = lw.init()
    for loss in bad:
        extra = {"val_losses": jnp.asarray(loss)} if name == "coba" else {}
        w, state = update(jnp.asarray(loss), state, **extra)
        assert np.all(np.isfinite(np.asarray(w))), (name, loss, w)
        for leaf in jax.tree.leaves(state):
            if jnp.issubdtype(leaf.dtype, jnp.inexact):
                assert np.all(np.isfinite(np.asarray(leaf))), (name, loss)


@pytest.mark.parametrize("name", list(_all_weightings(3)))
def test_wrong_number_of_losses_errors_at_trace_time(name):
    tx = mtl.from_loss_weighting(_all_weightings(3)[name])
    params = {"w": jnp.zeros((2,))}
    jac = {"w": jnp.ones((3, 2))}
    with pytest.raises(ValueError, match="task_losses has shape"):
        jax.jit(tx.update)(jac, tx.init(params), params, task_losses=jnp.ones(2))


@pytest.mark.parametrize("name", ["igb", "worst_task", "inverse_variance"])
def test_one_backward_path_equals_transform_path(name):
    """weighted_value_and_grad == optax.chain(method, sum_tasks) on the Jacobian."""
    k = 3
    targets = jnp.array([[1.0, 2.0], [3.0, -1.0], [0.5, 0.4]])

    def loss_fn(p, scale):
        return scale * jnp.sum((targets - p[None, :]) ** 2, axis=1) + 0.1

    lw = _all_weightings(k)[name]
    vg = jax.jit(mtl.weighted_value_and_grad(loss_fn, lw))
    tx = optax.chain(mtl.from_loss_weighting(lw), mtl.sum_tasks())
    params = jnp.array([0.2, -0.3])
    lw_state, tx_state = lw.init(), tx.init(params)
    tx_update = jax.jit(tx.update)
    for step in range(6):
        scale = 1.0 / (1.0 + step)
        extra = {"val_losses": jnp.array([1.0, 2.0, 3.0]) * scale} if name == "coba" else {}
        (losses, _, lw_state), g1 = vg(lw_state, params, scale, **extra)
        jac = jax.jacrev(loss_fn)(params, scale)
        g2, tx_state = tx_update(jac, tx_state, params, task_losses=losses, **extra)
        np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-5, atol=1e-6)


def test_constructor_validation():
    with pytest.raises(ValueError, match="steps_per_epoch"):
        mtl.igb(2, steps_per_epoch=0)
    with pytest.raises(ValueError, match="reward_decay"):
        mtl.worst_task(2, reward_decay=1.0)
    with pytest.raises(ValueError, match="statistic"):
        mtl.median_normalize(2, statistic="max")
    with pytest.raises(ValueError, match="min_share"):
        mtl.inverse_variance(2, min_share=1.5)
    with pytest.raises(ValueError, match="dataset_sizes"):
        mtl.task_schedule(2, dataset_sizes=[1.0, 2.0, 3.0])
