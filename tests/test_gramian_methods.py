"""IMTL-G, Aligned-MTL and ConFIG: the properties that define them (Gramian-first methods)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_jax as mtl

K = 5


def random_jacobian(rng, k=K, n=12, scaled=False):
    common = rng.normal(size=n)
    jac = np.where(np.arange(k) % 2 == 0, 1.0, -0.6)[:, None] * common + rng.normal(size=(k, n))
    if scaled:
        jac *= (10.0 ** rng.uniform(-3, 3, size=k))[:, None]
    return jac


_JITTED = {}


def aggregate(name, jac, **kwargs):
    key = (name, jac.shape, tuple((k, repr(v)) for k, v in sorted(kwargs.items())))
    if key not in _JITTED:
        chain = optax.chain(getattr(mtl, name)(**kwargs), mtl.sum_tasks())
        _JITTED[key] = (jax.jit(chain.update), chain.init(None))
    update, state = _JITTED[key]
    out, _ = update(jnp.asarray(jac, jnp.float32), state)
    return np.asarray(out, np.float64)


def test_imtl_g_equal_projections_on_unit_gradients():
    rng = np.random.default_rng(0)
    for trial in range(6):
        jac = random_jacobian(rng, scaled=trial % 2 == 1)  # norms spanning 1e-3..1e3 too
        d = aggregate("imtl_g", jac)
        proj = (jac / np.linalg.norm(jac, axis=1, keepdims=True)) @ d
        np.testing.assert_allclose(proj, proj.mean(), rtol=1e-3)
        # Weights sum to one (the reference normalization).
        w = np.asarray(mtl.imtl_g_weights(jnp.asarray(jac @ jac.T, jnp.float32)))
        np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-5)


def test_imtl_g_dependent_rows_use_the_pseudo_inverse():
    g = np.array([1.0, 2.0, 0.0])
    jac = np.stack([g, 2 * g])  # dependent rows: G^+ d = x / (5 sqrt a), x = (1, 2)
    w = np.asarray(mtl.imtl_g_weights(jnp.asarray(jac @ jac.T, jnp.float32)))
    np.testing.assert_allclose(w, [1 / 3, 2 / 3], rtol=1e-4)
    # Opposite rows: sum(G^+ d) = 0 -> zero weights (TorchJD), never NaN.
    w = np.asarray(mtl.imtl_g_weights(jnp.asarray(np.array([[1.0, -1.0], [-1.0, 1.0]]))))
    np.testing.assert_allclose(w, 0.0, atol=1e-6)


def test_aligned_mtl_balance_transformation():
    """B J has orthonormal-up-to-sqrt(s) rows: B G B = s I, with s the smallest eigenvalue."""
    rng = np.random.default_rng(1)
    jac = random_jacobian(rng)
    g = jac @ jac.T
    lam, vecs = np.linalg.eigh(g)
    b = np.sqrt(lam[0]) * (vecs / np.sqrt(lam)) @ vecs.T
    np.testing.assert_allclose(b @ g @ b, lam[0] * np.eye(K), atol=1e-8 * lam[-1])
    w = np.asarray(mtl.aligned_mtl_weights(jnp.asarray(g, jnp.float32)), np.float64)
    np.testing.assert_allclose(w, b @ np.full(K, 1 / K), rtol=2e-3)
    # Scale modes: median / rmse multiply the 'min' result by sqrt(s / lambda_min).
    for mode, s in [("median", lam[(K - 1) // 2]), ("rmse", lam.mean())]:
        wm = np.asarray(mtl.aligned_mtl_weights(jnp.asarray(g, jnp.float32), scale_mode=mode))
        np.testing.assert_allclose(wm, w * np.sqrt(s / lam[0]), rtol=2e-3)


def test_aligned_mtl_libmtl_scale_is_k_times_torchjd():
    """LibMTL ``weighting/Aligned_MTL.py``: alpha = B.sum(0) = K * B (1/K), re-derived here."""
    rng = np.random.default_rng(2)
    jac = random_jacobian(rng)
    g = jac @ jac.T
    lam, vecs = np.linalg.eigh(g)  # LibMTL: symeig, rank cut, B = sqrt(lam_min) V S^-1 V^T
    tol = lam.max() * K * np.finfo(np.float32).eps
    keep = lam > tol
    b = np.sqrt(lam[keep].min()) * (vecs[:, keep] / np.sqrt(lam[keep])) @ vecs[:, keep].T
    libmtl = b.sum(0) @ jac
    ours = aggregate("aligned_mtl", jac, pref_vector=jnp.ones(K))
    np.testing.assert_allclose(ours, libmtl, rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(aggregate("aligned_mtl", jac), libmtl / K, rtol=2e-3, atol=1e-5)


def test_aligned_mtl_zero_gramian_is_identity():
    w = mtl.aligned_mtl_weights(jnp.zeros((3, 3)))
    np.testing.assert_allclose(w, np.full(3, 1 / 3))


def test_conflict_free_equal_cosines_and_non_conflicting():
    rng = np.random.default_rng(3)
    for trial in range(6):
        jac = random_jacobian(rng, scaled=trial % 2 == 1)
        d = aggregate("conflict_free", jac)
        cos = (jac @ d) / (np.linalg.norm(jac, axis=1) * np.linalg.norm(d))
        np.testing.assert_allclose(cos, cos.mean(), rtol=1e-3)
        assert np.all(cos > 0)
        # Length: the sum of the projections of the task gradients on the direction.
        unit = d / np.linalg.norm(d)
        np.testing.assert_allclose(np.linalg.norm(d), np.sum(jac @ unit), rtol=1e-4)


@pytest.mark.parametrize("name", ["imtl_g", "aligned_mtl", "conflict_free"])
def test_permutation_equivariant(name):
    rng = np.random.default_rng(4)
    jac = random_jacobian(rng)
    d = aggregate(name, jac)
    perm = rng.permutation(K)
    np.testing.assert_allclose(aggregate(name, jac[perm]), d, rtol=1e-4, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="scale_mode"):
        mtl.aligned_mtl(scale_mode="max")
    with pytest.raises(ValueError, match="pref_vector"):
        mtl.conflict_free(pref_vector=jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="pref_vector"):
        aggregate("conflict_free", np.eye(2), pref_vector=jnp.ones(3))
