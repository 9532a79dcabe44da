"""MGDA: exact min-norm point, gradient normalizations, TorchJD's Frank-Wolfe, properties."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_jax as mtl
from mtl_jax import solvers


def random_jacobian(rng, k, n=10, scaled=False):
    common = rng.normal(size=n)
    jac = np.where(np.arange(k) % 2 == 0, 1.0, -0.6)[:, None] * common + rng.normal(size=(k, n))
    if scaled:
        jac *= (10.0 ** rng.uniform(-2, 2, size=k))[:, None]
    return jac


_JITTED: dict = {}


def aggregate(tx, jac, key=None, **extra):
    """chain(tx, sum_tasks) through jit; pass a hashable ``key`` to reuse the compilation."""
    cache_key = (key, jnp.shape(jac), tuple(sorted(extra)))
    if key is None or cache_key not in _JITTED:
        chain = optax.chain(tx, mtl.sum_tasks())
        _JITTED[cache_key] = (jax.jit(chain.update), chain.init(None))
    update, state = _JITTED[cache_key]
    out, _ = update(jnp.asarray(jac, jnp.float32), state, **extra)
    return np.asarray(out, np.float64)


def assert_min_norm_kkt(gram, w, rtol=1e-4):
    """w is the min-norm point of the simplex QP: (G w)_i >= w^T G w, with equality on supp(w)."""
    assert np.all(w >= -1e-7) and abs(w.sum() - 1) < 1e-5
    gw = gram @ w
    obj = w @ gw
    scale = np.abs(gram).max()
    assert np.all(gw >= obj - rtol * scale), (gw, obj)
    support = w > 1e-4
    np.testing.assert_allclose(gw[support], obj, atol=rtol * scale)


def test_mgda_output_is_the_exact_min_norm_point():
    rng = np.random.default_rng(0)
    weights = jax.jit(mtl.mgda_weights)
    for trial in range(16):
        k = (3, 8)[trial % 2]
        jac = random_jacobian(rng, k, scaled=trial % 3 == 0)
        jac /= np.linalg.norm(jac)
        gram = jac @ jac.T
        w = np.asarray(weights(jnp.asarray(gram, jnp.float32)), np.float64)
        assert_min_norm_kkt(gram, w)
        # Through the transform: sum_tasks gives w^T J.
        np.testing.assert_allclose(
            aggregate(mtl.mgda(), jac, "mgda"), w @ jac, rtol=2e-3, atol=1e-5
        )


def test_mgda_never_conflicts_and_is_permutation_equivariant():
    rng = np.random.default_rng(1)
    for _ in range(5):
        jac = random_jacobian(rng, 5)
        d = aggregate(mtl.mgda(), jac, "mgda")
        # The min-norm point d satisfies g_k . d >= |d|^2 >= 0 for every task.
        assert np.all(jac @ d >= d @ d - 1e-4 * np.linalg.norm(jac) * np.linalg.norm(d))
        perm = rng.permutation(5)
        np.testing.assert_allclose(
            aggregate(mtl.mgda(), jac[perm], "mgda"), d, rtol=1e-4, atol=1e-5
        )


def frank_wolfe_numpy(gram, epsilon=1e-3, max_iters=100):
    """Line-by-line NumPy port of TorchJD 0.18 ``aggregation/_mgda.py`` MGDAWeighting.forward."""
    k = gram.shape[0]
    alpha = np.ones(k) / k
    for _ in range(max_iters):
        t = np.argmin(gram @ alpha)
        e_t = np.zeros(k)
        e_t[t] = 1.0
        a = alpha @ (gram @ e_t)
        b = alpha @ (gram @ alpha)
        c = e_t @ (gram @ e_t)
        if c <= a:
            gamma = 1.0
        elif b <= a:
            gamma = 0.0
        else:
            gamma = (b - a) / (b + c - 2 * a)
        alpha = (1 - gamma) * alpha + gamma * e_t
        if gamma < epsilon:
            break
    return alpha


def test_frank_wolfe_solver_reproduces_torchjd_iterates():
    rng = np.random.default_rng(2)
    fw = jax.jit(solvers.min_norm_frank_wolfe)
    for trial in range(10):
        k = (3, 6)[trial % 2]
        jac = random_jacobian(rng, k)
        gram = jac @ jac.T
        expected = frank_wolfe_numpy(gram)
        got = np.asarray(fw(jnp.asarray(gram, jnp.float32)), np.float64)
        np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("normalization_type", ["none", "l2", "loss", "loss+"])
def test_gradient_normalizations(normalization_type):
    """Sener & Koltun / LibMTL: alpha = min-norm on g_k / gn_k; update sum_k alpha_k g_k / gn_k."""
    rng = np.random.default_rng(3)
    jac = random_jacobian(rng, 4, scaled=True)
    losses = np.array([0.5, 2.0, 1.0, 4.0])
    norms = np.linalg.norm(jac, axis=1)
    gn = {"none": np.ones(4), "l2": norms, "loss": losses, "loss+": losses * norms}[
        normalization_type
    ]
    unit = jac / gn[:, None]
    g = unit @ unit.T
    alpha = np.asarray(mtl.min_norm_simplex(jnp.asarray(g / np.trace(g), jnp.float32)), np.float64)
    assert_min_norm_kkt(g / np.trace(g), alpha)
    expected = alpha @ unit
    d = aggregate(mtl.mgda(normalization_type), jac, task_losses=jnp.asarray(losses))
    np.testing.assert_allclose(d, expected, rtol=2e-3, atol=1e-4 * np.abs(expected).max())


def test_normalization_needs_losses_and_guards_bad_ones():
    jac = np.eye(3)
    with pytest.raises(ValueError, match="task_losses"):
        aggregate(mtl.mgda("loss"), jac)
    # A zero / negative / NaN loss is not a usable normalizer: replaced by 1 (never NaN).
    d = aggregate(mtl.mgda("loss+"), jac, task_losses=jnp.array([0.0, -1.0, jnp.nan]))
    assert np.all(np.isfinite(d))


def test_bad_arguments():
    with pytest.raises(ValueError, match="normalization_type"):
        mtl.mgda("l1")
    with pytest.raises(ValueError, match="solver"):
        mtl.mgda(solver="cvxpy")
    with pytest.raises(ValueError, match="epsilon"):
        mtl.mgda(solver="frank_wolfe", epsilon=0.0)
    with pytest.raises(ValueError, match="max_iters"):
        mtl.mgda(max_iters=0)
    with pytest.raises(ValueError, match="Valid names"):
        mtl.get_balancer("mgda_ub")
