"""Cost of each balancing method: in a full training step, and its update alone.

Two measurements per K in {2, 3, 10, 40}, each a ratio of timings taken in one process,
round-robin (see `common.time_interleaved`):

* **Full step** (issue 9's "own ceiling"): one jitted training step of the benchmark CNN --
  ``value_and_jacobian`` + ``mtl.chain(method, sum_tasks, adam)`` + ``apply_updates`` (the fused
  reduction of `mtl.chain`; ``--unfused``: ``optax.chain``) -- as a ratio
  to the engine-only step (the same without the method: ``value_and_jacobian`` + ``sum_tasks``
  + ``adam``, i.e. EW through the Jacobian engine). Target: <= 1.10x at every K. Measured for
  the issue's method list at every K and for every method at the largest K. Each group of
  methods is timed together with the engine-only step, so every ratio has its own baseline.
* **Update alone** (issue 4), at every K: ``chain(method, sum_tasks)`` on a random Jacobian of
  the CNN encoder's shape (1.1M parameters), as a ratio to ``sum_tasks`` alone on the same
  Jacobian, and the time it adds to ``sum_tasks`` as a share of the engine-only training step
  (timed in the same process; target at K=40: <= 5%).
* **SegNet** (``--model segnet``, issue 9's second model): the full step of issue 9's methods on
  the NYUv2 hard-sharing SegNet of the harness (`common.segnet_setup`: ``experiments/nyud.py
  :segnet``, 25M parameters, BatchNorm in train mode with its statistics updated as in
  ``mtl_jax.train``) at a reduced resolution (``--resolution``, default 64x96; multiples of 32)
  and batch 2 (``--batch-size``), on a random batch in the NYUv2 format. K in {2, 3, 10}: K
  heads cycle the three tasks (segmentation, depth, normal, segmentation_1, ...; heads of one
  type share its labels). K=40 is not run by default: its unrolled Jacobian step did not
  compile in 17 min on the 2-core CPU. The Jacobian is of all parameters (heads included), as
  for the CNN; the harness balances the shared ones (``shared_only``).

Every function is timed from the state after `ADVANCE` (2) updates -- a steady-state step, not
a method's first one -- with its state donated and threaded through the timed calls, as a
training loop does (methods with Jacobian-sized state -- MoCo, DB-MTL, ExcessMTL -- then update
it in place: MoCo's update at K=40 took 216 ms with a fresh state buffer per call, 126 ms
donated), and the functions of a round run in a shuffled order.

Both report the **K-space part**: the same update on a K x 8 Jacobian (Gramian + K x K solve),
and for the full step its share of the step (target: <= 5% at K=40).

    python -m benchmarks.methods
    python -m benchmarks.methods --tasks 10 --methods mgda upgrad --repeats 5
    python -m benchmarks.methods --no-update-alone --tasks 2 40
    python -m benchmarks.methods --tasks 40 --methods mgda upgrad --unfused mgda upgrad
    python -m benchmarks.methods --model segnet --tasks 2 3 10 --repeats 5

Writes ``methods.json`` and ``methods.md`` (SegNet: ``methods_segnet.{json,md}``) to ``--out``
(default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import mtl_jax as mtl
from benchmarks import common
from mtl_jax.compare import method_not_applicable

# The per-method constructor / update arguments of the common method test (one source of truth).
from tests.test_common_methods import EXTRA_UPDATE_ARGS, INIT_KWARGS

# Issue 9's method list (EW is the engine-only step itself).
STEP_METHODS = (
    "mgda",
    "pcgrad",
    "cagrad",
    "nash_mtl",
    "upgrad",
    "aligned_mtl",
    "famo",
    "uncertainty_weighting",
)
ENGINE = "EW (engine only)"
# Overrides of the common test's constructor arguments: the common test re-chooses the
# sparse_training mask every 2 steps to exercise the refresh; timed here is the paper's fixed
# mask (chosen at the first update, so not in a steady-state step).
BENCHMARK_KWARGS: dict[str, dict[str, Any]] = {"sparse_training": {"refresh_every": None}}
# Updates (steps) run before timing, so that every method is timed in its steady state.
ADVANCE = 2
GROUP_SIZE = 8
# The SegNet's default K: at K=40 the unrolled Jacobian step of the SegNet did not finish
# compiling in 17 min on the 2-core CPU (loaded; K=10: ~4 min per step function there).
SEGNET_TASKS = (2, 3, 10)
# The models of the full step: name -> setup(num_tasks, **model_kwargs) (`common.StepSetup`).
MODELS: dict[str, Callable[..., common.StepSetup]] = {
    "cnn": common.cnn_setup,
    "segnet": common.segnet_setup,
}


# Suffix of a method timed in ``optax.chain`` instead of ``mtl.chain`` (``--unfused``).
UNFUSED = " [optax.chain]"


def _method(name: str) -> str:
    return name.removesuffix(UNFUSED)


def build(name: str, k: int) -> optax.GradientTransformationExtraArgs:
    name = _method(name)
    factory = getattr(mtl, name)
    kwargs = dict(INIT_KWARGS.get(name, lambda k: {})(k))
    kwargs.update(BENCHMARK_KWARGS.get(name, {}))
    if "num_tasks" in inspect.signature(factory).parameters:
        kwargs.setdefault("num_tasks", k)
    return factory(**kwargs)


def random_jacobian(k: int, params, key) -> dict:
    keys = jax.random.split(key, len(jax.tree.leaves(params)))
    leaves, treedef = jax.tree.flatten(params)
    rows = [common.normal(kk, (k,) + leaf.shape) for kk, leaf in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(treedef, rows)


def _extra(name: str, k: int) -> dict:
    name = _method(name)
    return EXTRA_UPDATE_ARGS[name](k, 0) if name in EXTRA_UPDATE_ARGS else {}


def _chain(name: str, k: int, *tail: optax.GradientTransformation):
    """``mtl.chain(method, sum_tasks, *tail)``; a name ending in `UNFUSED`: ``optax.chain``,
    which writes the re-combined K x P Jacobian before reducing it."""
    chain = optax.chain if name.endswith(UNFUSED) else mtl.chain
    if name in ("sum_tasks", ENGINE):
        return chain(mtl.sum_tasks(), *tail)
    return chain(build(name, k), mtl.sum_tasks(), *tail)


def update_fn(name: str, k: int, losses: jax.Array, jac: dict) -> Callable[[dict], dict]:
    """Jitted ``chain(method, sum_tasks)`` update of a Jacobian, from a steady state.

    The state is the one after `ADVANCE` updates on ``jac`` (an argument of the jitted
    function, not a constant): the timed call is an ordinary step, not a method's first one
    (sparse_training chooses its mask at the first; GradNorm records its initial losses there
    and acts from the second).
    """
    tx = _chain(name, k)
    extra = _extra(name, k)
    update = jax.jit(
        lambda j, s: tx.update(j, s, None, task_losses=losses, **extra), donate_argnums=1
    )
    return _threaded(
        lambda s, j: update(j, s), tx.init(jax.tree.map(lambda x: x[0], jac)), (jac,), ADVANCE
    )


def threaded_step(step, params, model_state, opt_state, batch, advance: int = ADVANCE):
    """A no-argument call of a `step_fn` step (which donates its optimizer state) that threads
    that state through the calls, as a training loop does, after ``advance`` steps (a steady
    state). Parameters and batch stay fixed."""

    def call(s):
        out = step(params, model_state, s, batch)
        return out, out[2]

    return _threaded(call, opt_state, (), advance)


def _threaded(call, state, advance_args: tuple, advance: int):
    """``timed(*args) -> out`` for ``call(state, *args) -> (out, new_state)`` with a donated
    state: each call consumes the state and keeps the new one; first ``advance`` calls on
    ``advance_args``."""
    box = [_distinct(state)]
    for _ in range(advance):
        box[0] = call(box[0], *advance_args)[1]

    def timed(*args):
        out, box[0] = call(box[0], *args)
        return out

    return timed


def _distinct(state):
    """The state with every array in its own buffer (an init may put one array in two fields;
    a donated state must not)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True) if isinstance(x, jax.Array) else x, state)


def step_fn(name: str, k: int, loss_fn: Callable):
    """Jitted full training step: value_and_jacobian + chain(method, sum_tasks, adam).

    ``loss_fn(params, model_state, batch) -> (losses, model_state)`` (`common.StepSetup`); the
    step returns the new parameters, model state and optimizer state, and the task losses.
    """
    tx = _chain(name, k, optax.adam(1e-3))
    vj = mtl.value_and_jacobian(loss_fn, has_aux=True)

    def step(params, model_state, opt_state, batch):
        (losses, model_state), jac = vj(params, model_state, batch)
        updates, opt_state = tx.update(
            jac, opt_state, params, task_losses=losses, **_extra(name, k)
        )
        return optax.apply_updates(params, updates), model_state, opt_state, losses

    return tx, jax.jit(step, donate_argnums=2)


def grad_step_fn(loss_fn: Callable):
    """Jitted EW step without the engine: jax.grad of the summed losses + adam."""
    tx = optax.adam(1e-3)

    def summed(params, model_state, batch):
        losses, model_state = loss_fn(params, model_state, batch)
        return jnp.sum(losses), model_state

    def step(params, model_state, opt_state, batch):
        grads, model_state = jax.grad(summed, has_aux=True)(params, model_state, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), model_state, opt_state

    return tx, jax.jit(step, donate_argnums=2)


def kspace_times(names: list[str], k: int, losses: jax.Array, repeats: int) -> dict[str, float]:
    tiny = {"w": jax.random.normal(jax.random.key(2), (k, 8))}
    fns = {name: update_fn(name, k, losses, tiny) for name in names}
    return common.time_interleaved(fns, (tiny,), repeats)


def full_steps(
    names: list[str], k: int, repeats: int, setup: common.StepSetup | None = None
) -> tuple[dict, dict]:
    """Median step times (s) of every method and of the engine-only step it was timed with.

    ``setup``: the model (default: the benchmark CNN, `common.cnn_setup`).
    """
    setup = setup or common.cnn_setup(k)
    params, model_state, batch = setup.params, setup.model_state, setup.batch
    times, baselines = {}, {}

    def call(step, opt_state):
        return threaded_step(step, params, model_state, opt_state, batch)

    engine_tx, engine = step_fn(ENGINE, k, setup.loss_fn)
    engine_call = call(engine, engine_tx.init(params))
    grad_tx, grad = grad_step_fn(setup.loss_fn)
    grad_call = call(grad, grad_tx.init(params))
    groups = [names[i : i + GROUP_SIZE] for i in range(0, len(names), GROUP_SIZE)] or [[]]
    for g, group in enumerate(groups):
        fns = {ENGINE: engine_call}
        if g == 0:
            fns["EW (jax.grad, no engine)"] = grad_call
        for name in group:
            tx, step = step_fn(name, k, setup.loss_fn)
            fns[name] = call(step, tx.init(params))
        t = common.time_interleaved(fns, (), repeats, warmup=1)
        for name in group:
            times[name], baselines[name] = t[name], t[ENGINE]
        if g == 0:
            times[ENGINE] = t[ENGINE]
            times["EW (jax.grad, no engine)"] = t["EW (jax.grad, no engine)"]
        print(f"K={k:3d} steps: " + ", ".join(f"{n} {v * 1e3:.0f} ms" for n, v in t.items()))
    return times, baselines


def run(
    tasks: list[int],
    methods: list[str],
    repeats: int,
    update_alone: bool = True,
    step_all_at_max: bool = True,
    steps: bool = True,
    model: str = "cnn",
    model_kwargs: dict[str, Any] | None = None,
) -> dict:
    """The measurements for every K in ``tasks``; ``model``: a key of `MODELS` (the update-alone
    part is the CNN encoder's, so ``update_alone`` needs ``model='cnn'``)."""
    defaults = {
        n: p.default
        for n, p in inspect.signature(MODELS[model]).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    model_kwargs = {**defaults, **(model_kwargs or {})}
    if model != "cnn" and update_alone:
        raise ValueError(
            f"The update-alone measurement is the CNN's; model={model!r} needs update_alone=False."
        )
    results = {
        "machine": common.machine_description(),
        "model": {"name": model, **model_kwargs},
        "rows": [],
    }
    for k in tasks:
        losses = jnp.linspace(1.0, 2.0, k)
        # Methods undefined at this K (Krum below K=3) are left out of its row: "n/a".
        defined = [m for m in methods if method_not_applicable(_method(m), k) is None]
        step_names = [m for m in STEP_METHODS if m in defined]
        if step_all_at_max and k == max(tasks):
            step_names += [m for m in defined if m not in step_names]
        alone_names = defined if update_alone else []
        kspace = kspace_times(sorted(set(step_names) | set(alone_names)), k, losses, repeats)
        # Each row dated: with --merge, rows of one file come from different runs.
        row = {"num_tasks": k, "date": results["machine"]["date"]}

        if not steps:
            step_names = []
        # The engine-only step is timed whenever a share of it is reported.
        if steps or alone_names:
            setup = MODELS[model](k, **model_kwargs)
            row["model_params"] = common.num_params(setup.params)
            times, baselines = full_steps(step_names, k, repeats, setup)
        else:
            times, baselines = {}, {}
        engine = times.get(ENGINE, float("nan"))
        row["engine_step_ms"] = engine * 1e3
        row["grad_step_ms"] = times.get("EW (jax.grad, no engine)", float("nan")) * 1e3
        row["steps"] = {
            name: {
                "ms": times[name] * 1e3,
                "ratio_to_engine_step": times[name] / baselines[name],
                "kspace_ms": kspace[name] * 1e3,
                "kspace_fraction_of_step": kspace[name] / times[name],
            }
            for name in step_names
        }
        for name, r in row["steps"].items():
            print(
                f"K={k:3d} {name:24s} step {r['ratio_to_engine_step']:6.3f}x engine-only  "
                f"K-space {100 * r['kspace_fraction_of_step']:6.2f}% of the step",
                flush=True,
            )

        if alone_names:
            encoder = common.init_hps_cnn(jax.random.key(0), k)["encoder"]
            jac = random_jacobian(k, encoder, jax.random.key(1))
            fns = {name: update_fn(name, k, losses, jac) for name in ["sum_tasks"] + alone_names}
            t = common.time_interleaved(fns, (jac,), repeats)
            base = t["sum_tasks"]
            row["num_params"] = common.num_params(encoder)
            row["sum_tasks_ms"] = base * 1e3
            row["methods"] = {
                name: {
                    "ms": t[name] * 1e3,
                    "ratio_to_sum_tasks": t[name] / base,
                    "added_fraction_of_engine_step": (t[name] - base) / engine,
                    "kspace_ms": kspace[name] * 1e3,
                }
                for name in alone_names
            }
            for name, r in row["methods"].items():
                print(
                    f"K={k:3d} {name:24s} update {r['ratio_to_sum_tasks']:7.2f}x sum_tasks",
                    flush=True,
                )
        results["rows"].append(row)
    return results


def merge_rows(path: str, results: dict) -> dict:
    """``results`` plus the rows of ``path`` (an earlier output) for the K it did not measure."""
    if not os.path.exists(path):
        return results
    with open(path) as f:
        old = json.load(f)
    new_k = {r["num_tasks"] for r in results["rows"]}
    rows = [r for r in old["rows"] if r["num_tasks"] not in new_k] + results["rows"]
    machines = old.get("machines", [old["machine"]]) + [results["machine"]]
    return {
        **results,
        "machines": machines,
        "rows": sorted(rows, key=lambda r: r["num_tasks"]),
    }


def describe_model(results: dict) -> str:
    """The model of the full step, in words (results without ``'model'``: the CNN)."""
    m = results.get("model", {"name": "cnn"})
    if m["name"] == "cnn":
        return "the benchmark CNN"
    return (
        f"the NYUv2 hard-sharing SegNet (filters {tuple(m['filters'])}, {m['height']}x"
        f"{m['width']} inputs, batch {m['batch_size']}; K heads cycling segmentation, depth, "
        "normal)"
    )


def to_markdown(results: dict) -> str:
    rows = results["rows"]
    m = results["machine"]
    out = []
    header = ["method"] + [f"K={r['num_tasks']}" for r in rows]
    names = list(dict.fromkeys(n for r in rows for n in r["steps"]))
    if names:
        body = []
        for name in names:
            cells = []
            for r in rows:
                s = r["steps"].get(name)
                if s is None:
                    cells.append("-")
                    continue
                share = 100 * s["kspace_fraction_of_step"]
                cells.append(f"{s['ratio_to_engine_step']:.3f}x / {share:.2f}%")
            body.append([name] + cells)
        body.append(["engine-only step (EW)"] + [f"{r['engine_step_ms']:.0f} ms" for r in rows])
        body.append(
            ["engine-only / jax.grad EW step"]
            + [f"{r['engine_step_ms'] / r['grad_step_ms']:.2f}x" for r in rows]
        )
        body.append(["jax.grad EW step"] + [f"{r['grad_step_ms']:.0f} ms" for r in rows])
        out.append(
            f"Full training step of {describe_model(results)} (value_and_jacobian + method + "
            "sum_tasks + adam) as a ratio to the engine-only step (value_and_jacobian + "
            "sum_tasks + adam), "
            "timed in the same round-robin / the K-space part (the method's update on a K x 8 "
            "Jacobian: Gramian + solve) as a share of the step. "
            f"backend={m['backend']}, {m['cpu_count']} CPUs, jax {m['jax']}, {m['date']}.\n\n"
            + common.markdown_table(header, body)
        )
    alone = [r for r in rows if "methods" in r]
    if alone:
        header = ["method"] + [f"K={r['num_tasks']}" for r in alone]
        body = []
        for name in dict.fromkeys(n for r in alone for n in r["methods"]):
            cells = []
            for r in alone:
                m_r = r["methods"].get(name)
                if m_r is None:
                    cells.append("n/a")
                    continue
                cells.append(
                    f"{m_r['ratio_to_sum_tasks']:.2f}x / "
                    f"{100 * m_r['added_fraction_of_engine_step']:+.1f}% / "
                    f"{m_r['kspace_ms']:.2f} ms"
                )
            body.append([name] + cells)
        body.append(["sum_tasks time"] + [f"{r['sum_tasks_ms']:.2f} ms" for r in alone])
        body.append(["engine-only step"] + [f"{r['engine_step_ms']:.0f} ms" for r in alone])
        out.append(
            "Update alone: time of `chain(method, sum_tasks)` as a ratio to `sum_tasks` on the "
            f"same random Jacobian ({alone[0]['num_params'] / 1e6:.2f}M parameters) / the time "
            "it adds to `sum_tasks` as a share of the engine-only training step / time of the "
            "same update on a K x 8 Jacobian (the K-space part).\n\n"
            + common.markdown_table(header, body)
        )
    dates = {r["num_tasks"]: r["date"] for r in rows if "date" in r}
    if len(set(dates.values())) > 1:  # rows merged from several runs (--merge)
        out.append("Runs: " + ", ".join(f"K={k} {d}" for k, d in dates.items()) + ".\n")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--tasks", type=int, nargs="+", default=None, help="default: 2 3 10 40 (segnet: 2 3 10)"
    )
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--no-update-alone",
        dest="update_alone",
        action="store_false",
        help="skip the update-alone measurement",
    )
    parser.add_argument(
        "--issue-methods-only",
        dest="step_all",
        action="store_false",
        help="full steps for issue 9's list only (by default every method at the largest K)",
    )
    parser.add_argument(
        "--no-steps", dest="steps", action="store_false", help="skip the full-step measurement"
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of other K already in the output JSON (re-measure some K only)",
    )
    parser.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="cnn",
        help="the full step's model: the benchmark CNN, or the NYUv2 SegNet at reduced "
        "resolution (full steps of issue 9's methods only; writes methods_segnet.{json,md})",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        nargs=2,
        default=[64, 96],
        metavar=("H", "W"),
        help="SegNet input height and width (multiples of 32)",
    )
    parser.add_argument("--batch-size", type=int, default=2, help="SegNet batch size")
    parser.add_argument(
        "--unfused",
        nargs="*",
        default=[],
        metavar="METHOD",
        help="also time these methods in optax.chain (the unfused reduction), as "
        "'METHOD [optax.chain]'",
    )
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    methods = args.methods or [m for m in mtl.BALANCERS if m != "scalarize"]
    methods = list(methods) + [m + UNFUSED for m in args.unfused]
    name, model_kwargs, tasks = "methods", {}, args.tasks or [2, 3, 10, 40]
    if args.model == "segnet":
        tasks = args.tasks or list(SEGNET_TASKS)
        name = "methods_segnet"
        h, w = args.resolution
        model_kwargs = {"height": h, "width": w, "batch_size": args.batch_size}
    cnn = args.model == "cnn"
    results = run(
        tasks,
        methods,
        args.repeats,
        args.update_alone and cnn,
        args.step_all and cnn,
        args.steps,
        args.model,
        model_kwargs,
    )
    if args.merge:
        results = merge_rows(os.path.join(args.out, f"{name}.json"), results)
    table = to_markdown(results)
    paths = common.write_outputs(name, args.out, results, table)
    print(table)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
