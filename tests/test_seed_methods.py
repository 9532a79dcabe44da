"""Tests of the seed methods: F-MTL, sparse training, FULLER, Rep-MTL (issue 4, part C)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_jax as mtl

# ----------------------------------------------------------------------------------------------
# F-MTL


def _two_task_quadratics(w):
    return jnp.stack([jnp.sum(w**4) + w[0] * w[1], jnp.sum((w - 1.0) ** 2)])


def test_f_mtl_rho_zero_is_plain_jacobian():
    w = jnp.array([0.3, -1.2, 2.0])
    losses, jac = mtl.value_and_jacobian(_two_task_quadratics)(w)
    for adaptive in (False, True):
        l2, j2, flat = mtl.f_mtl_value_and_jacobian(
            _two_task_quadratics, rho=0.0, adaptive=adaptive
        )(w)
        np.testing.assert_array_equal(l2, losses)
        np.testing.assert_array_equal(j2, jac)
        np.testing.assert_array_equal(flat, jnp.zeros_like(jac))
    # With H = 0 the transform is the balancer itself.
    bal = mtl.scalarize(jnp.array([0.3, 0.7]))
    tx = mtl.f_mtl(bal)
    out, _ = jax.jit(tx.update)(jac, tx.init(w), w, flat_jacobian=jnp.zeros_like(jac))
    ref, _ = bal.update(jac, bal.init(w), w)
    np.testing.assert_allclose(out, ref, rtol=1e-6)


def test_f_mtl_flat_rows_are_perturbed_gradients():
    # Task 2 is quadratic with Hessian 2I: h_2 = 2 * rho * g_2 / ||g_2|| exactly.
    w = jnp.array([1.0, 2.0, 0.5])
    rho = 0.1
    for strategy in ("vmap", "unrolled"):
        _, jac, flat = mtl.f_mtl_value_and_jacobian(
            _two_task_quadratics, rho=rho, adaptive=False, strategy=strategy
        )(w)
        g2 = np.asarray(jac[1])
        np.testing.assert_allclose(flat[1], 2 * rho * g2 / np.linalg.norm(g2), rtol=1e-5)
        g1 = jac[0]
        eps1 = rho * g1 / jnp.linalg.norm(g1)
        np.testing.assert_allclose(
            flat[0], jax.grad(lambda v: _two_task_quadratics(v)[0])(w + eps1) - g1, rtol=1e-5
        )


def test_f_mtl_requires_flat_jacobian_and_validates():
    tx = mtl.f_mtl()
    w = jnp.ones(3)
    with pytest.raises(ValueError, match="flat_jacobian"):
        tx.update(jnp.ones((2, 3)), tx.init(w), w)
    with pytest.raises(ValueError, match="rho"):
        mtl.f_mtl_value_and_jacobian(_two_task_quadratics, rho=-1.0)


def _np_min_norm_2(a, b):
    """Min-norm point of the segment [a, b] (authors' MinNormSolver._min_norm_element_from2)."""
    ab, aa, bb = a @ b, a @ a, b @ b
    if ab >= aa:
        gamma = 0.999
    elif ab >= bb:
        gamma = 0.001
    else:
        gamma = -(ab - bb) / (aa + bb - 2 * ab)
    return np.array([gamma, 1 - gamma])


def _authors_fmtl_mgda(x, ys, w, v, rho):
    """NumPy re-derivation of one F-MTL step, ``--method mgda --adaptive True``.

    From github.com/VietHoang1512/FS-MTL ``nyuv2/train.py`` (stage 1: per-task ASAM
    perturbation, shared encoder and each head normalized separately; stage 2: gradient of
    each task at its own perturbed point; ``mgda``: g and h = SAM - g normalized per task,
    min-norm weights for each, shared grad = K * sum_k (sol_h h_k + sol_g g_k); each head
    gets its perturbed gradient). Model: linear encoder W, linear heads v_k, MSE losses.
    """
    n, k = x.shape[0], len(ys)

    def grads(w_, v_k, y):
        r = x @ w_ @ v_k - y
        return 2 / n * np.outer(x.T @ r, v_k), 2 / n * (x @ w_).T @ r

    g_w, sam_w, sam_v = [], [], []
    for t in range(k):
        gw, gv = grads(w, v[t], ys[t])
        e_w = rho * w**2 * gw / (np.linalg.norm(np.abs(w) * gw) + 1e-12)
        e_v = rho * v[t] ** 2 * gv / (np.linalg.norm(np.abs(v[t]) * gv) + 1e-12)
        sw, sv = grads(w + e_w, v[t] + e_v, ys[t])
        g_w.append(gw.ravel())
        sam_w.append(sw.ravel())
        sam_v.append(sv)
    h_w = [s - g for s, g in zip(sam_w, g_w, strict=True)]
    gn = [g / np.linalg.norm(g) for g in g_w]
    hn = [h / np.linalg.norm(h) for h in h_w]
    sol_g, sol_h = _np_min_norm_2(*gn), _np_min_norm_2(*hn)
    d_w = k * sum(sol_h[t] * hn[t] + sol_g[t] * gn[t] for t in range(k))
    return d_w.reshape(w.shape), np.stack(sam_v)


def _authors_mgda_balancer(k):
    """The authors' ``mgda`` aggregation as a Gramian weighting: rows normalized, x K."""

    def weights(g):
        norms = jnp.sqrt(jnp.maximum(jnp.diag(g), 1e-30))
        w = mtl.min_norm_simplex(g / jnp.outer(norms, norms))
        return k * w / norms

    return mtl.gramian_weighting(weights)


def test_f_mtl_matches_authors_update():
    rng = np.random.default_rng(0)
    n, d, h, k, rho = 16, 4, 3, 2, 0.5

    def loss_fn(p, x, y):
        pred = (x @ p["w"]) @ p["v"].T  # [n, k]
        return jnp.mean((pred - y.T) ** 2, axis=0)

    labels = {"w": "shared", "v": "task_specific"}
    fn = mtl.f_mtl_value_and_jacobian(loss_fn, rho=rho, adaptive=True, param_labels=labels)
    tx = mtl.shared_only(mtl.f_mtl(_authors_mgda_balancer(k)), labels, task_specific=mtl.f_mtl())

    @jax.jit
    def step(params, x, y):
        _, jac, flat = fn(params, x, y)
        out, _ = tx.update(jac, tx.init(params), params, flat_jacobian=flat)
        return out

    max_dev = 0.0
    for trial in range(10):
        x = rng.normal(size=(n, d))
        ys = [rng.normal(size=n) for _ in range(k)]
        w = rng.normal(size=(d, h))
        v = rng.normal(size=(k, h))
        ref_w, ref_v = _authors_fmtl_mgda(x, ys, w, v, rho)
        params = {"w": jnp.asarray(w, jnp.float32), "v": jnp.asarray(v, jnp.float32)}
        out = step(params, jnp.asarray(x, jnp.float32), jnp.asarray(np.stack(ys), jnp.float32))
        got_w, got_v = np.asarray(out["w"]), np.asarray(out["v"])
        cos = got_w.ravel() @ ref_w.ravel() / (np.linalg.norm(got_w) * np.linalg.norm(ref_w))
        max_dev = max(max_dev, 1 - cos)
        np.testing.assert_allclose(got_w, ref_w, rtol=2e-4, atol=2e-5, err_msg=f"trial {trial}")
        np.testing.assert_allclose(got_v, ref_v, rtol=2e-4, atol=2e-5, err_msg=f"trial {trial}")
    assert max_dev < 1e-6


def _sharpness(loss, w):
    return float(jnp.max(jnp.linalg.eigvalsh(jax.hessian(loss)(w))))


def test_f_mtl_decreases_sharpness_on_toy():
    # Minima of both tasks form a valley (w0 * w1 = 1, w0 * w2 = 1) whose curvature grows
    # with the imbalance of the weights; plain GD stops where it lands, F-MTL drifts to the
    # flat (balanced) end.
    def losses(w):
        return jnp.stack([0.5 * (w[0] * w[1] - 1.0) ** 2, 0.5 * (w[0] * w[2] - 1.0) ** 2])

    total = lambda w: jnp.sum(losses(w))
    w0 = jnp.array([2.5, 0.3, 0.5])
    tx = optax.chain(mtl.f_mtl(), mtl.sum_tasks(), optax.sgd(0.05))

    def train(rho):
        fn = mtl.f_mtl_value_and_jacobian(losses, rho=rho, adaptive=False)

        @jax.jit
        def step(w, state):
            _, jac, flat = fn(w)
            upd, state = tx.update(jac, state, w, flat_jacobian=flat)
            return optax.apply_updates(w, upd), state

        w, state = w0, tx.init(w0)
        for _ in range(400):
            w, state = step(w, state)
        return w

    plain, flat = train(0.0), train(0.1)
    assert float(total(plain)) < 1e-3 and float(total(flat)) < 1e-2
    assert _sharpness(total, flat) < 0.8 * _sharpness(total, plain)


# ----------------------------------------------------------------------------------------------
# Sparse training


def _params():
    return {"enc": jnp.zeros((6, 4)), "head": jnp.zeros((4,))}


def _jac(rng, k=3):
    return {
        "enc": jnp.asarray(rng.normal(size=(k, 6, 4)), jnp.float32),
        "head": jnp.asarray(rng.normal(size=(k, 4)), jnp.float32),
    }


def test_sparse_training_fisher_mask_matches_numpy_top_k():
    rng = np.random.default_rng(0)
    jac, params = _jac(rng), _params()
    tx = mtl.sparse_training(sparsity=0.75, param_mask={"enc": True, "head": False})
    out, state = jax.jit(tx.update)(jac, tx.init(params), params)
    score = np.asarray(jac["enc"]).sum(0) ** 2
    keep = np.zeros(score.size, bool)
    keep[np.argsort(-score.ravel(), kind="stable")[:6]] = True
    np.testing.assert_array_equal(np.asarray(state.mask["enc"]).ravel(), keep)
    np.testing.assert_array_equal(out["enc"], np.where(keep.reshape(6, 4), jac["enc"], 0))
    np.testing.assert_array_equal(out["head"], jac["head"])  # not eligible: untouched


@pytest.mark.parametrize("score", ["fisher", "agreement", "random"])
def test_sparse_training_schedule(score):
    rng = np.random.default_rng(1)
    params = _params()
    jacs = [_jac(rng) for _ in range(7)]
    tx = mtl.sparse_training(sparsity=0.5, score=score, score_steps=2, refresh_every=3)
    update = jax.jit(tx.update)
    state = tx.init(params)
    masks = []
    for jac in jacs:
        out, state = update(jac, state, params)
        m = np.concatenate([np.ravel(state.mask["enc"]), np.ravel(state.mask["head"])])
        masks.append(m)
        nz = np.concatenate([np.ravel(out["enc"][0] != 0), np.ravel(out["head"][0] != 0)])
        assert not np.any(nz & ~m)  # nothing outside the mask gets through
    assert masks[0].all()  # step 0: still scoring, dense
    total = masks[0].size
    for m in masks[1:]:
        assert m.sum() == total // 2  # exact count after the first choice
    np.testing.assert_array_equal(masks[1], masks[2])
    np.testing.assert_array_equal(masks[2], masks[3])
    np.testing.assert_array_equal(masks[4], masks[5])
    np.testing.assert_array_equal(masks[5], masks[6])
    assert not np.array_equal(masks[3], masks[4])  # refreshed at step 1 + 3
    if score != "random":  # the refresh used the scores of steps 2..4 only
        acc = sum(
            np.concatenate([np.ravel(v) for v in _np_scores(j, score).values()]) for j in jacs[2:5]
        )
        keep = np.zeros(total, bool)
        keep[np.argsort(-acc, kind="stable")[: total // 2]] = True
        np.testing.assert_array_equal(masks[4], keep)


def _np_scores(jac, score):
    out = {}
    for name in ("enc", "head"):
        rows = np.asarray(jac[name], np.float64)
        s = rows.sum(0) ** 2
        if score == "agreement":
            s = s - (rows**2).sum(0)
        out[name] = s
    return out


def test_sparse_training_validates():
    for kwargs in (
        {"sparsity": 1.0},
        {"sparsity": -0.1},
        {"score": "magnitude"},
        {"score_steps": 0},
        {"refresh_every": 0},
    ):
        with pytest.raises(ValueError):
            mtl.sparse_training(**kwargs)


def test_sparse_training_composes_with_balancer_and_adam():
    # chain(sparse_training, <balancer>, sum_tasks, adam): frozen coordinates never move.
    balancer = mtl.upgrad()
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(32, 3)), jnp.float32)
    params = {
        "enc": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32) * 0.5,
        "head": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32) * 0.5,
    }

    def loss_fn(p):
        return jnp.mean((jnp.tanh(x @ p["enc"]) @ p["head"] - y) ** 2, axis=0)

    labels = {"enc": "shared", "head": "task_specific"}
    tx = optax.chain(
        mtl.shared_only(optax.chain(mtl.sparse_training(sparsity=0.5), balancer), labels),
        optax.adam(1e-2),
    )
    state = tx.init(params)

    @jax.jit
    def step(p, state):
        losses, jac = mtl.value_and_jacobian(loss_fn)(p)
        upd, state = tx.update(jac, state, p, task_losses=losses)
        return optax.apply_updates(p, upd), state, losses

    start = params
    first = None
    for _ in range(30):
        params, state, losses = step(params, state)
        first = losses if first is None else first
    assert float(jnp.sum(losses)) < float(jnp.sum(first))
    moved = np.asarray(params["enc"] != start["enc"])
    assert moved.sum() == 12  # exactly the unfrozen half of the encoder moved
    assert np.all(np.asarray(params["head"] != start["head"]))


# ----------------------------------------------------------------------------------------------
# FULLER


def _fuller_setup(rng, k=2):
    params = {"cam": jnp.zeros((3, 2)), "lidar": jnp.zeros((4,)), "fuse": jnp.zeros((2, 3))}
    jac = {
        "cam": jnp.asarray(rng.normal(size=(k, 3, 2)), jnp.float32),
        "lidar": jnp.asarray(rng.normal(size=(k, 4)) * 30.0, jnp.float32),
        "fuse": jnp.asarray(rng.normal(size=(k, 2, 3)), jnp.float32),
    }
    last = {"cam": False, "lidar": False, "fuse": True}
    modality = {"cam": "camera", "lidar": "lidar", "fuse": None}
    return params, jac, last, modality


def test_fuller_task_level_is_min_norm_at_last_layer():
    rng = np.random.default_rng(3)
    params, _, last, _ = _fuller_setup(rng)
    tx = mtl.fuller(last_shared_layer=last)
    update = jax.jit(tx.update)
    for _ in range(10):
        _, jac, _, _ = _fuller_setup(rng)
        out, _ = update(jac, tx.init(params), params)
        a, b = (np.asarray(jac["fuse"][i], np.float64).ravel() for i in range(2))
        gamma = np.clip((b - a) @ b / ((a - b) @ (a - b)), 0.0, 1.0)
        w = np.array([gamma, 1 - gamma])
        for name in ("cam", "lidar", "fuse"):
            ref = w.reshape(2, *([1] * (jac[name].ndim - 1))) * np.asarray(jac[name])
            np.testing.assert_allclose(out[name], ref, rtol=1e-4, atol=1e-4)


def test_fuller_equalizes_modality_magnitudes():
    rng = np.random.default_rng(4)
    params, jac, last, modality = _fuller_setup(rng, k=3)
    # The modality level is independent of the task level: use a cheap fixed calibration.
    cal = mtl.scalarize(jnp.array([0.5, 1.0, 2.0]))
    base = optax.chain(mtl.fuller(cal, last_shared_layer=last), mtl.sum_tasks())
    d0, _ = jax.jit(base.update)(jac, base.init(params), params)
    for target in ("mean", "max", "min"):
        tx = optax.chain(
            mtl.fuller(
                cal, last_shared_layer=last, modality_labels=modality, magnitude_target=target
            ),
            mtl.sum_tasks(),
        )
        d, _ = jax.jit(tx.update)(jac, tx.init(params), params)
        n0 = np.array([np.linalg.norm(d0[m]) for m in ("cam", "lidar")])
        n = np.array([np.linalg.norm(d[m]) for m in ("cam", "lidar")])
        np.testing.assert_allclose(n[0], n[1], rtol=1e-5)
        expected = {"mean": n0.mean(), "max": n0.max(), "min": n0.min()}[target]
        np.testing.assert_allclose(n[0], expected, rtol=1e-5)
        np.testing.assert_allclose(d["fuse"], d0["fuse"], rtol=1e-6)  # None label: untouched
        for m in ("cam", "lidar"):  # direction within a modality kept
            cos = np.vdot(d[m], d0[m]) / (np.linalg.norm(d[m]) * np.linalg.norm(d0[m]))
            assert cos > 1 - 1e-6


def test_fuller_plugs_in_any_calibration():
    rng = np.random.default_rng(5)
    params, jac, last, _ = _fuller_setup(rng, k=3)
    c = jnp.array([0.2, 1.0, 3.0])
    tx = mtl.fuller(task_calibration=mtl.scalarize(c), last_shared_layer=last)
    out, _ = jax.jit(tx.update)(jac, tx.init(params), params)
    for name in jac:  # a row scaling found at the last layer is carried to every layer
        ref = np.asarray(c).reshape(3, *([1] * (jac[name].ndim - 1))) * np.asarray(jac[name])
        np.testing.assert_allclose(out[name], ref, rtol=1e-4, atol=1e-3)
    # MGDA (part A) plugged in agrees with the built-in min-norm rule.
    tx_mgda = mtl.fuller(task_calibration=mtl.mgda(), last_shared_layer=last)
    tx_default = mtl.fuller(last_shared_layer=last)
    a, _ = jax.jit(tx_mgda.update)(jac, tx_mgda.init(params), params)
    b, _ = jax.jit(tx_default.update)(jac, tx_default.init(params), params)
    for name in jac:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-3, atol=1e-3)
    # A re-combination method (PCGrad): the last layer gets its output, every other layer the
    # same K x K re-combination of its task rows.
    tx = mtl.fuller(task_calibration=mtl.pcgrad(), last_shared_layer=last)
    out, _ = jax.jit(tx.update)(jac, tx.init(params), params)
    pc = mtl.pcgrad()
    ref_last, _ = pc.update({"fuse": jac["fuse"]}, pc.init({"fuse": params["fuse"]}), None)
    np.testing.assert_allclose(out["fuse"], ref_last["fuse"], rtol=1e-5, atol=1e-5)
    rows = np.asarray(jac["fuse"]).reshape(3, -1)
    a_mat = np.asarray(ref_last["fuse"]).reshape(3, -1) @ np.linalg.pinv(rows)
    for name in ("cam", "lidar"):
        ref = (a_mat @ np.asarray(jac[name]).reshape(3, -1)).reshape(jac[name].shape)
        np.testing.assert_allclose(out[name], ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("calibration", [None, "pcgrad", "scalarize"])
def test_fuller_fused_reduction_equals_the_calibrated_jacobian(calibration):
    # `mtl.chain(fuller, reducer)` contracts each leaf once with the calibrated task weights
    # (never writing the calibrated Jacobian); with modality rescaling, for a uniform and a
    # non-uniform reducer, it must give what the plain chain gives.
    rng = np.random.default_rng(8)
    params, jac, last, modality = _fuller_setup(rng, k=3)
    cal = {
        None: None,
        "pcgrad": mtl.pcgrad(),
        "scalarize": mtl.scalarize(jnp.array([1.0, 2.0, 0.5])),
    }
    weights = np.array([0.5, 2.0, 1.5], np.float32)
    cases = (
        (mtl.sum_tasks(), modality),
        (mtl.mean_tasks(), None),
        (mtl.TaskReducer(lambda n: weights[:n]), modality),
    )
    for reducer, labels in cases:
        make = functools.partial(
            mtl.fuller, cal[calibration], last_shared_layer=last, modality_labels=labels
        )
        assert isinstance(make(), mtl.Reducible)
        fused, plain = mtl.chain(make(), reducer), optax.chain(make(), reducer)

        @jax.jit
        def both(jac, fused=fused, plain=plain):
            a, _ = fused.update(jac, fused.init(params), params)
            b, _ = plain.update(jac, plain.init(params), params)
            return a, b

        a, b = both(jac)
        for name in jac:
            np.testing.assert_allclose(a[name], b[name], rtol=2e-5, atol=1e-5, err_msg=name)


def test_fuller_inside_shared_only_and_validates():
    rng = np.random.default_rng(6)
    params, jac, last, modality = _fuller_setup(rng)
    params = dict(params, head=jnp.zeros(2))
    jac = dict(jac, head=jnp.asarray(rng.normal(size=(2, 2)), jnp.float32))
    labels = {"cam": "shared", "lidar": "shared", "fuse": "shared", "head": "task_specific"}
    last = dict(last, head=False)
    modality = dict(modality, head=None)
    tx = mtl.shared_only(mtl.fuller(last_shared_layer=last, modality_labels=modality), labels)
    out, _ = jax.jit(tx.update)(jac, tx.init(params), params)
    np.testing.assert_allclose(out["head"], jnp.sum(jac["head"], 0))
    np.testing.assert_allclose(np.linalg.norm(out["cam"]), np.linalg.norm(out["lidar"]), rtol=1e-5)
    with pytest.raises(ValueError, match="magnitude_target"):
        mtl.fuller(magnitude_target="median")
    with pytest.raises(ValueError, match="last_shared_layer"):
        tx = mtl.fuller(last_shared_layer={"cam": False, "lidar": False, "fuse": False})
        p2, j2, _, _ = _fuller_setup(rng)
        tx.update(j2, tx.init(p2), p2)


# ----------------------------------------------------------------------------------------------
# Rep-MTL


def test_rep_mtl_tsr_entropy_bounds():
    b, d = 4, 6
    disjoint = np.zeros((2, b, d), np.float32)
    disjoint[0, :, :3] = 1.0
    disjoint[1, :, 3:] = 2.0
    shared = np.ones((2, b, d), np.float32)
    reg = lambda s: mtl.rep_mtl_regularizer(jnp.asarray(s), channel_axis=None)[1]["tsr"]
    assert float(reg(disjoint)) == pytest.approx(0.0, abs=1e-6)
    assert float(reg(shared)) == pytest.approx(1.0, abs=1e-6)
    half = disjoint + 0.5 * shared
    assert 0.0 < float(reg(half)) < 1.0


def test_rep_mtl_csa_prefers_aligned_samples():
    rng = np.random.default_rng(7)
    base = rng.normal(size=(8, 5, 5, 4)).astype(np.float32)
    aligned = np.stack([base, 2.0 * base])
    shuffled = np.stack([base, 2.0 * base[::-1]])
    csa = lambda s: float(mtl.rep_mtl_regularizer(jnp.asarray(s))[1]["csa"])
    assert csa(aligned) < csa(shuffled) - 1.0


def test_rep_mtl_loss_gradients():
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    params = {
        "enc": jnp.asarray(rng.normal(size=(5, 6)), jnp.float32),
        "heads": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32),
    }

    def loss_fn(p, **kw):
        z = jnp.tanh(x @ p["enc"])
        heads = lambda z: jnp.mean((z @ p["heads"] - y) ** 2, axis=0)
        return mtl.rep_mtl_loss(heads, z, channel_axis=None, **kw)

    (total, parts), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    np.testing.assert_allclose(total, jnp.sum(parts["losses"]) + parts["regularizer"], rtol=1e-6)
    # Zero weights: exactly the equal-weighting gradient.
    g0 = jax.jit(jax.grad(lambda p: loss_fn(p, tsr_weight=0.0, csa_weight=0.0)[0]))(params)
    ew = jax.grad(lambda p: jnp.sum(jnp.mean((jnp.tanh(x @ p["enc"]) @ p["heads"] - y) ** 2, 0)))(
        params
    )
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(ew), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The regularizer reaches the encoder (second order), and the gradient is right: a small
    # step against it lowers the total loss as predicted to first order.
    diff = jax.tree.map(lambda a, b: a - b, grads, g0)
    assert float(jnp.linalg.norm(diff["enc"])) > 1e-4
    direction = jax.tree.map(lambda g: g / (1e-12 + jnp.linalg.norm(grads["enc"])), grads)
    h = 1e-2
    f = jax.jit(lambda s: loss_fn(jax.tree.map(lambda p, d: p + s * d, params, direction))[0])
    fd = float(f(h) - f(-h)) / (2 * h)
    pred = float(
        sum(
            jnp.vdot(g, d)
            for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True)
        )
    )
    assert fd == pytest.approx(pred, rel=2e-2)


def test_rep_mtl_validates():
    with pytest.raises(ValueError, match="temperature"):
        mtl.rep_mtl_regularizer(jnp.ones((2, 3, 4)), temperature=0.0)
    with pytest.raises(ValueError, match="tsr_weight"):
        mtl.rep_mtl_loss(
            lambda z: jnp.stack([z.sum(), z.mean()]), jnp.ones((3, 2)), tsr_weight=-1.0
        )


def test_mask_arguments_accept_a_path_regex():
    # The form a config string can carry: a regex searched in each leaf's path.
    rng = np.random.default_rng(7)
    params, jac, last, modality = _fuller_setup(rng)
    labels = {"cam": "shared", "lidar": "shared", "fuse": "shared"}
    by_tree = mtl.shared_only(mtl.fuller(last_shared_layer=last, modality_labels=modality), labels)
    by_regex = mtl.shared_only(
        mtl.fuller(last_shared_layer="fuse", modality_labels=modality), labels
    )
    out_tree, _ = by_tree.update(jac, by_tree.init(params), params)
    out_regex, _ = by_regex.update(jac, by_regex.init(params), params)
    for name in out_tree:
        np.testing.assert_array_equal(out_tree[name], out_regex[name])
    sparse = mtl.sparse_training(sparsity=0.5, param_mask="cam|lidar")
    out, _ = sparse.update(jac, sparse.init(params), params)
    np.testing.assert_array_equal(out["fuse"], jac["fuse"])  # not selected: left dense
    assert np.mean(np.asarray(out["cam"]) == 0) > 0.2
    with pytest.raises(ValueError, match="matches none of the parameter paths.*'cam'"):
        bad = mtl.fuller(last_shared_layer="encoder")
        bad.update(jac, bad.init(params), params)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        bad = mtl.fuller(last_shared_layer="(")
        bad.update(jac, bad.init(params), params)
    with pytest.raises(ValueError, match="modality_labels needs one label per leaf"):
        mtl.fuller(modality_labels="cam")
