"""How far a 3x lead over the PyTorch peers is from this machine's arithmetic ceiling.

Issue 9 asks every method to be >= 3x faster per step than LibMTL and TorchJD. Where both sides
take the same passes (1 forward + K backward for the full Jacobian, 1 + 1 for a loss-level
method) the FLOPs are the same, so a 3x lead needs 3x the peer's FLOP rate. This benchmark
measures, in one process and the same round-robin rounds (`common.time_interleaved`):

* the machine's dense float32 ceiling: the faster of XLA's and PyTorch's ``[n, n] @ [n, n]``
  (n = 2048, the best case for both BLAS back ends; no convolution or elementwise op runs
  faster per FLOP);
* the HPS CNN's steps at each K (`benchmarks.peers`): ours (EW, full Jacobian and
  representation-level MGDA, the uncertainty-weighting loss path) and the peers' (PyTorch
  ``sum().backward()``, LibMTL's MGDA and UW, TorchJD's MGDA);

and counts each step's convolution and matmul FLOPs from the layer shapes (`step_gflop`;
elementwise ops are not counted, on either side; XLA's own count of the EW step is recorded
as a cross-check). Each comparison's table cell is the FLOP rate our path would need to be
3x faster than the peer, as a share of the dense ceiling: above 100% no implementation on this
CPU can reach it.

    python -m benchmarks.roofline --tasks 2 3 10 40 --repeats 5

writes ``benchmarks/results/roofline.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, peers

MATMUL_N = 2048
WIDTH, HIDDEN, BATCH = 32, 256, 64
# (input H = W, in channels, out channels, stride) of the HPS CNN's convolutions, as built by
# `common.init_hps_cnn` (3x3 kernels, SAME padding).
CONVS = ((32, 3, WIDTH, 1), (32, WIDTH, 2 * WIDTH, 2), (16, 2 * WIDTH, 2 * WIDTH, 2))
FLAT = 8 * 8 * 2 * WIDTH

# Each timed step: (our or the peer's name, the path whose FLOPs it computes).
ONE_BACKWARD, FULL = "1 forward + 1 backward", "1 forward + K backward"
OURS = {
    "ours EW": ("ew", peers.EW, ONE_BACKWARD),
    "ours MGDA, full Jacobian": ("mgda", "ours (full Jacobian)", FULL),
    "ours MGDA, representation": ("mgda", "ours (representation)", ONE_BACKWARD),
    "ours UW, loss path": ("uncertainty_weighting", "ours (loss path)", ONE_BACKWARD),
}
PEERS = {
    "PyTorch EW": ("ew", "PyTorch (sum().backward())", ONE_BACKWARD),
    "LibMTL MGDA": ("mgda", "LibMTL", FULL),
    "TorchJD MGDA": ("mgda", "TorchJD", FULL),
    "LibMTL UW": ("uncertainty_weighting", "LibMTL", ONE_BACKWARD),
}
# (ours, peer) pairs of the 3x target: the same method on both sides.
PAIRS = (
    ("ours EW", "PyTorch EW"),
    ("ours MGDA, full Jacobian", "LibMTL MGDA"),
    ("ours MGDA, full Jacobian", "TorchJD MGDA"),
    ("ours MGDA, representation", "LibMTL MGDA"),
    ("ours MGDA, representation", "TorchJD MGDA"),
    ("ours UW, loss path", "LibMTL UW"),
)


def step_gflop(num_tasks: int, path: str, batch: int = BATCH) -> float:
    """Convolution + matmul GFLOP of one HPS CNN step (2 per multiply-add).

    The forward pass is every conv, the dense layer and K heads; one backward pass through the
    encoder is each layer's kernel gradient and input gradient (none for the first conv, whose
    input is the data); each head's backward is its own weight and input gradient. The full
    Jacobian takes K encoder backward passes, one per task; one backward pass (EW, loss-level
    methods, the representation-level path) takes one, behind K head backward passes.
    """
    convs = [batch * (hw // s) ** 2 * cin * cout * 9 for hw, cin, cout, s in CONVS]
    dense, head = batch * FLAT * HIDDEN, batch * HIDDEN * common.NUM_CLASSES
    forward = sum(convs) + dense + num_tasks * head
    encoder_backward = 2 * sum(convs) - convs[0] + 2 * dense
    head_backward = 2 * head
    if path == FULL:
        macs = forward + num_tasks * (encoder_backward + head_backward)
    elif path == ONE_BACKWARD:
        macs = forward + encoder_backward + num_tasks * head_backward
    else:
        raise ValueError(f"unknown path {path!r}; expected {ONE_BACKWARD!r} or {FULL!r}")
    return 2 * macs / 1e9


def xla_gflop_of_ew_step(num_tasks: int) -> float | None:
    """XLA's own FLOP count (``cost_analysis``) of our EW gradient, elementwise ops included.

    Counted with XLA's own convolution: the same FLOPs as ours, whose blocked kernel gradient
    is a loop that XLA's cost analysis counts once rather than once per block.
    """
    params = common.init_hps_cnn(jax.random.key(0), num_tasks)
    batch = common.make_batch(jax.random.key(1), num_tasks)
    grad = jax.jit(jax.grad(lambda p: jnp.sum(common.task_losses(p, batch, conv="xla"))))
    try:
        cost = grad.lower(params).compile().cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]) / 1e9 if cost and "flops" in cost else None


def matmul_fns(with_torch: bool) -> dict[str, Callable]:
    """The dense float32 ceiling: ``[n, n] @ [n, n]`` in XLA (and PyTorch)."""
    a = common.normal(jax.random.key(0), (MATMUL_N, MATMUL_N))
    b = common.normal(jax.random.key(1), (MATMUL_N, MATMUL_N))
    dot = jax.jit(jnp.dot)
    fns = {"XLA matmul": lambda: dot(a, b)}
    if with_torch:
        import torch

        ta, tb = torch.from_numpy(np.array(a)), torch.from_numpy(np.array(b))
        fns["PyTorch matmul"] = lambda: torch.mm(ta, tb)
    return fns


def step_fns(k: int, with_torch: bool) -> dict[str, Callable]:
    """Every timed step of ``OURS`` (and ``PEERS``) at K tasks."""
    wanted = dict(OURS, **(PEERS if with_torch else {}))
    by_method = {m: peers.step_fns(m, k, with_torch) for m in {m for m, _, _ in wanted.values()}}
    return {name: by_method[m][variant] for name, (m, variant, _) in wanted.items()}


def run(tasks: list[int], repeats: int, with_torch: bool = True) -> dict:
    if with_torch:
        import torch

        torch.set_num_threads(peers.THREADS)
    results = {"machine": common.machine_description(), "repeats": repeats, "rows": []}
    results["xla_gflop_ew_step_k3"] = xla_gflop_of_ew_step(3)
    results["counted_gflop_ew_step_k3"] = step_gflop(3, ONE_BACKWARD)
    for k in tasks:
        fns = dict(matmul_fns(with_torch), **step_fns(k, with_torch))
        times = common.time_interleaved(fns, (), repeats, warmup=1)
        paths = {n: p for n, (_, _, p) in {**OURS, **PEERS}.items() if n in times}
        row = {
            "K": k,
            "ms": {n: 1e3 * t for n, t in times.items()},
            "gflop": {n: step_gflop(k, p) for n, p in paths.items()},
            "matmul_gflops": {
                n: 2 * MATMUL_N**3 / times[n] / 1e9 for n in times if n.endswith("matmul")
            },
        }
        results["rows"].append(row)
        print(f"K={k}: " + ", ".join(f"{n} {t:.1f} ms" for n, t in row["ms"].items()), flush=True)
    return results


def to_markdown(results: dict) -> str:
    rates, target = [], []
    for row in results["rows"]:
        k, ms, gflop = row["K"], row["ms"], row["gflop"]
        peak = max(row["matmul_gflops"].values())
        for name, rate in row["matmul_gflops"].items():
            rates.append(
                [k, name, "-", f"{ms[name]:.1f}", f"{rate:.0f}", f"{100 * rate / peak:.0f}%"]
            )
        for name in gflop:
            rate = gflop[name] / ms[name] * 1e3
            cells = [k, name, f"{gflop[name]:.2f}", f"{ms[name]:.1f}", f"{rate:.0f}"]
            rates.append(cells + [f"{100 * rate / peak:.0f}%"])
        for ours, peer in PAIRS:
            if ours not in ms or peer not in ms:
                continue
            needed = 3 * gflop[ours] / ms[peer] * 1e3
            target.append(
                [
                    k,
                    ours,
                    peer,
                    f"{ms[peer] / ms[ours]:.2f}x",
                    f"{ms[peer] / 3:.1f} ms = {needed:.0f} GFLOP/s",
                    f"**{100 * needed / peak:.0f}%**",
                ]
            )
    m = results["machine"]
    xla, counted = results["xla_gflop_ew_step_k3"], results["counted_gflop_ew_step_k3"]
    head = (
        f"Median of {results['repeats']} round-robin rounds per K; {m['backend']}, "
        f"{m['cpu_count']} CPUs, jax {m['jax']}, {m['date']}. Dense peak: the faster of the "
        f"two {MATMUL_N}x{MATMUL_N} matmuls in the same rounds. GFLOP: convolutions and "
        f"matmuls counted from the layer shapes (EW step at K=3: {counted:.2f} counted, "
        + (
            f"{xla:.2f} by XLA's cost analysis, elementwise ops included).\n\n"
            if xla
            else "XLA's count not available).\n\n"
        )
    )
    table1 = common.markdown_table(
        ["K", "step", "GFLOP", "median ms", "GFLOP/s", "of the dense peak"], rates
    )
    table2 = common.markdown_table(
        ["K", "ours", "peer", "peer / ours", "3x faster than the peer needs", "of the dense peak"],
        target,
    )
    return head + table1 + "\n" + table2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 3, 10, 40])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true", help="time the JAX side only")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="roofline")
    args = parser.parse_args()
    with_torch = not args.no_torch
    if with_torch and not peers.torch_available():
        raise SystemExit(
            "benchmarks.roofline needs torch and torchjd: pip install torch==2.13.0 && "
            'pip install -e ".[reference]" (or pass --no-torch).'
        )
    results = run(args.tasks, args.repeats, with_torch)
    table = to_markdown(results)
    print(table)
    for path in common.write_outputs(args.name, os.path.abspath(args.out), results, table):
        print("wrote", path)


if __name__ == "__main__":
    main()
