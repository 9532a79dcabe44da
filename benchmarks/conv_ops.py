"""Per-convolution cost of the benchmark CNN's step, XLA CPU against PyTorch, in one process.

Where the equal-weighting step's time goes, op by op, for the three convolutions of the HPS CNN
(`common.init_hps_cnn`, batch 64, 32x32x3): the forward convolution, the input gradient and the
kernel gradient, in JAX (`jax.lax.conv_general_dilated` and its VJPs; the kernel gradient both
as XLA's own and as ours, `mtl_jax.models.layers.conv_general_dilated`) and in PyTorch
(`torch.nn.functional.conv2d`, `torch.nn.grad.conv2d_input` / `conv2d_weight`, NCHW, the
layout its CPU kernels prefer), plus both libraries' whole EW step (`benchmarks.peers`). Every
function is jitted / warmed and timed round-robin in the same rounds (`common.time_interleaved`),
PyTorch limited to the threads XLA's CPU client uses. The first conv's input gradient is not
part of a training step (its input is the data) and is left out.

    python -m benchmarks.conv_ops --repeats 15

writes ``benchmarks/results/conv_ops.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import jax

from benchmarks import common, peers
from mtl_jax.models import layers

NHWC = ("NHWC", "HWIO", "NHWC")
BATCH = 64
# (name, input H = W, in channels, out channels, stride) of the HPS CNN's convolutions.
CONVS = (("conv1", 32, 3, 32, 1), ("conv2", 32, 32, 64, 2), ("conv3", 16, 64, 64, 2))
OPS = ("forward", "input grad", "kernel grad (XLA)", "kernel grad (ours)")


def in_step(conv: str, op: str) -> bool:
    """Whether a training step computes ``op`` of ``conv``: not the first conv's input grad."""
    return not (conv == CONVS[0][0] and op == "input grad")


def jax_ops(hw: int, cin: int, cout: int, stride: int) -> dict[str, Callable[[], jax.Array]]:
    """Jitted forward, input gradient and the two kernel gradients of one convolution."""
    kx, kw, ky = jax.random.split(jax.random.key(0), 3)
    x = common.normal(kx, (BATCH, hw, hw, cin))
    w = common.normal(kw, (3, 3, cin, cout))
    dy = common.normal(ky, (BATCH, hw // stride, hw // stride, cout))

    def conv(fn):
        return lambda x, w: fn(x, w, (stride, stride), "SAME", dimension_numbers=NHWC)

    xla, ours = conv(jax.lax.conv_general_dilated), conv(layers.conv_general_dilated)
    fwd = jax.jit(xla)
    dx = jax.jit(lambda x, w, dy: jax.vjp(lambda x: xla(x, w), x)[1](dy)[0])
    dw_xla = jax.jit(lambda x, w, dy: jax.vjp(lambda w: xla(x, w), w)[1](dy)[0])
    dw_ours = jax.jit(lambda x, w, dy: jax.vjp(lambda w: ours(x, w), w)[1](dy)[0])
    return {
        "forward": lambda: fwd(x, w),
        "input grad": lambda: dx(x, w, dy),
        "kernel grad (XLA)": lambda: dw_xla(x, w, dy),
        "kernel grad (ours)": lambda: dw_ours(x, w, dy),
    }


def torch_ops(hw: int, cin: int, cout: int, stride: int) -> dict[str, Callable[[], None]]:
    import torch
    import torch.nn.functional as F  # noqa: N812

    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, cin, hw, hw, generator=g)
    w = torch.randn(cout, cin, 3, 3, generator=g)
    dy = torch.randn(BATCH, cout, hw // stride, hw // stride, generator=g)
    kw = {"stride": stride, "padding": 1}
    return {
        "forward": lambda: F.conv2d(x, w, **kw),
        "input grad": lambda: torch.nn.grad.conv2d_input(x.shape, w, dy, **kw),
        "kernel grad": lambda: torch.nn.grad.conv2d_weight(x, w.shape, dy, **kw),
    }


def run(repeats: int, num_tasks: int = 3, with_torch: bool = True) -> dict:
    fns: dict[str, Callable] = {}
    for name, hw, cin, cout, stride in CONVS:
        ops = {"jax": jax_ops(hw, cin, cout, stride)}
        if with_torch:
            ops["torch"] = torch_ops(hw, cin, cout, stride)
        for lib, lib_ops in ops.items():
            for op, fn in lib_ops.items():
                if in_step(name, op):
                    fns[f"{lib} {name} {op}"] = fn
    params = common.init_hps_cnn(jax.random.key(0), num_tasks)
    batch = common.make_batch(jax.random.key(3), num_tasks)
    fns["jax EW step"] = peers.our_steps("ew", params, batch, full=False)[peers.EW]
    if with_torch:
        import torch

        torch.set_num_threads(peers.THREADS)
        model = peers.torch_model(num_tasks)
        fns["torch EW step"] = peers.torch_ew_step(model, *peers.torch_batch(num_tasks))
    times = common.time_interleaved(fns, (), repeats, warmup=2)
    return {
        "machine": common.machine_description(),
        "torch_threads": peers.THREADS if with_torch else None,
        "num_tasks": num_tasks,
        "repeats": repeats,
        "ms": {name: 1e3 * t for name, t in times.items()},
    }


def to_markdown(results: dict) -> str:
    ms = results["ms"]

    def cell(key: str) -> str:
        return f"{ms[key]:.1f}" if key in ms else "-"

    rows = []
    totals = {"jax": 0.0, "torch": 0.0}
    for name, *_ in CONVS:
        for op in OPS:
            jax_key = f"jax {name} {op}"
            if jax_key not in ms:
                continue
            torch_op = "kernel grad" if op.startswith("kernel grad") else op
            torch_key = f"torch {name} {torch_op}"
            ratio = f"{ms[jax_key] / ms[torch_key]:.2f}x" if torch_key in ms else "-"
            if op != "kernel grad (XLA)":
                totals["jax"] += ms[jax_key]
                totals["torch"] += ms.get(torch_key, 0.0)
            rows.append([name, op, cell(jax_key), cell(torch_key), ratio])
    has_torch = totals["torch"] > 0
    rows.append(
        [
            "sum",
            "our step's convolutions",
            f"{totals['jax']:.1f}",
            f"{totals['torch']:.1f}" if has_torch else "-",
            f"{totals['jax'] / totals['torch']:.2f}x" if has_torch else "-",
        ]
    )
    step_ratio = f"{ms['jax EW step'] / ms['torch EW step']:.2f}x" if "torch EW step" in ms else "-"
    rows.append(
        ["whole", "EW step (+ Adam)", cell("jax EW step"), cell("torch EW step"), step_ratio]
    )
    m = results["machine"]
    head = (
        f"Median ms, round-robin, {results['repeats']} rounds; batch {BATCH}, K="
        f"{results['num_tasks']}; {m['backend']}, {m['cpu_count']} CPUs, jax {m['jax']}, "
        f"torch threads {results['torch_threads']}, {m['date']}.\n\n"
    )
    return head + common.markdown_table(["conv", "op", "JAX", "PyTorch", "JAX / PyTorch"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true", help="time the JAX side only")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="conv_ops")
    args = parser.parse_args()
    results = run(args.repeats, args.tasks, with_torch=not args.no_torch)
    table = to_markdown(results)
    print(table)
    for path in common.write_outputs(args.name, os.path.abspath(args.out), results, table):
        print("wrote", path)


if __name__ == "__main__":
    main()
