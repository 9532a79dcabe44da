"""Cost of the per-task Jacobian: every engine strategy and the alternatives, as ratios to EW.

On the HPS CNN (benchmarks/common.py; batch 64, 32x32x3, ~1.1M parameters) for each K it times,
in one process: the forward pass alone, an equal-weight step (``jax.grad`` of the summed loss),
``mtl.value_and_jacobian`` with its default settings and each strategy, a Python loop of K
``jax.grad`` calls inside one ``jit``, vmap in chunks, and ``jax.jacrev``; each as a ratio to EW,
plus XLA's temporary memory of the compiled function. Four more rows time the EW step and the
default engine with `mtl_jax.models.layers.conv_general_dilated` as it was before 8 December
2026 ("previous conv": ``cpu_kernel_grad='per_tap'``, ``cpu_input_grad='xla'``) and with XLA's
own convolution (``jax.lax.conv_general_dilated``): the before/after of each change.

    python -m benchmarks.jacobian                       # K = 2, 3, 10, 40
    python -m benchmarks.jacobian --tasks 3 10 --repeats 3 --out benchmarks/results

Writes ``jacobian.json`` and ``jacobian.md`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import mtl_jax as mtl
from benchmarks import common


def formulations(num_tasks: int, chunk: int) -> dict:
    """name -> function(params, batch) returning something Jacobian-sized (or the EW grad)."""
    f = common.task_losses

    def loop_of_grads(params, batch):
        return [jax.grad(lambda p, k=k: f(p, batch)[k])(params) for k in range(num_tasks)]

    forms = {
        "forward": lambda p, b: f(p, b),
        "EW step (grad of sum)": jax.grad(lambda p, b: jnp.sum(f(p, b))),
        "value_and_jacobian (default)": mtl.value_and_jacobian(f),
        "strategy='unrolled'": mtl.value_and_jacobian(f, strategy="unrolled"),
        "strategy='vmap'": mtl.value_and_jacobian(f, strategy="vmap"),
        f"vmap, chunk_size={chunk}": mtl.value_and_jacobian(f, strategy="vmap", chunk_size=chunk),
        "loop of K jax.grad in jit": loop_of_grads,
        "jax.jacrev": jax.jacrev(f),
        "EW step, previous conv": jax.grad(lambda p, b: jnp.sum(f(p, b, conv="previous"))),
        "value_and_jacobian, previous conv": mtl.value_and_jacobian(
            lambda p, b: f(p, b, conv="previous")
        ),
        "EW step, XLA's conv": jax.grad(lambda p, b: jnp.sum(f(p, b, conv="xla"))),
        "value_and_jacobian, XLA's conv": mtl.value_and_jacobian(lambda p, b: f(p, b, conv="xla")),
    }
    return {name: jax.jit(fn) for name, fn in forms.items()}


def run(tasks: list[int], repeats: int, chunk: int) -> dict:
    results = {"machine": common.machine_description(), "rows": []}
    for k in tasks:
        params = common.init_hps_cnn(jax.random.key(0), k)
        batch = common.make_batch(jax.random.key(1), k)
        forms = formulations(k, chunk)
        mems = {name: common.temp_memory_mb(fn, (params, batch)) for name, fn in forms.items()}
        times = common.time_interleaved(forms, (params, batch), repeats)
        for name in forms:
            print(
                f"K={k:3d} {name:32s} {times[name] * 1e3:9.2f} ms  mem {mems[name]} MB", flush=True
            )
        ew = times["EW step (grad of sum)"]
        engine = [
            n
            for n in times
            if n not in ("forward", "EW step (grad of sum)")
            and "XLA" not in n
            and "previous" not in n
        ]
        fastest = min(engine, key=times.get)
        row = {
            "num_tasks": k,
            "num_params": common.num_params(params),
            "ew_ms": ew * 1e3,
            "ratio_to_ew": {n: t / ew for n, t in times.items()},
            "temp_memory_mb": mems,
            "fastest": fastest,
            "default_vs_fastest": times["value_and_jacobian (default)"] / times[fastest],
            "auto_strategy": list(mtl.auto_strategy(k)),
        }
        results["rows"].append(row)
    return results


def to_markdown(results: dict) -> str:
    rows = results["rows"]
    names = list(rows[0]["ratio_to_ew"])
    header = ["formulation"] + [f"K={r['num_tasks']}" for r in rows]
    body = []
    for n in names:
        cells = []
        for r in rows:
            mem = r["temp_memory_mb"][n]
            mem_s = f" / {mem:.0f} MB" if mem is not None else ""
            cells.append(f"{r['ratio_to_ew'][n]:.2f}x{mem_s}")
        body.append([n] + cells)
    body.append(["EW step time"] + [f"{r['ew_ms']:.1f} ms" for r in rows])
    body.append(["default / fastest"] + [f"{r['default_vs_fastest']:.3f}" for r in rows])
    m = results["machine"]
    note = (
        f"Ratios to the EW step (median time), with XLA temporary memory; HPS CNN "
        f"{rows[0]['num_params'] / 1e6:.2f}M params (+heads), batch 64, 32x32x3. "
        f"backend={m['backend']}, {m['cpu_count']} CPUs, jax {m['jax']}, {m['date']}.\n\n"
    )
    return note + common.markdown_table(header, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 3, 10, 40])
    parser.add_argument("--repeats", type=int, default=7, help="timing rounds")
    parser.add_argument("--chunk", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    results = run(args.tasks, args.repeats, args.chunk)
    table = to_markdown(results)
    paths = common.write_outputs("jacobian", args.out, results, table)
    print(table)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
