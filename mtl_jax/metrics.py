"""Multi-task summary metrics: delta_m % against single-task baselines.

``delta_m`` is the average relative change of every metric with respect to the single-task
baseline, signed so that lower is better (Maninis et al., CVPR 2019; the convention of CAGrad,
Nash-MTL and FAMO)::

    delta_m = 100 / M * sum_k (-1)^{h_k} (m_k - b_k) / b_k,   h_k = 1 if higher is better

The baselines are the single-task SegNet rows these papers compare against, from CAGrad
(Liu et al., NeurIPS 2021) ``nyuv2/plot.py`` and ``cityscapes/plot.py``, reused verbatim by
Nash-MTL ``experiments/nyuv2/utils.py`` (``BASE``, "base results from CAGrad") and FAMO.
The papers report the average of the test metrics over the last 10 epochs (`mean_last`).

Checked against: Nash-MTL ``experiments/nyuv2/utils.py::delta_fn`` and CAGrad
``cityscapes/plot.py::delta_fn``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

BASELINES: dict[str, dict[str, float]] = {
    "nyuv2": {
        "segmentation/mIoU": 0.3830,
        "segmentation/pixAcc": 0.6376,
        "depth/abs_err": 0.6754,
        "depth/rel_err": 0.2780,
        "normal/mean": 25.01,
        "normal/median": 19.21,
        "normal/<11.25": 0.3014,
        "normal/<22.5": 0.5720,
        "normal/<30": 0.6915,
    },
    "cityscapes": {
        "segmentation/mIoU": 0.7401,
        "segmentation/pixAcc": 0.9316,
        "depth/abs_err": 0.0125,
        "depth/rel_err": 27.77,
    },
}


def delta_m(
    metrics: Mapping[str, float],
    baseline: Mapping[str, float],
    higher_is_better: Mapping[str, bool],
) -> float:
    """Average signed relative change (in %) over the metrics of ``baseline``; lower is better.

    Args:
      metrics: measured metrics, e.g. `mtl_jax.tasks.compute_metrics` output.
      baseline: single-task values for the same keys, e.g. ``BASELINES['nyuv2']``.
      higher_is_better: direction of every baseline metric
        (`mtl_jax.tasks.higher_is_better(tasks)`).

    Returns:
      ``delta_m`` in percent (0 for the baseline itself, negative when better).

    Raises:
      KeyError: a baseline metric is missing from ``metrics`` or ``higher_is_better``.
      ValueError: empty baseline or a zero baseline value.

    Example:
      >>> round(delta_m({"a": 0.5, "b": 1.0}, {"a": 0.4, "b": 1.0}, {"a": True, "b": False}), 6)
      -12.5
    """
    if not baseline:
        raise ValueError("delta_m needs at least one baseline metric.")
    missing = [k for k in baseline if k not in metrics]
    if missing:
        raise KeyError(f"Metrics missing for delta_m: {missing}; got {sorted(metrics)}.")
    missing = [k for k in baseline if k not in higher_is_better]
    if missing:
        raise KeyError(f"higher_is_better has no entry for {missing}.")
    terms = []
    for key, base in baseline.items():
        if base == 0:
            raise ValueError(f"Baseline {key!r} is 0; relative change undefined.")
        sign = -1.0 if higher_is_better[key] else 1.0
        terms.append(sign * (float(metrics[key]) - base) / base)
    return float(np.mean(terms) * 100.0)


def mean_last(history: Sequence[Mapping[str, float]], n: int = 10) -> dict[str, float]:
    """Per-key mean over the last ``n`` entries of ``history`` (one metrics dict per epoch).

    The papers report test metrics averaged over the last 10 epochs (CAGrad ``plot.py``,
    Nash-MTL, FAMO). Keys missing from some of those entries are averaged over the entries
    that have them.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    window = list(history)[-n:]
    keys = dict.fromkeys(k for entry in window for k in entry)
    return {k: float(np.mean([e[k] for e in window if k in e])) for k in keys}


def format_results_table(
    results: Mapping[str, object], higher_is_better: Mapping[str, bool] | None = None
) -> str:
    """Markdown table of a run's per-task metrics (``train.train_and_evaluate``'s return).

    One row per ``'<task>/<metric>'``: the last evaluation, the average over the last
    ``num_averaged`` evaluations, and the direction (``higher`` / ``lower`` is better) when
    ``higher_is_better`` has it. ``delta_m`` gets its own row when the run computed it.

    Example:
      >>> print(format_results_table({"final": {"a/accuracy": 0.5}, "average": {"a/accuracy": 0.4},
      ...                             "num_averaged": 2}, {"a/accuracy": True}))
      | task | metric | final | mean of last 2 | better |
      |---|---|---|---|---|
      | a | accuracy | 0.5000 | 0.4000 | higher |
    """
    final = dict(results.get("final", {}))
    average = dict(results.get("average", {}))
    hib = higher_is_better or {}
    n = results.get("num_averaged", 1)
    lines = [
        f"| task | metric | final | mean of last {n} | better |",
        "|---|---|---|---|---|",
    ]
    keys = [k for k in final if k != "delta_m"] + (["delta_m"] if "delta_m" in final else [])
    for key in keys:
        task, _, metric = key.rpartition("/")
        better = {True: "higher", False: "lower"}.get(hib.get(key), "")
        if key == "delta_m":
            task, metric, better = "all", "delta_m %", "lower"
        avg = average.get(key)
        avg_text = f"{avg:.4f}" if isinstance(avg, int | float) else ""
        lines.append(f"| {task} | {metric} | {float(final[key]):.4f} | {avg_text} | {better} |")
    return "\n".join(lines)
