"""Cost of the loss-scalarizing (one-backward) path of the loss-level methods, as ratios to EW.

On the HPS CNN (benchmarks/common.py; batch 64, 32x32x3, ~1.1M parameters) for each K it times,
in one process, round-robin: an equal-weight step (``jax.grad`` of the summed loss) and, for
each loss-level method of ``mtl.registry.LOSS_METHODS`` that has a one-backward path,
``mtl.weighted_value_and_grad(loss_fn, mtl.<method>_weighting(K))`` (weights from this step's
losses, state update, one backward pass). The issue's target is <= 1.05x EW.

GradNorm needs the per-task gradient norms of the last shared layer (the encoder's dense layer,
524k parameters). Two ways are timed:

* ``gradnorm``: `mtl.gradnorm_dense_value_and_grad` with the model split at that layer: for
  ``y = x W + b`` the task-k gradient is ``(x^T g_k, sum_b g_k)`` with ``g_k = dL_k/dy``
  [B, 256] (K VJPs through the heads only), so the norms come from two B x B Gram matrices
  (`mtl.dense_grad_norms`); then one backward pass of the weighted loss;
* ``gradnorm (mask Jacobian)``: `mtl.gradnorm_value_and_grad` with that layer as its parameter
  subset: a K-row Jacobian w.r.t. the layer (K outer products of [B, 4096] x [B, 256]), then
  the same weighted backward (the path before the dense one, kept for comparison).

DB-MTL (log-loss gradient EMA) and ExcessMTL need per-task gradients of all shared parameters:
no one-backward path, not timed here.

    python -m benchmarks.loss_path
    python -m benchmarks.loss_path --tasks 3 --methods famo dwa --repeats 30

Writes ``loss_path.json`` and ``loss_path.md`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import functools
import inspect

import jax
import jax.numpy as jnp

import mtl_jax as mtl
from benchmarks import common

# The per-method constructor / update arguments of the common method test (one source of truth).
from tests.test_common_methods import EXTRA_UPDATE_ARGS, INIT_KWARGS

# Loss-level methods without a one-backward path (they need every shared parameter's per-task
# gradient).
NO_LOSS_PATH = ("db_mtl", "excess_mtl")
METHODS = tuple(m for m in mtl.registry.LOSS_METHODS if m not in NO_LOSS_PATH)
GRADNORM_MASK_ROW = "gradnorm (mask Jacobian)"

GRADNORM_MASK = {
    "encoder": {"conv1": False, "conv2": False, "conv3": False, "dense": True},
    "heads": False,
}


def weighting(name: str, k: int) -> mtl.LossWeighting:
    """``mtl.<name>_weighting`` with the common method test's constructor arguments."""
    factory = getattr(mtl, f"{name}_weighting")
    kwargs = dict(INIT_KWARGS.get(name, lambda k: {})(k))
    if "num_tasks" in inspect.signature(factory).parameters:
        kwargs.setdefault("num_tasks", k)
    return factory(**kwargs)


def dense_inputs(params: dict, batch: dict) -> jax.Array:
    """The input of the last shared (dense) layer: the flattened conv features."""
    return common.conv_features(params["encoder"], batch["x"])


def dense_layer(params: dict) -> tuple[jax.Array, jax.Array]:
    """(kernel, bias) of the last shared layer."""
    return params["encoder"]["dense"]["w"], params["encoder"]["dense"]["b"]


def losses_from_dense(params: dict, y: jax.Array, batch: dict) -> jax.Array:
    """The rest of the model from the dense layer's output (its ReLU, then the heads)."""
    return common.head_losses(params["heads"], jax.nn.relu(y), batch["y"])


def gradnorm_step(lw: mtl.LossWeighting, dense: bool = True):
    """GradNorm's loss path on the benchmark CNN: the dense (Gram) one or the mask-Jacobian one."""
    if dense:
        return mtl.gradnorm_dense_value_and_grad(dense_inputs, dense_layer, losses_from_dense, lw)
    return mtl.gradnorm_value_and_grad(common.task_losses, lw, GRADNORM_MASK)


def step_fns(k: int, methods: list[str]) -> tuple[dict, dict]:
    """name -> jitted ``fn(state, params, batch)``; and name -> initial state."""
    f = common.task_losses
    ew = jax.grad(lambda p, b: jnp.sum(f(p, b)))
    fns = {"EW step (grad of sum)": jax.jit(lambda s, p, b: ew(p, b))}
    states = {"EW step (grad of sum)": None}
    for name in methods:
        lw = weighting("gradnorm" if name == GRADNORM_MASK_ROW else name, k)
        extra = EXTRA_UPDATE_ARGS[name](k, 0) if name in EXTRA_UPDATE_ARGS else {}
        if name in ("gradnorm", GRADNORM_MASK_ROW):
            vg = gradnorm_step(lw, dense=name == "gradnorm")
        else:
            vg = mtl.weighted_value_and_grad(f, lw)
        fns[name] = jax.jit(functools.partial(vg, **extra))
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
    parser.add_argument("--methods", nargs="+", default=[*METHODS, GRADNORM_MASK_ROW])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    results = run(args.tasks, args.methods, args.repeats)
    paths = common.write_outputs("loss_path", args.out, results, to_markdown(results))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
