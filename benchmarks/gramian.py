"""Cost of `mtl.gramian` on CPU: column blocks against one dot, alone and inside a full step.

`mtl.gramian` sums, on a single CPU device, the Gramians of [K, 16384] column blocks of each long
Jacobian leaf (`mtl_jax.jacobian._gram_by_column_blocks`); elsewhere (GPU, TPU, meshes) it takes
one dot per leaf (`_gram_dot`). This benchmark times both paths in one process, round-robin:

* *Gramian alone*, for each K: the Gramian of a random Jacobian of the benchmark CNN
  (`benchmarks/common.py`, 1.11M parameters) by each path, with ``sum_tasks`` (one read of the
  Jacobian) as the memory floor, and each path's rate in GFLOP/s (2 K^2 P flops).
* *Full steps*, at the largest K, for ``--methods``: the training step of `benchmarks/methods.py`
  (``value_and_jacobian`` + ``mtl.chain(method, sum_tasks, adam)``) traced with each path, as a
  ratio to the engine-only step timed in the same rounds.

    python -m benchmarks.gramian                                   # K = 3, 10, 40; 4 methods
    python -m benchmarks.gramian --tasks 40 --methods mgda upgrad --repeats 11

The one-dot path is selected while tracing by raising the column-block threshold
(`mtl_jax.jacobian._GRAM_COLUMN_BLOCK`) above every leaf's size. Writes ``gramian.json`` and
``gramian.md`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import contextlib
from unittest import mock

import jax

import mtl_jax as mtl
from benchmarks import common
from benchmarks import methods as bm
from mtl_jax import jacobian as jac_lib

PATHS = ("column blocks", "one dot")


def _path(name: str):
    """Context in which `mtl.gramian` traces the given path."""
    if name == "one dot":
        return mock.patch.object(jac_lib, "_GRAM_COLUMN_BLOCK", 1 << 62)
    return contextlib.nullcontext()


def gramian_alone(k: int, repeats: int) -> dict:
    params = common.init_hps_cnn(jax.random.key(0), k)
    jac = bm.random_jacobian(k, params, jax.random.key(1))
    fns = {"sum_tasks": jax.jit(lambda j: mtl.sum_tasks().update(j, None)[0])}
    for name in PATHS:
        f = jax.jit(lambda j: mtl.gramian(j))  # a fresh function: its own trace cache
        with _path(name):
            jax.block_until_ready(f(jac))  # traced and compiled here, with this path
        fns[name] = f
    times = common.time_interleaved(fns, (jac,), repeats)
    p = common.num_params(params)
    return {
        "num_params": p,
        "ms": {n: t * 1e3 for n, t in times.items()},
        "gflops": {n: 2 * k * k * p / times[n] / 1e9 for n in PATHS},
    }


def full_steps(k: int, methods: list[str], repeats: int) -> dict:
    setup = common.cnn_setup(k)
    params, model_state, batch = setup.params, setup.model_state, setup.batch
    fns = {}

    def add(label, name, path):
        tx, step = bm.step_fn(name, k, setup.loss_fn)
        with _path(path):  # compiled here, under this Gramian path
            fns[label] = bm.threaded_step(step, params, model_state, tx.init(params), batch, 1)

    add(bm.ENGINE, bm.ENGINE, PATHS[0])
    for m in methods:
        for path in PATHS:
            add(f"{m} [{path}]", m, path)
    times = common.time_interleaved(fns, (), repeats, warmup=1)
    engine = times[bm.ENGINE]
    return {
        "engine_ms": engine * 1e3,
        "ratio": {n: t / engine for n, t in times.items() if n != bm.ENGINE},
    }


def to_markdown(results: dict) -> str:
    m = results["machine"]
    out = [
        f"Gramian of a random benchmark-CNN Jacobian, alone (median ms, GFLOP/s), "
        f"backend={m['backend']}, {m['cpu_count']} CPUs, jax {m['jax']}, {m['date']}.\n",
        common.markdown_table(
            ["K", "sum_tasks (one read)", *PATHS, "speed-up"],
            [
                [
                    k,
                    f"{r['ms']['sum_tasks']:.1f} ms",
                    *(f"{r['ms'][n]:.1f} ms ({r['gflops'][n]:.0f} GFLOP/s)" for n in PATHS),
                    f"{r['ms']['one dot'] / r['ms']['column blocks']:.2f}x",
                ]
                for k, r in results["alone"].items()
            ],
        ),
    ]
    if results.get("steps"):
        s = results["steps"]
        out += [
            f"\nFull training step at K={s['k']} as a ratio to the engine-only step "
            f"({s['engine_ms']:.0f} ms), same rounds:\n",
            common.markdown_table(
                ["method", *PATHS],
                [
                    [meth, *(f"{s['ratio'][f'{meth} [{p}]']:.3f}x" for p in PATHS)]
                    for meth in s["methods"]
                ],
            ),
        ]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[3, 10, 40])
    parser.add_argument("--methods", nargs="+", default=["mgda", "pcgrad", "cagrad", "upgrad"])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if jax.device_count() != 1:
        raise SystemExit("benchmarks.gramian: needs a single device (column blocks are 1-device).")
    results = {"machine": common.machine_description(), "alone": {}}
    for k in args.tasks:
        results["alone"][k] = r = gramian_alone(k, args.repeats)
        print(
            f"K={k:3d} Gramian alone: " + ", ".join(f"{n} {v:.1f} ms" for n, v in r["ms"].items())
        )
    if args.methods:
        k = max(args.tasks)
        s = full_steps(k, args.methods, args.repeats)
        results["steps"] = {"k": k, "methods": args.methods, **s}
        print(f"K={k:3d} steps: " + ", ".join(f"{n} {v:.3f}x" for n, v in s["ratio"].items()))
    table = to_markdown(results)
    print(table)
    for path in common.write_outputs("gramian", args.out, results, table):
        print("wrote", path)


if __name__ == "__main__":
    main()
