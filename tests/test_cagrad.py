"""Properties of CAGrad (dual solved in K-space)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_jax as mtl


def direction(rows, **kwargs):
    tx = optax.chain(mtl.cagrad(**kwargs), mtl.sum_tasks())
    out, _ = jax.jit(tx.update)(jnp.asarray(rows, jnp.float32), tx.init(None))
    return np.asarray(out, np.float64)


def test_c_zero_is_the_mean_gradient():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(4, 6))
    np.testing.assert_allclose(direction(rows, c=0.0), rows.mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("c", [0.4, 1.0])
def test_maximizes_worst_task_improvement_in_the_ball(c):
    """d solves max_{||d - g0|| <= c ||g0||} min_i g_i^T d: no point of the ball does better."""
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(3, 5))
    rows[1] = -0.7 * rows[0] + 0.3 * rows[1]  # a conflict
    d = direction(rows, c=c)
    g0 = rows.mean(0)
    radius = c * np.linalg.norm(g0)
    np.testing.assert_allclose(np.linalg.norm(d - g0), radius, rtol=1e-4)
    u = rng.normal(size=(20000, 5))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    candidates = g0 + radius * u * rng.uniform(0, 1, size=(20000, 1)) ** 0.2
    best_sampled = np.max(np.min(candidates @ rows.T, axis=1))
    ours = np.min(rows @ d)
    assert ours >= best_sampled - 1e-5 * np.abs(best_sampled)


def test_permutation_equivariant_and_linear_under_scaling():
    rng = np.random.default_rng(2)
    rows = rng.normal(size=(5, 7))
    d = direction(rows)
    perm = rng.permutation(5)
    np.testing.assert_allclose(direction(rows[perm]), d, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(direction(10.0 * rows), 10.0 * d, rtol=1e-4, atol=1e-5)


def test_weights_match_direction_and_tiny_gradients_give_zero():
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(3, 4))
    w = np.asarray(mtl.cagrad_weights(jnp.asarray(rows @ rows.T, jnp.float32)))
    np.testing.assert_allclose(w @ rows, direction(rows), rtol=1e-5, atol=1e-6)
    # TorchJD's norm_eps rule: trace(G) < norm_eps gives a zero update; norm_eps=0 disables it.
    np.testing.assert_array_equal(direction(1e-4 * rows), 0.0)
    tiny = direction(1e-4 * rows, norm_eps=0.0)
    np.testing.assert_allclose(tiny, 1e-4 * direction(rows), rtol=1e-3)


def test_opposite_gradients_are_finite():
    rows = np.array([[1.0, 2.0], [-1.0, -2.0]])
    d = direction(rows)
    assert np.all(np.isfinite(d))


@pytest.mark.parametrize("kwargs", [{"c": -0.1}, {"norm_eps": -1.0}])
def test_rejects_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        mtl.cagrad(**kwargs)
