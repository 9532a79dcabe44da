"""Property-based tests (hypothesis) of every balancer in `mtl.BALANCERS` on random Jacobians.

Each example draws per-task row scales in 1e-6..1e6, degenerate rows (zero rows, exact
duplicates, exact opposites, all rows zero), task losses spanning the same range, and random
content; the method runs two jitted steps (the second from the first one's state) and every
output must be finite with the input's tree structure, shapes and dtypes, and the new state
finite. Compilation dominates the cost, so each method is compiled once per (K, shape): the
default run uses one K per method (rotating over 1..8 across methods) and one pytree shape;
``-m slow`` draws K in 1..8 and two shapes for every method, with more examples.

Constructor and update arguments come from `test_common_methods` (INIT_KWARGS,
EXTRA_UPDATE_ARGS, MIN_TASKS), as in the common test.
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mtl_jax as mtl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_common_methods import MIN_TASKS, make, update_kwargs  # noqa: E402

METHODS = list(mtl.BALANCERS)

# Parameter pytrees (shapes without the task axis): a small dense layer, and a nested tree with
# a conv kernel, a scalar and an odd-sized vector.
SHAPES = (
    {"w": (5, 3), "b": (3,)},
    {"conv": {"kernel": (2, 2, 1, 3), "bias": (3,)}, "scale": (), "head": [(7,)]},
)


def _tree(shapes, fn):
    return jax.tree.map(fn, shapes, is_leaf=lambda x: isinstance(x, tuple))


@functools.cache
def _compiled(name: str, k: int, shape_id: int):
    """The method at K tasks, its jitted update, parameters and initial state (cached)."""
    tx = make(name, k)
    params = _tree(SHAPES[shape_id], lambda s: jnp.zeros(s, jnp.float32))
    return jax.jit(tx.update), params, tx.init(params)


def _rows(seed: int, k: int, n: int, log_scales, pattern) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(k, n)) * (10.0 ** np.asarray(log_scales))[:, None]
    for i, p in enumerate(pattern):
        j = (i + 1) % k
        if p == "zero":
            rows[i] = 0.0
        elif p == "duplicate" and k > 1:
            rows[j] = rows[i]
        elif p == "opposite" and k > 1:
            rows[j] = -rows[i]
    if "all_zero" in pattern:
        rows[:] = 0.0
    return rows.astype(np.float32)


def _jacobian(rows: np.ndarray, shapes):
    k = rows.shape[0]
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    out, start = [], 0
    for s in leaves:
        size = int(np.prod(s, dtype=int))
        out.append(jnp.asarray(rows[:, start : start + size].reshape((k, *s))))
        start += size
    return jax.tree.unflatten(treedef, out)


def _num_params(shapes) -> int:
    leaves = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
    return sum(int(np.prod(s, dtype=int)) for s in leaves)


@st.composite
def cases(draw, ks, shape_ids):
    k = draw(st.sampled_from(ks))
    shape_id = draw(st.sampled_from(shape_ids))
    log_scales = draw(st.lists(st.floats(-6.0, 6.0), min_size=k, max_size=k))
    pattern = draw(
        st.lists(
            st.sampled_from(["none", "none", "zero", "duplicate", "opposite", "all_zero"]),
            min_size=k,
            max_size=k,
        )
    )
    loss_scales = draw(st.lists(st.floats(-6.0, 6.0), min_size=k, max_size=k))
    seed = draw(st.integers(0, 2**31 - 1))
    return k, shape_id, log_scales, pattern, loss_scales, seed


def check(name, case):
    k, shape_id, log_scales, pattern, loss_scales, seed = case
    k = max(k, MIN_TASKS.get(name, 1))
    update, params, state = _compiled(name, k, shape_id)
    shapes = SHAPES[shape_id]
    rows = _rows(seed, k, _num_params(shapes), (log_scales + [0.0] * k)[:k], pattern)
    jac = _jacobian(rows, shapes)
    losses = jnp.asarray(10.0 ** np.asarray((loss_scales + [0.0] * k)[:k]), jnp.float32)
    for step in range(2):
        kwargs = update_kwargs(name, k, step)
        kwargs["task_losses"] = losses * (1.0 + 0.1 * step)
        out, state = update(jac, state, params, **kwargs)
        assert jax.tree.structure(out) == jax.tree.structure(jac), name
        for o, j in zip(jax.tree.leaves(out), jax.tree.leaves(jac), strict=True):
            assert o.shape == j.shape and o.dtype == j.dtype, (name, o.shape, o.dtype)
        bad = [i for i, o in enumerate(jax.tree.leaves(out)) if not np.all(np.isfinite(o))]
        assert not bad, f"{name}: non-finite output, K={k}, case {case}"
        assert bool(mtl.all_finite(state)), f"{name}: non-finite state, K={k}, case {case}"


FAST = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SLOW = settings(FAST, max_examples=80, derandomize=False)


@pytest.mark.parametrize("name", METHODS)
def test_fuzz_finite_outputs(name):
    k = 1 + METHODS.index(name) % 8  # one compilation per method; K covers 1..8 across methods

    @FAST
    @given(case=cases((k,), (0,)))
    def run(case):
        check(name, case)

    run()


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_fuzz_finite_outputs_all_k(name):
    @SLOW
    @given(case=cases(tuple(range(1, 9)), (0, 1)))
    def run(case):
        check(name, case)

    run()
