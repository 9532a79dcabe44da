"""Tests of mtl_jax.tasks (losses, split-level metrics) and mtl_jax.metrics (delta_m)."""

import doctest
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import metrics, tasks

NYU = tasks.get_tasks("nyuv2")
SEG, DEPTH, NORMAL = NYU


def _rotate(n: np.ndarray, degrees: np.ndarray) -> np.ndarray:
    """Rotates unit vectors n [..., 3] (in the x-z plane, n = (0, 0, 1)) by `degrees`."""
    a = np.radians(degrees)
    return np.stack([np.sin(a), np.zeros_like(a), np.cos(a)], axis=-1).astype(np.float32)


def _random_batch(rng, b=3, h=6, w=5, c=13):
    normal = rng.normal(size=(b, h, w, 3))
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    invalid = rng.random((b, h, w)) < 0.2
    normal[invalid] = 0
    depth = rng.uniform(0.5, 5, size=(b, h, w, 1))
    depth[invalid] = 0
    seg = rng.integers(0, c, size=(b, h, w))
    seg[rng.random((b, h, w)) < 0.2] = -1
    batch = {
        "segmentation": seg.astype(np.int32),
        "depth": depth.astype(np.float32),
        "normal": normal.astype(np.float32),
    }
    preds = {
        "segmentation": rng.normal(size=(b, h, w, c)).astype(np.float32),
        "depth": rng.uniform(0, 5, size=(b, h, w, 1)).astype(np.float32),
        "normal": rng.normal(size=(b, h, w, 3)).astype(np.float32),
    }
    return preds, batch


def _run_split(task_tuple, batches):
    update = jax.jit(functools.partial(tasks.update_metrics, task_tuple))
    accs = tasks.init_metrics(task_tuple)
    for preds, batch in batches:
        accs = update(accs, preds, batch)
    return tasks.compute_metrics(task_tuple, accs)


def test_get_tasks_and_unknown_dataset():
    assert [t.name for t in NYU] == ["segmentation", "depth", "normal"]
    assert [t.out_channels for t in NYU] == [13, 1, 3]
    assert [t.out_channels for t in tasks.get_tasks("cityscapes")] == [7, 1]
    assert tasks.get_tasks("cityscapes19")[0].out_channels == 19
    assert tasks.get_tasks("nyuv2") is NYU  # cached: safe to close over in jit
    with pytest.raises(ValueError, match="nyuv2, cityscapes"):
        tasks.get_tasks("kitti")


def test_segmentation_metrics_hand_computed():
    # Two classes; ground truth [[0, 1], [1, -1]], prediction [[0, 1], [0, 1]].
    task = tasks.segmentation_task(2)
    labels = np.array([[[0, 1], [1, -1]]], np.int32)
    guess = np.array([[[0, 1], [0, 1]]])
    logits = np.eye(2, dtype=np.float32)[guess] * 3.0
    acc = jax.jit(task.metric_update)(task.metric_init(), logits, {"segmentation": labels})
    np.testing.assert_array_equal(acc["confusion"], [[1, 0], [1, 1]])
    out = task.metric_compute(acc)
    # IoU_0 = 1 / (1 + 2 - 1), IoU_1 = 1 / (2 + 1 - 1); pixel accuracy 2 / 3.
    assert out["mIoU"] == pytest.approx(0.5)
    assert out["pixAcc"] == pytest.approx(2 / 3)


def test_segmentation_miou_skips_absent_classes():
    task = tasks.segmentation_task(3)
    labels = np.zeros((1, 2, 2), np.int32)
    logits = np.zeros((1, 2, 2, 3), np.float32)
    logits[..., 0] = 1.0
    acc = task.metric_update(task.metric_init(), logits, {"segmentation": labels})
    assert task.metric_compute(acc) == {"mIoU": 1.0, "pixAcc": 1.0}


def test_segmentation_loss_hand_computed():
    # Equal logits over C classes: -log(1/C) per labelled pixel; -1 pixels do not count.
    logits = np.zeros((1, 1, 3, 4), np.float32)
    logits[0, 0, 2] = [100.0, 0, 0, 0]  # confidently wrong, but its label is -1
    batch = {"segmentation": np.array([[[0, 3, -1]]], np.int32)}
    loss = tasks.segmentation_loss(logits, batch, num_classes=4)
    assert float(loss) == pytest.approx(np.log(4.0), rel=1e-6)


def test_depth_loss_and_metrics_hand_computed():
    target = np.array([[[[2.0], [0.0]], [[4.0], [1.0]]]], np.float32)  # one invalid pixel
    pred = np.array([[[[1.0], [9.0]], [[5.0], [1.5]]]], np.float32)
    batch = {"depth": target}
    # |errors| on valid pixels: 1, 1, 0.5; relative: 0.5, 0.25, 0.5.
    assert float(DEPTH.loss(pred, batch)) == pytest.approx(2.5 / 3)
    out = DEPTH.metric_compute(DEPTH.metric_update(DEPTH.metric_init(), pred, batch))
    assert out["abs_err"] == pytest.approx(2.5 / 3)
    assert out["rel_err"] == pytest.approx(1.25 / 3)


def test_normal_loss_and_metrics_hand_computed():
    up = np.zeros((1, 1, 5, 3), np.float32)
    up[..., 2] = 1.0
    up[0, 0, 4] = 0.0  # invalid pixel
    angles = np.array([0.0, 10.0, 25.0, 60.0, 90.0])
    pred = _rotate(up, angles)[None, None] * 7.0  # scale must not matter
    pred = pred.reshape(1, 1, 5, 3)
    batch = {"normal": up}
    valid = angles[:4]
    expected_loss = 1 - np.mean(np.cos(np.radians(valid)))
    assert float(NORMAL.loss(pred, batch)) == pytest.approx(expected_loss, abs=1e-6)
    out = NORMAL.metric_compute(NORMAL.metric_update(NORMAL.metric_init(), pred, batch))
    assert out["mean"] == pytest.approx(np.mean(valid), abs=1e-3)
    assert out["median"] == pytest.approx(np.median(valid), abs=tasks.NORMAL_HIST_BIN_DEG)
    assert out["<11.25"] == pytest.approx(0.5)
    assert out["<22.5"] == pytest.approx(0.5)
    assert out["<30"] == pytest.approx(0.75)


def test_normal_median_histogram_matches_numpy_median():
    rng = np.random.default_rng(0)
    for n in (1001, 1000):  # odd and even counts
        angles = np.concatenate([rng.gamma(2.0, 12.0, size=n - 3), [0.0, 179.99, 45.0]])
        angles = np.clip(angles, 0, 179.99)
        up = np.zeros((1, 1, n, 3), np.float32)
        up[..., 2] = 1.0
        pred = _rotate(up, angles).reshape(1, 1, n, 3)
        acc = NORMAL.metric_update(NORMAL.metric_init(), pred, {"normal": up})
        out = NORMAL.metric_compute(acc)
        exact = np.median(np.asarray(tasks.normal_angles(pred, up)))
        assert out["median"] == pytest.approx(exact, abs=tasks.NORMAL_HIST_BIN_DEG / 2 + 1e-4)


def test_split_metrics_equal_one_big_batch_and_mask_excludes_padding():
    rng = np.random.default_rng(1)
    preds, batch = _random_batch(rng, b=6)
    whole = _run_split(NYU, [(preds, batch)])
    halves = [
        ({k: v[s] for k, v in preds.items()}, {k: v[s] for k, v in batch.items()})
        for s in (slice(0, 2), slice(2, 6))
    ]
    split = _run_split(NYU, halves)
    for k in whole:
        assert split[k] == pytest.approx(whole[k], rel=1e-5, abs=1e-6), k
    # Padding examples (mask False) change neither metrics nor losses.
    junk_preds, junk_batch = _random_batch(np.random.default_rng(2), b=2)
    padded_preds = {k: np.concatenate([preds[k], junk_preds[k]]) for k in preds}
    padded_batch = {k: np.concatenate([batch[k], junk_batch[k]]) for k in batch}
    padded_batch["mask"] = np.array([True] * 6 + [False] * 2)
    padded = _run_split(NYU, [(padded_preds, padded_batch)])
    for k in whole:
        assert padded[k] == pytest.approx(whole[k], rel=1e-5, abs=1e-6), k
    losses = jax.jit(functools.partial(tasks.task_losses, NYU))
    np.testing.assert_allclose(losses(padded_preds, padded_batch), losses(preds, batch), rtol=1e-5)


def test_losses_jit_grad_finite_on_empty_mask():
    preds, batch = _random_batch(np.random.default_rng(3), b=2)
    batch["mask"] = np.zeros(2, bool)

    def total(p):
        return jnp.sum(tasks.task_losses(NYU, p, batch))

    value, grads = jax.jit(jax.value_and_grad(total))(preds)
    assert np.isfinite(value)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_loss_rejects_wrong_prediction_shape():
    preds, batch = _random_batch(np.random.default_rng(4))
    with pytest.raises(ValueError, match="expected \\[B, H, W, 13\\]"):
        SEG.loss(preds["segmentation"][:, :3], batch)


def test_bfloat16_predictions():
    preds, batch = _random_batch(np.random.default_rng(5))
    low = {k: jnp.asarray(v, jnp.bfloat16) for k, v in preds.items()}
    out = tasks.task_losses(NYU, low, batch)
    assert out.dtype == jnp.float32
    ref = tasks.task_losses(NYU, {k: jnp.asarray(v, jnp.float32) for k, v in low.items()}, batch)
    np.testing.assert_allclose(out, ref, rtol=1e-6)


def test_delta_m_hand_computed_and_errors():
    base = {"a": 0.4, "b": 2.0}
    hib = {"a": True, "b": False}
    assert metrics.delta_m(base, base, hib) == 0.0
    # a: +25 % better -> -25; b: +50 % worse -> +50; mean 12.5.
    assert metrics.delta_m({"a": 0.5, "b": 3.0}, base, hib) == pytest.approx(12.5)
    with pytest.raises(KeyError, match="'b'"):
        metrics.delta_m({"a": 0.5}, base, hib)
    with pytest.raises(KeyError, match="higher_is_better"):
        metrics.delta_m({"a": 0.5, "b": 1.0}, base, {"a": True})


def test_delta_m_matches_nash_mtl_formula_on_baselines():
    # Nash-MTL experiments/nyuv2/utils.py: (KK ** SIGN * (a - BASE) / BASE).mean() * 100,
    # SIGN = 1 for higher-is-better metrics, KK = -1.
    base = np.array([0.3830, 0.6376, 0.6754, 0.2780, 25.01, 19.21, 0.3014, 0.5720, 0.6915])
    sign = np.array([1, 1, 0, 0, 0, 0, 1, 1, 1])
    a = base * np.array([1.1, 1.02, 0.9, 0.95, 1.03, 0.97, 1.2, 1.0, 0.99])
    expected = ((-1.0) ** sign * (a - base) / base).mean() * 100
    keys = list(metrics.BASELINES["nyuv2"])
    np.testing.assert_allclose(list(metrics.BASELINES["nyuv2"].values()), base)
    hib = tasks.higher_is_better(NYU)
    assert [hib[k] for k in keys] == sign.astype(bool).tolist()
    got = metrics.delta_m(dict(zip(keys, a, strict=True)), metrics.BASELINES["nyuv2"], hib)
    assert got == pytest.approx(expected, rel=1e-12)
    city = tasks.higher_is_better(tasks.get_tasks("cityscapes"))
    assert set(metrics.BASELINES["cityscapes"]) == set(city)


def test_mean_last():
    history = [{"x": float(i)} for i in range(15)]
    assert metrics.mean_last(history) == {"x": pytest.approx(np.mean(range(5, 15)))}
    assert metrics.mean_last(history[:3], n=10) == {"x": 1.0}


def test_doctests():
    assert doctest.testmod(metrics).failed == 0


# -- reference comparison: PyTorch re-derivation of LibMTL examples/nyu/utils.py --


@pytest.mark.reference
def test_against_libmtl_torch_formulas():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    batches = [_random_batch(rng, b=2, h=12, w=10) for _ in range(3)]
    ours = _run_split(NYU, batches)

    # LibMTL SegMetric / DepthMetric / NormalMetric, channel-first as in LibMTL.
    record = torch.zeros((13, 13), dtype=torch.int64)
    abs_rec, rel_rec, bs, angles = [], [], [], []
    for preds, batch in batches:
        p = torch.from_numpy(preds["segmentation"]).permute(0, 3, 1, 2)
        gt = torch.from_numpy(batch["segmentation"]).long()
        pred = p.softmax(1).argmax(1).flatten()
        gt = gt.flatten()
        k = (gt >= 0) & (gt < 13)
        record += torch.bincount(13 * gt[k] + pred[k], minlength=169).reshape(13, 13)
        dp = torch.from_numpy(preds["depth"]).permute(0, 3, 1, 2)
        dg = torch.from_numpy(batch["depth"]).permute(0, 3, 1, 2)
        mask = (torch.sum(dg, dim=1) != 0).unsqueeze(1)
        pm, gm = dp.masked_select(mask), dg.masked_select(mask)
        n = torch.nonzero(mask, as_tuple=False).size(0)
        abs_rec.append((torch.sum(torch.abs(pm - gm)) / n).item())
        rel_rec.append((torch.sum(torch.abs(pm - gm) / gm) / n).item())
        bs.append(pm.size()[0])
        npred = torch.from_numpy(preds["normal"]).permute(0, 3, 1, 2)
        ngt = torch.from_numpy(batch["normal"]).permute(0, 3, 1, 2)
        npred = npred / torch.norm(npred, p=2, dim=1, keepdim=True)
        nmask = torch.sum(ngt, dim=1) != 0
        err = torch.acos(torch.clamp(torch.sum(npred * ngt, 1).masked_select(nmask), -1, 1))
        angles.append(np.degrees(err.numpy()))
    h = record.float()
    iu = torch.diag(h) / (h.sum(1) + h.sum(0) - torch.diag(h))
    angles = np.concatenate(angles)
    bs = np.array(bs)
    ref = {
        "segmentation/mIoU": torch.mean(iu).item(),
        "segmentation/pixAcc": (torch.diag(h).sum() / h.sum()).item(),
        "depth/abs_err": (np.array(abs_rec) * bs).sum() / bs.sum(),
        "depth/rel_err": (np.array(rel_rec) * bs).sum() / bs.sum(),
        "normal/mean": np.mean(angles),
        "normal/median": np.median(angles),
        "normal/<11.25": np.mean(angles < 11.25),
        "normal/<22.5": np.mean(angles < 22.5),
        "normal/<30": np.mean(angles < 30),
    }
    for k, v in ref.items():
        tol = tasks.NORMAL_HIST_BIN_DEG if k == "normal/median" else 1e-5
        assert ours[k] == pytest.approx(v, rel=1e-5, abs=tol), k

    # Losses: SegLoss (CrossEntropyLoss ignore_index=-1), DepthLoss, NormalLoss.
    preds, batch = batches[0]
    p = torch.from_numpy(preds["segmentation"]).permute(0, 3, 1, 2)
    labels = torch.from_numpy(batch["segmentation"]).long()
    seg = torch.nn.CrossEntropyLoss(ignore_index=-1)(p, labels)
    dp = torch.from_numpy(preds["depth"]).permute(0, 3, 1, 2)
    dg = torch.from_numpy(batch["depth"]).permute(0, 3, 1, 2)
    m = (torch.sum(dg, dim=1) != 0).float().unsqueeze(1)
    depth = torch.sum(torch.abs(dp - dg) * m) / torch.nonzero(m, as_tuple=False).size(0)
    npred = torch.from_numpy(preds["normal"]).permute(0, 3, 1, 2)
    npred = npred / torch.norm(npred, p=2, dim=1, keepdim=True)
    ngt = torch.from_numpy(batch["normal"]).permute(0, 3, 1, 2)
    m = (torch.sum(ngt, dim=1) != 0).float().unsqueeze(1)
    normal = 1 - torch.sum((npred * ngt) * m) / torch.nonzero(m, as_tuple=False).size(0)
    ours_losses = np.asarray(tasks.task_losses(NYU, preds, batch))
    np.testing.assert_allclose(ours_losses, [seg.item(), depth.item(), normal.item()], rtol=1e-5)


def test_normal_loss_gradient_is_finite_at_zero_prediction():
    """A predicted normal of exactly zero (e.g. ReLU features) must not give NaN gradients."""
    import jax
    import jax.numpy as jnp

    from mtl_jax import tasks as tasks_lib

    normal = next(t for t in tasks_lib.get_tasks("nyuv2") if t.name == "normal")
    target = jnp.zeros((1, 2, 2, 3)).at[..., 2].set(1.0)
    batch = {normal.target_key: target, "mask": jnp.ones((1,), bool)}
    pred = jnp.zeros((1, 2, 2, 3)).at[0, 0, 0].set(jnp.array([0.0, 0.6, 0.8]))
    grad = jax.grad(lambda p: normal.loss(p, batch))(pred)
    assert bool(jnp.all(jnp.isfinite(grad)))
    # Away from zero the loss is still 1 - cos: the non-zero pixel has cos 0.8.
    np_loss = float(normal.loss(pred, batch))
    assert abs(np_loss - (1 - 0.8 / 4)) < 1e-6
