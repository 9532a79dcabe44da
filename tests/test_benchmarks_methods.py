"""The balancer-cost benchmark (`benchmarks/methods.py`) on the NYUv2 SegNet (``--model segnet``).

A tiny SegNet (filters 4-8, 32x32 inputs) runs one full training step; methods undefined at
a K and the steady-state update are checked on small Jacobians. No timing asserts.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from benchmarks import common, methods

TINY = {"height": 32, "width": 32, "batch_size": 2, "filters": (4, 8, 8, 8, 8)}


def test_segnet_tasks_cycle_the_three_nyuv2_tasks():
    tasks = common.segnet_tasks(7)
    assert [t.name for t in tasks] == [
        "segmentation",
        "depth",
        "normal",
        "segmentation_1",
        "depth_1",
        "normal_1",
        "segmentation_2",
    ]
    assert [t.target_key for t in tasks] == ["segmentation", "depth", "normal"] * 2 + [
        "segmentation"
    ]
    assert [t.out_channels for t in tasks[:3]] == [13, 1, 3]


def test_segnet_full_step_tiny():
    k = 3
    setup = common.segnet_setup(k, **TINY)
    batch = setup.batch
    assert batch["image"].shape == (2, 32, 32, 3)
    assert batch["segmentation"].shape == (2, 32, 32) and batch["depth"].shape == (2, 32, 32, 1)
    assert -1 <= int(batch["segmentation"].min()) and int(batch["segmentation"].max()) < 13

    tx, step = methods.step_fn("mgda", k, setup.loss_fn)
    args = (setup.params, setup.model_state, tx.init(setup.params), batch)
    # The benchmark's program, compiled with XLA's cheap backend settings: about half the
    # compile time, the same results up to float rounding.
    compiled = step.lower(*args).compile(
        {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    )
    params, stats, _, losses = compiled(*args)
    seg, depth, normal = np.asarray(losses)
    # At initialization: near-uniform class scores, depth targets in [0.5, 10] against
    # predictions near 0, and random unit normals (1 - cosine about 1).
    assert 0.5 * math.log(13) < seg < 2 * math.log(13)
    assert 1.0 < depth < 10.0
    assert 0.5 < normal < 1.5
    for new, old in ((params, setup.params), (stats, setup.model_state)):
        new_leaves, old_leaves = jax.tree.leaves(new), jax.tree.leaves(old)
        assert all(np.all(np.isfinite(x)) for x in new_leaves)
        assert any(not np.allclose(a, b) for a, b in zip(new_leaves, old_leaves, strict=True))
    # Train mode: every BatchNorm's running statistics moved towards the batch's.
    means = [x for p, x in jax.tree.leaves_with_path(stats) if "mean" in jax.tree_util.keystr(p)]
    old_means = [
        x
        for p, x in jax.tree.leaves_with_path(setup.model_state)
        if "mean" in jax.tree_util.keystr(p)
    ]
    assert means and all(not np.allclose(a, b) for a, b in zip(means, old_means, strict=True))


def test_segnet_table_names_the_model():
    row = {
        "num_tasks": 3,
        "engine_step_ms": 30.0,
        "grad_step_ms": 20.0,
        "steps": {
            "mgda": {"ratio_to_engine_step": 1.05, "kspace_fraction_of_step": 0.001, "ms": 31.5}
        },
    }
    machine = {"backend": "cpu", "cpu_count": 2, "jax": "x", "date": "today"}
    results = {"machine": machine, "model": {"name": "segnet", **TINY}, "rows": [row]}
    table = methods.to_markdown(results)
    assert "NYUv2 hard-sharing SegNet (filters (4, 8, 8, 8, 8), 32x32 inputs, batch 2" in table
    assert "| mgda | 1.050x / 0.10% |" in table
    assert "| engine-only / jax.grad EW step | 1.50x |" in table
    assert "| jax.grad EW step | 20 ms |" in table
    del results["model"]  # earlier outputs: the CNN
    assert "Full training step of the benchmark CNN" in methods.to_markdown(results)


def test_methods_undefined_at_k_are_na_not_a_crash(monkeypatch):
    # Krum needs K >= 3: at K=2 it is left out of the row (shown as n/a), at K=3 it is timed.
    # The engine-only step (a CNN compile) is replaced by a fixed time; the updates are real.
    monkeypatch.setattr(
        methods, "full_steps", lambda names, k, repeats, setup: ({methods.ENGINE: 0.5}, {})
    )
    results = methods.run([2, 3], ["krum", "mgda"], repeats=1, steps=False)
    k2, k3 = results["rows"]
    assert set(k2["methods"]) == {"mgda"} and set(k3["methods"]) == {"krum", "mgda"}
    assert all(math.isfinite(r["ratio_to_sum_tasks"]) for r in k3["methods"].values())
    assert k2["steps"] == {} and k3["steps"] == {}
    table = methods.to_markdown(results)
    assert "| krum | n/a | " in table


def test_update_alone_is_timed_from_a_steady_state():
    # sparse_training chooses its mask at its first update and keeps it: the timed update must
    # apply the mask chosen on the advance Jacobian, not choose a new one from its input.
    k = 3
    jac = {"w": jax.random.normal(jax.random.key(0), (k, 100))}
    other = {"w": jax.random.normal(jax.random.key(1), (k, 100))}
    fn = methods.update_fn("sparse_training", k, np.linspace(1.0, 2.0, k), jac)
    scores = np.square(np.asarray(jac["w"]).sum(0))
    keep = scores >= np.median(scores)  # default sparsity 0.5: the top 50 columns
    out = np.asarray(fn(other)["w"])
    np.testing.assert_allclose(out, np.asarray(other["w"]).sum(0) * keep, rtol=1e-5, atol=1e-6)


def test_timed_update_threads_its_donated_state():
    # The timed update donates its state: repeated calls must thread it (a reused donated
    # buffer raises), and MoCo's tracked rows keep moving towards the input.
    k = 3
    jac = {"w": jax.random.normal(jax.random.key(0), (k, 100))}
    fn = methods.update_fn("moco", k, np.linspace(1.0, 2.0, k), jac)
    outs = [np.asarray(fn(jac)["w"]) for _ in range(3)]
    assert all(np.all(np.isfinite(o)) for o in outs)
    assert not np.allclose(outs[0], outs[2])
