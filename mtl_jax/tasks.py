"""Task definitions of the dense-prediction benchmarks: losses and split-level metrics.

A `Task` bundles what the harness needs per task: the batch key of its target, the number of
output channels of its head, a jit-safe scalar loss, and a metric accumulator (init / jit-safe
update / host-side compute). Metrics are accumulated over a whole split and computed once, as
the papers do (one confusion matrix for mIoU and pixel accuracy, all valid pixels for the depth
errors and the normal angles)::

    tasks = mtl_jax.tasks.get_tasks("nyuv2")
    losses = task_losses(tasks, preds, batch)          # [K], preds: task name -> [B, H, W, C]
    accs = init_metrics(tasks)
    accs = jax.jit(partial(update_metrics, tasks))(accs, preds, batch)   # per eval batch
    results = compute_metrics(tasks, accs)             # {'segmentation/mIoU': ..., ...}

The embedded datasets (``multidigits``, ``penguins``) have per-example tasks: `classification_task`
(logits [B, C]; cross-entropy loss; accuracy and mean cross-entropy) and `regression_task`
([B, D]; MSE loss; MAE and RMSE, also in original units such as grams for a standardized
target).

Every loss and metric update honours ``batch['mask']`` ([B] bool, False for padding examples),
when present.

Checked against: LibMTL ``examples/nyu/utils.py`` (SegLoss, DepthLoss, NormalLoss, SegMetric,
DepthMetric, NormalMetric), CAGrad ``cityscapes/utils.py`` and Nash-MTL
``experiments/nyuv2/utils.py`` (ConfMatrix, depth_error, normal_error). Deliberate differences:
  * mIoU averages the IoU over classes that occur in the split (ground truth or prediction);
    the references average over all classes and return NaN if one never occurs (identical
    otherwise).
  * Depth errors are averaged over all valid pixels of the split (LibMTL's pixel-weighted
    mean); MTAN/CAGrad/Nash-MTL average per-batch means, which equals this only for equal
    valid-pixel counts per batch.
  * The normal-angle median comes from a histogram with `NORMAL_HIST_BIN_DEG`-degree bins
    (exact up to half a bin, 0.0025 degrees); mean and threshold fractions are exact.
  * Empty masks give a zero loss (the references divide by zero and return NaN).
Sums are float32 on device (relative error ~1e-6 over a split); pixel counts are int32
(exact below 2**31 pixels, i.e. ~19k NYUv2 images per accumulation).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Batch = Mapping[str, jax.Array]

NORMAL_HIST_BIN_DEG = 0.005  # bin width of the angle histogram used for the median
NORMAL_THRESHOLDS_DEG = (11.25, 22.5, 30.0)
_NUM_BINS = int(round(180.0 / NORMAL_HIST_BIN_DEG))


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """One task of a multi-task benchmark.

    Attributes:
      name: task name, also the key of its prediction in the model output.
      target_key: batch key of the ground truth.
      out_channels: channels of the prediction head (classes for segmentation).
      loss: ``loss(pred, batch) -> scalar`` (jit-safe; ``pred`` [B, H, W, out_channels] for the
        dense tasks, [B, out_channels] for the per-example tasks of the embedded datasets).
      metric_init: ``() -> acc``, a pytree of zero sums.
      metric_update: ``(acc, pred, batch) -> acc`` (jit-safe; honours ``batch['mask']``).
      metric_compute: ``acc -> {metric: float}`` (host side, after the split).
      higher_is_better: ``{metric: bool}`` for every metric of ``metric_compute``.
      num_classes: size of the label space of a classification task (segmentation and the
        per-example classification tasks), None for regression tasks. Methods whose
        arguments depend on it (`mtl_jax.log_class_scaling`) read it from here.
    """

    name: str
    target_key: str
    out_channels: int
    loss: Callable[[jax.Array, Batch], jax.Array]
    metric_init: Callable[[], PyTree]
    metric_update: Callable[[PyTree, jax.Array, Batch], PyTree]
    metric_compute: Callable[[PyTree], dict[str, float]]
    higher_is_better: dict[str, bool]
    num_classes: int | None = None


def _example_mask(batch: Batch, shape: tuple[int, ...]) -> jax.Array:
    """``batch['mask']`` broadcast to ``shape`` (all True without a mask)."""
    if "mask" not in batch:
        return jnp.ones(shape, bool)
    mask = jnp.asarray(batch["mask"]).astype(bool)
    return jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (len(shape) - 1)), shape)


def _check_shapes(task: str, pred: jax.Array, target: jax.Array, channels: int) -> None:
    if pred.ndim != 4 or pred.shape[:3] != target.shape[:3] or pred.shape[-1] != channels:
        raise ValueError(
            f"Task {task!r}: prediction shape {pred.shape} does not match target "
            f"{target.shape}; expected [B, H, W, {channels}] at the target's resolution."
        )


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    return num / jnp.maximum(den, 1).astype(num.dtype)


def _normalize(x: jax.Array) -> jax.Array:
    """Unit vectors along the last axis; a zero vector stays zero, with a finite gradient.

    (``sqrt`` at 0 has an infinite derivative that an outer ``where`` does not stop: the
    "double where" keeps the unselected branch's input finite, so its gradient is too.)
    """
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    positive = sq > 0
    safe = jnp.where(positive, sq, 1.0)
    return jnp.where(positive, x * jax.lax.rsqrt(safe), 0.0)


# -- segmentation ---------------------------------------------------------------------------


def _seg_valid(labels: jax.Array, num_classes: int, batch: Batch) -> jax.Array:
    return (labels >= 0) & (labels < num_classes) & _example_mask(batch, labels.shape)


def segmentation_loss(pred: jax.Array, batch: Batch, *, num_classes: int) -> jax.Array:
    """Pixel-wise cross-entropy averaged over labelled pixels (label -1 is ignored).

    As ``torch.nn.CrossEntropyLoss(ignore_index=-1)`` on logits ``pred`` [B, H, W, C].
    """
    labels = jnp.asarray(batch["segmentation"]).astype(jnp.int32)
    _check_shapes("segmentation", pred, labels[..., None], num_classes)
    valid = _seg_valid(labels, num_classes, batch)
    logp = jax.nn.log_softmax(pred.astype(jnp.float32), axis=-1)
    safe = jnp.clip(labels, 0, num_classes - 1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    return _safe_div(jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid))


def segmentation_metric_init(num_classes: int) -> dict[str, jax.Array]:
    """Confusion matrix, rows = ground truth, columns = prediction."""
    return {"confusion": jnp.zeros((num_classes, num_classes), jnp.int32)}


def segmentation_metric_update(acc, pred: jax.Array, batch: Batch, *, num_classes: int):
    """Adds the batch's labelled pixels (argmax of ``pred``) to the confusion matrix."""
    labels = jnp.asarray(batch["segmentation"]).astype(jnp.int32)
    valid = _seg_valid(labels, num_classes, batch)
    guess = jnp.argmax(pred, axis=-1).astype(jnp.int32)
    index = jnp.where(valid, labels * num_classes + guess, 0).reshape(-1)
    counts = (
        jnp.zeros(num_classes * num_classes, jnp.int32)
        .at[index]
        .add(valid.reshape(-1).astype(jnp.int32))
    )
    return {"confusion": acc["confusion"] + counts.reshape(num_classes, num_classes)}


def segmentation_metric_compute(acc) -> dict[str, float]:
    """mIoU (over classes present in ground truth or prediction) and pixel accuracy."""
    h = np.asarray(jax.device_get(acc["confusion"]), np.float64)
    diag = np.diag(h)
    union = h.sum(0) + h.sum(1) - diag
    present = union > 0
    miou = float(np.mean(diag[present] / union[present])) if present.any() else float("nan")
    total = h.sum()
    pix_acc = float(diag.sum() / total) if total > 0 else float("nan")
    return {"mIoU": miou, "pixAcc": pix_acc}


# -- depth ----------------------------------------------------------------------------------


def _depth_valid(target: jax.Array, batch: Batch) -> jax.Array:
    # References: binary_mask = (sum over channels of gt != 0).
    valid = jnp.sum(target, axis=-1, keepdims=True) != 0
    return valid & _example_mask(batch, valid.shape)


def depth_loss(pred: jax.Array, batch: Batch) -> jax.Array:
    """L1 error averaged over pixels with non-zero ground truth (0 = no measurement)."""
    target = jnp.asarray(batch["depth"]).astype(jnp.float32)
    _check_shapes("depth", pred, target, target.shape[-1])
    valid = _depth_valid(target, batch)
    err = jnp.where(valid, jnp.abs(pred.astype(jnp.float32) - target), 0.0)
    return _safe_div(jnp.sum(err), jnp.sum(valid))


def depth_metric_init() -> dict[str, jax.Array]:
    return {
        "abs_sum": jnp.zeros((), jnp.float32),
        "rel_sum": jnp.zeros((), jnp.float32),
        "count": jnp.zeros((), jnp.int32),
    }


def depth_metric_update(acc, pred: jax.Array, batch: Batch):
    """Adds absolute and relative errors of the batch's valid pixels."""
    target = jnp.asarray(batch["depth"]).astype(jnp.float32)
    valid = _depth_valid(target, batch)
    err = jnp.abs(pred.astype(jnp.float32) - target)
    rel = err / jnp.where(valid, target, 1.0)
    per_example = lambda x: jnp.sum(jnp.where(valid, x, 0.0), axis=(1, 2, 3))  # noqa: E731
    return {
        "abs_sum": acc["abs_sum"] + jnp.sum(per_example(err)),
        "rel_sum": acc["rel_sum"] + jnp.sum(per_example(rel)),
        "count": acc["count"] + jnp.sum(valid, dtype=jnp.int32),
    }


def depth_metric_compute(acc) -> dict[str, float]:
    """Mean absolute and relative error over all valid pixels of the split."""
    acc = jax.device_get(acc)
    count = int(acc["count"])
    if count == 0:
        return {"abs_err": float("nan"), "rel_err": float("nan")}
    return {"abs_err": float(acc["abs_sum"]) / count, "rel_err": float(acc["rel_sum"]) / count}


# -- surface normals ------------------------------------------------------------------------


def _normal_valid(target: jax.Array, batch: Batch) -> jax.Array:
    valid = jnp.sum(target, axis=-1) != 0  # [B, H, W], as the references
    return valid & _example_mask(batch, valid.shape)


def normal_loss(pred: jax.Array, batch: Batch) -> jax.Array:
    """1 - cosine similarity between the normalised prediction and the ground truth, averaged
    over valid pixels (ground truth not all-zero)."""
    target = jnp.asarray(batch["normal"]).astype(jnp.float32)
    _check_shapes("normal", pred, target, 3)
    valid = _normal_valid(target, batch)
    cos = jnp.sum(_normalize(pred.astype(jnp.float32)) * target, axis=-1)
    return 1.0 - _safe_div(jnp.sum(jnp.where(valid, cos, 0.0)), jnp.sum(valid))


def normal_angles(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Angle in degrees between the normalised prediction and the ground truth, per pixel."""
    cos = jnp.sum(_normalize(pred.astype(jnp.float32)) * target.astype(jnp.float32), axis=-1)
    return jnp.degrees(jnp.arccos(jnp.clip(cos, -1.0, 1.0)))


def normal_metric_init() -> dict[str, jax.Array]:
    return {
        "angle_sum": jnp.zeros((), jnp.float32),
        "count": jnp.zeros((), jnp.int32),
        "below": jnp.zeros((len(NORMAL_THRESHOLDS_DEG),), jnp.int32),
        "hist": jnp.zeros((_NUM_BINS,), jnp.int32),
    }


def normal_metric_update(acc, pred: jax.Array, batch: Batch):
    """Adds the batch's valid-pixel angles (sum, threshold counts, median histogram)."""
    target = jnp.asarray(batch["normal"]).astype(jnp.float32)
    valid = _normal_valid(target, batch)
    angle = normal_angles(pred, target)
    ones = valid.astype(jnp.int32)
    below = jnp.stack([jnp.sum(ones * (angle < t)) for t in NORMAL_THRESHOLDS_DEG])
    bins = jnp.clip(jnp.floor(angle / NORMAL_HIST_BIN_DEG), 0, _NUM_BINS - 1).astype(jnp.int32)
    hist = acc["hist"].at[bins.reshape(-1)].add(ones.reshape(-1))
    per_example = jnp.sum(jnp.where(valid, angle, 0.0), axis=(1, 2))
    return {
        "angle_sum": acc["angle_sum"] + jnp.sum(per_example),
        "count": acc["count"] + jnp.sum(ones),
        "below": acc["below"] + below,
        "hist": hist,
    }


def _histogram_median(hist: np.ndarray, width: float) -> float:
    """np.median of the binned values, each value taken as its bin centre."""
    total = int(hist.sum())
    cum = np.cumsum(hist)

    def value(rank: int) -> float:  # 0-based rank in sorted order
        return (int(np.searchsorted(cum, rank, side="right")) + 0.5) * width

    if total % 2:
        return value(total // 2)
    return 0.5 * (value(total // 2 - 1) + value(total // 2))


def normal_metric_compute(acc) -> dict[str, float]:
    """Mean and median angle (degrees) and fractions of pixels under 11.25, 22.5, 30 degrees."""
    acc = jax.device_get(acc)
    count = int(acc["count"])
    if count == 0:
        return dict.fromkeys(("mean", "median", "<11.25", "<22.5", "<30"), float("nan"))
    below = np.asarray(acc["below"], np.float64) / count
    return {
        "mean": float(acc["angle_sum"]) / count,
        "median": _histogram_median(np.asarray(acc["hist"], np.int64), NORMAL_HIST_BIN_DEG),
        "<11.25": float(below[0]),
        "<22.5": float(below[1]),
        "<30": float(below[2]),
    }


# -- per-example classification and regression (embedded datasets) -------------------------


def _check_vector(task: str, pred: jax.Array, target: jax.Array, channels: int) -> None:
    if pred.ndim != 2 or pred.shape[0] != target.shape[0] or pred.shape[-1] != channels:
        raise ValueError(
            f"Task {task!r}: prediction shape {pred.shape} does not match target "
            f"{target.shape}; expected [B, {channels}]."
        )


def classification_loss(
    pred: jax.Array, batch: Batch, *, target_key: str, num_classes: int
) -> jax.Array:
    """Cross-entropy of logits ``pred`` [B, C] against integer labels ``batch[target_key]``
    [B], averaged over the examples of ``batch['mask']`` (``torch.nn.CrossEntropyLoss``)."""
    labels = jnp.asarray(batch[target_key]).astype(jnp.int32)
    _check_vector(target_key, pred, labels, num_classes)
    valid = _example_mask(batch, labels.shape)
    logp = jax.nn.log_softmax(pred.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.clip(labels, 0, num_classes - 1)[:, None], axis=-1)
    return _safe_div(jnp.sum(jnp.where(valid, nll[:, 0], 0.0)), jnp.sum(valid))


def classification_metric_init() -> dict[str, jax.Array]:
    return {
        "correct": jnp.zeros((), jnp.int32),
        "nll_sum": jnp.zeros((), jnp.float32),
        "count": jnp.zeros((), jnp.int32),
    }


def classification_metric_update(acc, pred: jax.Array, batch: Batch, *, target_key: str):
    """Adds the batch's correct argmax predictions and cross-entropy sum (masked examples)."""
    labels = jnp.asarray(batch[target_key]).astype(jnp.int32)
    valid = _example_mask(batch, labels.shape)
    logp = jax.nn.log_softmax(pred.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.clip(labels, 0, pred.shape[-1] - 1)[:, None], -1)
    correct = valid & (jnp.argmax(pred, axis=-1).astype(jnp.int32) == labels)
    return {
        "correct": acc["correct"] + jnp.sum(correct, dtype=jnp.int32),
        "nll_sum": acc["nll_sum"] + jnp.sum(jnp.where(valid, nll[:, 0], 0.0)),
        "count": acc["count"] + jnp.sum(valid, dtype=jnp.int32),
    }


def classification_metric_compute(acc) -> dict[str, float]:
    """Accuracy and mean cross-entropy over the split."""
    acc = jax.device_get(acc)
    count = int(acc["count"])
    if count == 0:
        return {"accuracy": float("nan"), "ce": float("nan")}
    return {"accuracy": int(acc["correct"]) / count, "ce": float(acc["nll_sum"]) / count}


def regression_loss(pred: jax.Array, batch: Batch, *, target_key: str) -> jax.Array:
    """Mean squared error of ``pred`` [B, D] against ``batch[target_key]`` [B, D], averaged over
    the masked examples and the D outputs (``torch.nn.MSELoss``)."""
    target = jnp.asarray(batch[target_key]).astype(jnp.float32)
    _check_vector(target_key, pred, target, target.shape[-1])
    valid = _example_mask(batch, target.shape)
    err = jnp.where(valid, jnp.square(pred.astype(jnp.float32) - target), 0.0)
    return _safe_div(jnp.sum(err), jnp.sum(valid))


def regression_metric_init() -> dict[str, jax.Array]:
    return {
        "abs_sum": jnp.zeros((), jnp.float32),
        "sq_sum": jnp.zeros((), jnp.float32),
        "count": jnp.zeros((), jnp.int32),
    }


def regression_metric_update(acc, pred: jax.Array, batch: Batch, *, target_key: str):
    """Adds the batch's absolute and squared errors (masked examples)."""
    target = jnp.asarray(batch[target_key]).astype(jnp.float32)
    valid = _example_mask(batch, target.shape)
    err = pred.astype(jnp.float32) - target
    return {
        "abs_sum": acc["abs_sum"] + jnp.sum(jnp.where(valid, jnp.abs(err), 0.0)),
        "sq_sum": acc["sq_sum"] + jnp.sum(jnp.where(valid, jnp.square(err), 0.0)),
        "count": acc["count"] + jnp.sum(valid, dtype=jnp.int32),
    }


def regression_metric_compute(acc, *, unit_scale: float | None = None, unit: str = ""):
    """MAE and RMSE over the split (in target units), and ``mae_<unit>``, ``rmse_<unit>`` =
    ``unit_scale`` times them when the target is standardized (e.g. grams)."""
    acc = jax.device_get(acc)
    count = int(acc["count"])
    mae = float(acc["abs_sum"]) / count if count else float("nan")
    rmse = float(np.sqrt(float(acc["sq_sum"]) / count)) if count else float("nan")
    out = {"mae": mae, "rmse": rmse}
    if unit_scale is not None:
        out[f"mae_{unit}"] = mae * unit_scale
        out[f"rmse_{unit}"] = rmse * unit_scale
    return out


def classification_task(name: str, num_classes: int, target_key: str | None = None) -> Task:
    """Per-example classification: logits [B, C], CE loss, accuracy and CE metrics."""
    key = target_key or name
    return Task(
        name=name,
        target_key=key,
        out_channels=num_classes,
        loss=functools.partial(classification_loss, target_key=key, num_classes=num_classes),
        metric_init=classification_metric_init,
        metric_update=functools.partial(classification_metric_update, target_key=key),
        metric_compute=classification_metric_compute,
        higher_is_better={"accuracy": True, "ce": False},
        num_classes=num_classes,
    )


def regression_task(
    name: str,
    out_channels: int = 1,
    target_key: str | None = None,
    *,
    unit_scale: float | None = None,
    unit: str = "",
) -> Task:
    """Per-example regression: prediction [B, D], MSE loss, MAE / RMSE metrics (also times
    ``unit_scale``, named with ``unit``, when the target is standardized)."""
    key = target_key or name
    better = {"mae": False, "rmse": False}
    if unit_scale is not None:
        if not unit:
            raise ValueError("regression_task: unit_scale needs a unit name.")
        better.update({f"mae_{unit}": False, f"rmse_{unit}": False})
    return Task(
        name=name,
        target_key=key,
        out_channels=out_channels,
        loss=functools.partial(regression_loss, target_key=key),
        metric_init=regression_metric_init,
        metric_update=functools.partial(regression_metric_update, target_key=key),
        metric_compute=functools.partial(
            regression_metric_compute, unit_scale=unit_scale, unit=unit
        ),
        higher_is_better=better,
    )


# -- task sets ------------------------------------------------------------------------------


def segmentation_task(num_classes: int) -> Task:
    """Semantic segmentation with ``num_classes`` classes (label -1 = ignore)."""
    return Task(
        name="segmentation",
        target_key="segmentation",
        out_channels=num_classes,
        loss=functools.partial(segmentation_loss, num_classes=num_classes),
        metric_init=functools.partial(segmentation_metric_init, num_classes),
        metric_update=functools.partial(segmentation_metric_update, num_classes=num_classes),
        metric_compute=segmentation_metric_compute,
        higher_is_better={"mIoU": True, "pixAcc": True},
        num_classes=num_classes,
    )


def depth_task() -> Task:
    """Depth (NYUv2, metres) or disparity (Cityscapes) regression; 0 = no ground truth."""
    return Task(
        name="depth",
        target_key="depth",
        out_channels=1,
        loss=depth_loss,
        metric_init=depth_metric_init,
        metric_update=depth_metric_update,
        metric_compute=depth_metric_compute,
        higher_is_better={"abs_err": False, "rel_err": False},
    )


def normal_task() -> Task:
    """Surface normal estimation (3 channels, normalised inside loss and metrics)."""
    return Task(
        name="normal",
        target_key="normal",
        out_channels=3,
        loss=normal_loss,
        metric_init=normal_metric_init,
        metric_update=normal_metric_update,
        metric_compute=normal_metric_compute,
        higher_is_better={
            "mean": False,
            "median": False,
            "<11.25": True,
            "<22.5": True,
            "<30": True,
        },
    )


@functools.cache
def get_tasks(dataset: str) -> tuple[Task, ...]:
    """Tasks of a dataset, in the order of `mtl_jax.data.dataset_info(dataset).tasks`.

    The same objects are returned on every call (cached), so they can be closed over by jitted
    functions.

    Raises:
      ValueError: unknown dataset, listing the valid names.
    """
    if dataset == "nyuv2":
        return (segmentation_task(13), depth_task(), normal_task())
    if dataset == "cityscapes":
        return (segmentation_task(7), depth_task())
    if dataset == "cityscapes19":
        return (segmentation_task(19), depth_task())
    if dataset == "multidigits":
        return (classification_task("left", 10), classification_task("right", 10))
    if dataset == "penguins":
        from mtl_jax.data import embedded  # reads the shipped CSV (no TensorFlow)

        _, std_g = embedded.penguins_body_mass_stats()
        return (
            classification_task("species", 3),
            classification_task("sex", 2),
            regression_task("body_mass", unit_scale=std_g, unit="g"),
        )
    raise ValueError(
        f"Unknown dataset {dataset!r}; valid names: nyuv2, cityscapes, cityscapes19, "
        "multidigits, penguins."
    )


# -- helpers over a task tuple --------------------------------------------------------------


def task_losses(tasks: Sequence[Task], preds: Mapping[str, jax.Array], batch: Batch) -> jax.Array:
    """Stacked per-task losses ``[K]`` (float32), in task order."""
    return jnp.stack([t.loss(preds[t.name], batch) for t in tasks])


def init_metrics(tasks: Sequence[Task]) -> dict[str, PyTree]:
    """Zero accumulators, keyed by task name."""
    return {t.name: t.metric_init() for t in tasks}


def update_metrics(
    tasks: Sequence[Task], accs: dict[str, PyTree], preds: Mapping[str, jax.Array], batch: Batch
) -> dict[str, PyTree]:
    """Adds one batch to every task's accumulator (jit-safe)."""
    return {t.name: t.metric_update(accs[t.name], preds[t.name], batch) for t in tasks}


def compute_metrics(tasks: Sequence[Task], accs: dict[str, PyTree]) -> dict[str, float]:
    """Split-level metrics, flattened as ``'<task>/<metric>'`` (the keys of `metrics.BASELINES`)."""
    out = {}
    for t in tasks:
        for k, v in t.metric_compute(accs[t.name]).items():
            out[f"{t.name}/{k}"] = v
    return out


def higher_is_better(tasks: Sequence[Task]) -> dict[str, bool]:
    """``'<task>/<metric>' -> bool`` for every metric of `compute_metrics`."""
    return {f"{t.name}/{k}": v for t in tasks for k, v in t.higher_is_better.items()}
