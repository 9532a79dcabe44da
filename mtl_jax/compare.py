r"""Comparison runner: single-task baselines, then every balancer for every seed, one table.

::

  python -m mtl_jax.compare --config=experiments/penguins.py --methods=all --seeds=3 \
      --workdir=/tmp/cmp_penguins
  python -m mtl_jax.compare --config=experiments/multidigits.py --methods=ew,mgda,pcgrad \
      --seeds=2 --workdir=/tmp/cmp_multidigits --config.num_epochs=5

Runs, sequentially and in-process (`mtl_jax.train.train_and_evaluate`), each in its own
directory under ``--workdir``:

1. **Single-task baselines**, one per task and seed: the same config and model with the
   balancer ``scalarize(weights=e_k)`` (one-hot on task k). The harness applies the balancer to
   the shared parameters only, so the shared trunk sees task k's loss alone; task k's head is
   trained on its loss as usual (the other heads also train, on a trunk they cannot influence,
   and are ignored). Baseline value of a metric of task k = its mean over the seeds of run k.
2. For two-task problems, a **preference sweep** ``scalarize(weights=(a, 1 - a))`` for
   ``--pareto_points`` values of ``a`` (first seed; the ends are the single-task runs).
3. **Each method for each seed** (seed-major: all methods of the first seed, then the next).
   ``ew`` is equal weighting (the plain sum of the losses, one backward pass).

A run whose ``results.json`` exists is loaded instead of trained, so an interrupted comparison
resumes where it stopped (an interrupted run resumes from its own checkpoint). A run that
raises is recorded as failed and the comparison goes on. Several processes started with the
same command share the work (a run being trained holds ``RUNNING`` in its directory; the
others skip it, and only a process that found nothing in progress writes the table: rerun the
command at the end). ``--notrain`` tabulates whatever has finished.

Outputs in ``--workdir``: ``comparison.md`` (per-task metrics mean +- std over seeds, delta_m %
against the single-task baselines -- `mtl_jax.metrics.delta_m`, lower is better -- seconds
per step relative to ``ew``, sorted by delta_m, with whether each method beats or loses to
``ew``), ``comparison.json`` (the same numbers and the run directories) and the plots of
`mtl_jax.plots` (PNG files in ``plots/`` and TensorBoard images).

Step time of a run: the median over its training-log windows (`train_log` in results.json,
evaluation excluded) of seconds per step, the first window (with compilation) left out.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

# Metrics entering delta_m (one per task, the ones the task is judged by). Datasets not listed
# use the keys of `mtl_jax.metrics.BASELINES` (the papers' NYUv2 / Cityscapes metrics).
DELTA_M_METRICS: dict[str, tuple[str, ...]] = {
    "multidigits": ("left/accuracy", "right/accuracy"),
    "penguins": ("species/accuracy", "sex/accuracy", "body_mass/mae_g"),
}

EW = "ew"
SINGLE_TASK = "single-task"


# ----------------------------------------------------------------------------------------------
# Run specifications
# ----------------------------------------------------------------------------------------------


def parse_methods(spec: str | Sequence[str]) -> list[str]:
    """Method names from ``'all'`` or a comma-separated list.

    ``'all'`` is ``ew`` and every name in `mtl_jax.BALANCERS` except ``scalarize`` (a fixed
    weighting that needs its weight vector; the runner uses it for the single-task baselines
    and the preference sweep).

    Raises:
      ValueError: an unknown name (listing the valid ones) or an empty list.
    """
    import mtl_jax as mtl

    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return [EW, *(m for m in mtl.BALANCERS if m != "scalarize")]
    valid = (EW, *mtl.BALANCERS)
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise ValueError(
            f"--methods: unknown or missing method names {unknown}; valid: 'all' or a "
            f"comma-separated list of {', '.join(valid)}."
        )
    return list(dict.fromkeys(names))


# Methods that are undefined below some number of tasks, with the arguments the runner gives
# them: name -> (minimum K, why).
MIN_TASKS: dict[str, tuple[int, str]] = {
    # Krum scores each task gradient by its distances to its K - n_byzantine - 2 nearest
    # others: K >= n_byzantine + 3 (TorchJD's check; the paper's 2f + 2 < n with f = 0).
    "krum": (3, "Krum with n_byzantine=0 needs K >= n_byzantine + 3, as in TorchJD"),
}


def method_not_applicable(method: str, num_tasks: int) -> str | None:
    """Why ``method`` cannot run on a ``num_tasks``-task problem (None when it can).

    Checked before anything is trained, so that the runner reports such a method as
    ``n/a: needs K >= ...`` instead of a failed run (`MIN_TASKS`).
    """
    if method in MIN_TASKS and num_tasks < MIN_TASKS[method][0]:
        k_min, why = MIN_TASKS[method]
        return f"needs K >= {k_min}, this problem has K = {num_tasks} ({why})"
    return None


def _unit_score(task: str, key: str, average: Mapping[str, float], higher: bool) -> float:
    """A task's validation score in [0, 1] (low = hard) for VisATB's difficulty term: its
    delta_m metric when that is a score in [0, 1] (accuracy, mIoU), else the R^2 of a
    standardized regression target (``1 - rmse^2``, clipped at 0)."""
    value = float(average[key])
    if higher and 0.0 <= value <= 1.0:
        return value
    rmse = average.get(f"{task}/rmse")
    if rmse is not None:
        return float(max(0.0, 1.0 - float(rmse) ** 2))
    raise ValueError(
        f"adaptive_task_balancing: no score in [0, 1] for task {task!r} (metric {key!r}); pass "
        "its statistics in --config.balancer instead."
    )


def visatb_statistics(
    single_task: Mapping[str, Sequence[Mapping[str, Any]]],
    metric_keys: Sequence[str],
    higher_is_better: Mapping[str, bool],
) -> dict[str, tuple[float, ...]]:
    """VisATB's stage-one statistics from the single-task baseline runs.

    The single-task run of task i trains the shared trunk on task i alone while every head
    trains on that trunk, so its test metric on task j measures what learning task i gives
    task j. With ``S[i, j]`` that metric (mean over seeds; ``metric_keys`` gives one metric per
    task, in task order) and ``R[i, j] = S[i, j] / S[j, j]`` (``S[j, j] / S[i, j]`` for a
    lower-is-better metric), the fraction of task j's single-task performance reached from
    task i's trunk:

    * ``out_contributions[i]`` = mean over j != i of ``R[i, j]`` (given),
    * ``in_contributions[j]`` = mean over i != j of ``R[i, j]`` (received),
    * ``difficulties[k]`` = task k's single-task score in [0, 1] (`_unit_score`).

    VisATB measures these with per-task fine-tuned models and validation sets; this is the
    same measurement on the runner's baselines (ours, not the authors' protocol).

    Args:
      single_task: task name -> results of its single-task runs (one per seed).
      metric_keys: one ``'<task>/<metric>'`` per task, in task order.
      higher_is_better: direction of each metric.

    Returns:
      ``{'out_contributions': ..., 'in_contributions': ..., 'difficulties': ...}``, [K] each.
    """
    tasks = [key.rpartition("/")[0] for key in metric_keys]
    k = len(tasks)
    if k < 2:
        raise ValueError("adaptive_task_balancing: needs at least two tasks.")
    missing = [t for t in tasks if not single_task.get(t)]
    if missing:
        raise ValueError(f"adaptive_task_balancing: no single-task runs of tasks {missing}.")

    def mean(task: str, key: str) -> float:
        return float(np.mean([r["average"][key] for r in single_task[task]]))

    s = np.array([[mean(ti, kj) for kj in metric_keys] for ti in tasks])
    own = np.diag(s)
    hib = np.array([higher_is_better[key] for key in metric_keys])
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(hib[None, :], s / own[None, :], own[None, :] / s)
    r = np.nan_to_num(r, nan=0.0, posinf=0.0)
    off = ~np.eye(k, dtype=bool)
    out_c = [float(np.mean(r[i][off[i]])) for i in range(k)]
    in_c = [float(np.mean(r[:, j][off[:, j]])) for j in range(k)]
    diff = []
    for t, key in zip(tasks, metric_keys, strict=True):
        avg = {kk: float(np.mean([run["average"][kk] for run in single_task[t]])) for kk in
               single_task[t][0]["average"]}  # fmt: skip
        diff.append(_unit_score(t, key, avg, bool(higher_is_better[key])))
    return {
        "out_contributions": tuple(out_c),
        "in_contributions": tuple(in_c),
        "difficulties": tuple(diff),
    }


def _literal(values: Sequence[Any]) -> str:
    return "(" + ", ".join("None" if v is None else f"{v:.6g}" for v in values) + ",)"


def method_balancer(
    method: str,
    config: ml_collections.ConfigDict,
    num_tasks: int,
    *,
    statistics: Mapping[str, Sequence[float]] | None = None,
) -> str:
    """``config.balancer`` of ``method``, with the arguments the methods without a usable
    default need, derived from the problem:

    * Krum ``n_byzantine=0``; trimmed mean ``trim_number=1`` (0 for two tasks);
    * IGB ``steps_per_epoch`` of the run;
    * log-class scaling ``num_classes`` from the dataset's task specs
      (`mtl_jax.tasks.Task.num_classes`; None, i.e. unscaled, for regression tasks);
    * adaptive task balancing (VisATB) the contributions and difficulties measured on the
      single-task baselines (``statistics``: `visatb_statistics`).

    (``task_schedule`` keeps its default schedule.)

    Raises:
      ValueError: adaptive_task_balancing without ``statistics``.
    """
    if method == EW:
        return EW
    if method == "krum":
        return "krum(n_byzantine=0)"
    if method == "trimmed_mean":
        return f"trimmed_mean(trim_number={1 if num_tasks >= 3 else 0})"
    if method == "igb":
        from mtl_jax import data as data_lib

        info = data_lib.dataset_info(config.dataset)
        steps = info.splits[info.train_split] // config.batch_size
        if config.get("steps_per_epoch", -1) not in (-1, None):
            steps = min(steps, config.steps_per_epoch)
        return f"igb(steps_per_epoch={max(int(steps), 1)})"
    if method == "log_class_scaling":
        from mtl_jax import tasks as tasks_lib

        classes = [t.num_classes for t in tasks_lib.get_tasks(config.dataset)]
        return "log_class_scaling(num_classes=(" + ", ".join(map(str, classes)) + ",))"
    if method == "adaptive_task_balancing":
        if statistics is None:
            raise ValueError(
                "adaptive_task_balancing: its contributions and difficulties come from the "
                "single-task baselines, which are not all finished."
            )
        return (
            "adaptive_task_balancing("
            + ", ".join(
                f"{name}={_literal(statistics[name])}"
                for name in ("out_contributions", "in_contributions", "difficulties")
            )
            + ")"
        )
    return method


def preference_balancer(weights: Sequence[float]) -> str:
    """``config.balancer`` string of the fixed scalarization with ``weights``."""
    return "scalarize(weights=(" + ", ".join(f"{float(w):.6g}" for w in weights) + ",))"


def preference_label(weights: Sequence[float]) -> str:
    """Directory-safe label of a preference vector, e.g. ``scalarize_1_0``."""
    return "scalarize_" + "_".join(f"{float(w):.4g}".replace(".", "p") for w in weights)


def sweep_weights(num_points: int) -> list[tuple[float, float]]:
    """``num_points`` two-task preference vectors ``(a, 1 - a)``, ``a`` from 1 down to 0."""
    if num_points < 2:
        raise ValueError(f"A preference sweep needs at least 2 points, got {num_points}.")
    return [(float(a), float(1.0 - a)) for a in np.linspace(1.0, 0.0, num_points)]


def run_config(
    base: ml_collections.ConfigDict, balancer: str, seed: int
) -> ml_collections.ConfigDict:
    """A copy of ``base`` with ``balancer`` (``'ew'`` = equal weighting), ``seed`` and no
    stored baseline (delta_m is computed by the runner)."""
    config = base.copy_and_resolve_references()
    with config.unlocked():
        config.balancer = "" if balancer == EW else balancer
        config.seed = int(seed)
        config.baseline = ()
    return config


def run_or_load(
    config: ml_collections.ConfigDict, workdir: str, train: bool = True
) -> dict[str, Any] | None:
    """``workdir/results.json`` if it exists, else `train.train_and_evaluate` into ``workdir``.

    While training, ``workdir/RUNNING`` exists (created exclusively): another process finding
    it returns None instead of training the same run, so several runner processes can share
    one ``--workdir``. (A process killed with SIGKILL leaves it behind: delete it to rerun.)
    With ``train=False`` a missing run is not trained: None.
    The wall time of a fresh run is stored in ``workdir/wall_seconds.txt``.
    """
    path = os.path.join(workdir, "results.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    if not train:
        return None
    from mtl_jax import train as train_lib

    os.makedirs(workdir, exist_ok=True)
    lock = os.path.join(workdir, "RUNNING")
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return None
    try:
        t0 = time.time()
        results = train_lib.train_and_evaluate(config, workdir)
        with open(os.path.join(workdir, "wall_seconds.txt"), "w") as f:
            f.write(f"{time.time() - t0:.1f}\n")
    finally:
        os.remove(lock)
    return results


# ----------------------------------------------------------------------------------------------
# Aggregation (pure functions of results dicts)
# ----------------------------------------------------------------------------------------------


def run_step_time(results: Mapping[str, Any]) -> float:
    """Median seconds per training step of a run (first log window, with compilation, left
    out when there are others); NaN without a training log."""
    times = [e["step_time_s"] for e in results.get("train_log", [])]
    if len(times) > 1:
        times = times[1:]
    return float(np.median(times)) if times else math.nan


def single_task_baseline(
    stl_runs: Mapping[str, Sequence[Mapping[str, Any]]], metric_keys: Sequence[str]
) -> dict[str, float]:
    """Baseline of each metric ``'<task>/<metric>'``: mean over seeds of task's own run.

    Args:
      stl_runs: task name -> results of its single-task runs (one per seed).
      metric_keys: the metrics to take (each from the run of its task).
    """
    out = {}
    for key in metric_keys:
        task = key.rpartition("/")[0]
        if task not in stl_runs or not stl_runs[task]:
            raise KeyError(f"No single-task run of task {task!r} for metric {key!r}.")
        out[key] = float(np.mean([r["average"][key] for r in stl_runs[task]]))
    return out


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    return float(np.mean(arr)), float(np.std(arr, ddof=1)) if arr.size > 1 else math.nan


def summarize(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    baseline: Mapping[str, float],
    higher_is_better: Mapping[str, bool],
    failures: Mapping[str, Sequence[str]] | None = None,
    not_applicable: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One row per method: metrics and delta_m (mean, std over seeds), step time vs ``ew``.

    Args:
      runs: method -> results dicts of its successful runs (one per seed).
      baseline: single-task value of every metric entering delta_m (`single_task_baseline`).
      higher_is_better: direction of every metric of ``baseline``.
      failures: method -> error messages of its failed runs.
      not_applicable: method -> why it cannot run on this problem (`method_not_applicable`);
        such a method gets a row without results.

    Returns:
      Rows sorted by mean delta_m (lower is better; methods without results last), each with
      ``method``, ``seeds``, ``metrics`` (key -> [mean, std]), ``delta_m`` ([mean, std], in %;
      std NaN for one seed),
      ``step_time_s``, ``step_time_vs_ew``, ``vs_ew`` (``'beats ew'`` / ``'loses to ew'``,
      ``' (within noise)'`` appended when the difference is within the larger of the two
      standard deviations), ``failed`` (error messages) and ``not_applicable`` (the reason, or
      ``''``).
    """
    from mtl_jax import metrics as metrics_lib

    failures = failures or {}
    not_applicable = not_applicable or {}
    rows = []
    for method in dict.fromkeys([*runs, *failures, *not_applicable]):
        results = list(runs.get(method, []))
        dms = [
            metrics_lib.delta_m(r["average"], baseline, higher_is_better)
            if all(k in r["average"] for k in baseline)
            else math.nan
            for r in results
        ]
        times = [run_step_time(r) for r in results]
        rows.append(
            {
                "method": method,
                "seeds": len(results),
                "metrics": {k: _mean_std([r["average"][k] for r in results]) for k in baseline},
                "delta_m": _mean_std(dms),
                "step_time_s": float(np.mean(times)) if times else math.nan,
                "failed": list(failures.get(method, [])),
                "not_applicable": not_applicable.get(method, ""),
            }
        )
    ew = next((r for r in rows if r["method"] == EW and r["seeds"]), None)
    for row in rows:
        row["step_time_vs_ew"] = row["step_time_s"] / ew["step_time_s"] if ew else math.nan
        row["vs_ew"] = ""
        if ew and row is not ew and not math.isnan(row["delta_m"][0]):
            diff = row["delta_m"][0] - ew["delta_m"][0]
            row["vs_ew"] = "beats ew" if diff < 0 else "loses to ew"
            stds = [x for x in (row["delta_m"][1], ew["delta_m"][1]) if not math.isnan(x)]
            if abs(diff) <= max(stds, default=0.0):
                row["vs_ew"] += " (within noise)"
    return sorted(rows, key=lambda r: (math.isnan(r["delta_m"][0]), r["delta_m"][0]))


def _pm(mean: float, std: float, digits: int) -> str:
    if math.isnan(mean):
        return "n/a"
    if math.isnan(std):  # one seed
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _digits(key: str) -> int:
    return 1 if key.endswith("_g") else 3


def format_table(
    rows: Sequence[Mapping[str, Any]],
    baseline: Mapping[str, float],
    higher_is_better: Mapping[str, bool],
) -> str:
    """Markdown table of `summarize` rows, with the single-task baseline as the first row."""
    keys = list(baseline)
    arrows = {True: "↑", False: "↓"}
    head = ["#", "method", *(f"{k} {arrows[higher_is_better[k]]}" for k in keys)]
    head += ["Δm % ↓", "s/step ÷ ew", "vs ew", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cells = ["", SINGLE_TASK, *(f"{baseline[k]:.{_digits(k)}f}" for k in keys)]
    lines.append("| " + " | ".join([*cells, "0 (reference)", "", "", ""]) + " |")
    for i, row in enumerate(rows, 1):
        if not row["seeds"]:
            if row.get("not_applicable"):
                note = "n/a: " + row["not_applicable"]
            elif row["failed"]:
                note = "failed: " + "; ".join(row["failed"])[:120]
            else:
                note = "not run"
            lines.append(f"| {i} | {row['method']} | {note} |" + " |" * (len(head) - 3))
            continue
        ratio = row["step_time_vs_ew"]
        seeds = f"{row['seeds']}" + (f" ({len(row['failed'])} failed)" if row["failed"] else "")
        cells = [
            str(i),
            f"**{row['method']}**" if row["method"] == EW else row["method"],
            *(_pm(*row["metrics"][k], _digits(k)) for k in keys),
            _pm(*row["delta_m"], 2),
            "n/a" if math.isnan(ratio) else f"{ratio:.2f}",
            row["vs_ew"],
            seeds,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------


def _load_config_tasks(config):
    from mtl_jax import tasks as tasks_lib

    tasks = tasks_lib.get_tasks(config.dataset)
    return [t.name for t in tasks], tasks_lib.higher_is_better(tasks)


def metric_keys_for(dataset: str) -> tuple[str, ...]:
    """The metrics entering delta_m for ``dataset`` (`DELTA_M_METRICS`, else the library's)."""
    from mtl_jax import metrics as metrics_lib

    if dataset in DELTA_M_METRICS:
        return DELTA_M_METRICS[dataset]
    if dataset in metrics_lib.BASELINES:
        return tuple(metrics_lib.BASELINES[dataset])
    raise ValueError(
        f"No delta_m metrics known for dataset {dataset!r}; pass --metrics=task/metric,..."
    )


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def run_comparison(
    config: ml_collections.ConfigDict,
    methods: Sequence[str],
    seeds: int | Sequence[int],
    workdir: str,
    *,
    pareto_points: int = -1,
    metric_keys: Sequence[str] | None = None,
    plots: bool = True,
    train: bool = True,
) -> dict[str, Any]:
    """Runs (or loads) everything and writes ``comparison.md``, ``comparison.json``, plots.

    Args:
      config: the experiment config (`get_config` of an ``experiments/*.py``).
      methods: ``'ew'`` and/or names in `mtl_jax.BALANCERS` (`parse_methods`).
      seeds: number of seeds (0, 1, ...) or the seeds themselves.
      workdir: output directory; one sub-directory per run.
      pareto_points: size of the two-task preference sweep; -1: 7 for two tasks, else 0.
      metric_keys: metrics entering delta_m (default `metric_keys_for(config.dataset)`).
      plots: also write the plots (`mtl_jax.plots.write_all`).
      train: train missing runs; False: tabulate the finished ones only (the ``seeds``
        column then says how many each method has).

    Returns:
      The content of ``comparison.json``.
    """
    t_start = time.time()
    seeds = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seeds:
        raise ValueError("--seeds must be at least 1.")
    names, hib = _load_config_tasks(config)
    metric_keys = tuple(metric_keys or metric_keys_for(config.dataset))
    missing = [k for k in metric_keys if k not in hib]
    if missing:
        raise ValueError(f"Unknown metrics {missing} for {config.dataset}; valid: {sorted(hib)}.")
    k = len(names)
    if pareto_points == -1:
        pareto_points = 7 if k == 2 else 0
    if pareto_points and k != 2:
        raise ValueError(f"The preference sweep is for two-task problems; this one has {k}.")
    inapplicable = {m: r for m in methods if (r := method_not_applicable(m, k)) is not None}
    for method, reason in inapplicable.items():
        msg = f"compare: {method} is not run: {reason}; its row says n/a."
        logging.warning(msg)
        print(msg, flush=True)
    os.makedirs(workdir, exist_ok=True)

    dirs: dict[str, dict[int, str]] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    failures: dict[str, list[str]] = {}
    elsewhere: list[str] = []

    def run(group: str, label: str, balancer: str, seed: int) -> dict[str, Any] | None:
        rel = os.path.join(_safe(label), f"seed_{seed}")
        dirs.setdefault(group, {})[seed] = rel
        logging.info("compare: %s seed %d -> %s", group, seed, rel)
        try:
            res = run_or_load(
                run_config(config, balancer, seed), os.path.join(workdir, rel), train=train
            )
        except Exception as e:  # noqa: BLE001 -- one failing method must not stop the rest
            logging.exception("compare: %s seed %d failed", group, seed)
            failures.setdefault(group, []).append(f"seed {seed}: {type(e).__name__}: {e}")
            return None
        if res is None and not train:
            return None
        if res is None:
            logging.info("compare: %s seed %d is being trained by another process", group, seed)
            elsewhere.append(f"{group} seed {seed}")
            return None
        runs.setdefault(group, []).append(res)
        return res

    # 1. Single-task baselines.
    stl: dict[str, list[dict[str, Any]]] = {}
    for seed in seeds:
        for i, name in enumerate(names):
            onehot = [1.0 if j == i else 0.0 for j in range(k)]
            res = run(
                f"{SINGLE_TASK}:{name}", preference_label(onehot), preference_balancer(onehot), seed
            )
            if res is not None:
                stl.setdefault(name, []).append(res)
    if any(e.startswith(SINGLE_TASK) for e in elsewhere):
        pareto_points, seeds_left = 0, []  # no baseline yet: help with the methods, no table
    else:
        baseline = single_task_baseline(stl, metric_keys)
        seeds_left = seeds
    # 2. Two-task preference sweep (first seed).
    pareto = []
    if pareto_points:
        for w in sweep_weights(pareto_points):
            res = run(f"pareto:{w[0]:.3g}", preference_label(w), preference_balancer(w), seeds[0])
            if res is not None:
                pareto.append({"weights": list(w), "average": res["average"]})

    # 3. Methods, seed-major.
    statistics = None
    if "adaptive_task_balancing" in methods and seeds_left:
        try:
            statistics = visatb_statistics(stl, metric_keys, hib)
            logging.info("compare: adaptive_task_balancing statistics %s", statistics)
        except ValueError as e:
            logging.warning("compare: %s", e)
    for seed in seeds:
        for method in methods:
            if method in inapplicable:
                continue
            try:
                balancer = method_balancer(method, config, k, statistics=statistics)
            except ValueError as e:
                failures.setdefault(method, []).append(f"seed {seed}: {e}")
                continue
            run(method, method, balancer, seed)
    if elsewhere or not seeds_left:
        logging.warning(
            "compare: runs %s were in progress in other processes; rerun the same command when "
            "they finish to write the table.",
            elsewhere,
        )
        return {"in_progress_elsewhere": elsewhere}
    method_runs = {m: runs[m] for m in methods if m in runs}
    not_ok = {
        m: failures.get(m, [])
        for m in methods
        if (m in failures or m not in method_runs) and m not in inapplicable
    }
    rows = summarize(method_runs, baseline, hib, not_ok, inapplicable)
    table = format_table(rows, baseline, hib)
    out = {
        "dataset": config.dataset,
        "tasks": names,
        "methods": list(methods),
        "seeds": seeds,
        "metric_keys": list(metric_keys),
        "higher_is_better": {key: hib[key] for key in metric_keys},
        "baseline": baseline,
        "rows": rows,
        "pareto": pareto,
        "run_dirs": {g: {str(s): d for s, d in v.items()} for g, v in dirs.items()},
        "failures": failures,
        "not_applicable": inapplicable,
        "adaptive_task_balancing_statistics": statistics,
        "wall_seconds_this_invocation": time.time() - t_start,
    }
    missing = len(seeds) * (len(methods) - len(inapplicable)) - sum(
        len(v) for v in method_runs.values()
    )
    header = (
        f"{config.dataset}: {len(methods)} methods x {len(seeds)} seeds"
        + (f" ({missing} runs missing: see the seeds column)" if missing else "")
        + "; per-task metrics "
        f"(mean over the last {config.get('num_average_epochs', 1)} evaluation(s)) mean ± std "
        "over seeds; Δm % against the single-task baselines (lower is better).\n\n"
    )
    from mtl_jax import train as train_lib

    with open(os.path.join(workdir, "comparison.md"), "w") as f:
        f.write(header + table)
    train_lib.write_json_atomic(os.path.join(workdir, "comparison.json"), out)
    if plots:
        from mtl_jax import plots as plots_lib

        out["plots"] = plots_lib.write_all(workdir, out)
        train_lib.write_json_atomic(os.path.join(workdir, "comparison.json"), out)
    print(header + table, flush=True)
    return out


def load_runs(workdir: str, comparison: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Group -> results dicts of its finished runs, from ``comparison['run_dirs']``."""
    out: dict[str, list[dict[str, Any]]] = {}
    for group, by_seed in comparison["run_dirs"].items():
        for rel in by_seed.values():
            path = os.path.join(workdir, rel, "results.json")
            if os.path.exists(path):
                with open(path) as f:
                    out.setdefault(group, []).append(json.load(f))
    return out


def main(argv: Sequence[str]) -> None:
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    run_comparison(
        f.config,
        parse_methods(f.methods),
        list(range(f.first_seed, f.first_seed + f.seeds)),
        f.workdir,
        pareto_points=f.pareto_points,
        metric_keys=f.metrics or None,
        plots=f.plots,
        train=f.train,
    )


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Output directory (one sub-directory per run).")
    flags.DEFINE_string("methods", "all", "'all' or comma-separated names ('ew' = equal weights).")
    flags.DEFINE_integer("seeds", 3, "Number of seeds per method.")
    flags.DEFINE_integer(
        "first_seed",
        0,
        "Seeds are first_seed, first_seed + 1, ... (to run seeds in parallel "
        "processes into one workdir: --first_seed=1 --seeds=1 --pareto_points=0 beside the "
        "--seeds=1 run, then --seeds=2 to write the table).",
    )
    flags.DEFINE_integer("pareto_points", -1, "Two-task preference sweep size (-1: 7 if K=2).")
    flags.DEFINE_list("metrics", [], "Metrics entering delta_m (default: per dataset).")
    flags.DEFINE_bool("plots", True, "Write the plots (mtl_jax.plots).")
    flags.DEFINE_bool("train", True, "Train missing runs (--notrain: tabulate finished ones).")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
