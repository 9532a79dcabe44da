"""Reliability of the harness (issue 10): nothing is lost under NaNs, kills and bad input.

Default tests: the non-finite guard of the train step (NaN injected into one task at step k on
the Jacobian and the loss-only path: parameters, optimizer, balancer and BatchNorm state
bitwise unchanged, training continues; N consecutive bad steps stop the run with
`train.NonFiniteError`; no NaN checkpoint), the public `mtl.skip_if_nonfinite` wrapper,
`train.validate_config` (one case per check), atomic ``results.json`` and orbax checkpoints,
and determinism (same config and seed, same metrics). `slow`: kill -9 of
``python -m mtl_jax.main`` at random moments, including during a checkpoint write, then the
same command again: the final state equals an uninterrupted run's, bitwise.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import mtl_jax as mtl
from mtl_jax import models, train
from mtl_jax import tasks as tasks_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from test_train import load_config  # noqa: E402


def to_numpy(x) -> np.ndarray:
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.array(x)


def tree_equal(a, b) -> bool:
    """Bitwise equality of two pytrees of arrays."""
    la, lb = jax.tree.leaves(snapshot(a)), jax.tree.leaves(snapshot(b))
    return len(la) == len(lb) and all(
        np.asarray(x).dtype == np.asarray(y).dtype
        and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(la, lb, strict=True)
    )


def snapshot(state):
    return jax.tree.map(to_numpy, state)


# -- non-finite guard in the train step ---------------------------------------------------------


def penguins_trainer(balancer):
    """A harness `Trainer` on the penguins tasks with a small MLP (cheap to compile)."""
    c = penguins_smoke(balancer=balancer)
    tasks = tasks_lib.get_tasks("penguins")
    model = models.build_model(
        "mlp", {t.name: t.out_channels for t in tasks}, in_features=3, hidden=(8,)
    )
    return train.Trainer(c, tasks, model, train.make_mesh(c), steps_per_epoch=2)


def penguins_batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "features": rng.normal(size=(n, 3)).astype(np.float32),
        "species": rng.integers(0, 3, size=(n,)).astype(np.int32),
        "sex": rng.integers(0, 2, size=(n,)).astype(np.int32),
        "body_mass": rng.normal(size=(n, 1)).astype(np.float32),
        "mask": np.ones((n,), bool),
    }


@pytest.mark.parametrize(
    "balancer,loss_only",
    [("pcgrad", False), ("dwa", True)],  # Jacobian path (random state) / one-backward path
)
def test_nan_in_one_task_skips_the_step_and_training_continues(balancer, loss_only):
    trainer = penguins_trainer(balancer)
    assert (trainer.loss_weighting is not None) == loss_only
    state = trainer.init_state()
    good = trainer.shard_batch(penguins_batch(seed=0))
    bad = penguins_batch(seed=1)
    bad["body_mass"][3, 0] = np.nan  # the body-mass loss (task 2) is NaN at step k = 2
    bad = trainer.shard_batch(bad)
    for _ in range(2):
        state, out = trainer.train_step(state, good, jnp.int32(0))
    before = snapshot(state)
    state, out = trainer.train_step(state, bad, jnp.int32(0))
    out = jax.device_get(out)
    assert np.isnan(out["losses"][2]) and np.all(np.isfinite(out["losses"][:2]))
    assert out["bad_tasks"].tolist() == [False, False, True]
    for key in ("params", "batch_stats", "opt", "balancer"):
        assert tree_equal(state[key], before[key]), key
    assert int(state["step"]) == 3
    assert int(state["nonfinite"]["bad_steps"]) == 1
    assert int(state["nonfinite"]["consecutive_bad_steps"]) == 1
    state, out = trainer.train_step(state, good, jnp.int32(0))  # training continues
    assert not tree_equal(state["params"], before["params"])
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))
    assert not out["bad_tasks"].any()
    assert int(state["nonfinite"]["consecutive_bad_steps"]) == 0
    assert int(state["nonfinite"]["bad_steps"]) == 1


def test_nonfinite_update_from_finite_losses_is_skipped_too(monkeypatch):
    # Finite losses and gradients, but an optimizer whose update overflows: the new parameters
    # would not be finite, so the step is skipped with no task to blame.
    overflow = optax.chain(optax.sgd(1.0), optax.scale(float("inf")))
    monkeypatch.setattr(train, "make_optimizer", lambda *a: (overflow, optax.constant_schedule(1)))
    trainer = penguins_trainer("")
    state = trainer.init_state()
    before = snapshot(state)
    state, out = trainer.train_step(state, trainer.shard_batch(penguins_batch()), jnp.int32(0))
    assert np.all(np.isfinite(out["losses"])) and not out["bad_tasks"].any()
    assert int(state["nonfinite"]["bad_steps"]) == 1
    assert tree_equal(state["params"], before["params"])


class NaNMassMLP(models.MLP):
    """The penguins MLP whose ``body_mass`` prediction is NaN: every step is bad."""

    def __call__(self, x, train=False, key=None):
        out = super().__call__(x, train=train, key=key)
        return {**out, "body_mass": out["body_mass"] * jnp.nan}


def penguins_smoke(**overrides):
    c = load_config("penguins.py", "smoke")
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def restore_state(workdir):
    """The latest checkpoint's train-state leaves and meta, read without a target."""
    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    step = mngr.latest_step()
    out = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
    )
    mngr.close()
    return step, out["state"]["leaves"], out["meta"]


def test_consecutive_bad_steps_raise_and_no_nan_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setitem(models.MODELS, "nan_mlp", NaNMassMLP)
    c = penguins_smoke(checkpoint_every_steps=1, max_consecutive_bad_steps=3)
    c.model.name = "nan_mlp"
    with pytest.raises(train.NonFiniteError, match=r"step 3: 3 consecutive.*body_mass"):
        train.train_and_evaluate(c, str(tmp_path))
    # Checkpoints of the skipped steps hold the initial (finite) parameters.
    step, leaves, _ = restore_state(str(tmp_path))
    assert step == 2
    assert all(np.all(np.isfinite(x)) for x in leaves if np.issubdtype(x.dtype, np.inexact))
    # With the limit off (0), the run ends; every step was skipped and reported.
    c.max_consecutive_bad_steps = 0
    res = train.train_and_evaluate(c, str(tmp_path / "off"))
    assert res["steps"] == 4 and res["skipped_steps"] == 4
    from tensorboard.backend.event_processing import event_accumulator

    ea = event_accumulator.EventAccumulator(str(tmp_path / "off"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"train/skipped_steps", "train/nonfinite/body_mass"} <= tags, sorted(tags)
    assert [e.value for e in ea.Scalars("train/nonfinite/body_mass")][-1] == 1.0
    assert [e.value for e in ea.Scalars("train/nonfinite/species")][-1] == 0.0


def test_save_refuses_a_nonfinite_state(tmp_path):
    mngr = train._checkpoint_manager(str(tmp_path), penguins_smoke())
    state = {"step": jnp.int32(1), "params": {"w": jnp.ones(3)}}
    train._save(mngr, state, {"step": 1})
    state = {"step": jnp.int32(2), "params": {"w": jnp.array([1.0, jnp.inf, 0.0])}}
    with pytest.raises(train.NonFiniteError, match=r"step 2.*\['params'\]\['w'\]"):
        train._save(mngr, state, {"step": 2})
    assert mngr.all_steps() == [1]
    mngr.close()


# -- the public optax wrapper -------------------------------------------------------------------


def test_skip_if_nonfinite_wrapper_per_task():
    inner = optax.chain(
        mtl.uncertainty_weighting(2), mtl.upgrad(), mtl.sum_tasks(), optax.adam(0.1)
    )
    tx = mtl.skip_if_nonfinite(inner, num_tasks=2)
    params = {"w": jnp.ones((3,)), "b": jnp.zeros(())}
    state = tx.init(params)
    update = jax.jit(tx.update)
    jac = {"w": jnp.array([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]]), "b": jnp.array([1.0, -1.0])}
    losses = jnp.array([1.0, 2.0])
    upd, state = update(jac, state, params, task_losses=losses)
    assert float(jnp.abs(upd["w"]).sum()) > 0 and int(state.bad_steps) == 0
    inner_before = snapshot(state.inner_state)
    for i, (bad_jac, bad_losses) in enumerate(
        [
            ({**jac, "b": jac["b"].at[1].set(jnp.inf)}, losses),  # task 1's Jacobian row
            (jac, losses.at[0].set(jnp.nan)),  # task 0's loss
        ]
    ):
        upd, state = update(bad_jac, state, params, task_losses=bad_losses)
        assert all(float(jnp.abs(u).sum()) == 0 for u in jax.tree.leaves(upd))
        assert tree_equal(state.inner_state, inner_before)
        assert state.bad_tasks.tolist() == ([False, True] if i == 0 else [True, False])
        assert int(state.consecutive_bad_steps) == i + 1
    upd, state = update(jac, state, params, task_losses=losses)
    assert int(state.bad_steps) == 2 and int(state.consecutive_bad_steps) == 0
    assert not tree_equal(state.inner_state, inner_before)
    assert not state.bad_tasks.any()


def test_task_finite_and_all_finite():
    jac = {"a": jnp.array([[1.0, jnp.nan], [2.0, 3.0], [0.0, 0.0]]), "n": jnp.ones((3, 2), int)}
    np.testing.assert_array_equal(mtl.task_finite(jnp.array([1.0, 2.0, jnp.inf]), jac), [1, 1, 0])
    np.testing.assert_array_equal(mtl.task_finite(jnp.ones(3), jac), [0, 1, 1])
    np.testing.assert_array_equal(mtl.task_finite(jacobian=jac), [0, 1, 1])
    assert bool(mtl.all_finite({"k": jax.random.key(0), "x": jnp.ones(2), "i": jnp.arange(3)}))
    assert not bool(mtl.all_finite([jnp.ones(2), jnp.array([-jnp.inf])]))


# -- configuration errors (before anything is compiled) -----------------------------------------


@pytest.mark.parametrize(
    "override,message",
    [
        ({"dataset": "penguin"}, r"config.dataset='penguin'; valid: nyuv2, .*penguins"),
        ({"model.name": "mlpp"}, r"config.model.name='mlpp'; valid: convnet, mlp, "),
        ({"model.width": 3}, r"model 'mlp' does not accept width; it accepts: in_features, "),
        ({"optimizer": "adamm"}, r"config.optimizer='adamm'; valid: 'adam', 'adamw', 'sgd'"),
        ({"lr_schedule": "poly"}, r"config.lr_schedule='poly'; valid: 'constant', 'step'"),
        ({"balancer": "upgradd"}, r"Unknown balancing method 'upgradd'.*Valid names: .*upgrad"),
        ({"balancer": "cagrad(cc=1)"}, r"'cagrad': .*unexpected keyword.*'cc'.*accepts: c, "),
        ({"balancer": "famo(num_tasks=2)"}, r"famo\(num_tasks=2\) but .*3 tasks \(species, sex,"),
        ({"num_devices": 4}, r"config.num_devices=4 but 1 device\(s\) are visible"),
        ({"batch_size": 0}, r"config.batch_size=0 must be a positive integer"),
        ({"learning_rate": 0.0}, r"config.learning_rate=0.0 must be positive"),
    ],
)
def test_validate_config_one_line_errors(override, message):
    c = load_config("penguins.py")
    for key, value in override.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    with pytest.raises(train.ConfigError, match=message) as e:
        train.validate_config(c)
    assert "\n" not in str(e.value)


BATCH_SCRIPT = r"""
import sys
sys.path.insert(0, "tests")
from test_train import load_config
from mtl_jax import train
c = load_config("penguins.py")
c.batch_size = 30
try:
    train.train_and_evaluate(c, sys.argv[1])
except train.ConfigError as e:
    print("ERROR", e)
c.batch_size, c.eval_batch_size = 32, 67
try:
    train.validate_config(c)
except train.ConfigError as e:
    print("ERROR", e)
"""


def test_batch_not_divisible_by_data_devices_fails_before_compiling(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", BATCH_SCRIPT, str(tmp_path / "w")],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = [x for x in proc.stdout.splitlines() if x.startswith("ERROR")]
    assert (
        "config.batch_size=30 must be divisible by the size of the mesh's data axis (4)"
        in (errors[0])
    )
    assert "config.eval_batch_size=67 must be divisible" in errors[1]
    assert not os.path.exists(tmp_path / "w"), "the workdir was created before validation"


def test_main_prints_config_error_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mtl_jax.main", "--config=experiments/penguins.py:smoke",
         "--config.optimizer=adamm", f"--workdir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "Bad config: Unknown config.optimizer='adamm'" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- atomic outputs -----------------------------------------------------------------------------


def test_write_json_atomic_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = str(tmp_path / "results.json")
    train.write_json_atomic(path, {"a": 1})

    def broken_dump(obj, f, **kw):
        f.write('{"a": 2, "partial')  # a writer dying mid-file
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", broken_dump)
    with pytest.raises(KeyboardInterrupt):
        train.write_json_atomic(path, {"a": 2})
    monkeypatch.undo()
    with open(path) as f:
        assert json.load(f) == {"a": 1}
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left behind
    train.write_json_atomic(path, {"a": 3})
    with open(path) as f:
        assert json.load(f) == {"a": 3}


@pytest.fixture(scope="module")
def rlw_run(tmp_path_factory):
    """One penguins smoke run with a random balancer (RLW): results and workdir."""
    w = str(tmp_path_factory.mktemp("rlw_run"))
    return train.train_and_evaluate(penguins_smoke(balancer="rlw"), w), w


def test_half_written_checkpoint_is_never_restored(rlw_run, tmp_path):
    w = str(tmp_path / "w")
    shutil.copytree(rlw_run[1], w)
    ckpt = os.path.join(w, "checkpoints")
    assert sorted(os.listdir(ckpt)) == ["4"]
    # A step killed mid-write: orbax's temporary directory, here with a truncated copy.
    tmp = os.path.join(ckpt, "6.orbax-checkpoint-tmp")
    shutil.copytree(os.path.join(ckpt, "4"), tmp)
    os.remove(os.path.join(tmp, "commit_success.txt"))  # written last, when committed
    for root, _, files in os.walk(tmp):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(os.path.getsize(f.name) // 2)
    step, leaves, meta = restore_state(w)
    assert step == 4 and meta["step"] == 4
    mngr = train._checkpoint_manager(w, penguins_smoke())
    assert mngr.latest_step() == 4 and mngr.all_steps() == [4]
    # The leftover is removed in the background, at the latest before the next save ends.
    train._save(mngr, {"step": jnp.int32(8), "x": jnp.ones(2)}, {"step": 8})
    mngr.close()
    assert os.listdir(ckpt) == ["8"]


# -- determinism --------------------------------------------------------------------------------


def test_same_config_and_seed_same_metrics(rlw_run, tmp_path):
    # RLW draws random task weights every step (a PRNG key in its state).
    a, wa = rlw_run
    b = train.train_and_evaluate(penguins_smoke(balancer="rlw"), str(tmp_path))
    assert a["history"] == b["history"]
    drop_time = lambda log: [{k: v for k, v in e.items() if k != "step_time_s"} for e in log]  # noqa: E731
    assert drop_time(a["train_log"]) == drop_time(b["train_log"])
    assert tree_equal(restore_state(wa)[1], restore_state(str(tmp_path))[1])


# -- kill -9 and resume (slow) ------------------------------------------------------------------


def _main_cmd(workdir):
    return [
        sys.executable, "-m", "mtl_jax.main", "--config=experiments/penguins.py:smoke",
        "--config.balancer=pcgrad", "--config.num_epochs=3", "--config.steps_per_epoch=8",
        "--config.checkpoint_every_steps=2", "--config.max_checkpoints_to_keep=2",
        "--config.log_every_steps=4", f"--workdir={workdir}",
    ]  # fmt: skip


def _finalized_steps(ckpt_dir):
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())


def _run_and_kill(workdir, mode, rng, env):
    """Starts the command and kills it (SIGKILL): at a random moment once training has
    checkpointed ('random'), or as soon as a checkpoint is being written ('during_save').
    Returns the finalized steps at the moment of the kill, or None if it finished first."""
    ckpt = os.path.join(workdir, "checkpoints")
    before = set(_finalized_steps(ckpt))
    proc = subprocess.Popen(
        _main_cmd(workdir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 600
    delay = rng.uniform(0.0, 1.5)
    triggered = None
    while proc.poll() is None and time.time() < deadline:
        names = os.listdir(ckpt) if os.path.isdir(ckpt) else []
        new_steps = set(_finalized_steps(ckpt)) - before
        # during_save: once this run has completed a checkpoint, kill while the next one is
        # being written (a complete one to resume from, a half-written one to ignore).
        if (
            mode == "during_save"
            and new_steps
            and any(
                "orbax-checkpoint-tmp" in n and int(n.split(".")[0]) > max(new_steps) for n in names
            )
        ):
            break
        if mode == "random" and new_steps:
            triggered = triggered or time.time()
            if time.time() - triggered >= delay:
                break
        time.sleep(0.002)
    if proc.poll() is not None:
        return None
    proc.kill()  # SIGKILL
    proc.wait()
    return _finalized_steps(ckpt)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["random", "during_save", "random"])
def test_kill_and_resume_equals_uninterrupted_run(tmp_path, mode):
    seed = int(os.environ.get("MTL_JAX_KILL_SEED", random.randrange(2**31)))
    rng = random.Random(seed)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ref = str(tmp_path / "ref")
    subprocess.run(_main_cmd(ref), cwd=ROOT, env=env, check=True, capture_output=True)
    work = str(tmp_path / "killed")
    kills = []
    for _ in range(3):  # up to three kills, then run to the end
        steps = _run_and_kill(work, mode, rng, env)
        if steps is None:
            break
        kills.append(steps[-1] if steps else 0)
    proc = subprocess.run(_main_cmd(work), cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert kills, f"the run finished before any kill (seed {seed})"
    resumed = f"Resumed from step {kills[-1]} " if kills[-1] else "Resumed from step"
    assert (resumed in proc.stderr) == bool(kills[-1]), (seed, kills, proc.stderr[-3000:])
    step_ref, leaves_ref, meta_ref = restore_state(ref)
    step, leaves, meta = restore_state(work)
    assert step == step_ref == 24
    assert tree_equal(leaves, leaves_ref), f"seed {seed}, kills after steps {kills}"
    with open(os.path.join(ref, "results.json")) as f:
        res_ref = json.load(f)
    with open(os.path.join(work, "results.json")) as f:
        res = json.load(f)
    assert res["history"] == res_ref["history"]
    print(f"kill/resume {mode}: seed {seed}, killed with checkpoints up to steps {kills}")
