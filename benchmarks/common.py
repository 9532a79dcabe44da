"""Shared pieces of the benchmarks: the benchmark CNN, timing, memory, and the output files.

The benchmark model is the hard-parameter-sharing CNN the issues specify: a shared conv encoder
(3 convs + a dense layer, ~1.1M parameters) and K linear classification heads, batch 64 of
32x32x3 inputs. Every figure a benchmark reports is a ratio of timings measured in the same
process (this machine is noisy), median of repeats, warm-up (compilation) excluded.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.models import layers

NUM_CLASSES = 10


def init_hps_cnn(key: jax.Array, num_tasks: int, width: int = 32, hidden: int = 256) -> dict:
    """Parameters of the HPS CNN: {'encoder': {...}, 'heads': {'w': [K, hidden, C], 'b': ...}}."""
    ks = jax.random.split(key, 5)

    def conv(k, cin, cout):
        return {
            "w": jax.random.normal(k, (3, 3, cin, cout)) * np.sqrt(2.0 / (9 * cin)),
            "b": jnp.zeros((cout,)),
        }

    flat = 8 * 8 * 2 * width
    encoder = {
        "conv1": conv(ks[0], 3, width),
        "conv2": conv(ks[1], width, 2 * width),
        "conv3": conv(ks[2], 2 * width, 2 * width),
        "dense": {
            "w": jax.random.normal(ks[3], (flat, hidden)) * np.sqrt(2.0 / flat),
            "b": jnp.zeros((hidden,)),
        },
    }
    heads = {
        "w": jax.random.normal(ks[4], (num_tasks, hidden, NUM_CLASSES)) / np.sqrt(hidden),
        "b": jnp.zeros((num_tasks, NUM_CLASSES)),
    }
    return {"encoder": encoder, "heads": heads}


def _conv(x, p, stride, conv):
    y = conv(x, p["w"], (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.relu(y + p["b"])


# The benchmark CNN's convolution: ours (fast kernel gradient on CPU) by default; XLA's own
# (``jax.lax.conv_general_dilated``) for the before/after rows of benchmarks/jacobian.py.
CONVS = {"ours": layers.conv_general_dilated, "xla": jax.lax.conv_general_dilated}


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
        "x": jax.random.normal(kx, (batch_size, 32, 32, 3)),
        "y": jax.random.randint(ky, (batch_size, num_tasks), 0, NUM_CLASSES),
    }


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
) -> dict[str, float]:
    """Median wall time (seconds) of each ``fn(*args)``, measured round-robin.

    Every round calls each function once, so slow phases of a noisy machine hit all of them
    alike and the ratios stay meaningful. The first ``warmup`` (compiling, warming) calls of each
    function are excluded.
    """
    for fn in fns.values():
        for _ in range(warmup):
            _block(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    n = 0
    while n < rounds or (time.perf_counter() - start < min_time and n < 20 * rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            _block(fn(*args))
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
