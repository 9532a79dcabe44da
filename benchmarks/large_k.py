"""Many tasks: peak memory and step time vs K of the three ways to balance K task gradients.

The model is an MLP with a shared encoder of 1.1M parameters (256 -> 1024 -> 768 -> 64, ReLU)
and K linear regression heads (65 parameters each), batch 64; every path computes one MGDA
update (`mtl.mgda_weights`, the exact min-norm solver) and returns the gradient:

* ``full``: `mtl.value_and_jacobian` (K x P Jacobian, the library's default strategy) ->
  ``optax.chain(mtl.mgda(), mtl.sum_tasks())``. Memory grows as K x P x 4 bytes.
* ``gramian``: `mtl.value_and_gramian` (chunks of ``--chunk`` Jacobian rows, K VJPs + K JVPs,
  the K x K Gramian accumulated chunk by chunk) -> `mtl.mgda_weights` -> one VJP (``combine``).
  Memory: ``chunk`` rows, not K.
* ``representation``: `mtl.representation_value_and_grad` (Jacobian w.r.t. the shared 64-wide
  features, MGDA-UB) -> one backward pass. A different (cheaper) algorithm, not the same update.

Each (K, path) runs in its own subprocess, so its peak resident memory (``VmHWM`` from
/proc/self/status, which includes the ~0.3 GB of an imported jax and XLA's compilation) is its
own; the step time is the median of ``--repeats`` calls after a warm-up call, next to an
equal-weight step (``jax.grad`` of the summed loss) timed round-robin in the same process. The
full path is not run where its Jacobian alone (K x P x 4 bytes) exceeds ``--max-jacobian-gb``;
the table then gives that computed size. At the smallest K the gradients of the full and the
Gramian path are compared (they must agree: same MGDA update).

    python -m benchmarks.large_k                          # K = 10, 100, 300, 1000
    python -m benchmarks.large_k --tasks 10 100 --repeats 2

Writes ``large_k.json`` and ``large_k.md`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

PATHS = ("full", "gramian", "representation")
D_IN, WIDTHS, BATCH = 256, (1024, 768, 64), 64


def _vm_hwm_mb() -> float:
    """Peak resident set size of this process so far (VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc/self/status (Linux only).")


def init_params(key, num_tasks: int) -> dict:
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(key, len(WIDTHS) + 1)
    encoder, fan_in = {}, D_IN
    for i, (k, width) in enumerate(zip(keys, WIDTHS, strict=False)):
        w = jax.random.normal(k, (fan_in, width)) * jnp.sqrt(2.0 / fan_in)
        encoder[f"dense{i}"] = {"w": w, "b": jnp.zeros((width,))}
        fan_in = width
    heads = {
        "w": jax.random.normal(keys[-1], (num_tasks, fan_in)) / jnp.sqrt(fan_in),
        "b": jnp.zeros((num_tasks,)),
    }
    return {"encoder": encoder, "heads": heads}


def encode(params, x):
    import jax

    h = x
    for i in range(len(WIDTHS)):
        layer = params["encoder"][f"dense{i}"]
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    return h


def head_losses(params, z, batch):
    import jax.numpy as jnp

    preds = z @ params["heads"]["w"].T + params["heads"]["b"]  # [B, K]
    return jnp.mean(jnp.square(preds - batch["y"]), axis=0)


def task_losses(params, batch):
    return head_losses(params, encode(params, batch["x"]), batch)


def make_step(path: str, chunk: int):
    """``step(params, batch) -> (losses, grads)`` for one path (not jitted)."""
    import optax

    import mtl_jax as mtl

    if path == "full":
        tx = optax.chain(mtl.mgda(), mtl.sum_tasks())

        def step(params, batch):
            losses, jac = mtl.value_and_jacobian(task_losses)(params, batch)
            grads, _ = tx.update(jac, tx.init(params), params)
            return losses, grads

    elif path == "gramian":

        def step(params, batch):
            losses, gram, combine = mtl.value_and_gramian(task_losses, chunk_size=chunk)(
                params, batch
            )
            return losses, combine(mtl.mgda_weights(gram))

    elif path == "representation":
        rep = mtl.representation_value_and_grad(
            lambda p, b: encode(p, b["x"]), head_losses, mtl.mgda_weights, strategy="vmap"
        )

        def step(params, batch):
            out = rep(params, batch)
            return out.losses, out.grads

    else:
        raise ValueError(f"Unknown path {path!r}; valid: {', '.join(PATHS)}.")
    return step


def child(num_tasks: int, path: str, chunk: int, repeats: int, check: bool) -> dict:
    """One (K, path) measurement, in this (fresh) process."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import common

    key_p, key_x, key_y = jax.random.split(jax.random.key(0), 3)
    params = init_params(key_p, num_tasks)
    batch = {
        "x": jax.random.normal(key_x, (BATCH, D_IN)),
        "y": jax.random.normal(key_y, (BATCH, num_tasks)),
    }
    jax.block_until_ready((params, batch))
    setup_mb = _vm_hwm_mb()
    step = jax.jit(make_step(path, chunk))
    ew = jax.jit(jax.grad(lambda p, b: jnp.sum(task_losses(p, b))))
    t0 = time.perf_counter()
    compiled = step.lower(params, batch).compile()
    compile_s = time.perf_counter() - t0
    analysis = compiled.memory_analysis()
    temp_mb = None if analysis is None else analysis.temp_size_in_bytes / 2**20
    times = common.time_interleaved({"step": step, "ew": ew}, (params, batch), repeats)
    out = {
        "K": num_tasks,
        "path": path,
        "params": common.num_params(params),
        "shared_params": common.num_params(params["encoder"]),
        "setup_rss_mb": setup_mb,
        "peak_rss_mb": _vm_hwm_mb(),
        "xla_temp_mb": temp_mb,
        "compile_s": compile_s,
        "step_s": times["step"],
        "ew_step_s": times["ew"],
    }
    if check:  # the same MGDA update from the full Jacobian and from the chunked Gramian
        _, g_full = jax.jit(make_step("full", chunk))(params, batch)
        _, g_gram = jax.jit(make_step("gramian", chunk))(params, batch)
        diffs = [
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_gram), strict=True)
        ]
        scale = max(float(np.max(np.abs(np.asarray(a)))) for a in jax.tree.leaves(g_full))
        out["full_vs_gramian_max_abs_diff"] = max(diffs)
        out["grad_max_abs"] = scale
    return out


def run_child(num_tasks: int, path: str, args, check: bool) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.large_k", "--child", path, "--tasks", str(num_tasks)]
    cmd += ["--chunk", str(args.chunk), "--repeats", str(args.repeats)]
    if check:
        cmd.append("--check")
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"K": num_tasks, "path": path, "error": " | ".join(tail), "wall_s": time.time() - t0}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["wall_s"] = time.time() - t0
    return row


def _fmt_row(row: dict, jac_gb: float) -> list[str]:
    if "skipped" in row:
        return [row["path"], "-", "-", "-", f"not run: {row['skipped']}"]
    if "error" in row:
        return [row["path"], "-", "-", "-", f"failed: {row['error'][:80]}"]
    ratio = row["step_s"] / row["ew_step_s"]
    return [
        row["path"],
        f"{row['peak_rss_mb'] / 1024:.2f} GiB",
        f"{row['step_s']:.3f} s ({ratio:.0f}x EW)",
        f"{row['compile_s']:.0f} s",
        f"Jacobian {jac_gb:.2f} GiB" if row["path"] == "full" else "",
    ]


def markdown(results: dict) -> str:
    from benchmarks import common

    m = results["machine"]
    lines = [
        f"Peak resident memory (VmHWM of the process, incl. ~{results['import_rss_mb']:.0f} MiB "
        "of imported jax) and step time (median; ratio to an equal-weight step in the same "
        f"process) of one MGDA update; MLP with {results['shared_params'] / 1e6:.2f}M shared "
        f"parameters + K heads of 65, batch {BATCH}, Gramian chunk {results['chunk']}. "
        f"backend={m['backend']}, {m['cpu_count']} CPUs (shared), jax {m['jax']}, {m['date']}.",
        "",
    ]
    rows = []
    for row in results["rows"]:
        jac_gb = row["K"] * row.get("params", results["params_at"][str(row["K"])]) * 4 / 2**30
        rows.append([str(row["K"]), *_fmt_row(row, jac_gb)])
    lines.append(
        common.markdown_table(
            ["K", "path", "peak memory", "step time", "compile", "note"], rows
        ).rstrip()
    )
    if results.get("check"):
        c = results["check"]
        lines += [
            "",
            f"Full vs. chunked-Gramian MGDA gradient at K={c['K']}: max abs difference "
            f"{c['full_vs_gramian_max_abs_diff']:.2e} (largest entry {c['grad_max_abs']:.2e}).",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[10, 100, 300, 1000])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--chunk", type=int, default=32, help="Gramian path: rows per chunk.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-jacobian-gb", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        row = child(args.tasks[0], args.child, args.chunk, args.repeats, args.check)
        print(json.dumps(row), flush=True)
        return

    from benchmarks import common

    shared = sum(a * b + b for a, b in zip((D_IN, *WIDTHS[:-1]), WIDTHS, strict=True))
    params_at = {str(k): shared + k * (WIDTHS[-1] + 1) for k in args.tasks}
    results = {
        "machine": common.machine_description(),
        "chunk": args.chunk,
        "batch": BATCH,
        "shared_params": shared,
        "params_at": params_at,
        "max_jacobian_gb": args.max_jacobian_gb,
        "rows": [],
    }
    for k in args.tasks:
        for path in args.paths:
            jac_gb = params_at[str(k)] * k * 4 / 2**30
            if path == "full" and jac_gb > args.max_jacobian_gb:
                row = {
                    "K": k,
                    "path": path,
                    "params": params_at[str(k)],
                    "skipped": f"its Jacobian alone needs {jac_gb:.2f} GiB "
                    f"(K x P x 4 bytes > --max-jacobian-gb={args.max_jacobian_gb})",
                }
            else:
                check = k == min(args.tasks) and path == "gramian" and "full" in args.paths
                row = run_child(k, path, args, check)
                if check and "error" not in row:
                    results["check"] = row
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    ok = [r for r in results["rows"] if "setup_rss_mb" in r]
    results["import_rss_mb"] = min(r["setup_rss_mb"] for r in ok) if ok else float("nan")
    table = markdown(results)
    print(table)
    common.write_outputs("large_k", args.out, results, table)


if __name__ == "__main__":
    main()
