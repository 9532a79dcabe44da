"""Per-convolution cost of a training step, XLA CPU against PyTorch, in one process.

Where the equal-weighting step's time goes, op by op, for the three convolutions of the HPS CNN
(`common.init_hps_cnn`, batch 64, 32x32x3; ``--model cnn``) or for the nine distinct 3x3
convolutions of the NYUv2 SegNet's encoder at the papers' resolution (288x384, batch 2;
``--model segnet``): the forward convolution, the input gradient and the kernel gradient, in JAX
(`jax.lax.conv_general_dilated` and its VJPs; the kernel gradient as XLA's own, as ours,
`mtl_jax.models.layers.conv_general_dilated`, and as ours with ``cpu_kernel_grad='per_tap'``,
its form for every shape before the blocked im2col one; the input gradient as XLA's and as
ours, the sum over input phases) and in PyTorch
(`torch.nn.functional.conv2d`, `torch.nn.grad.conv2d_input` / `conv2d_weight`, NCHW, the layout
its CPU kernels prefer), plus, for the CNN, both libraries' whole EW step (`benchmarks.peers`).
Every function is jitted / warmed and timed round-robin in the same rounds
(`common.time_interleaved`), PyTorch limited to the threads XLA's CPU client uses. The first
conv's input gradient is not part of a training step (its input is the data) and is left out.

    python -m benchmarks.conv_ops --repeats 15
    python -m benchmarks.conv_ops --model segnet --repeats 5

write ``benchmarks/results/conv_ops.{json,md}`` and ``conv_ops_segnet.{json,md}``.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable

import jax

from benchmarks import common, peers
from mtl_jax.models import layers

NHWC = ("NHWC", "HWIO", "NHWC")
# model -> (batch, convs); a conv is (name, input H, input W, in channels, out channels, stride).
MODELS = {
    "cnn": (
        64,
        (("conv1", 32, 32, 3, 32, 1), ("conv2", 32, 32, 32, 64, 2), ("conv3", 16, 16, 64, 64, 2)),
    ),
    "segnet": (
        2,
        tuple(
            (f"{h}x{w} {cin}->{cout}", h, w, cin, cout, 1)
            for h, w, cin, cout in (
                (288, 384, 3, 64),
                (288, 384, 64, 64),
                (144, 192, 64, 128),
                (144, 192, 128, 128),
                (72, 96, 128, 256),
                (72, 96, 256, 256),
                (36, 48, 256, 512),
                (36, 48, 512, 512),
                (18, 24, 512, 512),
            )
        ),
    ),
}
OPS = (
    "forward",
    "input grad (XLA)",
    "input grad (ours)",
    "kernel grad (XLA)",
    "kernel grad (per-tap)",
    "kernel grad (ours)",
)
# Gradients that are alternatives to ours: timed, but not part of the step's sum.
ALTERNATIVES = ("input grad (XLA)", "kernel grad (XLA)", "kernel grad (per-tap)")


def in_step(convs, conv: str, op: str) -> bool:
    """Whether a training step computes ``op`` of ``conv``: not the first conv's input grad."""
    return not (conv == convs[0][0] and op.startswith("input grad"))


def torch_op(op: str) -> str:
    """PyTorch's op that ``op`` is compared with (one input and one kernel gradient)."""
    return op.split(" (")[0]


def _out_hw(n: int, stride: int) -> int:
    return -(-n // stride)  # SAME padding


def jax_ops(
    h: int, w: int, cin: int, cout: int, stride: int, batch: int
) -> dict[str, Callable[[], jax.Array]]:
    """Jitted forward, the two input gradients and three kernel gradients of one convolution."""
    kx, kw, ky = jax.random.split(jax.random.key(0), 3)
    x = common.normal(kx, (batch, h, w, cin))
    k = common.normal(kw, (3, 3, cin, cout))
    dy = common.normal(ky, (batch, _out_hw(h, stride), _out_hw(w, stride), cout))
    strides = (stride, stride)

    def conv(fn):
        return lambda x, k: fn(x, k, strides, "SAME", dimension_numbers=NHWC)

    xla, ours = conv(jax.lax.conv_general_dilated), conv(layers.conv_general_dilated)
    per_tap = conv(functools.partial(layers.conv_general_dilated, cpu_kernel_grad="per_tap"))

    def input_grad(fn):
        return jax.jit(lambda x, k, dy: jax.vjp(lambda x: fn(x, k), x)[1](dy)[0])

    def kernel_grad(fn):
        return jax.jit(lambda x, k, dy: jax.vjp(lambda k: fn(x, k), k)[1](dy)[0])

    fwd = jax.jit(xla)
    grads = [input_grad(xla), input_grad(ours)] + [kernel_grad(f) for f in (xla, per_tap, ours)]
    return {
        "forward": lambda: fwd(x, k),
        **{name: functools.partial(fn, x, k, dy) for name, fn in zip(OPS[1:], grads, strict=True)},
    }


def torch_ops(
    h: int, w: int, cin: int, cout: int, stride: int, batch: int
) -> dict[str, Callable[[], None]]:
    import torch
    import torch.nn.functional as F  # noqa: N812

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, h, w, generator=g)
    k = torch.randn(cout, cin, 3, 3, generator=g)
    dy = torch.randn(batch, cout, _out_hw(h, stride), _out_hw(w, stride), generator=g)
    kw = {"stride": stride, "padding": 1}
    return {
        "forward": lambda: F.conv2d(x, k, **kw),
        "input grad": lambda: torch.nn.grad.conv2d_input(x.shape, k, dy, **kw),
        "kernel grad": lambda: torch.nn.grad.conv2d_weight(x, k.shape, dy, **kw),
    }


def run(repeats: int, num_tasks: int = 3, with_torch: bool = True, model: str = "cnn") -> dict:
    batch, convs = MODELS[model]
    fns: dict[str, Callable] = {}
    for name, *shape in convs:
        ops = {"jax": jax_ops(*shape, batch)}
        if with_torch:
            ops["torch"] = torch_ops(*shape, batch)
        for lib, lib_ops in ops.items():
            for op, fn in lib_ops.items():
                if in_step(convs, name, op):
                    fns[f"{lib} {name} {op}"] = fn
    if model == "cnn":
        params = common.init_hps_cnn(jax.random.key(0), num_tasks)
        inputs = common.make_batch(jax.random.key(3), num_tasks)
        fns["jax EW step"] = peers.our_steps("ew", params, inputs, full=False)[peers.EW]
    if with_torch:
        import torch

        torch.set_num_threads(peers.THREADS)
        if model == "cnn":
            net = peers.torch_model(num_tasks)
            fns["torch EW step"] = peers.torch_ew_step(net, *peers.torch_batch(num_tasks))
    times = common.time_interleaved(fns, (), repeats, warmup=2)
    return {
        "machine": common.machine_description(),
        "torch_threads": peers.THREADS if with_torch else None,
        "model": model,
        "batch": batch,
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
    convs = MODELS[results["model"]][1]
    for name, *_ in convs:
        for op in OPS:
            jax_key = f"jax {name} {op}"
            if jax_key not in ms:
                continue
            torch_key = f"torch {name} {torch_op(op)}"
            ratio = f"{ms[jax_key] / ms[torch_key]:.2f}x" if torch_key in ms else "-"
            if op not in ALTERNATIVES:
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
    if "jax EW step" in ms:
        step_ratio = (
            f"{ms['jax EW step'] / ms['torch EW step']:.2f}x" if "torch EW step" in ms else "-"
        )
        rows.append(
            ["whole", "EW step (+ Adam)", cell("jax EW step"), cell("torch EW step"), step_ratio]
        )
    m = results["machine"]
    head = (
        f"Median ms, round-robin, {results['repeats']} rounds; {results['model']}, "
        f"batch {results['batch']}, K={results['num_tasks']}; {m['backend']}, "
        f"{m['cpu_count']} CPUs, jax {m['jax']}, "
        f"torch threads {results['torch_threads']}, {m['date']}.\n\n"
    )
    return head + common.markdown_table(["conv", "op", "JAX", "PyTorch", "JAX / PyTorch"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true", help="time the JAX side only")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--model", choices=sorted(MODELS), default="cnn")
    parser.add_argument("--name", default=None, help="default: conv_ops[_<model>]")
    args = parser.parse_args()
    name = args.name or ("conv_ops" if args.model == "cnn" else f"conv_ops_{args.model}")
    results = run(args.repeats, args.tasks, with_torch=not args.no_torch, model=args.model)
    table = to_markdown(results)
    print(table)
    for path in common.write_outputs(name, os.path.abspath(args.out), results, table):
        print("wrote", path)


if __name__ == "__main__":
    main()
