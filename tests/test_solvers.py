"""Tests of the K-space solvers against exact solutions."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_jax as mtl


def exact_min_norm(g: np.ndarray) -> np.ndarray:
    """Brute force over supports: the exact min-norm point of the convex hull (small K)."""
    k = g.shape[0]
    best, best_w = np.inf, None
    for r in range(1, k + 1):
        for support in itertools.combinations(range(k), r):
            s = list(support)
            try:
                z = np.linalg.solve(g[np.ix_(s, s)], np.ones(r))
            except np.linalg.LinAlgError:
                continue
            if z.sum() <= 0:
                continue
            w_s = z / z.sum()
            if np.any(w_s < -1e-12):
                continue
            w = np.zeros(k)
            w[s] = w_s
            val = w @ g @ w
            if val < best - 1e-15:
                best, best_w = val, w
    return best_w


def test_project_simplex():
    v = jnp.array([0.5, 2.0, -1.0, 0.3])
    p = mtl.project_simplex(v)
    np.testing.assert_allclose(jnp.sum(p), 1.0, rtol=1e-6)
    assert bool(jnp.all(p >= 0))
    np.testing.assert_allclose(p, [0.0, 1.0, 0.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(mtl.project_simplex(jnp.full(3, 5.0)), jnp.full(3, 1 / 3), rtol=1e-6)


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_min_norm_simplex_is_exact_on_well_conditioned_input(k):
    rng = np.random.default_rng(k)
    solve = jax.jit(mtl.min_norm_simplex)
    for _ in range(20):
        j = rng.normal(size=(k, 3 * k))
        j[0] *= rng.uniform(0.5, 2)
        g = j @ j.T
        w = np.asarray(solve(jnp.asarray(g, jnp.float32)))
        w_ref = exact_min_norm(g)
        np.testing.assert_allclose(w, w_ref, atol=1e-6)
        np.testing.assert_allclose(w.sum(), 1.0, atol=1e-6)


def test_min_norm_simplex_degenerate_inputs_are_finite():
    cases = {
        "zero": np.zeros((3, 3)),
        "identical": np.ones((3, 3)),
        "opposite": np.array([[1.0, -1.0], [-1.0, 1.0]]),
        "huge": 1e30 * np.eye(3),
        "nan": np.full((2, 2), np.nan),
        "k1": np.array([[4.0]]),
    }
    for name, g in cases.items():
        w = mtl.min_norm_simplex(jnp.asarray(g, jnp.float32))
        assert bool(jnp.all(jnp.isfinite(w))), name
        np.testing.assert_allclose(jnp.sum(w), 1.0, atol=1e-5, err_msg=name)
    # Opposite vectors: the origin is in the hull, reached at equal weights.
    w = mtl.min_norm_simplex(jnp.asarray(cases["opposite"], jnp.float32))
    np.testing.assert_allclose(w, [0.5, 0.5], atol=1e-6)


def test_min_norm_simplex_is_scale_invariant():
    rng = np.random.default_rng(0)
    j = rng.normal(size=(4, 10))
    g = jnp.asarray(j @ j.T, jnp.float32)
    w = mtl.min_norm_simplex(g)
    for s in (1e-8, 1e6):
        np.testing.assert_allclose(mtl.min_norm_simplex(g * s), w, atol=1e-5)


def test_min_norm_simplex_warm_start():
    rng = np.random.default_rng(3)
    j = rng.normal(size=(5, 12))
    g = jnp.asarray(j @ j.T, jnp.float32)
    cold = mtl.min_norm_simplex(g)
    warm = mtl.min_norm_simplex(g, init=cold, max_iter=5)
    np.testing.assert_allclose(warm, cold, atol=1e-6)
