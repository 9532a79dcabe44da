"""Embedded datasets (MultiDigits, Penguins): construction, tasks, models, and the quick start.

The construction properties are checked exactly against scikit-learn's digits and the shipped
penguins CSV; the TFDS builders are read back through the real loader; the README's command is
run shortened through `train.train_and_evaluate` for both configs.
"""

import csv
import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from sklearn.datasets import load_digits

from mtl_jax import data, metrics, models, tasks, train
from mtl_jax.data import embedded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _load_config(name, arg):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# -- MultiDigits construction -----------------------------------------------------------------


def test_multidigits_sources_are_disjoint_and_cover_the_digits():
    images, labels = embedded.digit_sources()
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,)
    sources = embedded.source_split(1797)
    train, test = sources["train"], sources["test"]
    assert len(test) == embedded.MULTIDIGITS_TEST_SOURCES == 360 and len(train) == 1437
    assert not set(train) & set(test)
    assert sorted(np.concatenate([train, test])) == list(range(1797))
    for split, pool in sources.items():
        left, right = embedded.multidigits_pairs(split)
        assert len(left) == embedded.MULTIDIGITS_PAIRS[split]
        assert set(left) <= set(pool) and set(right) <= set(pool)
        assert np.all(left != right)
        # Most sources are used (uniform draws), so the split really uses its own pool.
        assert len(set(left) | set(right)) > 0.95 * len(pool)


def test_multidigits_canvas_is_the_max_overlay_of_the_two_sources_with_their_labels():
    digits = load_digits()
    src = digits.images / 16.0
    for split in ("train", "test"):
        ex = embedded.multidigits(split)
        left, right = embedded.multidigits_pairs(split)
        img = ex["image"]
        assert img.shape == (embedded.MULTIDIGITS_PAIRS[split], 8, 12, 1)
        assert img.dtype == np.float32 and img.min() >= 0 and img.max() <= 1
        canvas = img[..., 0]
        a, b = src[left].astype(np.float32), src[right].astype(np.float32)
        np.testing.assert_array_equal(canvas[:, :, :4], a[:, :, :4])
        np.testing.assert_array_equal(canvas[:, :, 4:8], np.maximum(a[:, :, 4:], b[:, :, :4]))
        np.testing.assert_array_equal(canvas[:, :, 8:], b[:, :, 4:])
        np.testing.assert_array_equal(ex["left"], digits.target[left])
        np.testing.assert_array_equal(ex["right"], digits.target[right])
        assert np.bincount(ex["left"], minlength=10).min() > 0.05 * len(left)
    # Test canvases never reuse a training source digit.
    train_src = set(np.concatenate(embedded.multidigits_pairs("train")))
    assert not train_src & set(np.concatenate(embedded.multidigits_pairs("test")))


def test_overlay_by_max_on_a_hand_made_pair():
    a, b = np.zeros((8, 8), np.float32), np.zeros((8, 8), np.float32)
    a[0, 5], b[0, 1], a[1, 6], b[1, 2] = 0.25, 0.75, 0.5, 0.125
    c = embedded.overlay(a, b)
    assert c.shape == (8, 12)
    assert c[0, 5] == 0.75 and c[1, 6] == 0.5 and c.sum() == 1.25


def test_multidigits_is_deterministic_and_seeded():
    first = {k: v.copy() for k, v in embedded.multidigits("train").items()}
    fp = embedded.fingerprint("multidigits")
    embedded.multidigits.cache_clear()
    again = embedded.multidigits("train")
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])
    assert embedded.fingerprint("multidigits") == fp
    other = embedded.multidigits_pairs("train", seed=1)[0]
    assert not np.array_equal(other, embedded.multidigits_pairs("train")[0])


# -- Penguins -----------------------------------------------------------------------------------


def test_penguins_parsing_drops_incomplete_rows():
    with open(embedded.PENGUINS_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 344
    raw = embedded.read_penguins()
    assert len(raw["species"]) == 333  # 11 rows have an NA in a used column
    assert np.bincount(raw["species"]).tolist() == [146, 68, 119]
    assert np.bincount(raw["sex"]).tolist() == [165, 168]  # female, male
    np.testing.assert_array_equal(raw["inputs"][0], [39.1, 18.7, 181.0])
    assert raw["body_mass_g"][0] == 3750.0 and raw["sex"][0] == 1 and raw["species"][0] == 0
    for name in ("LICENSE", "PROVENANCE.md"):
        assert os.path.isfile(os.path.join(os.path.dirname(embedded.PENGUINS_CSV), name))


def test_penguins_split_and_standardization_use_train_statistics():
    raw = embedded.read_penguins()
    split = embedded.penguins_split(333)
    assert len(split["train"]) == 266 and len(split["test"]) == 67
    assert not set(split["train"]) & set(split["test"])
    train, test = embedded.penguins("train"), embedded.penguins("test")
    np.testing.assert_allclose(train["features"].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(train["features"].std(0), 1.0, atol=1e-5)
    np.testing.assert_allclose(train["body_mass"].mean(), 0.0, atol=1e-5)
    assert abs(test["features"].mean()) > 1e-3  # test uses the train statistics, not its own
    mean, std = embedded.penguins_body_mass_stats()
    np.testing.assert_allclose(
        mean + std * test["body_mass"][:, 0], raw["body_mass_g"][split["test"]], rtol=1e-6
    )
    np.testing.assert_array_equal(test["species"], raw["species"][split["test"]])
    assert train["body_mass"].shape == (266, 1) and train["features"].dtype == np.float32


# -- builders through the loader ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["penguins", "multidigits"])
def test_builders_round_trip_through_the_loader(name, cache):
    info = data.dataset_info(name)
    assert info.embedded and info.tasks == tuple(t.name for t in tasks.get_tasks(name))
    expected = embedded.arrays(name, "test")
    loader = data.make_loader(name, "", "test", batch_size=64, seed=0, train=False, cache_dir=cache)
    batches = list(loader)
    assert len(batches) == math.ceil(info.splits["test"] / 64)
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == info.splits["test"]
    for key, value in expected.items():
        got = np.concatenate([b[key] for b in batches])[mask]
        np.testing.assert_array_equal(got, value)
    # A training epoch is a permutation of the train split.
    train_loader = data.make_loader(
        name, "", "train", batch_size=info.splits["train"] // 2, seed=3, train=True, cache_dir=cache
    )
    it = iter(train_loader)
    key = info.tasks[0]
    got = np.concatenate([next(it)[key] for _ in range(2)])
    full = embedded.arrays(name, "train")[key]
    n = 2 * (info.splits["train"] // 2)
    assert not np.array_equal(got, full[:n])
    assert np.bincount(got).sum() == n and np.abs(np.bincount(got) - np.bincount(full)).max() <= 1


def test_unknown_split_is_a_clear_error(cache):
    with pytest.raises(ValueError, match="valid: train, test"):
        data.make_loader("penguins", "", "val", batch_size=2, seed=0, train=False, cache_dir=cache)


# -- tasks and models ---------------------------------------------------------------------------


def test_classification_and_regression_losses_and_metrics():
    species, sex, mass = tasks.get_tasks("penguins")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 3)).astype(np.float32)
    labels = np.array([0, 2, 1, 1, 0], np.int32)
    mask = np.array([True, True, True, False, True])
    batch = {"species": labels, "mask": mask}
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ce = -logp[np.arange(5), labels]
    np.testing.assert_allclose(species.loss(jnp.asarray(logits), batch), ce[mask].mean(), 1e-6)
    acc = species.metric_update(species.metric_init(), jnp.asarray(logits), batch)
    out = species.metric_compute(acc)
    assert out["accuracy"] == np.mean((logits.argmax(1) == labels)[mask])
    np.testing.assert_allclose(out["ce"], ce[mask].mean(), rtol=1e-6)

    pred = rng.normal(size=(5, 1)).astype(np.float32)
    target = rng.normal(size=(5, 1)).astype(np.float32)
    batch = {"body_mass": target, "mask": mask}
    err = (pred - target)[mask, 0]
    np.testing.assert_allclose(mass.loss(jnp.asarray(pred), batch), np.mean(err**2), 1e-6)
    out = mass.metric_compute(mass.metric_update(mass.metric_init(), jnp.asarray(pred), batch))
    _, std = embedded.penguins_body_mass_stats()
    np.testing.assert_allclose(out["mae"], np.abs(err).mean(), rtol=1e-6)
    np.testing.assert_allclose(out["rmse"], np.sqrt(np.mean(err**2)), rtol=1e-6)
    np.testing.assert_allclose(out["mae_g"], std * np.abs(err).mean(), rtol=1e-6)
    hib = tasks.higher_is_better((species, sex, mass))
    assert hib["species/accuracy"] and not hib["body_mass/mae_g"] and not hib["sex/ce"]
    with pytest.raises(ValueError, match="expected"):
        sex.loss(jnp.zeros((5, 3)), {"sex": labels})  # sex has 2 classes


@pytest.mark.parametrize(
    "name,kw,x_shape",
    [
        ("mlp", {"in_features": 3, "hidden": (8, 8), "head_hidden": (4,)}, (4, 3)),
        ("convnet", {"input_shape": (8, 12, 1), "channels": (4, 8), "hidden": 16}, (4, 8, 12, 1)),
    ],
)
def test_small_models_output_logits_and_label_heads_task_specific(name, kw, x_shape):
    # Abstract model and shapes by tracing only: eager initializers and conv ops compile one
    # by one (~30 s on a loaded 2-core CPU); the quick-start test runs the real thing.
    model = nnx.eval_shape(lambda: models.build_model(name, {"a": 10, "b": 1}, seed=0, **kw))
    graphdef, params = nnx.split(model, nnx.Param)
    out = jax.eval_shape(
        lambda p, x: nnx.merge(graphdef, p)(x, train=True, key=jax.random.key(0)),
        params,
        jax.ShapeDtypeStruct(x_shape, jnp.float32),
    )
    assert out["a"].shape == (4, 10) and out["b"].shape == (4, 1)
    with pytest.raises(ValueError, match="expected"):
        jax.eval_shape(lambda p: nnx.merge(graphdef, p)(jnp.ones((4, 5))), params)
    labels = models.param_labels(model, params)
    flat = jax.tree_util.tree_flatten_with_path(labels)[0]
    specific = {str(p[0]) for p, lab in flat if lab == "task_specific"}
    shared = [p for p, lab in flat if lab == "shared"]
    assert shared and all("heads" not in str(p[0]) for p in shared)
    assert specific and all("heads" in s for s in specific)


# -- the quick-start command, shortened -------------------------------------------------------


@pytest.mark.parametrize("config_file", ["multidigits.py", "penguins.py"])
def test_quickstart_config_runs_shortened(config_file, cache, tmp_path, monkeypatch):
    monkeypatch.setenv(data.builders.CACHE_ENV, cache)
    full = _load_config(config_file, None)
    config = _load_config(config_file, "smoke")
    assert config.dataset == full.dataset and config.model == full.model
    config.num_epochs, config.steps_per_epoch, config.eval_steps = 1, 2, 1
    if config.dataset == "penguins":  # per-example [B, C] outputs through the Jacobian path too
        config.balancer = "mgda"
    results = train.train_and_evaluate(config, str(tmp_path))
    assert results["steps"] == 2 and len(results["history"]) == 1
    assert results["balancer"] == ([{"name": "mgda"}] if config.balancer else [])
    names = tasks.get_tasks(config.dataset)
    final = results["final"]
    for t in names:
        assert f"{t.name}/accuracy" in final or f"{t.name}/mae" in final
    assert all(np.isfinite(v) for v in final.values())
    assert "delta_m" not in final  # no stored baselines: skipped, not an error
    assert os.path.isfile(tmp_path / "results.json")
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))
    table = metrics.format_results_table(results, tasks.higher_is_better(names))
    assert table.count("\n") == len(final) + 1 and "| higher |" in table


def test_coba_gets_validation_losses_through_the_harness(cache, tmp_path, monkeypatch):
    # CoBa's update needs this step's validation losses: the harness draws one batch of the
    # validation split per step and checkpoints that loader's position too.
    monkeypatch.setenv(data.builders.CACHE_ENV, cache)
    config = _load_config("penguins.py", "smoke")
    config.num_epochs, config.steps_per_epoch, config.eval_steps = 2, 3, 1
    config.balancer = "coba(warmup_steps=1, history_length=2)"
    results = train.train_and_evaluate(config, str(tmp_path))
    assert results["steps"] == 6
    weights = np.array([e["weights"] for e in results["train_log"]])
    assert np.all(np.isfinite(weights))
    assert np.ptp(weights[1:], axis=0).max() > 1e-2  # after warm-up the weights move
    assert all(np.isfinite(v) for v in results["final"].values())
    config.num_epochs = 3  # resumes (train and validation loaders) from the step-6 checkpoint
    resumed = train.train_and_evaluate(config, str(tmp_path))
    assert resumed["steps"] == 9 and resumed["history"][:2] == results["history"]
