"""Properties of PCGrad and GradVac (the projection family, computed in K-space)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_jax as mtl
from mtl_jax.transforms.pcgrad import _task_orders, gradvac_matrix, pcgrad_matrix


def run(tx, rows, state=None, params=None):
    rows = jnp.asarray(rows, jnp.float32)
    state = tx.init(jnp.zeros(rows.shape[1:])) if state is None else state
    return jax.jit(tx.update)(rows, state, params)


def pcgrad_numpy(rows: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """PCGrad in parameter space (Algorithm 1 of the paper, TorchJD's task-skipping order)."""
    out = rows.copy()
    for i in range(rows.shape[0]):
        for j in orders[i]:
            if j == i:
                continue
            dot = out[i] @ rows[j]
            if dot < 0:
                out[i] -= dot / (rows[j] @ rows[j]) * rows[j]
    return out


def test_pcgrad_is_identity_without_conflict():
    rng = np.random.default_rng(0)
    rows = np.abs(rng.normal(size=(4, 10)))  # all pairwise inner products positive
    out, _ = run(mtl.pcgrad(), rows)
    np.testing.assert_allclose(out, rows, rtol=1e-6)


def test_pcgrad_two_conflicting_rows_become_orthogonal():
    rows = np.array([[1.0, 0.2, 0.0], [-1.0, 1.0, 0.5]])
    out, _ = run(mtl.pcgrad(), rows)
    out = np.asarray(out)
    np.testing.assert_allclose(out[0] @ rows[1], 0.0, atol=1e-5)
    np.testing.assert_allclose(out[1] @ rows[0], 0.0, atol=1e-5)
    # Each projected row is the original minus a multiple of the other.
    expected0 = rows[0] - (rows[0] @ rows[1]) / (rows[1] @ rows[1]) * rows[1]
    np.testing.assert_allclose(out[0], expected0, rtol=1e-5)


def test_pcgrad_gramian_first_equals_parameter_space_algorithm():
    rng = np.random.default_rng(1)
    for k in (3, 5, 8):
        rows = rng.normal(size=(k, 12))
        orders = np.asarray(_task_orders(jax.random.key(k), k))
        c = pcgrad_matrix(jnp.asarray(rows @ rows.T, jnp.float32), jnp.asarray(orders))
        np.testing.assert_allclose(np.asarray(c) @ rows, pcgrad_numpy(rows, orders), atol=1e-4)


def test_pcgrad_last_projection_leaves_no_conflict():
    rng = np.random.default_rng(2)
    rows = rng.normal(size=(5, 8))
    orders = np.asarray(_task_orders(jax.random.key(3), 5))
    c = np.asarray(pcgrad_matrix(jnp.asarray(rows @ rows.T, jnp.float32), jnp.asarray(orders)))
    projected = c @ rows
    for i in range(5):
        last = [j for j in orders[i] if j != i][-1]
        assert projected[i] @ rows[last] >= -1e-4


def test_pcgrad_pytree_and_dtype():
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(3, 7)).astype(np.float32)
    jac = {"a": jnp.asarray(rows[:, :4]).reshape(3, 2, 2), "b": jnp.asarray(rows[:, 4:])}
    tx = mtl.pcgrad(seed=4)
    out, _ = jax.jit(tx.update)(jac, tx.init(None))
    flat, _ = run(mtl.pcgrad(seed=4), rows)
    np.testing.assert_allclose(out["a"].reshape(3, 4), flat[:, :4], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["b"], flat[:, 4:], rtol=1e-5, atol=1e-6)


def test_pcgrad_two_tasks_permutation_equivariant():
    rows = np.array([[1.0, 0.5, -0.3], [-0.8, 1.0, 0.1]])
    out, _ = run(mtl.pcgrad(), rows)
    swapped, _ = run(mtl.pcgrad(), rows[::-1])
    np.testing.assert_allclose(np.asarray(swapped)[::-1], out, rtol=1e-6)


def test_pcgrad_orders_change_across_steps_and_follow_the_seed():
    rng = np.random.default_rng(4)
    rows = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    tx = mtl.pcgrad(seed=0)
    update = jax.jit(tx.update)
    state = tx.init(None)
    outs = []
    for _ in range(6):
        out, state = update(rows, state)
        outs.append(np.asarray(out))
    assert any(not np.allclose(outs[0], o) for o in outs[1:])
    again, _ = update(rows, tx.init(None))
    np.testing.assert_array_equal(again, outs[0])
    sums = [o.sum(0) for o in outs]
    assert all(np.all(np.isfinite(s)) for s in sums)


def test_gradvac_with_zero_targets_is_pcgrad():
    rng = np.random.default_rng(5)
    rows = rng.normal(size=(4, 9))
    out_vac, _ = run(mtl.gradvac(num_tasks=4, seed=7), rows)
    out_pc, _ = run(mtl.pcgrad(seed=7), rows)
    np.testing.assert_allclose(out_vac, out_pc, rtol=1e-4, atol=1e-5)


def test_gradvac_lifts_similarity_to_target_and_tracks_ema():
    rows = np.array([[1.0, 0.0, 0.0], [0.1, 1.0, 0.0]])  # cos ~ 0.0995
    g = jnp.asarray(rows @ rows.T, jnp.float32)
    phi_hat = jnp.array([[0.0, 0.5], [0.5, 0.0]], jnp.float32)
    orders = jnp.array([[0, 1], [1, 0]])
    c, new_phi = gradvac_matrix(g, phi_hat, orders, beta=0.25, eps=0.0)
    corrected = np.asarray(c) @ rows
    cos = corrected[0] @ rows[1] / np.linalg.norm(corrected[0]) / np.linalg.norm(rows[1])
    np.testing.assert_allclose(cos, 0.5, atol=1e-5)
    phi = rows[0] @ rows[1] / np.linalg.norm(rows[0]) / np.linalg.norm(rows[1])
    np.testing.assert_allclose(new_phi[0, 1], 0.75 * 0.5 + 0.25 * phi, rtol=1e-5)
    assert float(new_phi[0, 0]) == 0.0


def test_gradvac_state_stays_bounded_over_steps():
    rng = np.random.default_rng(6)
    tx = mtl.gradvac(num_tasks=3)
    state = tx.init(None)
    update = jax.jit(tx.update)
    for _ in range(5):
        out, state = update(jnp.asarray(rng.normal(size=(3, 6)), jnp.float32), state)
        assert np.all(np.isfinite(out))
    assert np.all(np.abs(np.asarray(state.phi_hat)) <= 1.0 + 1e-5)


def test_gradvac_in_chain_with_adam():
    tx = optax.chain(mtl.gradvac(num_tasks=2), mtl.sum_tasks(), optax.adam(1e-2))
    params = jnp.zeros(3)
    state = tx.init(params)
    upd, _ = tx.update(jnp.array([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0]]), state, params)
    assert upd.shape == (3,)


@pytest.mark.parametrize(
    "kwargs", [{"num_tasks": 0}, {"num_tasks": 2, "beta": 1.5}, {"num_tasks": 2, "eps": -1.0}]
)
def test_gradvac_rejects_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        mtl.gradvac(**kwargs)


def test_gradvac_checks_num_tasks():
    tx = mtl.gradvac(num_tasks=3)
    with pytest.raises(ValueError, match="num_tasks=3"):
        tx.update(jnp.ones((2, 4)), tx.init(None))


def test_composes_after_a_loss_weighting_in_one_chain():
    """The issue's headline chain: a loss weighting, then PCGrad, reduce, optimizer."""
    rng = np.random.default_rng(8)
    params = {"w": jnp.zeros((4,))}
    jac = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
    losses = jnp.array([1.0, 2.0, 0.5])
    tx = optax.chain(mtl.uncertainty_weighting(3), mtl.pcgrad(), mtl.sum_tasks(), optax.adam(1e-3))
    state = tx.init(params)
    upd, state = jax.jit(tx.update)(jac, state, params, task_losses=losses)
    assert upd["w"].shape == (4,) and bool(jnp.all(jnp.isfinite(upd["w"])))
    # Without the loss weighting the PCGrad rows differ only by the row scaling it applied.
    lw, _ = mtl.uncertainty_weighting(3).update(
        jac, mtl.uncertainty_weighting(3).init(params), params, task_losses=losses
    )
    pc, _ = mtl.pcgrad().update(lw, mtl.pcgrad().init(params), params)
    chain2 = optax.chain(mtl.uncertainty_weighting(3), mtl.pcgrad())
    out2, _ = chain2.update(jac, chain2.init(params), params, task_losses=losses)
    np.testing.assert_allclose(out2["w"], pc["w"], rtol=1e-5, atol=1e-7)
