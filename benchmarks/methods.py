"""Cost of each balancing method's update, as a ratio to `sum_tasks` on the same Jacobian.

For every method in ``mtl.BALANCERS`` and K in {2, 3, 10, 40}, on a random Jacobian of ~1M
parameters (leaves shaped like the benchmark CNN's), it times in one process, round-robin:
``sum_tasks`` alone, and ``chain(method, sum_tasks)``; and, for the K x K part, the method's
update on a tiny Jacobian with the same K (which is dominated by the K-space solve). It also
reports the method's cost relative to a full EW training step of the benchmark CNN, which is
the issue's target (the balancer adds <= 5% to a step at K=40).

    python -m benchmarks.methods
    python -m benchmarks.methods --tasks 10 --methods mgda upgrad --repeats 5

Writes ``methods.json`` and ``methods.md`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import inspect

import jax
import jax.numpy as jnp
import optax

import mtl_jax as mtl
from benchmarks import common

# The per-method constructor / update arguments of the common method test (one source of truth).
from tests.test_common_methods import EXTRA_UPDATE_ARGS, INIT_KWARGS


def build(name: str, k: int) -> optax.GradientTransformationExtraArgs:
    factory = getattr(mtl, name)
    kwargs = dict(INIT_KWARGS.get(name, lambda k: {})(k))
    if "num_tasks" in inspect.signature(factory).parameters:
        kwargs.setdefault("num_tasks", k)
    return factory(**kwargs)


def random_jacobian(k: int, params, key) -> dict:
    keys = jax.random.split(key, len(jax.tree.leaves(params)))
    leaves, treedef = jax.tree.flatten(params)
    rows = [jax.random.normal(kk, (k,) + leaf.shape) for kk, leaf in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(treedef, rows)


def run(tasks: list[int], methods: list[str], repeats: int) -> dict:
    results = {"machine": common.machine_description(), "rows": []}
    for k in tasks:
        encoder = common.init_hps_cnn(jax.random.key(0), k)["encoder"]
        jac = random_jacobian(k, encoder, jax.random.key(1))
        tiny = {"w": jax.random.normal(jax.random.key(2), (k, 8))}
        losses = jnp.linspace(1.0, 2.0, k)
        batch = common.make_batch(jax.random.key(3), k)
        params = common.init_hps_cnn(jax.random.key(0), k)
        ew_step = jax.jit(jax.grad(lambda p, b: jnp.sum(common.task_losses(p, b))))

        fns, tiny_fns = {}, {}
        for name in ["sum_tasks"] + methods:
            if name == "sum_tasks":
                tx = mtl.sum_tasks()
            else:
                tx = optax.chain(build(name, k), mtl.sum_tasks())

            def call(j, tx=tx, name=name):
                state = tx.init(jax.tree.map(lambda x: x[0], j))
                extra = EXTRA_UPDATE_ARGS[name](k, 0) if name in EXTRA_UPDATE_ARGS else {}
                return tx.update(j, state, None, task_losses=losses, **extra)[0]

            fns[name] = jax.jit(call)
            tiny_fns[name] = jax.jit(call)
        times = common.time_interleaved(
            {**fns, "EW training step": lambda j: ew_step(params, batch)}, (jac,), repeats
        )
        tiny_times = common.time_interleaved(tiny_fns, (tiny,), repeats)
        base, step = times["sum_tasks"], times["EW training step"]
        row = {
            "num_tasks": k,
            "num_params": common.num_params(encoder),
            "sum_tasks_ms": base * 1e3,
            "ew_step_ms": step * 1e3,
            "methods": {
                name: {
                    "ms": times[name] * 1e3,
                    "ratio_to_sum_tasks": times[name] / base,
                    "added_fraction_of_ew_step": (times[name] - base) / step,
                    "kspace_ms": tiny_times[name] * 1e3,
                }
                for name in methods
            },
        }
        results["rows"].append(row)
        for name, r in row["methods"].items():
            print(
                f"K={k:3d} {name:24s} {r['ratio_to_sum_tasks']:7.2f}x sum_tasks  "
                f"K-space {r['kspace_ms']:8.3f} ms",
                flush=True,
            )
    return results


def to_markdown(results: dict) -> str:
    rows = results["rows"]
    methods = list(rows[0]["methods"])
    header = ["method"] + [f"K={r['num_tasks']}" for r in rows]
    body = []
    for name in methods:
        cells = []
        for r in rows:
            m = r["methods"][name]
            cells.append(f"{m['ratio_to_sum_tasks']:.2f}x / {m['kspace_ms']:.2f} ms")
        body.append([name] + cells)
    body.append(["sum_tasks time"] + [f"{r['sum_tasks_ms']:.2f} ms" for r in rows])
    body.append(["EW training step"] + [f"{r['ew_step_ms']:.1f} ms" for r in rows])
    m = results["machine"]
    note = (
        "Each cell: time of `chain(method, sum_tasks)` as a ratio to `sum_tasks` on the same "
        f"random Jacobian ({rows[0]['num_params'] / 1e6:.2f}M parameters) / time of the same "
        "update on a K x 8 Jacobian (the K-space part: Gramian + solve). "
        f"backend={m['backend']}, {m['cpu_count']} CPUs, jax {m['jax']}, {m['date']}.\n\n"
    )
    return note + common.markdown_table(header, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 3, 10, 40])
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    methods = args.methods or [m for m in mtl.BALANCERS if m != "scalarize"]
    results = run(args.tasks, methods, args.repeats)
    table = to_markdown(results)
    paths = common.write_outputs("methods", args.out, results, table)
    print(table)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
