r"""Plots of a comparison (`mtl_jax.compare`): weights, gradient conflict, learning curves, Pareto.

::

  python -m mtl_jax.plots --workdir=/tmp/cmp_multidigits   # after python -m mtl_jax.compare

Reads ``comparison.json`` and the runs' ``results.json`` (their ``train_log`` and ``history``)
and writes PNG files (matplotlib, Agg backend) to ``workdir/plots/``, and the same images to
TensorBoard (``workdir/plots/events.out.tfevents.*``, "Images" tab):

* ``weights.png``: effective task weights over training, one panel per method (first seed);
* ``conflict.png``: mean pairwise task-gradient cosine over training, methods x task pairs
  (Jacobian-path runs only: the loss-level methods never form the per-task gradients);
* ``curves.png``: the test metric of every task entering delta_m over training, per method
  (mean over seeds);
* ``pareto.png`` (two-task problems): the two test metrics of the ``scalarize`` preference
  sweep against the end points of the balancers (mean over seeds).
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Runs = Mapping[str, Sequence[Mapping[str, Any]]]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int, cols: int = 6) -> tuple[int, int]:
    cols = min(cols, max(n, 1))
    return math.ceil(max(n, 1) / cols), cols


def _save(fig, path: str, dpi: int = 80) -> str:
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)
    return path


def plot_weights(runs: Runs, tasks: Sequence[str], path: str) -> str | None:
    """Effective task weights (``train_log[i]['weights']``) over steps, one panel per method."""
    methods = [m for m, rs in runs.items() if rs and rs[0].get("train_log")]
    if not methods:
        return None
    plt = _plt()
    rows, cols = _grid(len(methods))
    fig, axes = plt.subplots(
        rows, cols, figsize=(2.4 * cols, 1.9 * rows), squeeze=False, sharex=True
    )
    for ax, method in zip(axes.flat, methods, strict=False):
        log = runs[method][0]["train_log"]
        steps = [e["step"] for e in log]
        w = np.asarray([e["weights"] for e in log], np.float64)
        for i, task in enumerate(tasks):
            ax.plot(steps, w[:, i], lw=1.2, label=task)
        ax.set_title(method, fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(methods) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle("Effective task weights (balanced / raw row norm) vs step", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def mean_cosines(results: Mapping[str, Any]) -> np.ndarray | None:
    """Mean over the training log of the [K, K] task-gradient cosine matrix (None if absent)."""
    cos = [e["cos"] for e in results.get("train_log", []) if "cos" in e]
    return np.mean(np.asarray(cos, np.float64), axis=0) if cos else None


def plot_conflict(runs: Runs, tasks: Sequence[str], path: str) -> str | None:
    """Heatmap: methods (rows) x task pairs (columns), mean gradient cosine over training."""
    pairs = [(i, j) for i in range(len(tasks)) for j in range(i + 1, len(tasks))]
    rows, names = [], []
    for method, rs in runs.items():
        mats = [c for c in (mean_cosines(r) for r in rs) if c is not None]
        if mats:
            m = np.mean(mats, axis=0)
            rows.append([m[i, j] for i, j in pairs])
            names.append(method)
    if not rows or not pairs:
        return None
    plt = _plt()
    data = np.asarray(rows)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(pairs), 0.8 + 0.28 * len(names)))
    lim = max(0.05, float(np.nanmax(np.abs(data))))
    im = ax.imshow(data, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    for (r, c), v in np.ndenumerate(data):
        ax.text(c, r, f"{v:+.3f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(pairs)), [f"{tasks[i]}-{tasks[j]}" for i, j in pairs], fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_title("Mean task-gradient cosine over training", fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    return _save(fig, path)


def plot_curves(
    runs: Runs, metric_keys: Sequence[str], path: str, highlight: str = "ew"
) -> str | None:
    """Test metric of each task vs epoch, one line per method (mean over seeds)."""
    methods = [m for m, rs in runs.items() if rs and rs[0].get("history")]
    if not methods:
        return None
    plt = _plt()
    fig, axes = plt.subplots(
        1, len(metric_keys), figsize=(4.2 * len(metric_keys), 3.4), squeeze=False
    )
    colors = plt.get_cmap("tab20")
    for col, key in enumerate(metric_keys):
        ax = axes[0, col]
        for n, method in enumerate(methods):
            hists = [r["history"] for r in runs[method]]
            length = min(len(h) for h in hists)
            x = [h["epoch"] for h in hists[0][:length]]
            y = np.mean([[h[key] for h in hist[:length]] for hist in hists], axis=0)
            style = dict(color="k", lw=2.2) if method == highlight else dict(lw=1, alpha=0.8)
            if method != highlight:
                style["color"] = colors(n % 20)
            ax.plot(x, y, label=method, **style)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, -1].legend(fontsize=6, ncol=2 if len(methods) > 12 else 1, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def plot_pareto(
    comparison: Mapping[str, Any], runs: Runs, path: str, max_labels: int = 40
) -> str | None:
    """Two-task objective space: the preference sweep (line) and the balancers' end points."""
    keys = comparison["metric_keys"]
    if len(keys) != 2 or not comparison.get("pareto"):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 4.8))
    sweep = comparison["pareto"]
    xs = [p["average"][keys[0]] for p in sweep]
    ys = [p["average"][keys[1]] for p in sweep]
    ax.plot(xs, ys, "s-", color="gray", ms=5, label="scalarize sweep (seed 0)")
    for p, x, y in zip(sweep, xs, ys, strict=True):
        ax.annotate(f"{p['weights'][0]:.2f}", (x, y), fontsize=6, color="gray")
    for n, method in enumerate(m for m in comparison["methods"] if runs.get(m)):
        pts = np.asarray([[r["average"][k] for k in keys] for r in runs[method]])
        x, y = pts.mean(axis=0)
        ax.plot(x, y, "o", ms=6, color="k" if method == "ew" else None)
        if n < max_labels:
            ax.annotate(method, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    hib = comparison["higher_is_better"]
    ax.set_xlabel(f"{keys[0]} ({'higher' if hib[keys[0]] else 'lower'} is better)", fontsize=8)
    ax.set_ylabel(f"{keys[1]} ({'higher' if hib[keys[1]] else 'lower'} is better)", fontsize=8)
    ax.set_title(f"{comparison['dataset']}: balancers (mean over seeds) vs the sweep", fontsize=9)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _save(fig, path)


def write_images_to_tensorboard(logdir: str, paths: Mapping[str, str], step: int = 0) -> None:
    """Writes PNG files as TensorBoard images (tag -> path) into an event file in ``logdir``."""
    from PIL import Image
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(logdir)
    values = []
    for tag, path in paths.items():
        with open(path, "rb") as f:
            png = f.read()
        width, height = Image.open(io.BytesIO(png)).size
        image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)
        values.append(Summary.Value(tag=tag, image=image))
    writer.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))
    writer.close()


def write_all(workdir: str, comparison: Mapping[str, Any]) -> dict[str, str]:
    """All plots of a comparison into ``workdir/plots`` (PNG + TensorBoard); name -> path."""
    from mtl_jax import compare

    runs = compare.load_runs(workdir, comparison)
    method_runs = {m: runs[m] for m in comparison["methods"] if m in runs}
    out_dir = os.path.join(workdir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    tasks = comparison["tasks"]
    made = {
        "weights": plot_weights(method_runs, tasks, os.path.join(out_dir, "weights.png")),
        "conflict": plot_conflict(
            {
                **{
                    f"{compare.SINGLE_TASK}:{t}": runs.get(f"{compare.SINGLE_TASK}:{t}", [])
                    for t in tasks
                },
                **method_runs,
            },
            tasks,
            os.path.join(out_dir, "conflict.png"),
        ),
        "curves": plot_curves(
            method_runs, comparison["metric_keys"], os.path.join(out_dir, "curves.png")
        ),
        "pareto": plot_pareto(comparison, method_runs, os.path.join(out_dir, "pareto.png")),
    }
    made = {k: v for k, v in made.items() if v is not None}
    if made:
        write_images_to_tensorboard(out_dir, {f"comparison/{k}": v for k, v in made.items()})
    return made


def main(argv: Sequence[str]) -> None:
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    workdir = flags.FLAGS.workdir
    path = os.path.join(workdir, "comparison.json")
    if not os.path.exists(path):
        raise app.UsageError(f"No {path}: run `python -m mtl_jax.compare` into it first.")
    with open(path) as f:
        comparison = json.load(f)
    for name, png in write_all(workdir, comparison).items():
        print(f"{name}: {png}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "A `python -m mtl_jax.compare` output directory.")
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
