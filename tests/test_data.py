"""Tests of mtl_jax.data on fabricated copies in the exact on-disk format.

The real builders (TFDS array_record, no TensorFlow) and the real grain pipeline run on a few
full-resolution files per split.
"""

import json
import os
import shutil
import sys

import numpy as np
import pytest

from mtl_jax import data, tasks
from mtl_jax.data import augment, builders, fabricate


@pytest.fixture(scope="module")
def nyu_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("nyuv2"))
    return fabricate.write_fake_nyuv2(root, n_train=5, n_val=3, seed=0)


@pytest.fixture(scope="module")
def city_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cityscapes"))
    return fabricate.write_fake_cityscapes(root, n_train=4, n_val=3, seed=1)


def _ids(root, split, n):
    """First pixel value of each file's image -> file index (identifies examples in batches)."""
    return {
        float(np.load(os.path.join(root, split, "image", f"{i}.npy"))[0, 0, 0]): i for i in range(n)
    }


def _batch_ids(batch, ids):
    return [
        ids[float(v)] if m else None
        for v, m in zip(batch["image"][:, 0, 0, 0], batch["mask"], strict=True)
    ]


def _loader(root, split="train", **kw):
    kw.setdefault("batch_size", 2)
    kw.setdefault("seed", 0)
    kw.setdefault("train", split == "train")
    return data.make_loader("nyuv2", root, split, **kw)


def test_dataset_info():
    assert data.DATASETS == ("nyuv2", "cityscapes", "cityscapes19", "multidigits", "penguins")
    info = data.dataset_info("nyuv2")
    assert info.tasks == tuple(t.name for t in tasks.get_tasks("nyuv2"))
    assert info.input_shape == (288, 384, 3)
    assert info.splits == {"train": 795, "val": 654}
    assert (info.train_split, info.eval_split) == ("train", "val")
    assert "dropbox" in info.instructions
    city = data.dataset_info("cityscapes")
    assert city.input_shape == (128, 256, 3)
    assert city.splits == {"train": 2975, "val": 500}
    assert city.tasks == ("segmentation", "depth")
    with pytest.raises(ValueError, match="nyuv2, cityscapes, cityscapes19"):
        data.dataset_info("nyu")


def test_prepared_records_equal_files_without_tensorflow(nyu_dir):
    builder = builders.prepare("nyuv2", nyu_dir)
    source = builder.as_data_source(split="val")
    assert len(source) == 3
    for i in range(3):
        ex = source[i]
        for key, folder in [("image", "image"), ("depth", "depth"), ("normal", "normal")]:
            raw = np.load(os.path.join(nyu_dir, "val", folder, f"{i}.npy"))
            np.testing.assert_array_equal(ex[key], raw)
            assert ex[key].dtype == np.float32
        label = np.load(os.path.join(nyu_dir, "val", "label", f"{i}.npy"))
        np.testing.assert_array_equal(ex["segmentation"], label.astype(np.int32))
    assert "tensorflow" not in sys.modules


def test_train_batches_shapes_and_epochs(nyu_dir):
    loader = _loader(nyu_dir, num_epochs=3)
    assert loader.steps_per_epoch == 2  # 5 examples, batch 2, remainder dropped
    assert loader.num_examples == 5
    batches = list(loader)
    assert len(batches) == 6
    b = batches[0]
    assert b["image"].shape == (2, 288, 384, 3) and b["image"].dtype == np.float32
    assert b["segmentation"].shape == (2, 288, 384) and b["segmentation"].dtype == np.int32
    assert b["depth"].shape == (2, 288, 384, 1) and b["normal"].shape == (2, 288, 384, 3)
    assert b["mask"].dtype == bool and b["mask"].all()
    ids = _ids(nyu_dir, "train", 5)
    epochs = [sum((_batch_ids(x, ids) for x in batches[e : e + 2]), []) for e in (0, 2, 4)]
    for epoch in epochs:
        assert len(set(epoch)) == 4  # no repeats within an epoch
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled between epochs


def test_train_order_determined_by_seed(nyu_dir):
    ids = _ids(nyu_dir, "train", 5)

    def order(seed):
        loader = _loader(nyu_dir, seed=seed, num_epochs=4)
        return [i for b in loader for i in _batch_ids(b, ids)]

    assert order(0) == order(0)
    assert order(0) != order(1)


@pytest.mark.parametrize("augment_", [False, True])
def test_exact_resume_from_json_state(nyu_dir, augment_):
    loader = _loader(nyu_dir, augment=augment_)
    it = iter(loader)
    for _ in range(3):  # into the second epoch
        next(it)
    state = json.loads(json.dumps(loader.get_state()))
    expected = [next(it) for _ in range(3)]
    resumed = _loader(nyu_dir, augment=augment_)
    resumed.set_state(state)
    got = [b for b, _ in zip(resumed, range(3), strict=False)]
    for a, b in zip(expected, got, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    other = _loader(nyu_dir, seed=5)
    with pytest.raises(ValueError, match="seed: saved 0 != now 5"):
        other.set_state(state)


def test_augmentation_changes_data_keeps_format(nyu_dir):
    plain = next(iter(_loader(nyu_dir, num_epochs=1)))
    aug = [b for b in _loader(nyu_dir, augment=True, num_epochs=2)]
    assert any(not np.array_equal(plain["image"], b["image"]) for b in aug)
    for b in aug:
        assert b["image"].shape == plain["image"].shape
        assert b["segmentation"].dtype == np.int32
        assert set(np.unique(b["segmentation"])) <= set(range(-1, 13))


def test_eval_pass_covers_each_example_once_in_order(nyu_dir):
    loader = _loader(nyu_dir, "val", batch_size=2)
    assert loader.steps_per_epoch == 2
    ids = _ids(nyu_dir, "val", 3)
    for _ in range(2):  # each `for` is one full pass
        batches = list(loader)
        assert [_batch_ids(b, ids) for b in batches] == [[0, 1], [2, None]]
        pad = batches[-1]
        assert pad["mask"].tolist() == [True, False]
        assert not pad["image"][1].any() and not pad["segmentation"][1].any()


def test_eval_and_train_sharding_disjoint(nyu_dir):
    ids = _ids(nyu_dir, "val", 3)
    shards = [_loader(nyu_dir, "val", batch_size=1, shard_index=h, shard_count=2) for h in (0, 1)]
    assert [s.steps_per_epoch for s in shards] == [2, 2]  # same number of steps per host
    seen = [[i for b in s for i in _batch_ids(b, ids) if i is not None] for s in shards]
    assert sorted(seen[0] + seen[1]) == [0, 1, 2]
    train_ids = _ids(nyu_dir, "train", 5)
    for epoch in range(3):
        per_host = []
        for h in (0, 1):
            loader = _loader(nyu_dir, batch_size=1, shard_index=h, shard_count=2)
            batches = [b for b, _ in zip(loader, range(2 * (epoch + 1)), strict=False)][-2:]
            per_host.append({i for b in batches for i in _batch_ids(b, train_ids)})
        assert len(per_host[0]) == len(per_host[1]) == 2
        assert not per_host[0] & per_host[1]


def test_cityscapes_label7_and_libmtl_alias(city_dir, tmp_path):
    loader = data.make_loader("cityscapes", city_dir, "val", batch_size=2, seed=0, train=False)
    b = next(iter(loader))
    assert b["image"].shape == (2, 128, 256, 3)
    assert set(b) == {"image", "segmentation", "depth", "mask"}
    assert b["segmentation"].max() <= 6
    # LibMTL's cityscapes2 copy names the 7-class folder `label`.
    alias = str(tmp_path / "city2")
    shutil.copytree(city_dir, alias, ignore=shutil.ignore_patterns("_tfds"))
    for split in ("train", "val"):
        os.rename(os.path.join(alias, split, "label_7"), os.path.join(alias, split, "label"))
    b2 = next(iter(data.make_loader("cityscapes", alias, "val", batch_size=2, seed=0, train=False)))
    np.testing.assert_array_equal(b["segmentation"], b2["segmentation"])


def test_losses_on_loaded_batch_are_finite(city_dir):
    loader = data.make_loader("cityscapes", city_dir, "train", batch_size=2, seed=0, train=True)
    batch = next(iter(loader))
    task_tuple = tasks.get_tasks("cityscapes")
    preds = {
        t.name: np.zeros(batch["image"].shape[:3] + (t.out_channels,), np.float32)
        for t in task_tuple
    }
    losses = np.asarray(tasks.task_losses(task_tuple, preds, batch))
    assert np.all(np.isfinite(losses)) and losses[0] == pytest.approx(np.log(7), rel=1e-5)


def test_changed_raw_files_are_reprepared(tmp_path):
    root = fabricate.write_fake_cityscapes(str(tmp_path / "c"), n_train=2, n_val=1, seed=3)
    first = next(
        iter(data.make_loader("cityscapes", root, "val", batch_size=1, seed=0, train=False))
    )
    np.save(os.path.join(root, "val", "depth", "0.npy"), np.full((128, 256, 1), 7.0, np.float32))
    second = next(
        iter(data.make_loader("cityscapes", root, "val", batch_size=1, seed=0, train=False))
    )
    assert not np.array_equal(first["depth"], second["depth"])
    assert np.all(second["depth"] == 7.0)


# -- errors ---------------------------------------------------------------------------------


def _copy(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("_tfds"))
    return str(dst)


def test_missing_data_dir_error_explains(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(data.DataLayoutError) as e:
        _loader(missing)
    msg = str(e.value)
    assert missing in msg and "Looked in" in msg
    assert "train/label/{i}.npy" in msg and "(288, 384)" in msg
    assert "dropbox.com" in msg and "cannot be redistributed" in msg


def test_missing_folder_and_empty_split(nyu_dir, tmp_path):
    root = _copy(nyu_dir, tmp_path / "a")
    shutil.rmtree(os.path.join(root, "val", "normal"))
    with pytest.raises(data.DataLayoutError, match=r"Missing folder .*val/normal"):
        _loader(root)
    root = _copy(nyu_dir, tmp_path / "b")
    for folder in ("image", "label", "depth", "normal"):
        for f in os.listdir(os.path.join(root, "val", folder)):
            os.remove(os.path.join(root, "val", folder, f))
    with pytest.raises(data.DataLayoutError, match=r"Empty split.*val/image"):
        _loader(root)
    root = _copy(nyu_dir, tmp_path / "c")
    os.remove(os.path.join(root, "train", "depth", "2.npy"))
    with pytest.raises(data.DataLayoutError, match=r"missing 2\.npy"):
        _loader(root)


def test_wrong_shape_file_is_named(nyu_dir, tmp_path):
    root = _copy(nyu_dir, tmp_path / "d")
    bad = os.path.join(root, "val", "depth", "1.npy")
    np.save(bad, np.ones((288, 384), np.float32))
    with pytest.raises(ValueError, match=rf"{bad}: shape \(288, 384\), expected \(288, 384, 1\)"):
        _loader(root)


def test_label_out_of_range_is_named(nyu_dir, tmp_path):
    root = _copy(nyu_dir, tmp_path / "e")
    bad = os.path.join(root, "train", "label", "3.npy")
    label = np.load(bad)
    label[5, 5] = 13
    np.save(bad, label)
    with pytest.raises(ValueError, match=rf"{bad}: label values \[13\.0\] out of range"):
        _loader(root)


@pytest.mark.parametrize("corruption", ["empty_file", "truncated", "dtype", "nan", "float_label"])
def test_corrupted_file_is_named_with_the_expectation(city_dir, tmp_path, corruption):
    root = _copy(city_dir, tmp_path / corruption)
    folder = "label_7" if corruption == "float_label" else "depth"
    bad = os.path.join(root, "val", folder, "2.npy")
    good = np.load(bad)
    if corruption == "empty_file":
        open(bad, "wb").close()
        expected = r"Cannot read .*2\.npy.*expected a NumPy array of shape \(128, 256, 1\)"
    elif corruption == "truncated":
        with open(bad, "r+b") as f:
            f.truncate(os.path.getsize(bad) // 2)
        expected = r"Cannot read .*2\.npy.*truncated or corrupted"
    elif corruption == "dtype":
        np.save(bad, good.astype(np.complex64))
        expected = rf"{bad}: dtype complex64, expected a real float or integer array"
    elif corruption == "nan":
        good[3, 4, 0] = np.nan
        np.save(bad, good)
        expected = rf"{bad}: contains NaN or infinite values; expected finite values"
    else:
        good = good.astype(np.float32)
        good[0, 0] = 2.5
        np.save(bad, good)
        expected = rf"{bad}: label values \[2\.5\] out of range; expected integers in 0\.\.6"
    with pytest.raises(ValueError, match=expected):
        data.make_loader("cityscapes", root, "val", batch_size=1, seed=0, train=False)


def test_bad_arguments(nyu_dir):
    with pytest.raises(ValueError, match="Unknown split 'test'"):
        _loader(nyu_dir, "test")
    with pytest.raises(ValueError, match="fewer than one batch"):
        _loader(nyu_dir, batch_size=8)
    with pytest.raises(ValueError, match="shard_index"):
        _loader(nyu_dir, shard_index=2, shard_count=2)


# -- augmentation ---------------------------------------------------------------------------


def _example(rng, h=12, w=16):
    normal = rng.normal(size=(h, w, 3)).astype(np.float32)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    return {
        "image": rng.random((h, w, 3)).astype(np.float32),
        "segmentation": rng.integers(-1, 13, (h, w)).astype(np.int32),
        "depth": rng.uniform(0.5, 5, (h, w, 1)).astype(np.float32),
        "normal": normal,
        "mask": np.ones((), bool),
    }


def test_augment_flip_and_scale_semantics():
    ex = _example(np.random.default_rng(0))
    flipped = augment.hflip(ex)
    np.testing.assert_array_equal(flipped["image"], ex["image"][:, ::-1])
    np.testing.assert_array_equal(flipped["normal"][..., 0], -ex["normal"][:, ::-1, 0])
    np.testing.assert_array_equal(flipped["normal"][..., 1:], ex["normal"][:, ::-1, 1:])
    same = augment.scale_crop(ex, 1.0, 0, 0)
    for k in ex:
        np.testing.assert_array_equal(same[k], ex[k])
    zoom = augment.scale_crop(ex, 1.5, 2, 3)  # 8 x 10 window at (2, 3)
    assert zoom["depth"].shape == ex["depth"].shape
    # Corners of the window are reproduced exactly (align_corners); depth is divided by 1.5.
    np.testing.assert_allclose(zoom["image"][0, 0], ex["image"][2, 3])
    np.testing.assert_allclose(zoom["image"][-1, -1], ex["image"][9, 12], rtol=1e-6)
    assert zoom["depth"][0, 0, 0] == pytest.approx(ex["depth"][2, 3, 0] / 1.5)
    assert set(np.unique(zoom["segmentation"])) <= set(np.unique(ex["segmentation"][2:10, 3:13]))


def test_random_augment_deterministic_given_rng():
    ex = _example(np.random.default_rng(1))
    a = augment.random_scale_crop_flip(ex, np.random.default_rng(3))
    b = augment.random_scale_crop_flip(ex, np.random.default_rng(3))
    for k in ex:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.reference
@pytest.mark.parametrize("scale,top,left", [(1.2, 7, 30), (1.5, 0, 0), (1.5, 96, 128)])
def test_scale_crop_matches_libmtl_torch(scale, top, left):
    # Re-derivation of LibMTL examples/nyu/create_dataset.py::RandomScaleCrop with fixed draws.
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    ex = _example(np.random.default_rng(2), 288, 384)
    h, w = int(288 / scale), int(384 / scale)

    def chw(x):
        return torch.from_numpy(np.moveaxis(x, -1, 0).copy())

    img, dep, nor = chw(ex["image"]), chw(ex["depth"]), chw(ex["normal"])
    lab = torch.from_numpy(ex["segmentation"].astype(np.float32))
    ref = {
        "image": F.interpolate(
            img[None, :, top : top + h, left : left + w],
            size=(288, 384),
            mode="bilinear",
            align_corners=True,
        ).squeeze(0),
        "segmentation": F.interpolate(
            lab[None, None, top : top + h, left : left + w], size=(288, 384), mode="nearest"
        )
        .squeeze(0)
        .squeeze(0),
        "depth": F.interpolate(
            dep[None, :, top : top + h, left : left + w], size=(288, 384), mode="nearest"
        ).squeeze(0)
        / scale,
        "normal": F.interpolate(
            nor[None, :, top : top + h, left : left + w],
            size=(288, 384),
            mode="bilinear",
            align_corners=True,
        ).squeeze(0),
    }
    ours = augment.scale_crop(ex, scale, top, left)
    np.testing.assert_array_equal(ours["segmentation"], ref["segmentation"].numpy())
    np.testing.assert_allclose(ours["depth"], np.moveaxis(ref["depth"].numpy(), 0, -1), rtol=1e-6)
    for k in ("image", "normal"):
        np.testing.assert_allclose(ours[k], np.moveaxis(ref[k].numpy(), 0, -1), atol=2e-6)


@pytest.mark.slow
def test_worker_processes_same_batches_and_resume(nyu_dir):
    # grain mp_prefetch outside absl.app.run (flags unparsed) + exact resume from its state.
    kw = dict(batch_size=2, augment=True)
    reference = [b for b, _ in zip(_loader(nyu_dir, **kw), range(6), strict=False)]
    loader = _loader(nyu_dir, worker_count=2, **kw)
    it = iter(loader)
    got = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(loader.get_state()))
    loader.close()
    resumed = _loader(nyu_dir, worker_count=2, **kw)
    resumed.set_state(state)
    got += [b for b, _ in zip(resumed, range(3), strict=False)]
    resumed.close()
    for a, b in zip(reference, got, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(ValueError, match="worker_count"):
        _loader(nyu_dir, **kw).set_state(state)


def test_unwritable_cache_dir_error(nyu_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="MTL_JAX_TFDS_DIR"):
        _loader(nyu_dir, cache_dir=str(blocker))


def test_train_without_drop_remainder_pads_each_epoch(nyu_dir):
    loader = _loader(nyu_dir, drop_remainder=False, num_epochs=2)
    assert loader.steps_per_epoch == 3  # 5 examples -> 2 + 2 + 1 real, 1 padding
    ids = _ids(nyu_dir, "train", 5)
    batches = [_batch_ids(b, ids) for b in loader]
    assert len(batches) == 6
    for epoch in (batches[:3], batches[3:]):
        assert epoch[-1][1] is None
        assert sorted(i for b in epoch for i in b if i is not None) == [0, 1, 2, 3, 4]


def test_cityscapes19_float64_on_disk(tmp_path):
    root = fabricate.write_fake("cityscapes19", str(tmp_path / "c19"), 2, 1, dtype=np.float64)
    loader = data.make_loader("cityscapes19", root, "val", batch_size=1, seed=0, train=False)
    b = next(iter(loader))
    raw = np.load(os.path.join(root, "val", "label_19", "0.npy"))
    assert raw.dtype == np.float64 and raw.max() > 6
    np.testing.assert_array_equal(b["segmentation"][0], raw.astype(np.int32))
    assert b["depth"].dtype == np.float32
