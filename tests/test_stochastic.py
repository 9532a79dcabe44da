"""Properties of the stochastic, stateful methods: MoCo, SDMGrad, MoDo."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_jax as mtl


def f32(x):
    return jnp.asarray(x, jnp.float32)


def test_cross_gramian_matches_explicit_product_over_leaves():
    rng = np.random.default_rng(0)
    a = {"w": f32(rng.normal(size=(3, 2, 2))), "b": f32(rng.normal(size=(3, 5)))}
    b = {"w": f32(rng.normal(size=(3, 2, 2))), "b": f32(rng.normal(size=(3, 5)))}
    flat = lambda j: np.concatenate([np.asarray(j["b"]), np.asarray(j["w"]).reshape(3, 4)], 1)
    np.testing.assert_allclose(mtl.cross_gramian(a, b), flat(a) @ flat(b).T, rtol=1e-5)
    np.testing.assert_allclose(mtl.cross_gramian(a, a), mtl.gramian(a), rtol=1e-6)


def test_modo_step_formula_and_weight_jacobians():
    rng = np.random.default_rng(1)
    j1, j2, j3 = (rng.normal(size=(3, 6)) for _ in range(3))
    tx = mtl.modo(num_tasks=3, gamma=0.05, rho=0.1)
    update = jax.jit(tx.update)
    out, state = update(f32(j3), tx.init(None), weight_jacobians=(f32(j1), f32(j2)))
    lam = np.full(3, 1 / 3)
    v = lam - 0.05 * ((j1 @ j2.T) @ lam + 0.1 * lam)
    expected = np.asarray(mtl.project_simplex(f32(v)))
    np.testing.assert_allclose(state.weights, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, expected[:, None] * j3, rtol=1e-5, atol=1e-6)
    # Without weight_jacobians the Gramian of the update Jacobian is used.
    _, state_single = update(f32(j3), tx.init(None))
    v = lam - 0.05 * ((j3 @ j3.T) @ lam + 0.1 * lam)
    np.testing.assert_allclose(
        state_single.weights, mtl.project_simplex(f32(v)), rtol=1e-5, atol=1e-6
    )


def test_modo_converges_to_mgda_weights():
    rng = np.random.default_rng(2)
    rows = rng.normal(size=(3, 8))
    g = rows @ rows.T
    tx = mtl.modo(num_tasks=3, gamma=0.2 / np.trace(g), rho=0.0)
    update = jax.jit(tx.update)
    state = tx.init(None)
    for _ in range(2000 // 50):
        for _ in range(50):
            _, state = update(f32(rows), state)
    mgda = np.asarray(mtl.min_norm_simplex(f32(g)))
    np.testing.assert_allclose(state.weights, mgda, atol=1e-3)


def test_sdmgrad_weights_on_simplex_and_large_lambda_is_mean():
    rng = np.random.default_rng(3)
    rows = f32(rng.normal(size=(4, 7)))
    tx = mtl.sdmgrad(num_tasks=4)
    out, state = jax.jit(tx.update)(rows, tx.init(None))
    w = np.asarray(state.weights)
    assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-5
    comb = np.sum(np.asarray(out) * np.asarray(rows), 1) / np.sum(np.asarray(rows) ** 2, 1)
    np.testing.assert_allclose(comb, (w + 0.3 / 4) / 1.3, rtol=1e-4)
    tx = mtl.sdmgrad(num_tasks=4, lambda_=1e6)
    out, _ = jax.jit(tx.update)(rows, tx.init(None))
    np.testing.assert_allclose(out, np.asarray(rows) / 4, rtol=1e-4, atol=1e-6)


def test_sdmgrad_pref_vector_and_validation():
    with pytest.raises(ValueError, match="pref_vector"):
        mtl.sdmgrad(num_tasks=3, pref_vector=[0.5, 0.5])
    tx = mtl.sdmgrad(num_tasks=2, lambda_=1e6, pref_vector=[0.8, 0.2])
    rows = f32([[1.0, 0.0], [0.0, 1.0]])
    out, _ = tx.update(rows, tx.init(None))
    np.testing.assert_allclose(np.asarray(out).sum(0), [0.8, 0.2], rtol=1e-4)


def test_moco_first_step_and_needs_losses():
    rows = np.array([[3.0, 4.0], [0.0, 2.0]])
    losses = np.array([2.0, 1.0])
    tx = mtl.moco(num_tasks=2)
    update = jax.jit(tx.update)
    out, state = update(f32(rows), tx.init(jnp.zeros(2)), task_losses=f32(losses))
    h = rows / np.linalg.norm(rows, axis=1, keepdims=True) * losses[:, None]
    np.testing.assert_allclose(state.y, 0.5 * h, rtol=1e-5)  # beta / 1^0.5 = 0.5
    y = 0.5 * h
    logits = 0.5 - 0.1 * (y @ y.T) @ np.full(2, 0.5)
    lam = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(state.weights, lam, rtol=1e-5)
    np.testing.assert_allclose(out, lam[:, None] * y, rtol=1e-5)
    with pytest.raises(ValueError, match="task_losses"):
        tx.update(f32(rows), tx.init(jnp.zeros(2)))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_moco_keeps_its_tracked_gradients_through_a_non_finite_jacobian(bad):
    # A NaN / inf Jacobian entry must not reach y: the step keeps y (decided from the rows'
    # norms, fused into the tracking update) and the weights, and returns lambda @ y_old.
    rows = f32(np.array([[3.0, 4.0], [0.0, 2.0]]))
    losses = f32(np.array([2.0, 1.0]))
    tx = mtl.moco(num_tasks=2)
    update = jax.jit(tx.update)
    _, state = update(rows, tx.init(jnp.zeros(2)), task_losses=losses)
    out, after = update(rows.at[1, 0].set(bad), state, task_losses=losses)
    np.testing.assert_array_equal(after.y, state.y)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(after.weights))
    _, good = update(rows, state, task_losses=losses)
    assert not np.array_equal(good.y, state.y)  # a finite step does move y


@pytest.mark.parametrize(
    "factory,kwargs",
    [
        (mtl.modo, {"num_tasks": 2, "gamma": 0.0}),
        (mtl.modo, {"num_tasks": 2, "rho": -1.0}),
        (mtl.sdmgrad, {"num_tasks": 2, "lr": 0.0}),
        (mtl.sdmgrad, {"num_tasks": 2, "momentum": 1.0}),
        (mtl.sdmgrad, {"num_tasks": 2, "n_iter": 0}),
        (mtl.sdmgrad, {"num_tasks": 2, "lambda_": -0.1}),
        (mtl.moco, {"num_tasks": 2, "beta": 0.0}),
        (mtl.moco, {"num_tasks": 2, "gamma_sigma": -1.0}),
        (mtl.moco, {"num_tasks": 0}),
    ],
)
def test_rejects_bad_hyperparameters(factory, kwargs):
    with pytest.raises(ValueError):
        factory(**kwargs)


def test_weight_jacobians_must_be_a_pair():
    tx = mtl.modo(num_tasks=2)
    rows = f32(np.eye(2))
    with pytest.raises(ValueError, match="pair"):
        tx.update(rows, tx.init(None), weight_jacobians=rows)
