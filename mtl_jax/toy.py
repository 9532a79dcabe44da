"""The two-objective toy problem of CAGrad (reused by Nash-MTL and FAMO), trajectories and plots.

Two losses of a 2-D point ``x`` whose gradients conflict strongly and differ in scale; the
Pareto set is (approximately) the segment ``x1 in [-7, 7], x2 ~ -8.36``. Each method is run
from the standard initial points with Adam (lr 1e-3), exactly as the reference scripts do, and
the trajectories are drawn over the loss contours and in objective space with the Pareto front:

    python -m mtl_jax.toy --config=experiments/toy.py --workdir=/tmp/toy

The loss is our re-derivation of ``Toy`` in CAGrad's ``toy.py`` (Cranial-XIX/CAGrad) with the
``scale`` of the first loss added by Nash-MTL (``experiments/toy/problem.py``,
AvivNavon/nash-mtl), where ``scale=0.1`` makes the two losses differ in scale.

References:
  Liu, Liu, Jin, Stone, Liu. Conflict-Averse Gradient Descent for Multi-task Learning.
  NeurIPS 2021.
  Navon et al. Multi-Task Learning as a Bargaining Game. ICML 2022.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_jax as mtl
from mtl_jax import registry

LOWER = 5e-6

# Initial points of the reference scripts.
CAGRAD_INITS = ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0))
NASH_MTL_INITS = ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))


def toy_losses(x: jax.Array, scale: float = 1.0) -> jax.Array:
    """The two losses [f1, f2] at a point ``x = (x1, x2)`` (CAGrad's toy; f1 times ``scale``)."""
    x1, x2 = x[..., 0], x[..., 1]
    f1 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 - 7) - jnp.tanh(-x2)), LOWER)) + 6
    f2 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 + 3) + jnp.tanh(-x2) + 2), LOWER)) + 6
    c1 = jnp.maximum(jnp.tanh(x2 * 0.5), 0)
    f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    c2 = jnp.maximum(jnp.tanh(-x2 * 0.5), 0)
    f1 = (f1 * c1 + f1_sq * c2) * scale
    f2 = f2 * c1 + f2_sq * c2
    return jnp.stack([f1, f2], axis=-1)


def pareto_front(scale: float = 1.0, extent: float = 11.0, n: int = 1001) -> np.ndarray:
    """Non-dominated points of the objective values on an ``n x n`` grid of the domain.

    Returns an [M, 2] array of (f1, f2), sorted by f1.
    """
    grid = np.linspace(-extent, extent, n)
    xx, yy = np.meshgrid(grid, grid)
    f = np.asarray(toy_losses(jnp.stack([xx.ravel(), yy.ravel()], -1), scale), np.float64)
    order = np.lexsort((f[:, 1], f[:, 0]))
    f = f[order]
    best = np.minimum.accumulate(f[:, 1])
    keep = np.concatenate([[True], f[1:, 1] < best[:-1]])
    return f[keep]


def distance_to_front(points: np.ndarray, front: np.ndarray) -> np.ndarray:
    """Euclidean distance in objective space from each point to the nearest front point."""
    d = points[:, None, :] - front[None, :, :]
    return np.sqrt(np.min(np.sum(d * d, axis=-1), axis=1))


def run_method(
    balancer: optax.GradientTransformation,
    init: Sequence[float],
    *,
    steps: int,
    lr: float = 1e-3,
    scale: float = 1.0,
    record_every: int = 10,
) -> np.ndarray:
    """Trajectory [steps // record_every + 1, 2] of ``chain(balancer, sum_tasks, adam(lr))``."""
    tx = optax.chain(balancer, mtl.sum_tasks(), optax.adam(lr))
    x0 = jnp.asarray(init, jnp.float32)
    loss = lambda x: toy_losses(x, scale)

    def step(carry, _):
        x, opt_state = carry
        losses, jac = mtl.value_and_jacobian(loss)(x)
        updates, opt_state = tx.update(jac, opt_state, x, task_losses=losses)
        return (optax.apply_updates(x, updates), opt_state), None

    def chunk(carry, _):
        carry, _ = jax.lax.scan(step, carry, None, length=record_every)
        return carry, carry[0]

    @jax.jit
    def trajectory(x0):
        _, xs = jax.lax.scan(chunk, (x0, tx.init(x0)), None, length=steps // record_every)
        return jnp.concatenate([x0[None], xs], axis=0)

    return np.asarray(trajectory(x0))


def run_all(config: Any) -> dict:
    """Runs every method of ``config.methods`` from every initial point; returns the results."""
    front = pareto_front(config.scale)
    results = {"scale": config.scale, "steps": config.steps, "lr": config.lr, "methods": {}}
    for spec in config.methods:
        spec = dict(spec)
        name = spec.pop("label", None) or spec["name"]
        balancer = registry.build_chain([spec], num_tasks=2)
        runs = []
        for init in config.inits:
            traj = run_method(
                balancer,
                init,
                steps=config.steps,
                lr=config.lr,
                scale=config.scale,
                record_every=config.record_every,
            )
            final = np.asarray(toy_losses(jnp.asarray(traj[-1]), config.scale))
            dist = float(distance_to_front(final[None], front)[0])
            runs.append(
                {
                    "init": list(init),
                    "final_x": traj[-1].tolist(),
                    "final_losses": final.tolist(),
                    "distance_to_front": dist,
                    "reached_front": bool(dist < config.front_tolerance),
                    "trajectory": traj.tolist(),
                }
            )
        results["methods"][name] = runs
    return results


def plot(results: dict, path: str) -> None:
    """Trajectories over the mean-loss contours (top) and in objective space (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = results["scale"]
    names = list(results["methods"])
    fig, axes = plt.subplots(2, len(names), figsize=(3.2 * len(names), 6.4), squeeze=False)
    grid = np.linspace(-10, 10, 300)
    xx, yy = np.meshgrid(grid, grid)
    f = np.asarray(toy_losses(jnp.stack([xx, yy], -1), scale))
    front = pareto_front(scale)
    for col, name in enumerate(names):
        top, bottom = axes[0, col], axes[1, col]
        top.contour(xx, yy, f.mean(-1), levels=20, cmap="viridis", linewidths=0.8)
        top.plot([-7, 7], [-8.3552, -8.3552], color="gray", lw=4, alpha=0.5, zorder=0)
        bottom.plot(front[:, 0], front[:, 1], color="gray", lw=3, alpha=0.6, label="Pareto front")
        for run in results["methods"][name]:
            traj = np.asarray(run["trajectory"])
            top.plot(traj[:, 0], traj[:, 1], lw=1.5)
            top.plot(*traj[0], "ko", ms=4)
            fl = np.asarray(toy_losses(jnp.asarray(traj), scale))
            bottom.plot(fl[:, 0], fl[:, 1], lw=1.5)
            bottom.plot(*fl[-1], "k*", ms=7)
        reached = sum(r["reached_front"] for r in results["methods"][name])
        top.set_title(f"{name} ({reached}/{len(results['methods'][name])} on front)", fontsize=10)
        top.set_xlim(-10, 10)
        top.set_ylim(-10, 10)
        top.set_aspect("equal")
        bottom.set_xlabel("f1")
        bottom.set_ylabel("f2")
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)


def summary_table(results: dict) -> str:
    """Markdown: per method, per initial point, the final distance to the Pareto front."""
    names = list(results["methods"])
    inits = [tuple(r["init"]) for r in results["methods"][names[0]]]
    header = "| method | " + " | ".join(f"start {i}" for i in inits) + " | on front |\n"
    header += "|---|" + "---|" * (len(inits) + 1) + "\n"
    rows = []
    for name in names:
        runs = results["methods"][name]
        cells = [f"{r['distance_to_front']:.3f}{' ✓' if r['reached_front'] else ''}" for r in runs]
        rows.append(
            f"| {name} | " + " | ".join(cells) + f" | {sum(r['reached_front'] for r in runs)}"
            f"/{len(runs)} |"
        )
    return header + "\n".join(rows) + "\n"


def main(config: Any, workdir: str) -> dict:
    os.makedirs(workdir, exist_ok=True)
    results = run_all(config)
    plot(results, os.path.join(workdir, "toy.png"))
    table = summary_table(results)
    with open(os.path.join(workdir, "toy.md"), "w") as f:
        f.write(table)
    slim = {
        k: v
        if k != "methods"
        else {
            m: [{kk: vv for kk, vv in r.items() if kk != "trajectory"} for r in runs]
            for m, runs in v.items()
        }
        for k, v in results.items()
    }
    tmp = os.path.join(workdir, "toy.json.tmp")
    with open(tmp, "w") as f:
        json.dump(slim, f, indent=2)
    os.replace(tmp, os.path.join(workdir, "toy.json"))
    print(table)
    print("wrote", os.path.join(workdir, "toy.png"))
    return results


def _cli(argv: Sequence[str]) -> None:
    del argv
    main(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", None, "Toy experiment config.")
    _WORKDIR = flags.DEFINE_string("workdir", "/tmp/mtl_toy", "Output directory.")
    app.run(_cli)
