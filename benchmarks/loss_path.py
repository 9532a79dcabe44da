"""Cost of the loss-scalarizing (one-backward) path of the loss-level methods, as ratios to EW.

On the HPS CNN (benchmarks/common.py; batch 64, 32x32x3, ~1.1M parameters) for each K it times,
in one process, round-robin: an equal-weight step (``jax.grad`` of the summed loss) and, for
each method, ``mtl.weighted_value_and_grad(loss_fn, mtl.<method>_weighting(K))`` (weights from
this step's losses, state update, one backward pass). GradNorm uses
``mtl.gradnorm_value_and_grad`` with the last shared layer (the encoder's dense layer) as its
parameter subset: per-task norms from a Jacobian w.r.t. that layer only, then one backward.
The issue's target is <= 1.05x EW.

    python -m benchmarks.loss_path
    python -m benchmarks.loss_path --tasks 3 --methods famo dwa --repeats 30

Writes ``loss_path.json`` and ``loss_path.md`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

import mtl_jax as mtl
from benchmarks import common

# Methods with a pure loss path (part D of issue 5). ExcessMTL and DB-MTL (with its gradient
# EMA) need the per-task gradients of all shared parameters: no one-backward path.
METHODS = ("uncertainty_weighting", "dwa", "rlw", "gls", "imtl_l", "stch", "famo", "gradnorm")

GRADNORM_MASK = {
    "encoder": {"conv1": False, "conv2": False, "conv3": False, "dense": True},
    "heads": False,
}


def step_fns(k: int, methods: list[str]) -> tuple[dict, dict]:
    """name -> jitted ``fn(state, params, batch)``; and name -> initial state."""
    f = common.task_losses
    ew = jax.grad(lambda p, b: jnp.sum(f(p, b)))
    fns = {"EW step (grad of sum)": jax.jit(lambda s, p, b: ew(p, b))}
    states = {"EW step (grad of sum)": None}
    for name in methods:
        lw = getattr(mtl, f"{name}_weighting")(k)
        if name == "gradnorm":
            vg = mtl.gradnorm_value_and_grad(f, lw, GRADNORM_MASK)
        else:
            vg = mtl.weighted_value_and_grad(f, lw)
        fns[name] = jax.jit(vg)
        states[name] = lw.init()
    return fns, states


def run(tasks: list[int], methods: list[str], repeats: int) -> dict:
    results = {"machine": common.machine_description(), "rows": []}
    for k in tasks:
        params = common.init_hps_cnn(jax.random.key(0), k)
        batch = common.make_batch(jax.random.key(1), k)
        fns, states = step_fns(k, methods)
        bound = {name: functools.partial(fn, states[name]) for name, fn in fns.items()}
        times = common.time_interleaved(bound, (params, batch), repeats)
        ew = times["EW step (grad of sum)"]
        for name, t in times.items():
            row = {"K": k, "method": name, "ms": t * 1e3, "ratio_to_ew": t / ew}
            results["rows"].append(row)
            print(f"K={k:3d} {name:28s} {t * 1e3:9.2f} ms  {t / ew:6.3f}x EW", flush=True)
    return results


def to_markdown(results: dict) -> str:
    rows = [
        [
            r["K"],
            f"`{r['method']}`" if "EW" not in r["method"] else r["method"],
            f"{r['ms']:.2f}",
            f"{r['ratio_to_ew']:.3f}",
        ]
        for r in results["rows"]
    ]
    m = results["machine"]
    head = f"Backend {m['backend']}, {m['cpu_count']} CPUs, jax {m['jax']}, {m['date']}.\n\n"
    return head + common.markdown_table(["K", "method", "ms / step", "x EW"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[3, 10, 40])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    results = run(args.tasks, args.methods, args.repeats)
    paths = common.write_outputs("loss_path", args.out, results, to_markdown(results))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
