"""Properties of Nash-MTL and FairGrad (positive solutions of G x = x^(-p), in K-space)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_jax as mtl
from mtl_jax.transforms.nash_mtl import solve_power_balance


def weights_of(tx, rows, steps=1):
    """Runs tx on rows for `steps` steps and returns the last row weights (out = diag(w) J)."""
    rows = jnp.asarray(rows, jnp.float32)
    state = tx.init(None)
    update = jax.jit(tx.update)
    for _ in range(steps):
        out, state = update(rows, state)
    out, rows = np.asarray(out, np.float64), np.asarray(rows, np.float64)
    return np.sum(out * rows, 1) / np.sum(rows * rows, 1), state


@pytest.mark.parametrize("k", [2, 4, 7])
def test_nash_solution_satisfies_bargaining_equation(k):
    rng = np.random.default_rng(k)
    rows = rng.normal(size=(k, 12)) * 10.0 ** rng.uniform(-2, 2, size=(k, 1))
    g = rows @ rows.T
    alpha = np.asarray(mtl.nash_mtl_weights(jnp.asarray(g, jnp.float32)), np.float64)
    assert np.all(alpha > 0)
    np.testing.assert_allclose(g @ alpha, 1.0 / alpha, rtol=1e-3)
    # Every task gets the same log-improvement: alpha_i * g_i^T d = 1.
    np.testing.assert_allclose(alpha * (g @ alpha), 1.0, rtol=1e-3)


def test_nash_orthogonal_rows_and_norm_clipping():
    rows = np.array([[2.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 4.0]])
    w, _ = weights_of(mtl.nash_mtl(num_tasks=3, max_norm=0.0), rows)
    np.testing.assert_allclose(w, [0.5, 2.0, 0.25], rtol=1e-4)
    tx = optax.chain(mtl.nash_mtl(num_tasks=3, max_norm=1.0), mtl.sum_tasks())
    d, _ = tx.update(jnp.asarray(rows, jnp.float32), tx.init(None))
    # ||alpha^T J||^2 = K at the solution, so max_norm=1 clips to norm 1.
    np.testing.assert_allclose(np.linalg.norm(d), 1.0, rtol=1e-4)


def test_nash_permutation_equivariant():
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(5, 9))
    perm = rng.permutation(5)
    w, _ = weights_of(mtl.nash_mtl(num_tasks=5, max_norm=0.0), rows)
    wp, _ = weights_of(mtl.nash_mtl(num_tasks=5, max_norm=0.0), rows[perm])
    np.testing.assert_allclose(wp, w[perm], rtol=1e-4)


def test_nash_update_every_reuses_weights_and_fallback_keeps_previous():
    rng = np.random.default_rng(2)
    tx = mtl.nash_mtl(num_tasks=2, max_norm=0.0, update_weights_every=2)
    update = jax.jit(tx.update)
    state = tx.init(None)
    a = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)
    _, state = update(a, state)
    first = np.asarray(state.alpha)
    _, state = update(3.0 * a, state)  # not a refresh step
    np.testing.assert_array_equal(state.alpha, first)
    _, state = update(3.0 * a, state)  # refresh: alpha scales as 1/3
    np.testing.assert_allclose(state.alpha, first / 3.0, rtol=1e-4)
    # Opposite gradients: no positive solution; the previous weights are kept.
    opposite = jnp.asarray([[1.0, 2.0, 0.0, 0.0], [-1.0, -2.0, 0.0, 0.0]])
    out, state2 = update(opposite, state._replace(step=jnp.zeros((), jnp.int32)))
    np.testing.assert_array_equal(state2.alpha, state.alpha)
    assert np.all(np.isfinite(out))


def test_solver_scale_and_warm_start():
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(4, 6))
    g = jnp.asarray(rows @ rows.T, jnp.float32)
    x, ok = solve_power_balance(g, 0.5)
    assert bool(ok)
    np.testing.assert_allclose(g @ x, x**-0.5, rtol=1e-3)
    x2, ok2 = solve_power_balance(1e6 * g, 0.5, init=x)
    assert bool(ok2)
    np.testing.assert_allclose(x2, x * 1e6 ** (-1 / 1.5), rtol=1e-3)


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_fairgrad_solves_alpha_fair_equation(alpha):
    rng = np.random.default_rng(4)
    rows = rng.normal(size=(5, 8))
    g = rows @ rows.T
    w = np.asarray(mtl.fairgrad_weights(jnp.asarray(g, jnp.float32), alpha=alpha), np.float64)
    np.testing.assert_allclose(g @ w, w ** (-1.0 / alpha), rtol=1e-3)


def test_fairgrad_special_cases():
    rng = np.random.default_rng(5)
    rows = rng.normal(size=(3, 5))
    w0, _ = weights_of(mtl.fairgrad(alpha=0.0), rows)
    np.testing.assert_allclose(w0, 1.0 / 3.0, rtol=1e-6)
    w1, _ = weights_of(mtl.fairgrad(alpha=1.0), rows)
    wn, _ = weights_of(mtl.nash_mtl(num_tasks=3, max_norm=0.0), rows)
    np.testing.assert_allclose(w1, wn, rtol=1e-4)
    perm = np.array([2, 0, 1])
    wp, _ = weights_of(mtl.fairgrad(alpha=2.0), rows[perm])
    w2, _ = weights_of(mtl.fairgrad(alpha=2.0), rows)
    np.testing.assert_allclose(wp, w2[perm], rtol=1e-4)


def test_fairgrad_no_solution_falls_back_to_uniform():
    rows = np.array([[1.0, 2.0], [-1.0, -2.0]])
    w, _ = weights_of(mtl.fairgrad(alpha=1.0), rows)
    np.testing.assert_allclose(w, 0.5)


@pytest.mark.parametrize(
    "factory,kwargs",
    [
        (mtl.nash_mtl, {"num_tasks": 0}),
        (mtl.nash_mtl, {"num_tasks": 2, "max_norm": -1.0}),
        (mtl.nash_mtl, {"num_tasks": 2, "update_weights_every": 0}),
        (mtl.nash_mtl, {"num_tasks": 2, "optim_niter": 0}),
        (mtl.fairgrad, {"alpha": -1.0}),
        (mtl.fairgrad, {"max_iters": 0}),
    ],
)
def test_rejects_bad_hyperparameters(factory, kwargs):
    with pytest.raises(ValueError):
        factory(**kwargs)
