"""The common test every balancing method in `mtl.BALANCERS` must pass.

Like optax's ``contrib/_common_test.py``: each method goes through the same checks, always via
``jax.jit(tx.update)``: output shapes and dtypes equal the input's, finite on degenerate
Jacobians (zero row, identical rows, opposite rows, K=1, all zero, 1e-12 and 1e8 scales),
deterministic given its seed, accepts and ignores unknown extra args, and trains a small Flax
model inside ``optax.chain(method, mtl.sum_tasks(), optax.adam(...))``.

A method is added by listing its name in `mtl_jax/registry.py`; constructor or update arguments
it needs beyond ``num_tasks`` / ``task_losses`` go in the two tables below.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mtl_jax as mtl

# Constructor kwargs for methods that need more than `num_tasks` (function of K).
INIT_KWARGS = {
    # part A (robust aggregators need their hyper-parameter; trimming needs K >= 2t + 1)
    "krum": lambda k: {"n_byzantine": 0},
    "trimmed_mean": lambda k: {"trim_number": 1 if k >= 3 else 0},
    "scalarize": lambda k: {"weights": jnp.linspace(0.5, 1.5, k)},
    # part E (seed loss-level methods): short horizons so every phase runs in the tests
    "igb": lambda k: {"steps_per_epoch": 2},
    "coba": lambda k: {"warmup_steps": 2, "history_length": 4},
    "adaptive_task_balancing": lambda k: {
        "out_contributions": jnp.linspace(0.1, 0.7, k),
        "in_contributions": jnp.linspace(0.9, 0.2, k),
        "difficulties": jnp.linspace(0.2, 0.8, k),
    },
    "task_schedule": lambda k: {
        "dataset_sizes": [10.0**i for i in range(k, 0, -1)],
        "switch_step": 2,
    },
    "log_class_scaling": lambda k: {"num_classes": [2 + i for i in range(k)]},
    # part C (seed methods): labels as functions of the parameters (1-D leaves = "last layer")
    "fuller": lambda k: {
        "last_shared_layer": lambda p: jax.tree.map(lambda x: jnp.ndim(x) == 1, p),
        "modality_labels": lambda p: jax.tree.map(lambda x: f"rank{jnp.ndim(x)}", p),
    },
    "sparse_training": lambda k: {"sparsity": 0.5, "refresh_every": 2},
}

# Extra update kwargs beyond `task_losses` (function of K and the step index).
EXTRA_UPDATE_ARGS: dict = {
    # part E
    "coba": lambda k, step: {"val_losses": jnp.linspace(2.0, 1.0, k) / (1.0 + 0.05 * step)},
}

# Methods undefined below some K (Krum needs K >= n_byzantine + 3, as in TorchJD): smaller K
# is skipped in the degenerate-input test (the method raises a ValueError naming the minimum).
MIN_TASKS: dict = {"krum": 3}


def make(name: str, k: int) -> optax.GradientTransformationExtraArgs:
    factory = getattr(mtl, name)
    kwargs = dict(INIT_KWARGS.get(name, lambda k: {})(k))
    if "num_tasks" in inspect.signature(factory).parameters:
        kwargs.setdefault("num_tasks", k)
    return factory(**kwargs)


def update_kwargs(name: str, k: int, step: int = 0) -> dict:
    losses = jnp.linspace(1.0, 2.0, k) / (1.0 + 0.1 * step)
    kwargs = {"task_losses": losses}
    if name in EXTRA_UPDATE_ARGS:
        kwargs.update(EXTRA_UPDATE_ARGS[name](k, step))
    return kwargs


def params_like(k: int, dtype=jnp.float32):
    del k
    return {"w": jnp.zeros((5, 3), dtype), "b": jnp.zeros((3,), dtype)}


def jac_from_rows(rows: np.ndarray, dtype=jnp.float32):
    """[K, 18] rows -> Jacobian pytree matching `params_like`."""
    k = rows.shape[0]
    rows = jnp.asarray(rows, dtype)
    return {"w": rows[:, :15].reshape(k, 5, 3), "b": rows[:, 15:].reshape(k, 3)}


def degenerate_cases(k: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    base = rng.normal(size=(k, 18)).astype(np.float32)
    zero_row = base.copy()
    zero_row[0] = 0
    identical = np.repeat(base[:1], k, axis=0)
    opposite = base.copy()
    if k > 1:
        opposite[1] = -opposite[0]
    return {
        "random": base,
        "zero_row": zero_row,
        "identical": identical,
        "opposite": opposite,
        "all_zero": np.zeros_like(base),
        "tiny": base * 1e-12,
        "huge": base * 1e8,
    }


@functools.cache
def jitted(name: str, k: int, dtype=jnp.float32):
    """The method at K tasks and its jitted update, shared by the tests of this module.

    Compilation dominates these tests, so the shape, degenerate-input and determinism tests at
    the same (method, K, dtype) run one compiled program (each run starts from a fresh state).
    """
    tx = make(name, k)
    return tx, jax.jit(tx.update)


def run_steps(name, k, jacs, dtype=jnp.float32, **extra):
    tx, update = jitted(name, k, dtype)
    params = params_like(k, dtype)
    state = tx.init(params)
    outs = []
    for step, jac in enumerate(jacs):
        out, state = update(jac, state, params, **update_kwargs(name, k, step), **extra)
        outs.append(out)
    return outs, state


METHODS = list(mtl.BALANCERS)


def test_registry_names_resolve():
    missing = [n for n in METHODS if not callable(getattr(mtl, n, None))]
    assert not missing, f"registered but not exported from mtl_jax: {missing}"
    assert len(set(METHODS)) == len(METHODS)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shapes_and_dtypes(name, dtype):
    k = 3
    rng = np.random.default_rng(0)
    jac = jac_from_rows(rng.normal(size=(k, 18)), dtype)
    (out,), _ = run_steps(name, k, [jac], dtype)
    assert jax.tree.structure(out) == jax.tree.structure(jac)
    for o, j in zip(jax.tree.leaves(out), jax.tree.leaves(jac), strict=True):
        assert o.shape == j.shape
        assert o.dtype == j.dtype
        assert bool(jnp.all(jnp.isfinite(o.astype(jnp.float32))))


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("k", [1, 3])
def test_finite_on_degenerate_jacobians(name, k):
    if k < MIN_TASKS.get(name, 1):
        pytest.skip(f"{name} needs K >= {MIN_TASKS[name]}")
    cases = degenerate_cases(k, np.random.default_rng(1))
    # One transform and state through every case in sequence: also checks that a degenerate
    # step does not poison the state for the next one.
    jacs = [jac_from_rows(rows) for rows in cases.values()]
    outs, state = run_steps(name, k, jacs)
    for case, out in zip(cases, outs, strict=True):
        for leaf in jax.tree.leaves(out):
            assert bool(jnp.all(jnp.isfinite(leaf))), f"{name}: non-finite output on {case!r}"
    for leaf in jax.tree.leaves(state):
        if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact):
            assert bool(jnp.all(jnp.isfinite(leaf))), f"{name}: non-finite state"


@pytest.mark.parametrize("name", METHODS)
def test_deterministic_and_ignores_unknown_extra_args(name):
    k = 3  # the K of the tests above: run `a` reuses their compiled update
    rng = np.random.default_rng(2)
    jacs = [jac_from_rows(rng.normal(size=(k, 18))) for _ in range(3)]
    a, _ = run_steps(name, k, jacs)
    b, _ = run_steps(name, k, jacs, some_unknown_extra_arg=jnp.ones(2))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class TinyMTLNet(nnx.Module):
    """Hard parameter sharing: a shared layer and one linear head per task."""

    def __init__(self, k: int, rngs: nnx.Rngs):
        self.shared = nnx.Linear(4, 8, rngs=rngs)
        self.heads = nnx.List([nnx.Linear(8, 1, rngs=rngs) for _ in range(k)])

    def __call__(self, x):
        h = jnp.tanh(self.shared(x))
        return jnp.concatenate([head(h) for head in self.heads], axis=-1)


@pytest.mark.parametrize("name", METHODS)
def test_trains_flax_model_in_optax_chain(name):
    k = 3
    model = TinyMTLNet(k, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    x = jax.random.normal(jax.random.key(1), (16, 4))
    y = jax.random.normal(jax.random.key(2), (16, k))

    def loss_fn(params):
        pred = nnx.merge(graphdef, params)(x)
        return jnp.mean((pred - y) ** 2, axis=0)

    tx = optax.chain(make(name, k), mtl.sum_tasks(), optax.adam(1e-2))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        losses, jac = mtl.value_and_jacobian(loss_fn)(params)
        extra = update_kwargs(name, k)
        extra["task_losses"] = losses
        updates, opt_state = tx.update(jac, opt_state, params, **extra)
        return optax.apply_updates(params, updates), opt_state, losses

    start = params
    for _ in range(4):
        params, opt_state, losses = step(params, opt_state)
    assert bool(jnp.all(jnp.isfinite(losses)))
    moved = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), start, params)
    assert max(float(v) for v in jax.tree.leaves(moved)) > 0
    for leaf in jax.tree.leaves(params):
        assert bool(jnp.all(jnp.isfinite(leaf)))
