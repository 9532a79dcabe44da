"""Tests of the comparison runner (mtl_jax/compare.py) and its plots (mtl_jax/plots.py).

Default tests: aggregation, table and plots on fabricated results dicts (no training). `slow`:
the ``python -m mtl_jax.compare`` command end to end on the MultiDigits smoke config (two
methods, two seeds, a three-point preference sweep), then rerun to check that it resumes.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from mtl_jax import compare, plots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIB = {"a/accuracy": True, "b/err": False}


def load_config(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments", name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def fake_results(acc: float, err: float, step_time: float = 0.1, cos: float | None = 0.2):
    """A results.json-like dict: two evaluations and a three-window training log."""
    log = []
    for step, t in ((1, 50.0), (10, step_time), (20, step_time)):  # first window: compile
        entry = {"step": step, "step_time_s": t, "losses": [1.0, 2.0], "weights": [0.4, 0.6]}
        if cos is not None:
            entry["cos"] = [[1.0, cos], [cos, 1.0]]
        log.append(entry)
    final = {"a/accuracy": acc, "b/err": err}
    history = [
        {"epoch": 1, "step": 10, "a/accuracy": acc / 2, "b/err": 2 * err},
        {"epoch": 2, "step": 20, **final},
    ]
    return {"final": final, "average": final, "history": history, "train_log": log}


def test_parse_methods():
    import mtl_jax as mtl

    names = compare.parse_methods("all")
    assert names == ["ew", *(m for m in mtl.BALANCERS if m != "scalarize")] and len(names) > 30
    assert compare.parse_methods("ew, mgda,ew") == ["ew", "mgda"]
    with pytest.raises(ValueError, match="nope"):
        compare.parse_methods("ew,nope")


def test_preference_helpers_and_run_config():
    assert compare.preference_balancer([1.0, 0.0]) == "scalarize(weights=(1, 0,))"
    assert compare.preference_label([0.5, 0.5]) == "scalarize_0p5_0p5"
    w = compare.sweep_weights(3)
    assert w == [(1.0, 0.0), (0.5, 0.5), (0.0, 1.0)]
    from mtl_jax import train

    base = load_config("multidigits.py", "smoke")
    c = compare.run_config(base, compare.preference_balancer([1.0, 0.0]), seed=3)
    assert c.seed == 3 and base.seed == 0 and c.baseline == ()
    assert train.parse_balancer(c.balancer) == [{"name": "scalarize", "weights": (1, 0)}]
    assert compare.run_config(base, "ew", 0).balancer == ""


def test_run_or_load_loads_skips_locked_and_untrained_runs(tmp_path):
    done, locked, empty = (str(tmp_path / n) for n in ("done", "locked", "empty"))
    os.makedirs(done)
    with open(os.path.join(done, "results.json"), "w") as f:
        json.dump(fake_results(0.5, 1.0), f)
    assert compare.run_or_load(None, done)["final"]["a/accuracy"] == 0.5
    os.makedirs(locked)
    open(os.path.join(locked, "RUNNING"), "w").close()  # another process is training it
    assert compare.run_or_load(None, locked) is None
    assert compare.run_or_load(None, empty, train=False) is None
    assert not os.path.exists(empty)


def test_run_step_time_skips_the_compile_window():
    assert compare.run_step_time(fake_results(0.9, 1.0, step_time=0.3)) == pytest.approx(0.3)
    assert math.isnan(compare.run_step_time({"train_log": []}))


def test_summarize_delta_m_sorting_and_ew_comparison():
    stl = {"a": [fake_results(0.8, 9.0), fake_results(0.9, 9.0)], "b": [fake_results(0.1, 2.0)]}
    baseline = compare.single_task_baseline(stl, ["a/accuracy", "b/err"])
    assert baseline == {"a/accuracy": pytest.approx(0.85), "b/err": 2.0}
    runs = {
        "ew": [fake_results(0.85, 2.2, 0.1), fake_results(0.85, 2.2, 0.1)],
        "good": [fake_results(0.935, 2.0, 0.2), fake_results(0.935, 2.0, 0.2)],  # -5 %
        "bad": [fake_results(0.765, 2.4, 0.3), fake_results(0.85, 2.4, 0.3)],
    }
    rows = compare.summarize(runs, baseline, HIB, {"broken": ["seed 0: FloatingPointError"]})
    assert [r["method"] for r in rows] == ["good", "ew", "bad", "broken"]
    by = {r["method"]: r for r in rows}
    # delta_m = 100/2 * (-(acc - 0.85)/0.85 + (err - 2)/2)
    assert by["ew"]["delta_m"][0] == pytest.approx(5.0)
    assert by["good"]["delta_m"] == (pytest.approx(-5.0), pytest.approx(0.0))
    bad = [50 * (-(a - 0.85) / 0.85 + 0.2) for a in (0.765, 0.85)]
    assert by["bad"]["delta_m"][0] == pytest.approx(np.mean(bad))
    assert by["bad"]["delta_m"][1] == pytest.approx(np.std(bad, ddof=1))
    assert by["bad"]["metrics"]["a/accuracy"][0] == pytest.approx(0.8075)
    assert by["good"]["step_time_vs_ew"] == pytest.approx(2.0)
    assert by["good"]["vs_ew"] == "beats ew"
    assert by["bad"]["vs_ew"] == "loses to ew"  # 10 % worse; std 3.5
    assert by["ew"]["vs_ew"] == "" and by["broken"]["seeds"] == 0
    table = compare.format_table(rows, baseline, HIB)
    lines = table.splitlines()
    assert lines[0].startswith("| # | method | a/accuracy ↑ | b/err ↓ | Δm % ↓")
    assert "| single-task | 0.850 | 2.000 | 0 (reference) |" in lines[2]
    assert lines[3].startswith("| 1 | good | 0.935 ± 0.000 | 2.000 ± 0.000 | -5.00 ± 0.00 | 2.00 |")
    assert "| 2 | **ew** |" in lines[4] and "loses to ew" in lines[5]
    assert "failed: seed 0: FloatingPointError" in lines[6]
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_within_noise_is_flagged():
    baseline = {"a/accuracy": 1.0, "b/err": 1.0}
    runs = {
        "ew": [fake_results(0.9, 1.0), fake_results(0.7, 1.0)],  # delta_m 5 and 15
        "m": [fake_results(0.79, 1.0), fake_results(0.79, 1.0)],  # 10.5: worse, within noise
    }
    rows = {r["method"]: r for r in compare.summarize(runs, baseline, HIB)}
    assert rows["m"]["vs_ew"] == "loses to ew (within noise)"
    # One seed: no std; the noise test uses ew's alone.
    runs["one"] = [fake_results(0.85, 1.0)]  # delta_m 7.5
    rows = {r["method"]: r for r in compare.summarize(runs, baseline, HIB)}
    assert math.isnan(rows["one"]["delta_m"][1])
    assert rows["one"]["vs_ew"] == "beats ew (within noise)"  # 7.5 vs 10 +- 7.1
    table = compare.format_table(list(rows.values()), baseline, HIB)
    assert "| one | 0.850 | 1.000 | 7.50 |" in table


def test_plots_are_written(tmp_path):
    # A fabricated comparison directory: runs on disk, comparison.json as the runner writes it.
    groups = {
        "single-task:a": (0.9, 3.0, 0.1),
        "single-task:b": (0.1, 1.0, -0.3),
        "ew": (0.85, 1.2, None),
        "mgda": (0.8, 1.1, 0.05),
        "pareto:0.5": (0.87, 1.3, 0.2),
    }
    run_dirs = {}
    for group, (acc, err, cos) in groups.items():
        rel = os.path.join(group.replace(":", "_"), "seed_0")
        os.makedirs(tmp_path / rel)
        (tmp_path / rel / "results.json").write_text(json.dumps(fake_results(acc, err, cos=cos)))
        run_dirs[group] = {"0": rel}
    comparison = {
        "dataset": "fake",
        "tasks": ["a", "b"],
        "methods": ["ew", "mgda"],
        "metric_keys": ["a/accuracy", "b/err"],
        "higher_is_better": HIB,
        "run_dirs": run_dirs,
        "pareto": [
            {"weights": [1.0, 0.0], "average": {"a/accuracy": 0.9, "b/err": 3.0}},
            {"weights": [0.5, 0.5], "average": {"a/accuracy": 0.87, "b/err": 1.3}},
            {"weights": [0.0, 1.0], "average": {"a/accuracy": 0.1, "b/err": 1.0}},
        ],
    }
    made = plots.write_all(str(tmp_path), comparison)
    assert set(made) == {"weights", "conflict", "curves", "pareto"}
    for path in made.values():
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert 5_000 < os.path.getsize(path) < 200_000
    # conflict rows: the Jacobian-path runs only (ew took the loss-only path: no cosines).
    assert plots.mean_cosines(fake_results(0.1, 1.0, cos=None)) is None
    assert plots.mean_cosines(fake_results(0.1, 1.0, cos=0.25))[0, 1] == pytest.approx(0.25)
    from tensorboard.backend.event_processing import event_accumulator

    ea = event_accumulator.EventAccumulator(str(tmp_path / "plots"))
    ea.Reload()
    assert set(ea.Tags()["images"]) == {f"comparison/{k}" for k in made}


@pytest.mark.slow
def test_compare_command_end_to_end_and_resume(tmp_path):
    work = str(tmp_path / "cmp")
    cmd = [
        sys.executable, "-m", "mtl_jax.compare", "--config=experiments/multidigits.py:smoke",
        "--methods=ew,mgda", "--seeds=2", "--pareto_points=3", f"--workdir={work}",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-5000:]
    with open(os.path.join(work, "comparison.json")) as f:
        out = json.load(f)
    assert [r["method"] for r in out["rows"]] and {r["method"] for r in out["rows"]} == {
        "ew",
        "mgda",
    }
    for row in out["rows"]:
        assert row["seeds"] == 2 and np.isfinite(row["delta_m"][0]) and not row["failed"]
        assert row["step_time_s"] > 0
    assert set(out["baseline"]) == {"left/accuracy", "right/accuracy"}
    assert [p["weights"] for p in out["pareto"]] == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    # The ends of the sweep are the seed-0 single-task runs (same directory, not retrained).
    assert out["run_dirs"]["pareto:1"]["0"] == out["run_dirs"]["single-task:left"]["0"]
    table = open(os.path.join(work, "comparison.md")).read()
    assert "| single-task |" in table and "| mgda |" in table
    assert set(out["plots"]) == {"weights", "conflict", "curves", "pareto"}
    # 4 single-task + 4 method runs + 1 sweep midpoint = 9 runs, each trained once.
    walls = [dp for dp, _, files in os.walk(work) if "wall_seconds.txt" in files]
    assert len(walls) == 9
    # Rerun: everything is loaded, nothing retrained; same numbers.
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "train.py" not in proc.stderr  # the harness logged nothing: no run was trained
    with open(os.path.join(work, "comparison.json")) as f:
        again = json.load(f)
    assert again["rows"] == out["rows"]


def test_krum_is_not_applicable_to_two_tasks_and_gets_an_na_row():
    # Krum (n_byzantine=0, as the runner builds it) needs K >= 3, as TorchJD checks.
    reason = compare.method_not_applicable("krum", 2)
    assert reason is not None and reason.startswith("needs K >= 3, this problem has K = 2")
    assert compare.method_not_applicable("krum", 3) is None
    assert compare.method_not_applicable("mgda", 2) is None
    import mtl_jax as mtl

    with pytest.raises(ValueError, match="K >= n_byzantine \\+ 3"):  # what a run would hit
        mtl.krum_weights(np.eye(2, dtype=np.float32), n_byzantine=0)
    baseline = {"a/accuracy": 1.0, "b/err": 1.0}
    runs = {"ew": [fake_results(0.9, 1.0), fake_results(0.7, 1.0)]}
    rows = compare.summarize(runs, baseline, HIB, {}, {"krum": reason})
    assert [r["method"] for r in rows] == ["ew", "krum"]
    assert rows[1]["not_applicable"] == reason and rows[1]["seeds"] == 0
    line = compare.format_table(rows, baseline, HIB).splitlines()[-1]
    assert line.startswith("| 2 | krum | n/a: needs K >= 3, this problem has K = 2 (")
    assert "failed" not in line


def test_method_balancer_derives_arguments_from_the_task_specs():
    from mtl_jax import train

    penguins = load_config("penguins.py", "smoke")
    spec = compare.method_balancer("log_class_scaling", penguins, 3)
    # species 3 classes, sex 2, body mass a regression (unscaled).
    assert train.parse_balancer(spec) == [
        {"name": "log_class_scaling", "num_classes": (3, 2, None)}
    ]
    digits = load_config("multidigits.py", "smoke")
    assert compare.method_balancer("log_class_scaling", digits, 2).endswith("=(10, 10,))")
    with pytest.raises(ValueError, match="single-task baselines"):
        compare.method_balancer("adaptive_task_balancing", penguins, 3)
    stats = {"out_contributions": (0.5, 1), "in_contributions": (1, 0.25), "difficulties": (0.9, 0)}
    spec = compare.method_balancer("adaptive_task_balancing", digits, 2, statistics=stats)
    [parsed] = train.parse_balancer(spec)
    assert parsed == {"name": "adaptive_task_balancing", **{k: tuple(v) for k, v in stats.items()}}
    train.validate_config(compare.run_config(digits, spec, 0))  # builds with these arguments


def test_visatb_statistics_from_single_task_runs():
    hib = {"a/accuracy": True, "b/mae": False}

    def res(acc, mae, rmse):
        return {"average": {"a/accuracy": acc, "b/mae": mae, "b/rmse": rmse}}

    # Run of task a (trunk learns a): a 0.9, b's error 4 (vs 2 from its own trunk).
    stl = {"a": [res(0.9, 4.0, 0.9), res(0.9, 4.0, 0.9)], "b": [res(0.6, 2.0, 0.5)]}
    st = compare.visatb_statistics(stl, ["a/accuracy", "b/mae"], hib)
    # R[a, b] = 2 / 4 (error: own / other), R[b, a] = 0.6 / 0.9.
    np.testing.assert_allclose(st["out_contributions"], [0.5, 0.6 / 0.9])
    np.testing.assert_allclose(st["in_contributions"], [0.6 / 0.9, 0.5])
    # Difficulty scores: a's accuracy; b's R^2 of the standardized target, 1 - 0.5^2.
    np.testing.assert_allclose(st["difficulties"], [0.9, 0.75])
    w = compare.method_balancer("adaptive_task_balancing", None, 2, statistics=st)
    assert w.startswith("adaptive_task_balancing(out_contributions=(0.5, 0.666667,)")
    with pytest.raises(ValueError, match="no single-task runs"):
        compare.visatb_statistics({"a": stl["a"]}, ["a/accuracy", "b/mae"], hib)
    with pytest.raises(ValueError, match="no score in \\[0, 1\\]"):
        compare.visatb_statistics(
            {"a": stl["a"], "b": [{"average": {"a/accuracy": 0.6, "b/mae": 2.0}}]},  # no rmse
            ["a/accuracy", "b/mae"],
            hib,
        )
