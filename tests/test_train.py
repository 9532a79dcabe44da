"""Tests of the training harness (mtl_jax/train.py, mtl_jax/main.py, experiments/*.py).

Default tests: balancer-spec parsing, schedules, one train step of every balancer through the
harness's jitted step (tiny model, synthetic batch), and an in-process end-to-end run on a
fabricated Cityscapes copy (train, evaluate, checkpoint, resume exactly). `slow`: the
``python -m mtl_jax.main`` command on fabricated NYUv2 and Cityscapes copies, and data
parallelism on 8 fake CPU devices against 1 device.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

import mtl_jax as mtl
from mtl_jax import models, train
from mtl_jax import tasks as tasks_lib
from mtl_jax.data import fabricate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from test_common_methods import EXTRA_UPDATE_ARGS, INIT_KWARGS  # noqa: E402


def load_config(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments", name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


# -- balancer specs -----------------------------------------------------------------------------


def test_parse_balancer_forms():
    assert train.parse_balancer("") == []
    assert train.parse_balancer("ew") == []
    assert train.parse_balancer("upgrad") == [{"name": "upgrad"}]
    assert train.parse_balancer("cagrad(c=0.4), pcgrad") == [
        {"name": "cagrad", "c": 0.4},
        {"name": "pcgrad"},
    ]
    assert train.parse_balancer(["mgda", {"name": "cagrad", "c": 0.2}]) == [
        {"name": "mgda"},
        {"name": "cagrad", "c": 0.2},
    ]


def test_parse_balancer_errors_name_valid_methods():
    with pytest.raises(ValueError, match="Valid names:.*upgrad"):
        train.parse_balancer("upgradd")
    with pytest.raises(ValueError, match="Cannot parse"):
        train.parse_balancer("cagrad(c=")
    with pytest.raises(ValueError, match="literals"):
        train.parse_balancer("cagrad(c=x)")


def test_build_balancer_fills_num_tasks_and_rejects_bad_kwargs():
    tx = train.build_balancer(train.parse_balancer("famo"), 3)  # famo needs num_tasks
    assert tx.init({"w": jnp.zeros(2)}) is not None
    with pytest.raises(ValueError, match="accepts"):
        train.build_balancer(train.parse_balancer("cagrad(not_an_arg=1)"), 3)


def test_loss_weighting_path_only_for_a_lone_loss_method():
    assert train.loss_weighting_for([{"name": "dwa"}], 3) is not None
    assert train.loss_weighting_for([{"name": "upgrad"}], 3) is None
    assert train.loss_weighting_for([{"name": "dwa"}, {"name": "pcgrad"}], 3) is None
    assert train.loss_weighting_for([], 3).name == "equal_weighting"  # one backward pass


def test_step_schedule_halves_at_epoch_boundary():
    c = load_config("nyud.py")
    c.num_epochs, c.lr_decay_epochs = 4, 2
    sched = train.make_schedule(c, steps_per_epoch=10)
    assert float(sched(19)) == pytest.approx(1e-4)
    assert float(sched(20)) == pytest.approx(5e-5)
    assert float(sched(39)) == pytest.approx(5e-5)


def test_unknown_optimizer_and_schedule_are_clear_errors():
    c = load_config("nyud.py")
    c.optimizer = "adamm"
    with pytest.raises(ValueError, match="'adam', 'adamw', 'sgd'"):
        train.make_optimizer(c, 10)
    c = load_config("nyud.py")
    c.lr_schedule = "poly"
    with pytest.raises(ValueError, match="'constant', 'step', 'cosine'"):
        train.make_schedule(c, 10)


# -- one step of every balancer through the harness ---------------------------------------------


class TinyNet(nnx.Module):
    """A shared 3x3 conv + BatchNorm and a 1x1 conv head per task (same output contract)."""

    task_specific_modules = ("heads",)

    def __init__(self, tasks, *, rngs: nnx.Rngs):
        self.tasks = tuple(tasks)
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.heads = nnx.Dict({t: nnx.Conv(4, c, (1, 1), rngs=rngs) for t, c in tasks.items()})

    def __call__(self, x, train=False, key=None):
        h = jnp.tanh(self.bn(self.conv(x), use_running_average=not train))
        return {t: models.finalize_prediction(t, self.heads[t](h)) for t in self.tasks}


def synthetic_batch(n=2, h=8, w=8, seed=0):
    rng = np.random.default_rng(seed)
    normal = rng.normal(size=(n, h, w, 3)).astype(np.float32)
    return {
        "image": rng.uniform(size=(n, h, w, 3)).astype(np.float32),
        "segmentation": rng.integers(-1, 13, size=(n, h, w)).astype(np.int32),
        "depth": rng.uniform(0.0, 5.0, size=(n, h, w, 1)).astype(np.float32),
        "normal": normal / np.linalg.norm(normal, axis=-1, keepdims=True),
        "mask": np.ones((n,), bool),
    }


def spec_string(specs) -> str:
    """``[{'name': 'cagrad', 'c': 0.4}]`` -> ``'cagrad(c=0.4)'`` (the command-line form)."""
    if isinstance(specs, str):
        return specs
    items = []
    for spec in specs:
        kw = ", ".join(f"{k}={v!r}" for k, v in spec.items() if k != "name")
        items.append(f"{spec['name']}({kw})")
    return ", ".join(items)


def make_trainer(balancer, **overrides):
    c = load_config("nyud.py", "smoke")
    c.balancer = spec_string(balancer)
    for k, v in overrides.items():
        setattr(c, k, v)
    tasks = tasks_lib.get_tasks("nyuv2")
    model = TinyNet({t.name: t.out_channels for t in tasks}, rngs=nnx.Rngs(0))
    mesh = train.make_mesh(c)
    return train.Trainer(c, tasks, model, mesh, steps_per_epoch=2)


# Constructor arguments that differ from the common method test's: a config carries strings,
# not functions (FULLER's last shared layer is a regex on the parameter path).
HARNESS_KWARGS = {"fuller": {"last_shared_layer": "bn"}}


# The full sweep compiles one train step per method (~5-10 s of CPU each on this machine), so
# it is `slow`; by default a representative subset runs: a Gramian QP method, a fixed
# scalarization (effective weights checked) and a stateful loss-only-path method.
DEFAULT_SUBSET = ("upgrad", "scalarize", "dwa")


def _one_step(name):
    kwargs = HARNESS_KWARGS.get(name) or INIT_KWARGS.get(name, lambda k: {})(3)
    spec = {"name": name, **kwargs}
    spec = {k: (np.asarray(v).tolist() if isinstance(v, jax.Array) else v) for k, v in spec.items()}
    trainer = make_trainer([spec])
    assert train.parse_balancer(trainer.config.balancer) == [spec]
    state = trainer.init_state()
    before = jax.tree.map(np.asarray, state["params"])
    batch = trainer.shard_batch(synthetic_batch())
    # Methods taking validation losses (CoBa) get a validation batch, as train_and_evaluate does.
    assert trainer.needs_val_losses == (name in EXTRA_UPDATE_ARGS)
    val = trainer.shard_batch(synthetic_batch(seed=1)) if trainer.needs_val_losses else None
    state, out = trainer.train_step(state, batch, jnp.int32(0), val)
    state, out = trainer.train_step(state, batch, jnp.int32(0), val)
    assert int(state["step"]) == 2
    assert np.all(np.isfinite(out["losses"])) and out["losses"].shape == (3,)
    assert np.all(np.isfinite(out["weights"])) and out["weights"].shape == (3,)
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), state["params"], before)
    assert max(jax.tree.leaves(moved)) > 0, "parameters did not change"
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))
    if trainer.loss_weighting is None:
        np.testing.assert_allclose(np.diag(np.asarray(out["cos"])), 1.0, atol=1e-4)
    if name == "scalarize":  # effective weights = the scalarization's weights
        np.testing.assert_allclose(out["weights"], spec["weights"], rtol=1e-4)
    return trainer


@pytest.mark.parametrize("name", DEFAULT_SUBSET)
def test_one_train_step_through_the_harness(name):
    trainer = _one_step(name)
    assert (trainer.loss_weighting is not None) == (name in mtl.LOSS_METHODS)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in mtl.BALANCERS if n not in DEFAULT_SUBSET])
def test_one_train_step_of_every_balancer(name):
    _one_step(name)


def test_combination_weights_recover_the_task_weights_of_a_combined_gradient():
    key = jax.random.key(3)
    ka, kb, ke = jax.random.split(key, 3)
    jac = [jax.random.normal(ka, (3, 5, 4)), jax.random.normal(kb, (3, 7))]
    w = jnp.array([0.5, -1.0, 2.0])

    def combined(weights, jac):
        return [jnp.tensordot(weights, j, axes=1) for j in jac]

    gram = mtl.gramian(jac)
    got = mtl.combination_weights(jac, combined(w, jac), gram=gram)
    np.testing.assert_allclose(got, w, rtol=1e-4)
    # A part of d outside the span of the task gradients is ignored (least squares).
    flat = jnp.concatenate([j.reshape(3, -1) for j in jac], axis=1)
    e = jax.random.normal(ke, (flat.shape[1],))
    e = e - flat.T @ jnp.linalg.solve(flat @ flat.T, flat @ e)
    d = combined(w, jac)
    d = [d[0] + e[:20].reshape(5, 4), d[1] + e[20:]]
    np.testing.assert_allclose(mtl.combination_weights(jac, d, gram=gram), w, rtol=1e-4, atol=1e-5)
    # Two equal task gradients: the minimum-norm weights split their share evenly.
    dup = [jnp.stack([j[0], j[0], j[2]]) for j in jac]
    got = mtl.combination_weights(dup, combined(jnp.array([2.0, 0.0, 1.0]), dup))
    np.testing.assert_allclose(got, [1.0, 1.0, 1.0], rtol=1e-4)
    with pytest.raises(ValueError, match="same parameters"):
        mtl.combination_weights(jac, combined(w, jac)[:1])


def test_jacobian_path_logs_the_weights_that_rebuild_its_gradient():
    # UPGrad over all parameters (shared_only=False), SGD with lr 1: the update is -d, and the
    # logged weights must rebuild d from the task gradients (d = J^T lambda on the shared
    # parameters; UPGrad's output is a combination of the task gradients).
    trainer = make_trainer(
        "upgrad", shared_only=False, optimizer="sgd", momentum=0.0, learning_rate=1.0
    )
    state = trainer.init_state()
    batch = trainer.shard_batch(synthetic_batch())
    p0 = jax.tree.map(np.asarray, state["params"])
    key = jax.random.fold_in(jax.random.key(0), 0)

    def losses(p):
        return trainer._losses(p, state["batch_stats"], batch, key)[0]

    jac = jax.jit(jax.jacrev(losses))(state["params"])
    state, out = trainer.train_step(state, batch, jnp.int32(0))
    lam = np.asarray(out["weights"])
    assert not np.allclose(lam, lam[0]), "UPGrad's weights should not all be equal here"
    for j, before, after in zip(
        trainer._shared_leaves(jac),
        trainer._shared_leaves(p0),
        trainer._shared_leaves(state["params"]),
        strict=True,
    ):
        d = before - np.asarray(after)
        rebuilt = np.tensordot(lam, np.asarray(j), axes=1)
        np.testing.assert_allclose(rebuilt, d, rtol=2e-3, atol=2e-3 * np.abs(d).max() + 1e-7)


def test_equal_weighting_step_matches_plain_gradient_of_summed_losses():
    # SGD with lr 1 makes the update the gradient itself (Adam would amplify float noise in
    # near-zero gradients, e.g. of the conv bias before BatchNorm, to +-lr).
    # The Jacobian path (loss_only_path=False) with no balancer must equal it too.
    trainer = make_trainer(
        "", loss_only_path=False, optimizer="sgd", momentum=0.0, learning_rate=1.0
    )
    state = trainer.init_state()
    batch = trainer.shard_batch(synthetic_batch())
    p0 = state["params"]
    key = jax.random.fold_in(jax.random.key(0), 0)

    def summed_loss(p):
        return jnp.sum(trainer._losses(p, state["batch_stats"], batch, key)[0])

    grads = jax.jit(jax.grad(summed_loss))(p0)  # jitted: op-by-op autodiff is slower
    updates, _ = trainer.optimizer.update(grads, trainer.optimizer.init(p0), p0)
    expected = optax.apply_updates(p0, updates)
    expected = jax.tree.map(np.asarray, expected)
    state, out = trainer.train_step(state, batch, jnp.int32(0))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-6),
        state["params"],
        expected,
    )
    np.testing.assert_allclose(out["weights"], 1.0, rtol=1e-5)


# -- end to end (in process) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def cityscapes_dir(tmp_path_factory):
    return fabricate.write_fake_cityscapes(str(tmp_path_factory.mktemp("cityscapes")), n_train=4)


@pytest.fixture
def tiny_model(monkeypatch):
    monkeypatch.setitem(models.MODELS, "tiny", TinyNet)


def tiny_cityscapes_config(data_dir, **overrides):
    """The smoke config with `TinyNet` (registered as 'tiny' by the `tiny_model` fixture)."""
    c = load_config("cityscapes.py", "smoke")
    c.data_dir = data_dir
    c.model = ml_collections.ConfigDict({"name": "tiny"})
    c.augment = False
    c.balancer = "mgda"
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def test_train_and_evaluate_checkpoints_and_resumes_exactly(cityscapes_dir, tmp_path, tiny_model):
    # One run of 4 steps vs. a run stopped after 2 steps and restarted with the same workdir.
    full = train.train_and_evaluate(tiny_cityscapes_config(cityscapes_dir), str(tmp_path / "a"))
    assert full["steps"] == 4 and len(full["history"]) == 2
    w = str(tmp_path / "b")
    part = train.train_and_evaluate(tiny_cityscapes_config(cityscapes_dir, num_train_steps=2), w)
    assert part["steps"] == 2
    resumed = train.train_and_evaluate(tiny_cityscapes_config(cityscapes_dir), w)
    assert resumed["steps"] == 4 and [h["epoch"] for h in resumed["history"]] == [1, 2]
    for key, value in full["final"].items():
        assert resumed["final"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # results.json: final, average over the last epochs, delta_m against the config baseline.
    with open(os.path.join(w, "results.json")) as f:
        res = json.load(f)
    assert set(res["final"]) >= {"segmentation/mIoU", "depth/abs_err", "delta_m"}
    assert res["num_averaged"] == 2
    mean = np.mean([h["depth/abs_err"] for h in res["history"]])
    assert res["average"]["depth/abs_err"] == pytest.approx(mean)
    # train_log: one entry per logged step (log_every_steps=1), kept across the resume.
    assert [e["step"] for e in res["train_log"]] == [1, 2, 3, 4]
    for e in res["train_log"]:
        assert len(e["losses"]) == len(e["weights"]) == 2 and e["step_time_s"] > 0
        cos = np.asarray(e["cos"])
        assert cos.shape == (2, 2) and np.allclose(np.diag(cos), 1.0, atol=1e-4)
    # TensorBoard scalars: per-task losses, weights, cosines, step time, eval metrics.
    from tensorboard.backend.event_processing import event_accumulator

    ea = event_accumulator.EventAccumulator(w)
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for tag in (
        "train/loss/segmentation",
        "train/weight/depth",
        "train/cos/segmentation-depth",
        "train/step_time_s",
        "eval/segmentation/mIoU",
        "eval/delta_m",
    ):
        assert tag in tags, (tag, sorted(tags))


# -- the command line (slow) --------------------------------------------------------------------


def run_main(config_arg, data_dir, workdir, *extra, env=None):
    cmd = [
        sys.executable, "-m", "mtl_jax.main", f"--config={config_arg}",
        f"--config.data_dir={data_dir}", f"--workdir={workdir}", *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-5000:]
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f), proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("config,writer", [("nyud.py", "nyuv2"), ("cityscapes.py", "cityscapes")])
def test_main_end_to_end_with_resume(config, writer, tmp_path):
    data_dir = str(tmp_path / "data")
    getattr(fabricate, f"write_fake_{writer}")(data_dir)
    work = str(tmp_path / "work")
    cfg = os.path.join("experiments", config) + ":smoke"
    bal = "--config.balancer=upgrad"
    first, _ = run_main(cfg, data_dir, work, "--config.num_train_steps=2", bal)
    assert first["steps"] == 2
    second, log = run_main(cfg, data_dir, work, bal)
    assert "Resumed from step 2" in log
    assert second["steps"] == 4 and [h["epoch"] for h in second["history"]] == [1, 2]
    assert np.isfinite(second["final"]["delta_m"])


SHARDING_SCRIPT = r"""
import json, sys
import jax
from mtl_jax import train
sys.path.insert(0, "tests")
import test_train as t
from mtl_jax import models
models.MODELS["tiny"] = t.TinyNet
c = t.tiny_cityscapes_config(sys.argv[1], num_devices=int(sys.argv[3]), batch_size=8,
                             eval_batch_size=8, num_train_steps=2)
res = train.train_and_evaluate(c, sys.argv[2])
print("RESULT", json.dumps({"n": len(jax.devices()), "final": res["final"]}))
"""


@pytest.mark.slow
def test_data_parallel_on_8_fake_devices_matches_1_device(cityscapes_dir, tmp_path):
    data_dir = fabricate.write_fake_cityscapes(str(tmp_path / "d"), n_train=8, n_val=8)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = {}
    for n in (1, 8):
        t0 = time.time()
        proc = subprocess.run(
            [sys.executable, "-c", SHARDING_SCRIPT, data_dir, str(tmp_path / f"w{n}"), str(n)],
            cwd=ROOT, capture_output=True, text=True, env=env, timeout=1800,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-5000:]
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1]
        out[n] = json.loads(line[len("RESULT ") :])
        assert out[n]["n"] == 8, time.time() - t0
    for key, value in out[1]["final"].items():
        assert out[8]["final"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
