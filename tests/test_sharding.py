"""Sharded training steps give the single-device result, on 8 simulated CPU devices.

The checks run in a subprocess (``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be
set before jax starts): for data-parallel 8x1, FSDP 8x1 and data x model 4x2 meshes, one train
step (``value_and_jacobian`` -> balancer -> ``sum_tasks`` -> sgd, jitted with explicit in/out
shardings and donated buffers) of each balancer gives the parameters of the unsharded step to
1e-5; a checkpoint saved under one mesh restores under another. Each (method, mesh) pair is one
compilation: the default run checks EW under all three meshes and every other method under one
of the two meshes that shard parameters (`DEFAULT_MESHES`); ``-m slow`` checks every pair.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

import mtl_jax as mtl

METHODS = ["sum_tasks", "mgda", "pcgrad", "upgrad", "nash_mtl", "uncertainty_weighting"]
MESHES = {
    "dp8": ({"data": 8}, False, ()),
    "fsdp8": ({"data": 8}, True, ()),
    "dp4_mp2": ({"data": 4, "model": 2}, False, ((r"dense.*\['w'\]", (None, "model")),)),
}
# The default run: EW under every mesh, each other method under FSDP 8x1 or data x model 4x2
# (alternating), so every method and every mesh runs sharded with 14 compilations instead of the
# 24 of the full matrix (the `slow` test `test_sharded_step_every_mesh`).
DEFAULT_MESHES = {
    "sum_tasks": ("dp8", "fsdp8", "dp4_mp2"),
    "mgda": ("dp4_mp2",),
    "pcgrad": ("fsdp8",),
    "upgrad": ("dp4_mp2",),
    "nash_mtl": ("fsdp8",),
    "uncertainty_weighting": ("dp4_mp2",),
}


def _run_checks(out_path: str, every_mesh: bool = False) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import orbax.checkpoint as ocp

    from benchmarks import common
    from mtl_jax import sharding

    assert jax.device_count() == 8, jax.devices()
    k = 3
    params0 = common.init_hps_cnn(jax.random.key(0), k, width=8, hidden=32)
    batch0 = common.make_batch(jax.random.key(1), k, batch_size=16)
    results = {}

    def make_tx(name):
        # Plain SGD: Adam's m / sqrt(v) would amplify float reduction-order differences on
        # near-zero gradient entries into O(lr) parameter differences.
        if name == "sum_tasks":
            return optax.chain(mtl.sum_tasks(), optax.sgd(0.1))
        balancer = mtl.build_chain([name], num_tasks=k)
        return optax.chain(balancer, mtl.sum_tasks(), optax.sgd(0.1))

    def make_step(tx):
        def step(params, opt_state, batch):
            losses, jac = mtl.value_and_jacobian(common.task_losses)(params, batch)
            updates, opt_state = tx.update(jac, opt_state, params, task_losses=losses)
            return optax.apply_updates(params, updates), opt_state

        return step

    for name in METHODS:
        if name != "sum_tasks" and name not in mtl.BALANCERS:
            results[name] = "not registered"
            continue
        tx = make_tx(name)
        step = make_step(tx)
        # Two steps, so that stateful methods use their state once.
        ref_p, ref_s = params0, tx.init(params0)
        for _ in range(2):
            ref_p, ref_s = jax.jit(step)(ref_p, ref_s, batch0)
        results[name] = {}
        for mesh_name in MESHES if every_mesh else DEFAULT_MESHES[name]:
            axes, fsdp, rules = MESHES[mesh_name]
            mesh = sharding.make_mesh(axes)
            fsdp_axis = "data" if fsdp else None
            p_sh = sharding.tree_shardings(params0, mesh, rules, fsdp_axis)
            opt_state0 = tx.init(params0)
            s_sh = sharding.tree_shardings(opt_state0, mesh, rules, fsdp_axis)
            b_sh = jax.tree.map(lambda _: sharding.batch_sharding(mesh), batch0)
            jstep = jax.jit(
                step,
                in_shardings=(p_sh, s_sh, b_sh),
                out_shardings=(p_sh, s_sh),
                donate_argnums=(0, 1),
            )
            # Host copies: donation must not delete the reference arrays.
            p = jax.device_put(jax.tree.map(jnp.copy, params0), p_sh)
            s = jax.device_put(jax.tree.map(jnp.copy, opt_state0), s_sh)
            b = jax.device_put(batch0, b_sh)
            for _ in range(2):
                p, s = jstep(p, s, b)
            err = max(
                float(np.max(np.abs(np.asarray(a) - np.asarray(r))))
                for a, r in zip(jax.tree.leaves(p), jax.tree.leaves(ref_p), strict=True)
            )
            scale = max(float(np.max(np.abs(np.asarray(r)))) for r in jax.tree.leaves(ref_p))
            sharded_leaves = sum(
                not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(p)
            )
            results[name][mesh_name] = {
                "max_abs_err": err,
                "scale": scale,
                "sharded_leaves": sharded_leaves,
            }

    # Checkpoint saved under FSDP 8x1, restored under data x model 4x2.
    mesh_a = sharding.make_mesh({"data": 8})
    mesh_b = sharding.make_mesh({"data": 4, "model": 2})
    p_a = jax.device_put(params0, sharding.tree_shardings(params0, mesh_a, (), "data"))
    rules_b = MESHES["dp4_mp2"][2]
    target_sh = sharding.tree_shardings(params0, mesh_b, rules_b)
    ckpt_dir = os.path.join(os.path.dirname(out_path), "ckpt")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(ckpt_dir, p_a)
    abstract = jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), params0, target_sh
    )
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(ckpt_dir, abstract)
    same = all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params0), strict=True)
    )
    specs = [str(leaf.sharding.spec) for leaf in jax.tree.leaves(restored)]
    results["checkpoint_cross_mesh"] = {"equal": same, "specs": specs}
    try:
        sharding.partition_spec("['w']", (3, 5), mesh_a, [(r"w", ("data",))])
        results["indivisible_error"] = None
    except ValueError as e:
        results["indivisible_error"] = str(e)
    with open(out_path, "w") as f:
        json.dump(results, f)


def _checks_in_subprocess(tmp_path_factory, *args: str) -> dict:
    out = tmp_path_factory.mktemp("sharding") / "results.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), str(out), *args],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def sharding_results(tmp_path_factory):
    return _checks_in_subprocess(tmp_path_factory)


def _check_sharded_step(res, method, meshes):
    if res == "not registered":
        pytest.skip(f"{method} is not registered in mtl.BALANCERS")
    assert sorted(res) == sorted(meshes), (method, sorted(res))
    for mesh_name, r in res.items():
        assert r["max_abs_err"] <= 1e-5 * max(1.0, r["scale"]), (method, mesh_name, r)
    # The meshes really shard something: FSDP splits every large parameter.
    if "fsdp8" in res:
        assert res["fsdp8"]["sharded_leaves"] >= 4
    if "dp4_mp2" in res:
        assert res["dp4_mp2"]["sharded_leaves"] >= 1
    if "dp8" in res:
        assert res["dp8"]["sharded_leaves"] == 0


@pytest.mark.parametrize("method", METHODS)
def test_sharded_step_equals_single_device(sharding_results, method):
    _check_sharded_step(sharding_results[method], method, DEFAULT_MESHES[method])


@pytest.fixture(scope="module")
def sharding_results_every_mesh(tmp_path_factory):
    return _checks_in_subprocess(tmp_path_factory, "all")


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_sharded_step_every_mesh(sharding_results_every_mesh, method):
    # The full method x mesh matrix; the default test above covers every method and every mesh.
    _check_sharded_step(sharding_results_every_mesh[method], method, MESHES)


def test_checkpoint_restores_under_another_mesh(sharding_results):
    r = sharding_results["checkpoint_cross_mesh"]
    assert r["equal"]
    assert any("model" in s for s in r["specs"])


def test_indivisible_rule_is_a_clear_error(sharding_results):
    msg = sharding_results["indivisible_error"]
    assert msg and "['w'] of shape (3, 5)" in msg and "not divisible" in msg


def test_mesh_errors():
    from mtl_jax import sharding

    with pytest.raises(ValueError, match="needs 64 devices but only"):
        sharding.make_mesh({"data": 64})
    with pytest.raises(ValueError, match="At most one mesh axis may be -1"):
        sharding.make_mesh({"data": -1, "model": -1})
    mesh = sharding.make_mesh({"data": -1})
    with pytest.raises(ValueError, match="names mesh axis 'x'; the mesh has"):
        sharding.partition_spec("['w']", (3, 5), sharding.make_mesh({"data": 1}), [(r"w", ("x",))])
    spec = sharding.partition_spec("['w']", (6, 4), mesh, (), fsdp_axis="data")
    assert spec in (
        sharding.P("data"),
        sharding.P(),
        sharding.P(None, "data"),
        sharding.P("data", None),
    )


# -- the harness (mtl_jax.train) under config.mesh / config.sharding_rules / config.fsdp ----------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Penguins MLP: trunk 3 -> 64 -> 64, heads 64 -> 32 -> {3, 2, 1}. The model axis splits the
# output features of the trunk and of the heads' hidden layers; FSDP then splits another
# dimension over the data axis where it divides.
MP_RULES = ((r"(trunk|hidden).*kernel", (None, "model")),)


def penguins_config(**overrides):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "penguins", os.path.join(ROOT, "experiments", "penguins.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("smoke")  # 2 epochs x 2 steps of batch 32
    # SGD with momentum (Adam would amplify reduction-order noise); a Jacobian-path balancer.
    c.optimizer, c.momentum, c.learning_rate = "sgd", 0.9, 0.05
    c.balancer = "mgda"
    c.eval_batch_size = 8
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def make_trainer(config):
    from mtl_jax import models, train
    from mtl_jax import tasks as tasks_lib

    tasks = tasks_lib.get_tasks(config.dataset)
    model_cfg = dict(config.model)
    name = model_cfg.pop("name")
    model = models.build_model(
        name, {t.name: t.out_channels for t in tasks}, seed=config.seed, **model_cfg
    )
    return train.Trainer(config, tasks, model, train.make_mesh(config), steps_per_epoch=2)


def restore_state(config, workdir):
    """The latest checkpoint in ``workdir``, restored into ``config``'s mesh and shardings."""
    from mtl_jax import train

    trainer = make_trainer(config)
    mngr = train._checkpoint_manager(workdir, config)
    state, meta = train._restore(mngr, trainer.init_state())
    mngr.close()
    assert meta is not None, f"no checkpoint in {workdir}"
    return state


def _run_harness_checks(out_path: str) -> None:
    import jax
    import numpy as np

    from mtl_jax import train

    assert jax.device_count() == 8, jax.devices()
    tmp = os.path.dirname(out_path)
    one = dict(num_devices=1)
    mesh42 = dict(mesh=(("data", 4), ("model", 2)), sharding_rules=MP_RULES, fsdp=True)
    dp8 = dict(mesh=(("data", 8),))
    runs = {
        "1 device": [one],
        "4x2 FSDP": [mesh42],
        # 2 steps under 4x2 + FSDP, then resumed from its checkpoint under data-parallel 8x1.
        "4x2 FSDP -> 8x1": [dict(mesh42, num_train_steps=2), dp8],
    }
    results = {}
    params = {}
    for name, phases in runs.items():
        workdir = os.path.join(tmp, name.replace(" ", "_").replace(">", ""))
        for overrides in phases:
            res = train.train_and_evaluate(penguins_config(**overrides), workdir)
        # Restored under a single device, whatever mesh saved it.
        state = restore_state(penguins_config(**one), workdir)
        params[name] = [np.asarray(x) for x in jax.tree.leaves(state["params"])]
        results[name] = {"steps": res["steps"], "final": res["final"]}
    for name in runs:
        results[name]["max_abs_err"] = max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(params[name], params["1 device"], strict=True)
        )
    trainer = make_trainer(penguins_config(**mesh42))
    specs = {
        jax.tree_util.keystr(path): str(sh.spec)
        for path, sh in jax.tree_util.tree_leaves_with_path(trainer.state_shardings["params"])
    }
    opt_specs = [str(sh.spec) for sh in jax.tree.leaves(trainer.state_shardings["opt"])]
    # The checkpoint of the single-device run restored into the 4x2 FSDP layout.
    state = restore_state(penguins_config(**mesh42), os.path.join(tmp, "1_device"))
    restored_specs = {
        jax.tree_util.keystr(path): str(x.sharding.spec)
        for path, x in jax.tree_util.tree_leaves_with_path(state["params"])
    }
    same = all(
        np.array_equal(np.asarray(a), b)
        for a, b in zip(jax.tree.leaves(state["params"]), params["1 device"], strict=True)
    )
    results["layout"] = {
        "param_specs": specs,
        "opt_specs": opt_specs,
        "restored_specs": restored_specs,
        "restored_equal": same,
    }
    with open(out_path, "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def harness_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("harness") / "results.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), str(out), "harness"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


@pytest.mark.slow
def test_harness_on_4x2_mesh_with_fsdp_matches_one_device(harness_results):
    r = harness_results
    for name in ("4x2 FSDP", "4x2 FSDP -> 8x1"):
        assert r[name]["steps"] == r["1 device"]["steps"] == 4, r
        assert r[name]["max_abs_err"] <= 1e-5, (name, r[name])
        for key, value in r["1 device"]["final"].items():
            assert r[name]["final"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    specs = r["layout"]["param_specs"]
    # Rules + FSDP: the model axis where the rule says, the data axis on another dimension.
    assert specs["['trunk'][1]['kernel'].value"] == "P('data', 'model')", specs
    assert specs["['trunk'][0]['kernel'].value"] == "P(None, 'model')", specs
    assert "model" not in specs["['heads']['sex']['out']['kernel'].value"], specs
    # The momentum buffers mirror their parameters.
    extra = Counter(r["layout"]["opt_specs"])
    extra.subtract(specs.values())  # one momentum buffer per parameter, same spec
    assert {s: n for s, n in extra.items() if n} == {"P()": 1}, r["layout"]  # + a step count
    # A 1-device checkpoint restores into the 4x2 FSDP layout, values unchanged.
    assert r["layout"]["restored_equal"]
    assert r["layout"]["restored_specs"] == specs


def test_harness_mesh_config_and_layout_on_one_device():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mtl_jax import sharding, train

    c = penguins_config(mesh=(("data", 1), ("model", 1)), sharding_rules=MP_RULES, fsdp=True)
    trainer = make_trainer(c)
    assert dict(trainer.mesh.shape) == {"data": 1, "model": 1}
    by_path = {
        jax.tree_util.keystr(p): sh.spec
        for p, sh in jax.tree_util.tree_leaves_with_path(trainer.state_shardings["params"])
    }
    assert by_path["['trunk'][1]['kernel'].value"] == sharding.P(None, "model")
    # Optimizer state mirrors its parameter (path suffix + shape), counters replicated.
    opt = {
        jax.tree_util.keystr(p): sh.spec
        for p, sh in jax.tree_util.tree_leaves_with_path(trainer.state_shardings["opt"])
    }
    assert opt["[0][0].trace['trunk'][1]['kernel'].value"] == sharding.P(None, "model"), opt
    state = trainer.init_state()
    from mtl_jax import data as data_lib

    loader = data_lib.make_loader("penguins", "", "train", batch_size=4, seed=0, train=True)
    batch = next(iter(loader))
    state, out = trainer.train_step(state, trainer.shard_batch(batch), jnp.int32(0))
    assert int(state["step"]) == 1 and np.all(np.isfinite(out["losses"]))
    (kernel,) = jax.tree.leaves(state["params"]["trunk"][1]["kernel"])
    assert kernel.sharding.spec == sharding.P(None, "model")
    # Config errors name the problem.
    with pytest.raises(ValueError, match="no 'data' axis"):
        train.make_mesh(penguins_config(mesh=(("model", 1),)))
    with pytest.raises(ValueError, match="needs 64 devices"):
        train.make_mesh(penguins_config(mesh=(("data", 64),)))
    with pytest.raises(ValueError, match="expected \\(regex, spec\\)"):
        train.sharding_rules(penguins_config(sharding_rules=(("kernel",),)))
    # A mapping works too (and the default is 1-D data parallel over all devices).
    import ml_collections

    mesh = train.make_mesh(ml_collections.ConfigDict({"mesh": {"data": -1}}))
    assert mesh.axis_names == ("data",)


def test_mirror_shardings_follow_parameters():
    import jax.numpy as jnp
    import optax

    from mtl_jax import sharding

    mesh = sharding.make_mesh({"data": 1, "model": 1})
    params = {"enc": {"w": jnp.zeros((4, 6))}, "w": jnp.zeros((4, 6))}
    rules = [(r"\['enc'\]\['w'\]", (None, "model"))]
    p_sh = sharding.tree_shardings(params, mesh, rules)
    state = {
        "adam": optax.adam(1e-3).init(params),
        "jac_momentum": {"enc": {"w": jnp.zeros((3, 4, 6))}},
        "weights": jnp.zeros((3,)),
    }
    sh = sharding.mirror_shardings(state, params, p_sh, mesh)
    assert sh["adam"][0].mu["enc"]["w"].spec == sharding.P(None, "model")
    assert sh["adam"][0].mu["w"].spec == sharding.P()  # the longest matching path wins
    assert sh["adam"][0].count.spec == sharding.P()
    assert sh["jac_momentum"]["enc"]["w"].spec == sharding.P(None, None, "model")
    assert sh["weights"].spec == sharding.P()


if __name__ == "__main__":
    if sys.argv[2:] == ["harness"]:
        _run_harness_checks(sys.argv[1])
    else:
        _run_checks(sys.argv[1], every_mesh=sys.argv[2:] == ["all"])
