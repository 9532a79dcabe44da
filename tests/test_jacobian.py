"""Tests of the per-task Jacobian engine and the task-axis utilities."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mtl_jax as mtl
from mtl_jax import jacobian as jac_lib


def mlp_params(key, sizes=(4, 6, 3)):
    keys = jax.random.split(key, len(sizes))
    return [
        {"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros((b,))}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=False)
    ]


def mlp_losses(params, x, y):
    h = x
    for i, layer in enumerate(params):
        h = h @ layer["w"] + layer["b"]
        if i < len(params) - 1:
            h = jnp.tanh(h)
    return jnp.mean((h - y) ** 2, axis=0)  # one loss per output = per task


@pytest.fixture
def problem():
    params = mlp_params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (8, 4))
    y = jax.random.normal(jax.random.key(2), (8, 3))
    return params, x, y


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"strategy": "vmap"},
        {"strategy": "unrolled"},
        {"strategy": "vmap", "chunk_size": 2},
        {"strategy": "unrolled", "chunk_size": 1},
        {"chunk_size": 5},
    ],
)
def test_matches_jacrev(problem, kwargs):
    params, x, y = problem
    losses, jac = jax.jit(mtl.value_and_jacobian(mlp_losses, **kwargs))(params, x, y)
    np.testing.assert_allclose(losses, mlp_losses(params, x, y), rtol=1e-6)
    ref = jax.jacrev(mlp_losses)(params, x, y)
    for a, b in zip(jax.tree.leaves(jac), jax.tree.leaves(ref), strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_has_aux_and_argnums(problem):
    params, x, y = problem

    def f(params, x, y):
        losses = mlp_losses(params, x, y)
        return losses, {"total": jnp.sum(losses)}

    (losses, aux), jac = mtl.value_and_jacobian(f, has_aux=True)(params, x, y)
    np.testing.assert_allclose(aux["total"], jnp.sum(losses), rtol=1e-6)
    assert jax.tree.structure(jac) == jax.tree.structure(params)

    losses2, (jp, jx) = mtl.value_and_jacobian(mlp_losses, argnums=(0, 1))(params, x, y)
    np.testing.assert_allclose(losses2, losses, rtol=1e-6)
    assert jx.shape == (3,) + x.shape
    np.testing.assert_allclose(jx, jax.jacrev(mlp_losses, argnums=1)(params, x, y), atol=1e-5)


def test_sum_tasks_equals_grad_of_sum(problem):
    params, x, y = problem
    _, jac = mtl.value_and_jacobian(mlp_losses)(params, x, y)
    tx = mtl.sum_tasks()
    out, _ = jax.jit(tx.update)(jac, tx.init(params), params)
    ref = jax.grad(lambda p: jnp.sum(mlp_losses(p, x, y)))(params)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
    out, _ = mtl.mean_tasks().update(jac, (), params)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b / 3, atol=1e-6, rtol=1e-5)


def test_contract_example_runs_verbatim():
    """The example of ARCHITECTURE.md, with a concrete 3-task model."""
    params = {"shared": jnp.ones((4, 5)) * 0.1, "heads": jnp.ones((3, 5)) * 0.2}
    batch = {"x": jnp.arange(8.0).reshape(2, 4) / 8, "y": jnp.array([[1.0, 0.0, -1.0]] * 2)}

    def loss_fn(params, batch):  # per-task losses, shape [K]
        h = jnp.tanh(batch["x"] @ params["shared"])
        pred = h @ params["heads"].T
        seg_loss, depth_loss, normal_loss = jnp.mean((pred - batch["y"]) ** 2, axis=0)
        aux = {"pred": pred}
        return jnp.stack([seg_loss, depth_loss, normal_loss]), aux

    (losses, aux), jac = mtl.value_and_jacobian(loss_fn, has_aux=True)(params, batch)
    ref = jax.jacrev(lambda p: loss_fn(p, batch)[0])(params)
    for a, b in zip(jax.tree.leaves(jac), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    tx = optax.chain(mtl.scalarize(jnp.ones(3)), mtl.sum_tasks(), optax.adam(1e-3))
    opt_state = tx.init(params)
    updates, opt_state = tx.update(jac, opt_state, params, task_losses=losses)
    params = optax.apply_updates(params, updates)
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))


def test_nnx_state_and_bfloat16():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    graphdef, params = nnx.split(model, nnx.Param)
    x = jnp.ones((4, 3), jnp.bfloat16)

    def f(params):
        out = nnx.merge(graphdef, params)(x).astype(jnp.float32)
        return jnp.mean(out**2, axis=0)

    losses, jac = mtl.value_and_jacobian(f)(params)
    for leaf, p in zip(jax.tree.leaves(jac), jax.tree.leaves(params), strict=True):
        assert leaf.shape == (2,) + p.shape
        assert leaf.dtype == jnp.bfloat16
    g = mtl.gramian(jac)
    assert g.dtype == jnp.float32 and g.shape == (2, 2)


def test_gramian_sums_over_leaves_in_float32():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 3, 2)), rng.normal(size=(4, 5))
    jac = {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.bfloat16)}
    flat = np.concatenate([a.reshape(4, -1), np.asarray(jac["b"], np.float64)], axis=1)
    np.testing.assert_allclose(mtl.gramian(jac), flat @ flat.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [2, 13])
def test_gramian_of_long_leaves_by_column_blocks(k):
    # Leaves long enough for the CPU column-block loop (with a remainder block), in float32 and
    # bfloat16, under jit and with a gradient through it: the plain product in float64.
    n = 3 * jac_lib._GRAM_COLUMN_BLOCK + 123
    rng = np.random.default_rng(k)
    a = rng.normal(size=(k, n)).astype(np.float32)
    b = rng.normal(size=(k, 2, n // 2)).astype(np.float32)
    jac = {"a": jnp.asarray(a), "b": jnp.asarray(b, jnp.bfloat16)}
    flat = np.concatenate([a, np.asarray(jac["b"], np.float64).reshape(k, -1)], axis=1)
    ref = flat.astype(np.float64) @ flat.T.astype(np.float64)
    jaxpr = str(jax.make_jaxpr(mtl.gramian)(jac))
    assert jax.device_count() > 1 or "scan" in jaxpr or "while" in jaxpr  # the loop is used
    g = jax.jit(mtl.gramian)(jac)
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    da = jax.grad(lambda x: jnp.trace(mtl.gramian({"a": x})))(jnp.asarray(a))
    np.testing.assert_allclose(da, 2 * a, rtol=1e-6)


def test_row_helpers():
    jac = {"a": jnp.arange(12.0).reshape(3, 2, 2), "b": jnp.ones((3, 1))}
    w = jnp.array([1.0, 0.0, 2.0])
    scaled = mtl.scale_rows(jac, w)
    np.testing.assert_allclose(scaled["a"][1], 0)
    np.testing.assert_allclose(scaled["a"][2], 2 * jac["a"][2])
    m = jnp.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    comb = mtl.combine_rows(jac, m)
    assert comb["a"].shape == (2, 2, 2)
    np.testing.assert_allclose(comb["a"][0], jac["a"][0] + jac["a"][1])
    ws = mtl.weighted_sum(jac, w)
    np.testing.assert_allclose(ws["a"], jac["a"][0] + 2 * jac["a"][2])


def test_reduce_rows_matches_axis_reductions():
    x = jax.random.normal(jax.random.key(0), (5, 3, 4))
    np.testing.assert_allclose(jac_lib.reduce_rows(x), jnp.sum(x, axis=0), rtol=1e-6)
    np.testing.assert_allclose(
        jax.jit(jac_lib.reduce_rows, static_argnums=1)(x, jnp.abs),
        jnp.sum(jnp.abs(x), axis=0),
        rtol=1e-6,
    )
    np.testing.assert_array_equal(jac_lib.reduce_rows(x, op=jnp.maximum), jnp.max(x, axis=0))
    np.testing.assert_array_equal(jac_lib.reduce_rows(x[:1]), x[0])
    w = np.arange(1.0, x.shape[0] + 1.0)
    np.testing.assert_allclose(
        jac_lib.reduce_rows(x, jnp.abs, weights=w), jnp.tensordot(w, jnp.abs(x), 1), rtol=1e-6
    )


def test_scalarize_is_weighted_loss_gradient(problem):
    params, x, y = problem
    w = jnp.array([0.2, 1.0, 3.0])
    _, jac = mtl.value_and_jacobian(mlp_losses)(params, x, y)
    tx = optax.chain(mtl.scalarize(w), mtl.sum_tasks())
    out, _ = tx.update(jac, tx.init(params), params)
    ref = jax.grad(lambda p: jnp.dot(w, mlp_losses(p, x, y)))(params)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_shared_only_leaves_heads_with_their_own_gradient(problem):
    params, x, y = problem
    _, jac = mtl.value_and_jacobian(mlp_losses)(params, x, y)
    labels = mtl.label_by_path(params, "[1]")  # last layer = task heads
    assert jax.tree.leaves(labels) == ["shared", "shared", "task_specific", "task_specific"]
    w = jnp.array([0.0, 1.0, 0.0])
    tx = mtl.shared_only(mtl.scalarize(w), labels)
    out, _ = jax.jit(tx.update)(jac, tx.init(params), params)
    # Shared layer: only task 1's gradient; heads: the plain sum of task gradients.
    np.testing.assert_allclose(out[0]["w"], jac[0]["w"][1], atol=1e-6)
    np.testing.assert_allclose(out[1]["w"], jnp.sum(jac[1]["w"], axis=0), atol=1e-6)


# ---------------------------------------------------------------------------- bad input


def test_scalar_or_2d_losses_are_rejected():
    p = jnp.ones(3)
    with pytest.raises(ValueError, match=r"1-D vector of per-task losses.*shape \(\)"):
        mtl.value_and_jacobian(lambda p: jnp.sum(p))(p)
    with pytest.raises(ValueError, match=r"1-D vector.*shape \(2, 3\)"):
        mtl.value_and_jacobian(lambda p: jnp.outer(p[:2], p))(p)
    with pytest.raises(ValueError, match="has_aux=True"):
        mtl.value_and_jacobian(lambda p: p, has_aux=True)(p)


def test_bad_jacobians_name_the_leaf():
    with pytest.raises(ValueError, match=r"\['b'\] has shape \(2, 3\)"):
        mtl.num_tasks({"a": jnp.ones((3, 4)), "b": jnp.ones((2, 3))})
    params = {"a": jnp.ones((3, 4))}
    grad = {"a": jnp.ones((3, 4))}
    tx = mtl.sum_tasks()
    with pytest.raises(ValueError, match=r"\['a'\].*not a gradient"):
        tx.update(grad, tx.init(params), params)
    with pytest.raises(ValueError, match="scalar"):
        mtl.num_tasks({"a": jnp.ones(())})


def test_unknown_strategy_lists_valid_ones():
    with pytest.raises(ValueError, match="auto, vmap, unrolled"):
        mtl.value_and_jacobian(lambda p: p, strategy="loop")(jnp.ones(2))


def test_auto_strategy_choice():
    assert mtl.auto_strategy(10, "cpu") == ("unrolled", None)
    assert mtl.auto_strategy(1000, "cpu")[0] == "vmap"
    assert mtl.auto_strategy(10, "gpu") == ("vmap", None)


def test_registry_errors():
    with pytest.raises(ValueError, match="Unknown balancing method 'nope'.*scalarize"):
        mtl.get_balancer("nope")
    with pytest.raises(ValueError, match="'scalarize'.*It accepts: weights"):
        mtl.get_balancer("scalarize", weight=[1.0])
    chain = mtl.build_chain([{"name": "scalarize", "weights": [1.0, 2.0]}])
    out, _ = chain.update(jnp.ones((2, 3)), chain.init(jnp.ones(3)))
    np.testing.assert_allclose(out[1], 2.0)


@jax.jit
def full_jacobian_min_norm(params, x, y):
    """The reference of the test below: Gramian and min-norm direction from the full Jacobian
    (module-level, so all chunk sizes share one compilation)."""
    _, jac = mtl.value_and_jacobian(mlp_losses)(params, x, y)
    g = mtl.gramian(jac)
    return g, mtl.weighted_sum(jac, mtl.min_norm_simplex(g))


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 8])
def test_value_and_gramian_matches_full_jacobian_path(problem, chunk_size):
    params, x, y = problem

    @jax.jit
    def large_k(params):
        losses, g, combine = mtl.value_and_gramian(mlp_losses, chunk_size=chunk_size)(params, x, y)
        w = mtl.min_norm_simplex(g)
        return losses, g, combine(w)

    losses, g, grad = large_k(params)
    g_ref, ref = full_jacobian_min_norm(params, x, y)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_value_and_gramian_has_aux(problem):
    params, x, y = problem
    f = lambda p, x, y: (mlp_losses(p, x, y), {"n": x.shape[0]})
    (losses, aux), g, combine = mtl.value_and_gramian(f, has_aux=True)(params, x, y)
    assert aux["n"] == 8 and g.shape == (3, 3)
    grad = combine(jnp.ones(3))
    ref = jax.grad(lambda p: jnp.sum(mlp_losses(p, x, y)))(params)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
