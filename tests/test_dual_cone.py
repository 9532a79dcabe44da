"""UPGrad, DualProj and the dual-cone QP solver: optimality certificates and properties.

The comparison with TorchJD itself is in tests/test_reference_torchjd.py (``-m reference``);
here the answers are checked by their KKT conditions and the properties TorchJD promises.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_jax as mtl
from mtl_jax import solvers


def conflicting_jacobian(rng: np.random.Generator, k: int, n: int = 12, scaled: bool = False):
    common = rng.normal(size=n)
    signs = np.where(np.arange(k) % 2 == 0, 1.0, -0.7)
    jac = signs[:, None] * common + 0.6 * rng.normal(size=(k, n))
    if scaled:
        jac *= (10.0 ** rng.uniform(-3, 3, size=k))[:, None]
    return jac


_JITTED: dict = {}


def aggregate(tx, jac: np.ndarray, key=None) -> np.ndarray:
    """chain(tx, sum_tasks) through jit; pass a hashable ``key`` to reuse the compilation."""
    cache_key = (key, jac.shape)
    if key is None or cache_key not in _JITTED:
        chain = optax.chain(tx, mtl.sum_tasks())
        _JITTED[cache_key] = (jax.jit(chain.update), chain.init(None))
    update, state = _JITTED[cache_key]
    out, _ = update(jnp.asarray(jac, jnp.float32), state)
    return np.asarray(out, np.float64)


def test_solve_box_qp_satisfies_kkt():
    rng = np.random.default_rng(0)
    solve = jax.jit(solvers.solve_box_qp)
    for trial in range(30):
        k = (2, 5, 10)[trial % 3]
        jac = conflicting_jacobian(rng, k, scaled=trial % 2 == 1)
        g = np.asarray(solvers.normalize_regularize_gramian(jnp.asarray(jac @ jac.T, jnp.float32)))
        lower = rng.uniform(-0.5, 1.0, size=k).astype(np.float32)
        v = np.asarray(solve(jnp.asarray(g), jnp.asarray(lower)), np.float64)
        g64 = g.astype(np.float64)
        lam = g64 @ v
        scale = np.abs(lam).max() + 1e-12
        assert np.all(v >= lower - 1e-6), "infeasible"
        assert np.all(lam >= -1e-4 * scale), "negative multiplier"
        # Complementary slackness: a free coordinate has a zero multiplier.
        free = v > lower + 1e-4 * (np.abs(v).max() + 1e-12)
        np.testing.assert_allclose(lam[free], 0.0, atol=1e-4 * scale)


def test_solve_box_qp_warm_start_and_no_polish():
    rng = np.random.default_rng(1)
    jac = conflicting_jacobian(rng, 6)
    g = solvers.normalize_regularize_gramian(jnp.asarray(jac @ jac.T, jnp.float32))
    lower = jnp.asarray(np.eye(6)[2] / 6, jnp.float32)
    v = solvers.solve_box_qp(g, lower)
    v_warm = solvers.solve_box_qp(g, lower, init=v, max_iter=5)
    np.testing.assert_allclose(v_warm, v, rtol=1e-5, atol=1e-7)
    # Without the polish the first-order phase alone gets close on this problem too.
    v_fo = solvers.solve_box_qp(g, lower, polish_iter=0, max_iter=5000, tol=0.0)
    np.testing.assert_allclose(v_fo, v, rtol=1e-3, atol=1e-5)


def test_project_dual_cone_gives_the_projection():
    """x = J^T v lies in the dual cone and x - J^T u is normal to it at x (projection)."""
    rng = np.random.default_rng(2)
    project = jax.jit(lambda g, u: solvers.project_dual_cone(g, u, reg_eps=0.0))
    for trial in range(10):
        k = (3, 6)[trial % 2]
        jac = conflicting_jacobian(rng, k)
        u = rng.uniform(0, 1, size=k)
        g = jnp.asarray(jac @ jac.T, jnp.float32)
        v = np.asarray(project(g, jnp.asarray(u, jnp.float32)), np.float64)
        x = jac.T @ v
        scale = np.linalg.norm(jac) * np.linalg.norm(x)
        assert np.all(jac @ x >= -1e-4 * scale)
        # Projection: x = J^T u + J^T mu with mu = v - u >= 0 and mu_k (J x)_k = 0.
        mu = v - u
        assert np.all(mu >= -1e-5)
        np.testing.assert_allclose(mu * (jac @ x), 0.0, atol=1e-4 * scale)


def test_zero_or_tiny_gramian_falls_back_to_the_preference_vector():
    # TorchJD: a Gramian with trace < norm_eps is replaced by 0, so the QP returns v = u.
    g = jnp.asarray(np.eye(3) * 1e-8, jnp.float32)
    # Jitted: run op by op, the QP solver's loops cost more than their compilation.
    np.testing.assert_allclose(jax.jit(mtl.upgrad_weights)(g), np.full(3, 1 / 3), rtol=1e-5)
    np.testing.assert_allclose(jax.jit(mtl.dualproj_weights)(g), np.full(3, 1 / 3), rtol=1e-5)


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_non_conflicting(name):
    """J d >= 0. With the default reg_eps=1e-4 this holds in TorchJD's (global) sense only: a
    task whose squared gradient norm is below ~reg_eps * |J|_F^2 may see a tiny conflict, as in
    TorchJD; with reg_eps=0 (fine for full-rank J) it holds row by row, badly scaled rows too."""
    rng = np.random.default_rng(3)
    for trial in range(12):
        k = (3, 7)[trial % 2]
        jac = conflicting_jacobian(rng, k, scaled=trial % 3 == 2)
        # TorchJD's assert_non_conflicting: |positive part of J d| == |J d| (atol/rtol 4e-4).
        proj = jac @ aggregate(getattr(mtl, name)(), jac, name)
        np.testing.assert_allclose(
            np.linalg.norm(np.maximum(proj, 0)), np.linalg.norm(proj), rtol=4e-4, atol=4e-4
        )
        d = aggregate(getattr(mtl, name)(reg_eps=0.0), jac, (name, "noreg"))
        proj = jac @ d
        assert np.all(proj >= -1e-4 * np.linalg.norm(jac, axis=1) * np.linalg.norm(d)), proj


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_permutation_equivariant(name):
    rng = np.random.default_rng(4)
    jac = conflicting_jacobian(rng, 6)
    d = aggregate(getattr(mtl, name)(), jac, (name, "perm"))  # one compilation for all four
    for _ in range(3):
        perm = rng.permutation(6)
        np.testing.assert_allclose(
            aggregate(getattr(mtl, name)(), jac[perm], (name, "perm")), d, rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("name", ["upgrad"])
def test_linear_under_scaling(name):
    """A(diag(a c1 + b c2) J) = a A(diag(c1) J) + b A(diag(c2) J) (TorchJD's property test).

    TorchJD promises (and tests) it for UPGrad only: DualProj projects the mean, a nonlinear
    function of the row scales (see test_dualproj_is_not_linear_under_scaling).

    Exact for the unregularized projection; with the default reg_eps=1e-4 TorchJD's own test
    needs rtol 6e-2, so the tight check uses reg_eps=1e-7.
    """
    rng = np.random.default_rng(5)
    jac = rng.normal(size=(5, 12))
    tx = getattr(mtl, name)(reg_eps=1e-7)
    for _ in range(3):
        c1, c2 = rng.uniform(0.1, 1, size=5), rng.uniform(0.1, 1, size=5)
        a, b = rng.uniform(0.1, 1, size=2)
        x1 = aggregate(tx, c1[:, None] * jac, (name, "reg"))
        x2 = aggregate(tx, c2[:, None] * jac, (name, "reg"))
        x = aggregate(tx, (a * c1 + b * c2)[:, None] * jac, (name, "reg"))
        np.testing.assert_allclose(x, a * x1 + b * x2, rtol=2e-3, atol=2e-3 * np.linalg.norm(x))


def test_upgrad_identity_on_non_conflicting_rows():
    # Orthogonal rows are already in the dual cone: UPGrad = mean, DualProj = mean.
    jac = np.diag([1.0, 2.0, 3.0])
    np.testing.assert_allclose(aggregate(mtl.upgrad(), jac), jac.mean(0), rtol=1e-5)
    np.testing.assert_allclose(aggregate(mtl.dualproj(), jac), jac.mean(0), rtol=1e-5)


def test_pref_vector_and_bad_arguments():
    jac = np.diag([1.0, 2.0])
    d = aggregate(mtl.upgrad(pref_vector=jnp.array([1.0, 0.0])), jac)
    np.testing.assert_allclose(d, [1.0, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="norm_eps"):
        mtl.upgrad(norm_eps=-1.0)
    with pytest.raises(ValueError, match="reg_eps"):
        mtl.dualproj(reg_eps=-1.0)
    with pytest.raises(ValueError, match="pref_vector"):
        mtl.upgrad(pref_vector=jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="K=2"):
        aggregate(mtl.dualproj(pref_vector=jnp.ones(3)), jac)


def test_dualproj_is_not_linear_under_scaling():
    # Two conflicting rows: scaling one row changes which constraint is active.
    jac = np.array([[1.0, 0.0], [-0.9, 0.3]])
    f = lambda c: aggregate(mtl.dualproj(reg_eps=0.0), c[:, None] * jac, "dp")
    c1, c2 = np.array([1.0, 0.1]), np.array([0.1, 1.0])
    assert np.linalg.norm(f(c1 + c2) - f(c1) - f(c2)) > 1e-2
