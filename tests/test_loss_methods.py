"""Loss-level methods of issue 5 part D against re-derivations of their reference update rules.

Each reference below is a NumPy (float64) re-derivation of the update rule in the cited file of
LibMTL (github.com/median-research-group/LibMTL @ 4336804, ``LibMTL/weighting/<Method>.py``),
the FAMO authors' ``famo.py`` (github.com/Cranial-XIX/FAMO) or TorchJD 0.18
(``torchjd/aggregation/<file>.py``). Every method runs >= 20 consecutive steps of state
evolution on a fixed loss (or Jacobian) sequence, through ``jax.jit``, and its weights must
match within 1e-5 relative. Comparisons that run the PyTorch code itself are behind the
``reference`` marker.

Torch's ``Adam(lr, weight_decay=wd)`` (how LibMTL trains UW / GradNorm / IMTL-L scales, and
FAMO's logits) is re-derived as `NpAdam`.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_jax as mtl

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5
STEPS = 24


class NpAdam:
    """``torch.optim.Adam`` (coupled L2 ``weight_decay``, bias-corrected) in float64."""

    def __init__(self, lr, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8):
        self.lr, self.wd, (self.b1, self.b2), self.eps = lr, weight_decay, betas, eps
        self.m = self.v = None
        self.t = 0

    def step(self, p, g):
        g = g + self.wd * p
        if self.m is None:
            self.m, self.v = np.zeros_like(p), np.zeros_like(p)
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        m_hat = self.m / (1 - self.b1**self.t)
        v_hat = self.v / (1 - self.b2**self.t)
        return p - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def torch_adam(lr, wd):
    return optax.chain(optax.add_decayed_weights(wd), optax.adam(lr))


def loss_sequence(k=3, steps=STEPS, seed=0):
    """Positive, decreasing-ish per-task losses with noise: a fixed [steps, K] sequence."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps)[:, None]
    scale = np.array([1.0, 3.0, 0.3, 2.0, 0.7][:k])
    return scale * np.exp(-0.05 * t * (1 + np.arange(k))) * (1 + 0.2 * rng.random((steps, k)))


def run_weighting(lw, losses, extras=None):
    """Runs ``lw.update`` through jit over the sequence; returns the [steps, K] weights."""
    update = jax.jit(lw.update)
    state = lw.init()
    out = []
    for t, loss in enumerate(losses):
        kw = extras(t) if extras is not None else {}
        w, state = update(jnp.asarray(loss, jnp.float32), state, **kw)
        out.append(np.asarray(w, np.float64))
    return np.stack(out), state


def assert_weights_close(got, want, rtol=RTOL):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=0)


# ---------------------------------------------------------------------------------------------
# Uncertainty weighting -- LibMTL/weighting/UW.py: loss = sum(L / (2 exp(s)) + s / 2), s init
# -0.5, returned weights 1 / (2 exp(s)), s stepped by the model's torch Adam after backward.


def ref_uw(losses, lr, wd, s0=-0.5):
    s = np.full(losses.shape[1], s0)
    opt = NpAdam(lr, wd)
    ws = []
    for loss in losses:
        ws.append(1 / (2 * np.exp(s)))
        grad = -loss / (2 * np.exp(s)) + 0.5  # d/ds of L/(2 e^s) + s/2
        s = opt.step(s, grad)
    return np.stack(ws)


@pytest.mark.parametrize("lr,wd", [(1e-4, 1e-5), (0.05, 1e-5)])
def test_uncertainty_weighting_matches_libmtl(lr, wd):
    losses = loss_sequence()
    opt = None if lr == 1e-4 else torch_adam(lr, wd)  # None: the default is LibMTL's
    got, _ = run_weighting(mtl.uncertainty_weighting_weighting(3, optimizer=opt), losses)
    want = ref_uw(losses, lr, wd)
    assert_weights_close(got, want)
    if lr > 1e-3:
        assert np.ptp(want[:, 1]) > 0.1  # the state really evolved


def test_uncertainty_weighting_recovers_noise_ratio():
    spec = importlib.util.spec_from_file_location(
        "uncertainty_noise_ratio", ROOT / "examples" / "uncertainty_noise_ratio.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    r = example.run(sigma1=0.5, sigma2=2.0, steps=600)
    # exp(s_k) -> the realized noise variances; their ratio -> sigma1^2 / sigma2^2 = 1/16.
    assert r["recovered_ratio"] == pytest.approx(r["empirical_ratio"], rel=0.05)
    assert r["recovered_ratio"] == pytest.approx(r["true_ratio"], rel=0.1)
    assert r["variance_1"] == pytest.approx(0.25, rel=0.1)
    assert r["variance_2"] == pytest.approx(4.0, rel=0.1)


@pytest.mark.reference
def test_uncertainty_weighting_and_imtl_l_match_libmtl_torch_code():
    """LibMTL's UW and IMTL-L losses, differentiated by torch autograd, stepped by torch Adam."""
    import torch

    losses = loss_sequence()
    for name, init, scaled, weight in [
        ("uw", -0.5, lambda s, x: x / (2 * s.exp()) + s / 2, lambda s: 1 / (2 * s.exp())),
        ("imtl_l", 0.0, lambda s, x: s.exp() * x - s, lambda s: s.exp()),
    ]:
        s = torch.nn.Parameter(torch.full((3,), init, dtype=torch.float64))
        opt = torch.optim.Adam([s], lr=0.05, weight_decay=1e-5)
        want = []
        for loss in losses:
            opt.zero_grad()
            curr = torch.tensor(loss, requires_grad=True)
            total = scaled(s, curr).sum()
            total.backward()
            want.append(curr.grad.numpy().copy())  # the weights are d total / d L_k
            np.testing.assert_allclose(want[-1], weight(s).detach().numpy(), rtol=1e-12)
            opt.step()
        factory = {"uw": mtl.uncertainty_weighting_weighting, "imtl_l": mtl.imtl_l_weighting}
        got, _ = run_weighting(factory[name](3, optimizer=torch_adam(0.05, 1e-5)), losses)
        assert_weights_close(got, np.stack(want))


@pytest.mark.reference
def test_gls_and_stch_match_libmtl_torch_autograd():
    """Weights = autograd of LibMTL's GLS / STCH loss expressions w.r.t. the task losses."""
    import torch

    epochs = [e for e in range(6) for _ in range(4)]
    losses = loss_sequence(steps=len(epochs))
    gls_want, stch_want, total, count, nadir = [], [], 0.0, 0, None
    for loss, e in zip(losses, epochs, strict=True):
        curr = torch.tensor(loss, requires_grad=True)
        (g,) = torch.autograd.grad(torch.pow(curr.prod(), 1.0 / 3), curr)
        gls_want.append(g.numpy())
        curr = torch.tensor(loss, requires_grad=True)
        if e <= 2:
            obj = torch.log(curr + 1e-20).sum()
            if e == 2:
                total, count = total + curr.detach(), count + 1
        else:
            nadir = total / count if nadir is None else nadir
            rel = torch.log(curr / nadir + 1e-20)
            obj = 1.0 * torch.log(torch.sum(torch.exp((rel - rel.detach().max()) / 1.0))) * 3
        (g,) = torch.autograd.grad(obj, curr)
        stch_want.append(g.numpy())
    got, _ = run_weighting(mtl.gls_weighting(3), losses)
    assert_weights_close(got, np.stack(gls_want))
    lw = mtl.stch_weighting(3, warmup_epoch=2)
    got, _ = run_weighting(lw, losses, lambda t: {"epoch": epochs[t]})
    assert_weights_close(got, np.stack(stch_want))


# ---------------------------------------------------------------------------------------------
# DWA -- LibMTL/weighting/DWA.py + LibMTL/trainer.py: train_loss_buffer[:, e] is the mean
# training loss of epoch e; in epoch e > 1 the weights are
# K softmax(buffer[:, e-1] / buffer[:, e-2] / T), else 1.


def ref_dwa(losses, epochs, T=2.0):
    k = losses.shape[1]
    buffer = {}
    ws = []
    for e in sorted(set(epochs)):
        idx = [i for i, ep in enumerate(epochs) if ep == e]
        for _ in idx:
            if e > 1:
                r = buffer[e - 1] / buffer[e - 2]
                z = np.exp(r / T - np.max(r / T))
                ws.append(k * z / z.sum())
            else:
                ws.append(np.ones(k))
        buffer[e] = losses[idx].mean(0)
    return np.stack(ws)


def test_dwa_per_epoch_matches_libmtl():
    epochs = [e for e in range(8) for _ in range(3)]  # 8 epochs of 3 batches: 24 steps
    losses = loss_sequence(steps=len(epochs))
    got, _ = run_weighting(mtl.dwa_weighting(3), losses, lambda t: {"epoch": epochs[t]})
    want = ref_dwa(losses, epochs)
    assert_weights_close(got, want)
    assert np.ptp(want[-1]) > 0.01


def test_dwa_without_epoch_is_per_call():
    losses = loss_sequence()
    got, _ = run_weighting(mtl.dwa_weighting(3, T=1.0), losses)
    assert_weights_close(got, ref_dwa(losses, list(range(len(losses))), T=1.0))


# ---------------------------------------------------------------------------------------------
# RLW -- TorchJD 0.18 aggregation/_random.py and LibMTL/weighting/RLW.py: softmax(randn(K)).


@functools.lru_cache
def _rlw_scan(k, n):
    update = mtl.rlw_weighting(k).update  # the seed only enters through the state

    def body(state, _):
        w, state = update(jnp.ones(k), state)
        return state, w

    return jax.jit(lambda state: jax.lax.scan(body, state, None, length=n)[1])


def rlw_samples(k, n, seed=0):
    return np.asarray(_rlw_scan(k, n)(mtl.rlw_weighting(k, seed=seed).init()), np.float64)


def test_rlw_distribution_is_softmax_of_standard_normal():
    from scipy import stats

    k, n = 4, 4000
    ws = rlw_samples(k, n)
    np.testing.assert_allclose(ws.sum(1), 1.0, rtol=1e-5)
    assert np.all(ws > 0)
    # log w = z - logsumexp(z): centred logs are z - mean(z), each ~ N(0, (K-1)/K), and the
    # log-ratio of two weights is z_i - z_j ~ N(0, 2).
    centred = np.log(ws) - np.log(ws).mean(1, keepdims=True)
    for i in range(k):
        assert stats.kstest(centred[:, i], "norm", args=(0, np.sqrt((k - 1) / k))).pvalue > 1e-3
    ratio = np.log(ws[:, 0] / ws[:, 1])
    assert stats.kstest(ratio, "norm", args=(0, np.sqrt(2))).pvalue > 1e-3
    # Fresh draws each step, deterministic given the seed, different across seeds.
    assert len({tuple(np.round(w, 6)) for w in ws[:50]}) == 50
    np.testing.assert_array_equal(ws, rlw_samples(k, n))
    assert not np.allclose(ws[:5], rlw_samples(k, n, seed=1)[:5])


@pytest.mark.reference
def test_rlw_matches_torchjd_random_distribution():
    import torch
    from scipy import stats
    from torchjd.aggregation import Random

    k, n = 3, 3000
    torch.manual_seed(0)
    agg = Random()
    eye = torch.eye(k)
    ref = np.stack([agg(eye).numpy() for _ in range(n)])  # rows of I: the output is w
    ours = rlw_samples(k, n)
    for i in range(k):
        assert stats.ks_2samp(ours[:, i], ref[:, i]).pvalue > 1e-3


# ---------------------------------------------------------------------------------------------
# GLS -- LibMTL/weighting/GLS.py: loss = prod(L)^(1/K); its gradient's weights are
# d loss / d L_k = prod(L)^(1/K) / (K L_k).


def test_gls_matches_libmtl_gradient():
    losses = loss_sequence(k=4)
    got, _ = run_weighting(mtl.gls_weighting(4), losses)
    gm = np.prod(losses, axis=1, keepdims=True) ** (1 / 4)
    assert_weights_close(got, gm / (4 * losses))
    # and equals autodiff of the geometric mean
    g = jax.grad(lambda x: jnp.prod(x) ** 0.25)(jnp.asarray(losses[3], jnp.float32))
    np.testing.assert_allclose(got[3], np.asarray(g), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# IMTL-L -- LibMTL/weighting/IMTL.py: scaled losses exp(s) L - s, s init 0; each task's backward
# accumulates d/ds_k = exp(s_k) L_k - 1 into s.grad; the model's Adam steps s.


def ref_imtl_l(losses, lr, wd):
    s = np.zeros(losses.shape[1])
    opt = NpAdam(lr, wd)
    ws = []
    for loss in losses:
        ws.append(np.exp(s))
        s = opt.step(s, np.exp(s) * loss - 1)
    return np.stack(ws)


@pytest.mark.parametrize("lr", [1e-4, 0.05])
def test_imtl_l_matches_libmtl(lr):
    losses = loss_sequence()
    opt = None if lr == 1e-4 else torch_adam(lr, 1e-5)
    got, _ = run_weighting(mtl.imtl_l_weighting(3, optimizer=opt), losses)
    assert_weights_close(got, ref_imtl_l(losses, lr, 1e-5))


# ---------------------------------------------------------------------------------------------
# STCH -- LibMTL/weighting/STCH.py: epochs < warmup: loss sum log(L + 1e-20); epoch == warmup:
# the same, and the losses are averaged into the nadir point; later
# loss = K mu log sum exp((log(L / nadir + 1e-20) - max) / mu). Weights: d loss / d L.


def ref_stch(losses, epochs, mu, warmup):
    k = losses.shape[1]
    total, count, nadir = np.zeros(k), 0, None
    ws = []
    for loss, e in zip(losses, epochs, strict=True):
        if e <= warmup:
            ws.append(1 / (loss + 1e-20))
            if e == warmup:
                total, count = total + loss, count + 1
        else:
            if nadir is None:
                nadir = total / count
            rel = np.log(loss / nadir + 1e-20)
            z = np.exp((rel - rel.max()) / mu)
            soft = z / z.sum()
            # chain rule through log(L / nadir + eps)
            ws.append(k * soft / (nadir * (loss / nadir + 1e-20)))
    return np.stack(ws)


@pytest.mark.parametrize("mu", [1.0, 0.3])
def test_stch_matches_libmtl(mu):
    epochs = [e for e in range(6) for _ in range(4)]  # 24 steps, warm-up epochs 0..2
    losses = loss_sequence(steps=len(epochs))
    lw = mtl.stch_weighting(3, mu=mu, warmup_epoch=2)
    got, _ = run_weighting(lw, losses, lambda t: {"epoch": epochs[t]})
    assert_weights_close(got, ref_stch(losses, epochs, mu, 2))


# ---------------------------------------------------------------------------------------------
# FAMO -- authors' famo.py and LibMTL/weighting/FAMO.py (+ the trainer's update_w): with
# z = softmax(w), D = L - min + 1e-8, the loss sum(log(D) z / c), c = sum(z / D) detached,
# has weights (z / D) / c. After the model step update_w(curr) takes one torch Adam step
# (lr 0.025, weight_decay gamma) on w with grad = J_softmax^T delta,
# delta = log D(prev) - log D(curr). Our single call per step uses the next step's losses as
# "curr" (documented one-step offset), so the authors' sequence with curr_t := losses_{t+1}
# must match exactly.


def ref_famo(losses, lr=0.025, gamma=1e-3, mins=0.0):
    w = np.zeros(losses.shape[1])
    opt = NpAdam(lr, gamma)
    ws = []
    for t, loss in enumerate(losses):
        z = np.exp(w - w.max())
        z /= z.sum()
        d = loss - mins + 1e-8
        ws.append((z / d) / np.sum(z / d))
        if t + 1 < len(losses):
            delta = np.log(d) - np.log(losses[t + 1] - mins + 1e-8)
            grad = z * (delta - np.dot(z, delta))
            w = opt.step(w, grad)
    return np.stack(ws)


@pytest.mark.parametrize("gamma,mins", [(1e-3, 0.0), (1e-2, (0.2, 0.1, 0.005))])
def test_famo_matches_authors(gamma, mins):
    losses = loss_sequence()
    got, state = run_weighting(mtl.famo_weighting(3, gamma=gamma, min_losses=mins), losses)
    want = ref_famo(losses, gamma=gamma, mins=np.asarray(mins))
    assert_weights_close(got, want)
    assert np.ptp(np.asarray(state.logits)) > 0.05  # the logits really moved


@pytest.mark.reference
def test_famo_matches_authors_torch_code():
    """Runs the authors' update rule with torch autograd and torch.optim.Adam."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    losses = loss_sequence()
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.025, weight_decay=1e-3)
    want = []
    for t in range(len(losses)):
        curr = torch.tensor(losses[t], requires_grad=True)
        z = F.softmax(w, -1)
        d = curr + 1e-8
        c = (z / d).sum().detach()
        loss = (d.log() * z / c).sum()
        (g,) = torch.autograd.grad(loss, curr)
        want.append(g.numpy())
        if t + 1 < len(losses):
            delta = (curr.detach() + 1e-8).log() - (torch.tensor(losses[t + 1]) + 1e-8).log()
            (dw,) = torch.autograd.grad(F.softmax(w, -1), w, grad_outputs=delta)
            opt.zero_grad()
            w.grad = dw
            opt.step()
    got, _ = run_weighting(mtl.famo_weighting(3), losses)
    assert_weights_close(got, np.stack(want))


# ---------------------------------------------------------------------------------------------
# GradNorm -- LibMTL/weighting/GradNorm.py: loss_scale p init 1; epoch 0: EW; epoch >= 1:
# w = K softmax(p), G_k = ||w_k g_k||, L_i = L / buffer[:, 0] (epoch-0 mean loss),
# r = L_i / mean(L_i), const = mean(G) r^alpha (detached), L_grad = sum |G - const| backward
# into p; the model's Adam then steps p. The returned (and applied) weights are w before the
# step.


def ref_gradnorm(losses, norms, epochs, alpha=1.5, lr=1e-4, wd=1e-5):
    k = losses.shape[1]
    p = np.ones(k)
    opt = NpAdam(lr, wd)
    init = losses[[i for i, e in enumerate(epochs) if e == 0]].mean(0)
    ws = []
    for loss, n, e in zip(losses, norms, epochs, strict=True):
        if e == 0:
            ws.append(np.ones(k))
            continue
        s = np.exp(p - p.max())
        s /= s.sum()
        w = k * s
        g = w * n
        li = loss / init
        r = li / li.mean()
        const = g.mean() * r**alpha
        grad_w = np.sign(g - const) * n
        grad_p = k * s * (grad_w - np.dot(s, grad_w))  # softmax chain rule
        ws.append(w)
        p = opt.step(p, grad_p)
    return np.stack(ws)


def gradnorm_inputs(steps=STEPS, k=3):
    rng = np.random.default_rng(5)
    losses = loss_sequence(k=k, steps=steps)
    norms = np.array([1.0, 4.0, 0.5][:k]) * (1 + 0.3 * rng.random((steps, k)))
    return losses, norms


@pytest.mark.parametrize("lr", [1e-4, 0.05])
def test_gradnorm_matches_libmtl(lr):
    losses, norms = gradnorm_inputs()
    epochs = [0] * 4 + [1 + t // 5 for t in range(STEPS - 4)]
    opt = None if lr == 1e-4 else torch_adam(lr, 1e-5)
    lw = mtl.gradnorm_weighting(3, optimizer=opt)
    got, _ = run_weighting(lw, losses, lambda t: {"grad_norms": norms[t], "epoch": epochs[t]})
    want = ref_gradnorm(losses, norms, epochs, lr=lr)
    assert_weights_close(got, want)
    if lr > 1e-3:
        assert np.ptp(want[-1]) > 0.1


@pytest.mark.reference
def test_gradnorm_matches_libmtl_torch_autograd():
    """The GradNorm loss differentiated by torch autograd and stepped by torch Adam."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    losses, norms = gradnorm_inputs()
    k = 3
    grads = [torch.tensor(np.diag(n)) for n in norms]  # g_k = n_k e_k: ||g_k|| = n_k
    p = torch.nn.Parameter(torch.ones(k, dtype=torch.float64))
    opt = torch.optim.Adam([p], lr=0.05, weight_decay=1e-5)
    init = losses[0]
    want = [np.ones(k)]
    for t in range(1, STEPS):
        opt.zero_grad()
        w = k * F.softmax(p, dim=-1)
        g_per = torch.norm(w.unsqueeze(1) * grads[t], p=2, dim=-1)
        li = torch.tensor(losses[t] / init)
        r = li / li.mean()
        const = (g_per.mean(0) * r**1.5).detach()
        (g_per - const).abs().sum(0).backward()
        want.append(w.detach().numpy())
        opt.step()
    lw = mtl.gradnorm_weighting(k, optimizer=torch_adam(0.05, 1e-5))
    got, _ = run_weighting(lw, losses, lambda t: {"grad_norms": norms[t]})  # epoch = call
    # `ref_gradnorm` (float64) matches this torch run to 1e-15. Our float32 optax Adam at
    # lr 0.05 drifts from torch's float64 Adam by ~4.5e-7 relative per step (measured: 1.07e-5
    # after 23 active steps; optax.adam alone on fixed gradients: 1.9e-6 absolute in 24 steps),
    # hence 2e-5 here; the 1e-5 comparisons above use the same rule.
    assert_weights_close(got, np.stack(want), rtol=2e-5)


def test_gradnorm_transform_reads_masked_jacobian_norms():
    rng = np.random.default_rng(0)
    jac = {
        "enc": {"last": jnp.asarray(rng.normal(size=(3, 4, 2))), "first": jnp.ones((3, 5))},
        "head": jnp.asarray(rng.normal(size=(3, 2))),
    }
    mask = {"enc": {"last": True, "first": False}, "head": False}
    norms = np.linalg.norm(np.asarray(jac["enc"]["last"]).reshape(3, -1), axis=1)
    np.testing.assert_allclose(mtl.task_grad_norms(jac, mask), norms, rtol=1e-6)
    np.testing.assert_allclose(
        mtl.task_grad_norms(jac, {"enc": True, "head": False}), np.sqrt(norms**2 + 5), rtol=1e-6
    )
    tx = mtl.gradnorm(3, optimizer=optax.sgd(0.1), param_mask=mask)
    lw = mtl.gradnorm_weighting(3, optimizer=optax.sgd(0.1))
    params = jax.tree.map(lambda x: x[0], jac)
    state, lw_state = tx.init(params), lw.init()
    update, lw_update = jax.jit(tx.update), jax.jit(lw.update)
    for t, loss in enumerate(loss_sequence(steps=4)):
        out, state = update(jac, state, params, task_losses=jnp.asarray(loss, jnp.float32))
        w, lw_state = lw_update(jnp.asarray(loss, jnp.float32), lw_state, grad_norms=norms)
        np.testing.assert_allclose(out["head"], np.asarray(w)[:, None] * jac["head"], rtol=1e-5)
        if t >= 2:  # call 0: EW epoch; call 1: GradNorm's first step from p = 1
            assert not np.allclose(np.asarray(w), 1.0)


def test_gradnorm_one_backward_path_equals_masked_transform():
    rng = np.random.default_rng(1)
    params = {
        "enc": {
            "first": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
            "last": jnp.asarray(rng.normal(size=(5, 5)), jnp.float32),
        },
        "heads": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
    }
    x = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)

    def loss_fn(p):
        h = jnp.tanh(jnp.tanh(x @ p["enc"]["first"]) @ p["enc"]["last"])
        return jnp.mean((h @ p["heads"] - y) ** 2, axis=0) * jnp.array([1.0, 4.0, 0.25])

    mask = {"enc": {"first": False, "last": True}, "heads": False}
    opt = optax.sgd(0.5)
    lw = mtl.gradnorm_weighting(3, optimizer=opt)
    vg = jax.jit(mtl.gradnorm_value_and_grad(loss_fn, lw, mask))
    tx = optax.chain(mtl.gradnorm(3, optimizer=opt, param_mask=mask), mtl.sum_tasks())

    @jax.jit
    def transform_path(params, tx_state):
        losses, jac = mtl.value_and_jacobian(loss_fn)(params)
        return tx.update(jac, tx_state, params, task_losses=losses)

    lw_state, tx_state = lw.init(), tx.init(params)
    for t in range(5):
        (losses, w, lw_state), grad = vg(lw_state, params)
        grad2, tx_state = transform_path(params, tx_state)
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(grad2), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
        if t >= 2:
            assert not np.allclose(np.asarray(w), 1.0)
        params = jax.tree.map(lambda p, g: p - 0.05 * g, params, grad)


def random_dense_model(rng, batch_shape, d_in, d_out, k, bias=True):
    """A random dense layer ``y = x W (+ b)`` under nonlinear heads; and its (W, b) Jacobian."""
    x = jnp.asarray(rng.normal(size=(*batch_shape, d_in)), jnp.float32)
    dense = {"w": jnp.asarray(rng.normal(size=(d_in, d_out)), jnp.float32)}
    if bias:
        dense["b"] = jnp.asarray(rng.normal(size=(d_out,)), jnp.float32)
    heads = jnp.asarray(rng.normal(size=(k, d_out)), jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 2.0, size=k), jnp.float32)

    def heads_fn(y):
        flat = jnp.reshape(jnp.tanh(y), (-1, d_out))
        return scale * jnp.mean((flat @ heads.T - 0.3) ** 2, axis=0)

    def dense_fn(d):
        y = x @ d["w"]
        return y + d["b"] if bias else y

    y = dense_fn(dense)
    losses, vjp = jax.vjp(heads_fn, y)
    cotangents = mtl.jacobian_rows(lambda ct: vjp(ct)[0], k, losses.dtype)  # [K, *y.shape]
    _, jac = mtl.value_and_jacobian(lambda d: heads_fn(dense_fn(d)))(dense)
    return x, cotangents, jac


@pytest.mark.parametrize(
    "batch_shape, d_in, d_out, k, bias",
    [
        ((4,), 16, 8, 3, True),  # N^2 (in + K out) < K N in out: the B x B Gram products
        ((4,), 16, 8, 3, False),
        ((2, 3), 16, 8, 3, True),  # [B, T, in], Gram products
        ((3, 20), 4, 3, 2, True),  # [B, T, in] with N = 60 > in x out: outer products
        ((5,), 6, 5, 1, False),  # K = 1, outer products
    ],
)
def test_dense_grad_norms_equal_the_dense_layer_jacobian_norms(batch_shape, d_in, d_out, k, bias):
    rng = np.random.default_rng(sum(batch_shape) + d_in + k)
    x, cotangents, jac = random_dense_model(rng, batch_shape, d_in, d_out, k, bias)
    got = jax.jit(mtl.dense_grad_norms, static_argnums=2)(x, cotangents, bias)
    assert got.shape == (k,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, mtl.task_grad_norms(jac), rtol=1e-5)
    if bias:  # the bias term is really there: dropping it gives the kernel's norms only
        np.testing.assert_allclose(
            mtl.dense_grad_norms(x, cotangents, bias=False),
            mtl.task_grad_norms(jac, {"w": True, "b": False}),
            rtol=1e-5,
        )


def test_dense_grad_norms_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"same batch dims; got inputs \(8, 5\)"):
        mtl.dense_grad_norms(jnp.ones((8, 5)), jnp.ones((3, 7, 2)))
    with pytest.raises(ValueError, match="output_cotangents \\[K, ..., out\\]"):
        mtl.dense_grad_norms(jnp.ones((8, 5)), jnp.ones((8, 2)))  # no task axis


def dense_split_model(rng, batch_shape, bias):
    """A small model split at its dense last shared layer, as the dense path wants it."""
    d_in, hidden, d_out = 4, 6, 5
    params = {
        "enc": {
            "first": jnp.asarray(rng.normal(size=(d_in, hidden)), jnp.float32),
            "dense": {"w": jnp.asarray(rng.normal(size=(hidden, d_out)) / 2, jnp.float32)},
        },
        "heads": jnp.asarray(rng.normal(size=(d_out, 3)), jnp.float32),
    }
    if bias:
        params["enc"]["dense"]["b"] = jnp.asarray(rng.normal(size=(d_out,)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(*batch_shape, d_in)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(*batch_shape, 3)), jnp.float32)
    scale = jnp.array([1.0, 4.0, 0.25])

    def inputs_fn(p, x, target):
        return jnp.tanh(x @ p["enc"]["first"])

    def dense_fn(p):
        return p["enc"]["dense"]["w"], p["enc"]["dense"].get("b")

    def heads_fn(p, y, x, target):
        err = (jnp.tanh(y) @ p["heads"] - target).reshape(-1, 3)
        losses = jnp.mean(err**2, axis=0) * scale
        return losses, {"mean": jnp.mean(losses)}

    def loss_fn(p, x, target):
        kernel, b = dense_fn(p)
        y = inputs_fn(p, x, target) @ kernel
        return heads_fn(p, y if b is None else y + b, x, target)

    return params, (x, target), (inputs_fn, dense_fn, heads_fn), loss_fn


@pytest.mark.parametrize("batch_shape, bias", [((16,), True), ((4, 5), False)])
def test_gradnorm_dense_path_equals_mask_jacobian_path(batch_shape, bias):
    params, args, (inputs_fn, dense_fn, heads_fn), loss_fn = dense_split_model(
        np.random.default_rng(2), batch_shape, bias
    )
    mask = {"enc": {"first": False, "dense": True}, "heads": False}
    lw = mtl.gradnorm_weighting(3, optimizer=optax.sgd(0.5))
    fast = jax.jit(
        mtl.gradnorm_dense_value_and_grad(inputs_fn, dense_fn, heads_fn, lw, has_aux=True)
    )
    slow = jax.jit(mtl.gradnorm_value_and_grad(loss_fn, lw, mask, has_aux=True))
    fast_state = slow_state = lw.init()
    for t in range(6):
        epoch = t // 2  # epoch 0 (two calls) records L(0), GradNorm acts from epoch 1
        (losses, w, fast_state, aux), grads = fast(fast_state, params, *args, epoch=epoch)
        (losses2, w2, slow_state, aux2), grads2 = slow(slow_state, params, *args, epoch=epoch)
        np.testing.assert_allclose(losses, losses2, rtol=1e-6)
        np.testing.assert_allclose(aux["mean"], aux2["mean"], rtol=1e-6)
        np.testing.assert_allclose(w, w2, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(fast_state), jax.tree.leaves(slow_state), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
        if t >= 3:  # epoch 0: EW; from epoch 1 on the learned weights move
            assert not np.allclose(np.asarray(w), 1.0)
        params = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)


def test_gradnorm_dense_path_rejects_a_layer_of_the_wrong_shape():
    params, args, (inputs_fn, dense_fn, heads_fn), _ = dense_split_model(
        np.random.default_rng(3), (8,), True
    )
    lw = mtl.gradnorm_weighting(3)
    transposed = mtl.gradnorm_dense_value_and_grad(
        inputs_fn, lambda p: (dense_fn(p)[0].T, dense_fn(p)[1]), heads_fn, lw, has_aux=True
    )
    with pytest.raises(ValueError, match=r"got x \(8, 6\), kernel \(5, 6\), bias \(5,\)"):
        transposed(lw.init(), params, *args)
    bad_bias = mtl.gradnorm_dense_value_and_grad(
        inputs_fn, lambda p: (dense_fn(p)[0], jnp.zeros(6)), heads_fn, lw, has_aux=True
    )
    with pytest.raises(ValueError, match=r"bias \[out\] or None\); got .* bias \(6,\)"):
        bad_bias(lw.init(), params, *args)


# ---------------------------------------------------------------------------------------------
# ExcessMTL -- TorchJD 0.18 aggregation/_excess_mtl.py (ExcessMTLWeighting): S += J^2,
# e_k = sum J_k^2 / sqrt(S_k + 1e-7); warm-up calls keep w = 1/K and sum e; the first
# non-warm-up call sets the baseline (raw e used on that call when n_warmup_steps = 0,
# else e / (baseline + 1e-7)); w <- softmax(log w + eta e). Output w^T J.


def ref_excess_mtl(jacs, eta=1.0, n_warmup=0):
    k = jacs[0].shape[0]
    s = np.zeros_like(jacs[0])
    w = np.full(k, 1 / k)
    initial, warm_sum, ws = None, np.zeros(k), []
    for step, jac in enumerate(jacs):
        s = s + jac**2
        e = (jac**2 / np.sqrt(s + 1e-7)).sum(1)
        if step < n_warmup:
            warm_sum += e
            ws.append(w.copy())
            continue
        if initial is None:
            if n_warmup > 0:
                initial = warm_sum / n_warmup
                e = e / (initial + 1e-7)
            else:
                initial = e
        else:
            e = e / (initial + 1e-7)
        logits = np.log(w) + eta * e
        w = np.exp(logits - logits.max())
        w /= w.sum()
        ws.append(w.copy())
    return np.stack(ws)


def jacobian_sequence(k=3, n=6, steps=STEPS, seed=3):
    rng = np.random.default_rng(seed)
    scale = np.array([1.0, 0.3, 2.0][:k])[:, None]
    return [scale * rng.normal(size=(k, n)) * np.exp(-0.03 * t) for t in range(steps)]


@pytest.mark.parametrize("eta,n_warmup", [(1.0, 0), (0.5, 3)])
def test_excess_mtl_matches_torchjd_rule(eta, n_warmup):
    jacs = jacobian_sequence()
    tx = mtl.excess_mtl(3, robust_step_size=eta, n_warmup_steps=n_warmup)
    params = jnp.zeros(6)
    state = tx.init(params)
    update = jax.jit(tx.update)
    got = []
    for jac in jacs:
        out, state = update(jnp.asarray(jac, jnp.float32), state, params)
        got.append(np.asarray(state.weighting.weights, np.float64))
        np.testing.assert_allclose(out, got[-1][:, None] * jac, rtol=1e-5, atol=1e-7)
    want = ref_excess_mtl(jacs, eta, n_warmup)
    assert_weights_close(np.stack(got), want)
    assert np.ptp(want[-1]) > 0.01


@pytest.mark.reference
def test_excess_mtl_matches_torchjd():
    import torch
    from torchjd.aggregation import ExcessMTL

    jacs = jacobian_sequence()
    agg = ExcessMTL(robust_step_size=1.0)
    tx = mtl.excess_mtl(3)
    params = jnp.zeros(6)
    state = tx.init(params)
    for jac in jacs:
        ref = agg(torch.tensor(jac, dtype=torch.float32)).numpy()
        out, state = jax.jit(tx.update)(jnp.asarray(jac, jnp.float32), state, params)
        got = np.asarray(out).sum(0)
        cos = got @ ref / (np.linalg.norm(got) * np.linalg.norm(ref))
        assert 1 - cos < 1e-6
        np.testing.assert_allclose(np.linalg.norm(got), np.linalg.norm(ref), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# DB-MTL -- LibMTL/weighting/DB_MTL.py: g_k = grad log(L_k + 1e-8) = J_k / (L_k + 1e-8);
# buffer = g + (beta / step^sigma) (buffer - g) (buffer starts at 0, step from 1);
# alpha = max ||buffer_k|| / (||buffer_k|| + 1e-8); new grad = sum alpha_k buffer_k.


def ref_db_mtl(jacs, losses, beta=0.9, sigma=0.0):
    buf = np.zeros_like(jacs[0])
    outs, alphas = [], []
    for step, (jac, loss) in enumerate(zip(jacs, losses, strict=True), start=1):
        g = jac / (loss[:, None] + 1e-8)
        buf = g + (beta / step**sigma) * (buf - g)
        u = np.linalg.norm(buf, axis=1)
        alpha = u.max() / (u + 1e-8)
        alphas.append(alpha)
        outs.append((alpha[:, None] * buf).sum(0))
    return np.stack(outs), np.stack(alphas)


@pytest.mark.parametrize("beta,sigma", [(0.9, 0.0), (0.5, 0.5)])
def test_db_mtl_matches_libmtl(beta, sigma):
    jacs, losses = jacobian_sequence(), loss_sequence()
    tx = mtl.db_mtl(3, beta=beta, beta_sigma=sigma)
    params = jnp.zeros(6)
    state = tx.init(params)
    update = jax.jit(tx.update)
    got = []
    for jac, loss in zip(jacs, losses, strict=True):
        out, state = update(jnp.asarray(jac, jnp.float32), state, params, task_losses=loss)
        got.append(np.asarray(out, np.float64).sum(0))
    want, _ = ref_db_mtl(jacs, losses, beta, sigma)
    np.testing.assert_allclose(np.stack(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_db_mtl_weighting_equals_transform_without_momentum():
    jacs, losses = jacobian_sequence(), loss_sequence()
    lw = mtl.db_mtl_weighting(3)
    tx = mtl.db_mtl(3, beta=0.0)
    params = jnp.zeros(6)
    state = tx.init(params)
    for jac, loss in list(zip(jacs, losses, strict=True))[:5]:
        out, state = tx.update(jnp.asarray(jac, jnp.float32), state, params, task_losses=loss)
        norms = np.linalg.norm(jac, axis=1)
        w, _ = lw.update(jnp.asarray(loss, jnp.float32), lw.init(), grad_norms=norms)
        np.testing.assert_allclose(out, np.asarray(w)[:, None] * jac, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Common behaviour: non-positive losses, bad input, one-backward path.

LOG_METHODS = {
    "gls": lambda: mtl.gls_weighting(3),
    "stch": lambda: mtl.stch_weighting(3, warmup_epoch=1),
    "famo": lambda: mtl.famo_weighting(3),
    "db_mtl": lambda: mtl.db_mtl_weighting(3),
}


@pytest.mark.parametrize("name", sorted(LOG_METHODS))
def test_zero_and_negative_losses_give_finite_weights(name):
    lw = LOG_METHODS[name]()
    extra = {"grad_norms": jnp.array([1.0, 0.0, 2.0])} if name == "db_mtl" else {}
    update = jax.jit(lw.update)
    state = lw.init()
    seq = [[1.0, 2.0, 0.5], [0.0, 1.0, 2.0], [-1.0, 0.0, 3.0], [0.0, 0.0, 0.0], [1.0, -2.0, 1.0]]
    for loss in seq:
        w, state = update(jnp.asarray(loss), state, **extra)
        assert np.all(np.isfinite(np.asarray(w))), (name, loss, w)
        assert np.all(np.asarray(w) >= 0)
    for leaf in jax.tree.leaves(state):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert np.all(np.isfinite(np.asarray(leaf)))


def test_db_mtl_transform_finite_on_zero_losses():
    tx = mtl.db_mtl(2)
    params = jnp.zeros(3)
    state = tx.init(params)
    jac = jnp.array([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]])
    for loss in ([0.0, 1.0], [-1.0, 0.0]):
        out, state = tx.update(jac, state, params, task_losses=jnp.asarray(loss))
        assert np.all(np.isfinite(np.asarray(out)))


ALL_WEIGHTINGS = [
    "uncertainty_weighting_weighting",
    "dwa_weighting",
    "rlw_weighting",
    "gls_weighting",
    "imtl_l_weighting",
    "stch_weighting",
    "famo_weighting",
    "gradnorm_weighting",
    "excess_mtl_weighting",
    "db_mtl_weighting",
]


@pytest.mark.parametrize(
    "name",
    [
        "uncertainty_weighting",
        "dwa",
        "rlw",
        "gls",
        "imtl_l",
        "stch",
        "famo",
        "gradnorm",
        "db_mtl",
        "excess_mtl",
    ],
)
def test_wrong_number_of_losses_fails_at_trace_time(name):
    tx = getattr(mtl, name)(3)
    params = jnp.zeros(2)
    jac = jnp.ones((3, 2))
    with pytest.raises(ValueError, match=r"task_losses has shape \(2,\)"):
        jax.jit(tx.update)(jac, tx.init(params), params, task_losses=jnp.ones(2))
    with pytest.raises(ValueError, match="num_tasks=3"):
        jax.jit(tx.update)(jnp.ones((2, 2)), tx.init(params), params, task_losses=jnp.ones(2))


BAD_HYPERPARAMETERS = [
    (mtl.uncertainty_weighting, {"num_tasks": 0}, "num_tasks"),
    (mtl.dwa, {"num_tasks": 2, "T": 0.0}, "T must be > 0"),
    (mtl.rlw, {"num_tasks": 2, "seed": 1.5}, "seed"),
    (mtl.gls, {"num_tasks": 2, "eps": -1.0}, "eps"),
    (mtl.imtl_l, {"num_tasks": 2.0}, "num_tasks"),
    (mtl.stch, {"num_tasks": 2, "mu": -1.0}, "mu"),
    (mtl.stch, {"num_tasks": 2, "warmup_epoch": -1}, "warmup_epoch"),
    (mtl.famo, {"num_tasks": 2, "w_lr": 0.0}, "w_lr"),
    (mtl.famo, {"num_tasks": 2, "gamma": -1e-3}, "gamma"),
    (mtl.gradnorm, {"num_tasks": 2, "alpha": -1.0}, "alpha"),
    (mtl.excess_mtl, {"num_tasks": 2, "robust_step_size": 0.0}, "robust_step_size"),
    (mtl.excess_mtl, {"num_tasks": 2, "n_warmup_steps": -2}, "n_warmup_steps"),
    (mtl.db_mtl, {"num_tasks": 2, "beta": 1.0}, "beta"),
    (mtl.db_mtl, {"num_tasks": 2, "beta_sigma": -0.5}, "beta_sigma"),
]


@pytest.mark.parametrize("factory,kwargs,match", BAD_HYPERPARAMETERS)
def test_invalid_hyperparameters_raise_at_construction(factory, kwargs, match):
    with pytest.raises(ValueError, match=match):
        factory(**kwargs)


def test_missing_gradient_information_is_a_clear_error():
    with pytest.raises(ValueError, match="grad_norms"):
        mtl.gradnorm_weighting(2).update(jnp.ones(2), mtl.gradnorm_weighting(2).init())
    with pytest.raises(ValueError, match="excess_risks"):
        lw = mtl.excess_mtl_weighting(2)
        lw.update(jnp.ones(2), lw.init())


@pytest.mark.parametrize("name", ["uncertainty_weighting", "dwa", "famo", "stch", "gls"])
def test_one_backward_path_equals_transform_path(name):
    """weighted_value_and_grad (one backward) == value_and_jacobian + transform + sum_tasks."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)

    def loss_fn(p):
        return jnp.mean((x @ p["w"] - 1.0) ** 2, axis=0) + 0.1

    lw = getattr(mtl, f"{name}_weighting")(3)
    tx = optax.chain(getattr(mtl, name)(3), mtl.sum_tasks())
    vg = jax.jit(mtl.weighted_value_and_grad(loss_fn, lw))
    lw_state, tx_state = lw.init(), tx.init(params)

    @jax.jit
    def transform_path(params, tx_state):
        losses, jac = mtl.value_and_jacobian(loss_fn)(params)
        return tx.update(jac, tx_state, params, task_losses=losses)

    for _ in range(4):
        (losses, w, lw_state), grad = vg(lw_state, params)
        grad2, tx_state = transform_path(params, tx_state)
        np.testing.assert_allclose(grad["w"], grad2["w"], rtol=2e-5, atol=1e-6)
        params = jax.tree.map(lambda p, g: p - 0.05 * g, params, grad)
