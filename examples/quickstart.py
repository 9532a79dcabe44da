"""Quick start: three tasks on the real handwritten digits bundled with scikit-learn.

A hard-parameter-sharing MLP (shared trunk + one head per task) is trained with any balancing
method of mtl_jax in a plain optax loop, and compared with equal weighting (EW):

    python examples/quickstart.py                       # EW vs MGDA, PCGrad, UPGrad (if present)
    python examples/quickstart.py --methods mgda --steps 300

Tasks (all from the 1,797 real 8x8 digits of the UCI Optical Recognition of Handwritten Digits
data set, shipped inside scikit-learn, no download): the digit (10 classes), its parity
(2 classes), and the digit's mean ink intensity (regression, standardized).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import mtl_jax as mtl

TASKS = ("digit", "parity", "ink")


def load_digits(seed: int = 0):
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    x = (data.images.reshape(len(data.images), -1) / 16.0).astype(np.float32)
    digit = data.target.astype(np.int32)
    ink = x.mean(axis=1)
    ink = ((ink - ink.mean()) / ink.std()).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(x))
    x, digit, ink = x[order], digit[order], ink[order]
    n_train = int(0.8 * len(x))

    def split(sl):
        return {"x": x[sl], "digit": digit[sl], "parity": digit[sl] % 2, "ink": ink[sl]}

    return split(slice(0, n_train)), split(slice(n_train, None))


class HPSNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, hidden: int = 64):
        self.trunk1 = nnx.Linear(64, hidden, rngs=rngs)
        self.trunk2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.digit = nnx.Linear(hidden, 10, rngs=rngs)
        self.parity = nnx.Linear(hidden, 2, rngs=rngs)
        self.ink = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.trunk2(jax.nn.relu(self.trunk1(x))))
        return {"digit": self.digit(h), "parity": self.parity(h), "ink": self.ink(h)[:, 0]}


def task_losses(out, batch):
    ce = lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return jnp.stack(
        [
            ce(out["digit"], batch["digit"]),
            ce(out["parity"], batch["parity"]),
            jnp.mean((out["ink"] - batch["ink"]) ** 2),
        ]
    )


def train(method: str, train_set, test_set, steps: int, batch_size: int, seed: int):
    graphdef, params = nnx.split(HPSNet(nnx.Rngs(seed)), nnx.Param)
    balancer = mtl.get_balancer(method) if method != "ew" else mtl.scalarize(jnp.ones(3))
    tx = optax.chain(balancer, mtl.sum_tasks(), optax.adam(1e-3))
    opt_state = tx.init(params)

    def loss_fn(params, batch):
        return task_losses(nnx.merge(graphdef, params)(batch["x"]), batch)

    @jax.jit
    def step(params, opt_state, batch):
        losses, jac = mtl.value_and_jacobian(loss_fn)(params, batch)
        updates, opt_state = tx.update(jac, opt_state, params, task_losses=losses)
        return optax.apply_updates(params, updates), opt_state, losses

    rng = np.random.default_rng(seed)
    n = len(train_set["x"])
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = rng.choice(n, batch_size, replace=False)
        batch = {k: jnp.asarray(v[idx]) for k, v in train_set.items()}
        params, opt_state, _ = step(params, opt_state, batch)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0

    out = nnx.merge(graphdef, params)(jnp.asarray(test_set["x"]))
    return {
        "digit acc": float(jnp.mean(out["digit"].argmax(-1) == test_set["digit"])),
        "parity acc": float(jnp.mean(out["parity"].argmax(-1) == test_set["parity"])),
        "ink mse": float(jnp.mean((out["ink"] - test_set["ink"]) ** 2)),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    methods = args.methods or ["ew"] + [
        m for m in ("mgda", "pcgrad", "upgrad") if m in mtl.BALANCERS
    ]
    train_set, test_set = load_digits(args.seed)
    print(f"{len(train_set['x'])} train / {len(test_set['x'])} test digits, tasks: {TASKS}")
    print(f"{'method':10s} {'digit acc':>10s} {'parity acc':>11s} {'ink mse':>8s} {'time':>7s}")
    for method in methods:
        r = train(method, train_set, test_set, args.steps, args.batch_size, args.seed)
        print(
            f"{method:10s} {r['digit acc']:10.3f} {r['parity acc']:11.3f} "
            f"{r['ink mse']:8.4f} {r['seconds']:6.1f}s"
        )


if __name__ == "__main__":
    main()
