"""Krum and trimmed mean: selection / trimming behaviour and argument checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_jax as mtl
from mtl_jax.transforms import robust


def aggregate(tx, jac):
    chain = optax.chain(tx, mtl.sum_tasks())
    out, _ = jax.jit(chain.update)(jac, chain.init(None))
    return out


def test_krum_rejects_an_outlier_and_multi_krum_averages():
    rng = np.random.default_rng(0)
    honest = 1.0 + 0.05 * rng.normal(size=(4, 6))
    jac = np.concatenate([honest, -50.0 * np.ones((1, 6))])
    w = np.asarray(mtl.krum_weights(jnp.asarray(jac @ jac.T, jnp.float32), n_byzantine=1))
    assert w[-1] == 0 and w.sum() == pytest.approx(1.0) and np.count_nonzero(w) == 1
    # Numpy re-derivation of TorchJD's Krum scores (aggregation/_krum.py).
    dist = np.linalg.norm(jac[:, None] - jac[None], axis=-1)
    scores = np.sort(dist, axis=1)[:, 1 : 5 - 1 - 2 + 1].sum(1)
    assert np.argmax(w) == np.argmin(scores)
    w2 = np.asarray(mtl.krum_weights(jnp.asarray(jac @ jac.T), n_byzantine=1, n_selected=3))
    np.testing.assert_allclose(np.sort(w2), [0, 0, 1 / 3, 1 / 3, 1 / 3], atol=1e-7)
    assert w2[-1] == 0
    d = aggregate(mtl.krum(n_byzantine=1, n_selected=3), jnp.asarray(jac, jnp.float32))
    np.testing.assert_allclose(d, w2 @ jac, rtol=1e-5)


def test_krum_checks():
    with pytest.raises(ValueError, match="n_byzantine"):
        mtl.krum(n_byzantine=-1)
    with pytest.raises(ValueError, match="n_selected"):
        mtl.krum(n_byzantine=0, n_selected=0)
    with pytest.raises(ValueError, match="K >= n_byzantine \\+ 3"):
        aggregate(mtl.krum(n_byzantine=1), jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="n_selected"):
        aggregate(mtl.krum(n_byzantine=0, n_selected=4), jnp.ones((3, 4)))


@pytest.mark.parametrize("trim_number", [0, 1, 2])
def test_trimmed_mean_matches_numpy(trim_number):
    rng = np.random.default_rng(1)
    jac = {"a": rng.normal(size=(5, 3, 2)).astype(np.float32), "b": rng.normal(size=(5, 4))}
    jac["a"][:, 0, 0] = [1.0, 1.0, 1.0, 7.0, -7.0]  # ties
    jac = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), jac)
    tx = mtl.trimmed_mean(trim_number)
    out, _ = jax.jit(tx.update)(jac, tx.init(None))
    for key in jac:
        x = np.sort(np.asarray(jac[key]), axis=0)[trim_number : 5 - trim_number].mean(0)
        np.testing.assert_allclose(np.asarray(out[key]).sum(0), x, rtol=1e-6, atol=1e-7)
        # Each row keeps only its surviving values (no new values appear).
        kept = np.asarray(out[key]) != 0
        np.testing.assert_allclose(
            np.asarray(out[key])[kept],
            np.asarray(jac[key])[kept] / (5 - 2 * trim_number),
            rtol=1e-6,
        )


def test_trimmed_mean_checks_and_permutation_invariance():
    with pytest.raises(ValueError, match="trim_number"):
        mtl.trimmed_mean(-1)
    with pytest.raises(ValueError, match="2 \\* trim_number \\+ 1"):
        aggregate(mtl.trimmed_mean(2), jnp.ones((4, 3)))
    rng = np.random.default_rng(2)
    jac = jnp.asarray(rng.normal(size=(6, 8)), jnp.float32)
    d = aggregate(mtl.trimmed_mean(2), jac)
    perm = rng.permutation(6)
    np.testing.assert_allclose(aggregate(mtl.trimmed_mean(2), jac[perm]), d, rtol=1e-6)


def test_trimmed_mean_rank_is_the_stable_argsort_rank():
    # The counting rank must place ties (by task index), NaNs (last) and signed zeros exactly as
    # the double stable argsort it replaces.
    x = jnp.round(2.0 * jax.random.normal(jax.random.key(0), (7, 5, 3))) / 2.0
    x = x.at[2, 0, 0].set(jnp.nan).at[5, 0, 0].set(jnp.nan).at[1, 1, 1].set(-0.0)
    expected = jnp.argsort(jnp.argsort(x, axis=0, stable=True), axis=0, stable=True)
    np.testing.assert_array_equal(jax.jit(robust._stable_task_rank)(x), expected)


@pytest.mark.parametrize("trim_number", [0, 1, 2, 3])
def test_trim_keep_matches_the_rank_on_ties_nans_and_signed_zeros(trim_number):
    # Both paths (extraction for few trimmed values, the rank count otherwise) keep exactly the
    # entries whose stable rank lies in [trim_number, K - trim_number).
    x = jnp.round(2.0 * jax.random.normal(jax.random.key(1), (31, 6, 4))) / 2.0
    x = x.at[2, 0, 0].set(jnp.nan).at[5, 0, 0].set(jnp.nan).at[1, 1, 1].set(-0.0)
    x = x.at[:, 2, 2].set(jnp.nan).at[:, 3, 3].set(1.0).at[7, 4, 0].set(jnp.inf)
    rank = jnp.argsort(jnp.argsort(x, axis=0, stable=True), axis=0, stable=True)
    expected = (rank >= trim_number) & (rank < 31 - trim_number)
    keep = jax.jit(robust._trim_keep, static_argnums=1)
    np.testing.assert_array_equal(keep(x, trim_number), expected)
    for largest in (False, True):
        mask = jax.jit(robust._extreme_tasks, static_argnums=(1, 2))(x, trim_number, largest)
        want = rank >= 31 - trim_number if largest else rank < trim_number
        np.testing.assert_array_equal(mask, want)


def _tied_jac(k):
    x = jnp.round(2.0 * jax.random.normal(jax.random.key(3), (k, 6, 4))) / 2.0
    x = x.at[2, 0, 0].set(jnp.nan).at[1, 1, 1].set(-0.0).at[:, 2, 2].set(jnp.nan)
    return x.at[:, 3, 3].set(1.0).at[0, 4, 0].set(jnp.inf).at[1, 4, 1].set(-jnp.inf)


@pytest.mark.parametrize("k", [3, 31])
def test_extreme_pairs_are_the_first_and_last_stable_ranks(k):
    x = _tied_jac(k)
    rank = jnp.argsort(jnp.argsort(x, axis=0, stable=True), axis=0, stable=True)
    (_, low_task), (_, high_task) = jax.jit(robust._extreme_pairs)(x)
    tasks = jnp.arange(k)[:, None, None]
    np.testing.assert_array_equal(tasks == low_task[None], rank == 0)
    np.testing.assert_array_equal(tasks == high_task[None], rank == k - 1)


@pytest.mark.parametrize("trim_number", [0, 1, 2, 8])
def test_trimmed_mean_fused_reduction_equals_the_trimmed_jacobian(trim_number):
    # `mtl.chain` sums the kept entries directly (one walk for trim_number=1, the mask else);
    # a non-uniform reducer and ties / NaNs / infinities must give the plain chain's result.
    k = 31
    weights = np.arange(1, k + 1, dtype=np.float32)
    reducer = mtl.TaskReducer(lambda n: weights[:n])
    fused = mtl.chain(mtl.trimmed_mean(trim_number), reducer)
    plain = optax.chain(mtl.trimmed_mean(trim_number), reducer)
    assert isinstance(mtl.trimmed_mean(trim_number), mtl.Reducible)
    jac = {"w": _tied_jac(k)}
    a, _ = jax.jit(fused.update)(jac, fused.init(None))
    b, _ = jax.jit(plain.update)(jac, plain.init(None))
    np.testing.assert_allclose(a["w"], b["w"], rtol=1e-5, atol=1e-6)
    assert np.isnan(np.asarray(a["w"][2, 2]))  # an all-NaN column stays NaN
