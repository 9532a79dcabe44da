"""Shared pieces of the benchmarks: the benchmark models, timing, memory, and the output files.

The benchmark model is the hard-parameter-sharing CNN the issues specify: a shared conv encoder
(3 convs + a dense layer, ~1.1M parameters) and K linear classification heads, batch 64 of
32x32x3 inputs. `segnet_setup` builds the second model of issue 9's "own ceiling": the NYUv2
hard-sharing SegNet of the harness at a reduced resolution. Every figure a benchmark reports is
a ratio of timings measured in the same process (this machine is noisy), median of repeats,
warm-up (compilation) excluded.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtl_jax import models, tasks
from mtl_jax.models import layers

NUM_CLASSES = 10


def normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``jax.random.normal(key, shape)``, the same values, drawn flat: XLA's CPU backend takes
    seconds to compile a 4-D draw (2-5 s per shape here) and 0.3 s for a flat one."""
    return jax.random.normal(key, (int(np.prod(shape)),)).reshape(shape)


def init_hps_cnn(key: jax.Array, num_tasks: int, width: int = 32, hidden: int = 256) -> dict:
    """Parameters of the HPS CNN: {'encoder': {...}, 'heads': {'w': [K, hidden, C], 'b': ...}}."""
    ks = jax.random.split(key, 5)

    def conv(k, cin, cout):
        return {
            "w": normal(k, (3, 3, cin, cout)) * np.sqrt(2.0 / (9 * cin)),
            "b": jnp.zeros((cout,)),
        }

    flat = 8 * 8 * 2 * width
    encoder = {
        "conv1": conv(ks[0], 3, width),
        "conv2": conv(ks[1], width, 2 * width),
        "conv3": conv(ks[2], 2 * width, 2 * width),
        "dense": {
            "w": normal(ks[3], (flat, hidden)) * np.sqrt(2.0 / flat),
            "b": jnp.zeros((hidden,)),
        },
    }
    heads = {
        "w": normal(ks[4], (num_tasks, hidden, NUM_CLASSES)) / np.sqrt(hidden),
        "b": jnp.zeros((num_tasks, NUM_CLASSES)),
    }
    return {"encoder": encoder, "heads": heads}


def _conv(x, p, stride, conv):
    y = conv(x, p["w"], (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.relu(y + p["b"])


# The benchmark CNN's convolution: ours (fast gradients on CPU) by default; for the before/after
# rows of benchmarks/jacobian.py, ours as it was before 8 December 2026 (per-tap kernel gradient
# for every shape, XLA's input gradient) and XLA's own (``jax.lax.conv_general_dilated``).
CONVS = {
    "ours": layers.conv_general_dilated,
    "previous": functools.partial(
        layers.conv_general_dilated, cpu_kernel_grad="per_tap", cpu_input_grad="xla"
    ),
    "xla": jax.lax.conv_general_dilated,
}


def conv_features(encoder: dict, x: jax.Array, conv: str = "ours") -> jax.Array:
    """The flattened conv features [B, 8 * 8 * 2 * width]: the input of the dense layer."""
    fn = CONVS[conv]
    h = _conv(x, encoder["conv1"], 1, fn)
    h = _conv(h, encoder["conv2"], 2, fn)
    h = _conv(h, encoder["conv3"], 2, fn)
    return h.reshape(h.shape[0], -1)


def encode(encoder: dict, x: jax.Array, conv: str = "ours") -> jax.Array:
    """Shared representation [B, hidden]."""
    h = conv_features(encoder, x, conv)
    return jax.nn.relu(h @ encoder["dense"]["w"] + encoder["dense"]["b"])


def head_losses(heads: dict, z: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-task cross-entropy [K] from the shared representation; labels [B, K]."""
    logits = jnp.einsum("bh,khc->kbc", z, heads["w"]) + heads["b"][:, None, :]
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, labels.T[..., None], axis=-1)[..., 0]
    return -jnp.mean(picked, axis=1)


def task_losses(params: dict, batch: dict, conv: str = "ours") -> jax.Array:
    return head_losses(params["heads"], encode(params["encoder"], batch["x"], conv), batch["y"])


def make_batch(key: jax.Array, num_tasks: int, batch_size: int = 64) -> dict:
    kx, ky = jax.random.split(key)
    return {
        "x": normal(kx, (batch_size, 32, 32, 3)),
        "y": jax.random.randint(ky, (batch_size, num_tasks), 0, NUM_CLASSES),
    }


class StepSetup(NamedTuple):
    """A model for the training-step benchmarks, with its initial parameters and one batch.

    ``loss_fn(params, model_state, batch)`` returns ``(losses [K], new model_state)``; the model
    state is the BatchNorm statistics (empty for the CNN), updated in train mode.
    """

    loss_fn: Callable[[Any, Any, Any], tuple[jax.Array, Any]]
    params: Any
    model_state: Any
    batch: Any


def cnn_setup(num_tasks: int, conv: str = "ours") -> StepSetup:
    """The benchmark CNN (no model state), parameters and batch of the default sizes."""
    return StepSetup(
        loss_fn=lambda p, s, b: (task_losses(p, b, conv), s),
        params=init_hps_cnn(jax.random.key(0), num_tasks),
        model_state={},
        batch=make_batch(jax.random.key(3), num_tasks),
    )


def segnet_tasks(num_tasks: int) -> tuple[tasks.Task, ...]:
    """K tasks cycling NYUv2's three (segmentation, depth, normal, segmentation_1, depth_1, ...).

    Head i is task type ``i % 3``; every head of a type reads that type's label (the batch's
    ``'segmentation'``, ``'depth'`` or ``'normal'``), so K > 3 adds heads and losses, not data.
    """
    base = tasks.get_tasks("nyuv2")
    return tuple(
        base[i % 3]
        if i < 3
        else dataclasses.replace(base[i % 3], name=f"{base[i % 3].name}_{i // 3}")
        for i in range(num_tasks)
    )


def make_nyuv2_batch(seed: int, height: int, width: int, batch_size: int) -> dict:
    """A random batch in the NYUv2 format of the harness (``mtl_jax.data``), about 10% of the
    pixels unlabelled (segmentation -1, depth and normal 0) as in the real data."""
    rng = np.random.default_rng(seed)
    shape = (batch_size, height, width)
    labelled = rng.uniform(size=shape + (1,)) > 0.1
    normal = rng.normal(size=shape + (3,))
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    batch = {
        "image": rng.uniform(size=shape + (3,)),
        "segmentation": np.where(labelled[..., 0], rng.integers(0, 13, shape), -1),
        "depth": np.where(labelled, rng.uniform(0.5, 10.0, shape + (1,)), 0.0),
        "normal": np.where(labelled, normal, 0.0),
    }
    return {
        k: jnp.asarray(v, jnp.int32 if k == "segmentation" else jnp.float32)
        for k, v in batch.items()
    }


def segnet_setup(
    num_tasks: int,
    height: int = 64,
    width: int = 96,
    batch_size: int = 2,
    filters: tuple[int, ...] = (64, 128, 256, 512, 512),
    seed: int = 0,
) -> StepSetup:
    """The harness's hard-sharing SegNet (``experiments/nyud.py:segnet``) on a random batch.

    Built as `mtl_jax.train.train_and_evaluate` builds it (``models.build_model('segnet', ...)``,
    split into parameters and BatchNorm statistics) with the K tasks of `segnet_tasks`; the loss
    runs the model in train mode and returns the updated statistics, as the harness's
    ``Trainer._losses``. Height and width must be multiples of 32 (SegNet's five poolings).

    Cycled heads (K > 3) are named ``<type>_<i>``, so `layers.finalize_prediction` leaves their
    output raw; their losses are the same, since the segmentation and normal losses re-apply
    log-softmax and normalization.
    """
    task_list = segnet_tasks(num_tasks)
    heads = {t.name: t.out_channels for t in task_list}
    # As `models.build_model('segnet', heads, seed=seed, filters=filters)`, with an RBG key:
    # the default (threefry) key compiles each initializer for ~1 s of CPU, ~30 s in all.
    rngs = nnx.Rngs(jax.random.key(seed, impl="rbg"))
    model = models.MODELS["segnet"](heads, filters=tuple(filters), rngs=rngs)
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    def loss_fn(params, batch_stats, batch):
        # Fresh statistics at the current trace level (see `Trainer._forward`).
        batch_stats = jax.tree.map(lambda x: x, batch_stats)
        model = nnx.merge(graphdef, params, batch_stats)
        preds = model(batch["image"], train=True)
        losses = jnp.stack([t.loss(preds[t.name], batch) for t in task_list])
        return losses, nnx.state(model, nnx.BatchStat)

    batch = make_nyuv2_batch(seed, height, width, batch_size)
    return StepSetup(loss_fn, params, batch_stats, batch)


def num_params(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _block(out):
    return jax.block_until_ready(out)


def time_interleaved(
    fns: dict[str, Callable],
    args: Sequence[Any],
    rounds: int,
    min_time: float = 0.0,
    warmup: int = 2,
    seed: int = 0,
) -> dict[str, float]:
    """Median wall time (seconds) of each ``fn(*args)``, measured round-robin.

    Every round calls each function once, so slow phases of a noisy machine hit all of them
    alike and the ratios stay meaningful. The order is shuffled every round (seeded): a
    function that always ran right after the same heavy one would otherwise pay for that
    neighbour's freed memory and cold caches on every call (seen: the first function of a
    38-function round timed 2x slower than alone). The first ``warmup`` (compiling, warming)
    calls of each function are excluded.
    """
    for fn in fns.values():
        for _ in range(warmup):
            _block(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    n = 0
    while n < rounds or (time.perf_counter() - start < min_time and n < 20 * rounds):
        for i in rng.permutation(len(names)):
            name = names[i]
            t0 = time.perf_counter()
            _block(fns[name](*args))
            times[name].append(time.perf_counter() - t0)
        n += 1
    return {name: statistics.median(ts) for name, ts in times.items()}


def temp_memory_mb(jitted: Callable, args: Sequence[Any]) -> float | None:
    """Temporary memory of the compiled function (XLA's memory_analysis), in MB."""
    try:
        analysis = jitted.lower(*args).compile().memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if analysis is None:
        return None
    return float(analysis.temp_size_in_bytes) / 2**20


def machine_description() -> dict:
    return {
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def write_outputs(name: str, out_dir: str, payload: dict, table: str) -> tuple[str, str]:
    """Writes ``<name>.json`` and ``<name>.md`` under ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"{name}.json")
    md_path = os.path.join(out_dir, f"{name}.md")
    with open(json_path, "w") as f:
        json.dump(payload, f, indent=2)
    with open(md_path, "w") as f:
        f.write(table)
    return json_path, md_path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
