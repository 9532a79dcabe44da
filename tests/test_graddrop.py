"""Properties of GradDrop (elementwise sign dropout, leaf-wise)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_jax as mtl


def run(tx, jac, state=None):
    state = tx.init(None) if state is None else state
    return jax.jit(tx.update)(jac, state)


def test_same_sign_entries_always_kept():
    rng = np.random.default_rng(0)
    rows = np.abs(rng.normal(size=(3, 50))).astype(np.float32)
    rows[:, 25:] *= -1  # columns are sign-pure, either all positive or all negative
    out, _ = run(mtl.graddrop(), jnp.asarray(rows))
    np.testing.assert_array_equal(out, rows)


def test_each_entry_keeps_one_sign_or_nothing():
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(4, 400)).astype(np.float32)
    out, _ = run(mtl.graddrop(seed=3), jnp.asarray(rows))
    out = np.asarray(out)
    kept = out != 0
    np.testing.assert_array_equal(out[kept], rows[kept])
    signs = np.where(kept, np.sign(rows), 0)
    assert not np.any((signs > 0).any(0) & (signs < 0).any(0))
    # Mixed-sign columns: a drawn sign is kept with probability ~ purity; check it is random.
    assert 0.2 < kept.mean() < 0.8


def test_positive_sign_chosen_with_probability_purity():
    rows = np.tile(np.array([[3.0], [-1.0]], np.float32), (1, 4000))  # purity P = 0.75
    out, _ = run(mtl.graddrop(seed=0), jnp.asarray(rows))
    frac_positive = float(np.mean(np.asarray(out)[0] != 0))
    assert abs(frac_positive - 0.75) < 0.03


def test_leak_one_is_identity_and_leak_vector():
    rng = np.random.default_rng(2)
    rows = jnp.asarray(rng.normal(size=(2, 30)), jnp.float32)
    out, _ = run(mtl.graddrop(leak=1.0), rows)
    np.testing.assert_allclose(out, rows, rtol=1e-6)
    out, _ = run(mtl.graddrop(leak=[1.0, 0.0]), rows)
    np.testing.assert_allclose(out[0], rows[0], rtol=1e-6)


def test_pytree_bfloat16_and_fresh_masks_each_step():
    rng = np.random.default_rng(3)
    jac = {
        "w": jnp.asarray(rng.normal(size=(3, 8, 4)), jnp.bfloat16),
        "b": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
    }
    tx = mtl.graddrop()
    out1, state = run(tx, jac)
    out2, _ = run(tx, jac, state)
    assert out1["w"].dtype == jnp.bfloat16 and out1["b"].dtype == jnp.float32
    assert not np.array_equal(np.asarray(out1["w"], np.float32), np.asarray(out2["w"], np.float32))
    again, _ = run(tx, jac)
    np.testing.assert_array_equal(np.asarray(again["b"]), np.asarray(out1["b"]))


def test_zero_columns_stay_zero_and_finite():
    rows = jnp.zeros((3, 5), jnp.float32)
    out, _ = run(mtl.graddrop(), rows)
    np.testing.assert_array_equal(out, 0.0)


@pytest.mark.parametrize("leak", [-0.1, 1.5, [[0.1]]])
def test_rejects_bad_leak(leak):
    with pytest.raises(ValueError):
        mtl.graddrop(leak=leak)


def test_rejects_wrong_number_of_leaks():
    tx = mtl.graddrop(leak=[0.1, 0.2])
    with pytest.raises(ValueError, match="leak"):
        tx.update(jnp.ones((3, 4)), tx.init(None))
