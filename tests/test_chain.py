"""`mtl.chain`: optax.chain semantics with the row combination fused into the reduction."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_jax as mtl
from tests.test_common_methods import make, params_like, update_kwargs

K = 4

# Methods whose output is a re-combination of their input rows (must fuse in `mtl.chain`).
ROW_COMBINATIONS = (
    "scalarize mgda upgrad dualproj imtl_g aligned_mtl conflict_free krum pcgrad cagrad gradvac "
    "nash_mtl fairgrad sdmgrad modo uncertainty_weighting gradnorm dwa rlw gls imtl_l famo stch "
    "excess_mtl igb coba worst_task median_normalize inverse_variance adaptive_task_balancing "
    "task_schedule log_class_scaling"
).split()


def random_jac(step: int):
    rows = jax.random.normal(jax.random.key(step), (K, 18))
    return {"w": rows[:, :15].reshape(K, 5, 3), "b": rows[:, 15:].reshape(K, 3)}


# Default run: one of each kind of combination (vector weights from a Gramian / a stateful
# solver / losses, a K x K matrix, the elementwise `Reducible`s, Jacobian-shaped state); all
# methods under `-m slow`.
FAST = (
    "mgda",
    "nash_mtl",
    "pcgrad",
    "uncertainty_weighting",
    "graddrop",
    "trimmed_mean",
    "sparse_training",
    "moco",
    "db_mtl",
    "fuller",
)
ALL = [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in sorted(mtl.BALANCERS)]


@pytest.mark.parametrize("name", ALL)
def test_chain_equals_optax_chain(name):
    """Same updates and same states over 2 steps, with and without the fused reduction (one
    jitted program runs both: compilation dominates this test)."""
    params = params_like(K)
    fused_tx = mtl.chain(make(name, K), mtl.sum_tasks(), optax.scale(-0.1))
    plain_tx = optax.chain(make(name, K), mtl.sum_tasks(), optax.scale(-0.1))
    s_fused, s_plain = fused_tx.init(params), plain_tx.init(params)
    assert jax.tree.structure(s_fused) == jax.tree.structure(s_plain)

    @jax.jit
    def two_steps(s_fused, s_plain):
        outs = []
        for step in range(2):
            jac, kw = random_jac(step), update_kwargs(name, K, step)
            u_fused, s_fused = fused_tx.update(jac, s_fused, params, **kw)
            u_plain, s_plain = plain_tx.update(jac, s_plain, params, **kw)
            outs.append((u_fused, u_plain))
        return outs, s_fused, s_plain

    outs, s_fused, s_plain = two_steps(s_fused, s_plain)
    for step, (u_fused, u_plain) in enumerate(outs):
        for a, b in zip(jax.tree.leaves(u_fused), jax.tree.leaves(u_plain), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6, err_msg=f"{name} step {step}")
    for a, b in zip(jax.tree.leaves(s_fused), jax.tree.leaves(s_plain), strict=True):
        if jnp.issubdtype(a.dtype, jnp.inexact):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6, err_msg=name)


def _task_shaped_products(jaxpr) -> int:
    """How many products (muls, dots) in the (nested) jaxpr output the "w" leaf's [K, 5, 3]
    shape or its flat [K, 15] rows."""

    def task_shaped(shape):
        return shape in ((K, 5, 3), (K, 15))

    n = sum(
        eqn.primitive.name in ("mul", "dot_general")
        and any(task_shaped(v.aval.shape) for v in eqn.outvars)
        for eqn in jaxpr.eqns
    )
    return n + sum(
        _task_shaped_products(sub)
        for eqn in jaxpr.eqns
        for sub in jax.extend.core.jaxprs_in_params(eqn.params)
    )


def _jaxpr(tx, name):
    params, jac, kw = params_like(K), random_jac(0), update_kwargs(name, K)
    state = tx.init(params)
    return jax.make_jaxpr(lambda j, s: tx.update(j, s, params, **kw))(jac, state).jaxpr


@pytest.mark.parametrize("name", ROW_COMBINATIONS)
def test_row_combinations_fuse(name):
    """The fused chain does not form ``diag(w) J`` ([K, 5, 3]): one task-shaped product fewer
    than the plain chain (none for most methods; ExcessMTL's ``g * g`` statistic, MoCo's and
    DB-MTL's EMAs remain). Fails if a method loses its `RowCombination` form (tracing only; the
    values are checked above)."""
    tx = make(name, K)
    assert isinstance(tx, mtl.RowCombination), name
    fused = _task_shaped_products(_jaxpr(mtl.chain(tx, mtl.sum_tasks()), name))
    plain = _task_shaped_products(_jaxpr(optax.chain(make(name, K), mtl.sum_tasks()), name))
    assert fused == plain - 1, (fused, plain)


@pytest.mark.parametrize("name", ["moco", "db_mtl"])
def test_tracked_row_methods_combine_their_state_rows(name):
    """MoCo and DB-MTL output ``diag(w) y`` for Jacobian-shaped state y: RowCombinations of y,
    whose fused chain forms one task-shaped product fewer than the plain chain (the EMA's own
    products remain)."""
    tx = make(name, K)
    assert isinstance(tx, mtl.RowCombination), name
    rows, c, _ = tx.combination(random_jac(0), tx.init(params_like(K)), **update_kwargs(name, K))
    assert c.shape == (K,) and jax.tree.structure(rows) == jax.tree.structure(random_jac(0))

    fused = _task_shaped_products(_jaxpr(mtl.chain(make(name, K), mtl.sum_tasks()), name))
    plain = _task_shaped_products(_jaxpr(optax.chain(make(name, K), mtl.sum_tasks()), name))
    assert fused == plain - 1, (fused, plain)


@pytest.mark.parametrize("name", ["graddrop", "trimmed_mean", "sparse_training", "fuller"])
def test_elementwise_methods_reduce_without_a_task_shaped_output(name):
    """GradDrop, TrimmedMean, sparse training and FULLER are `Reducible`: in the fused chain no
    operation outputs a [K, 5, 3] array (their masked / calibrated Jacobian); the plain chain
    does."""
    tx = make(name, K)
    assert isinstance(tx, mtl.Reducible) and not isinstance(tx, mtl.RowCombination), name

    def task_shaped(jaxpr):
        return any(
            any(v.aval.shape == (K, 5, 3) for v in eqn.outvars)
            or any(task_shaped(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
            for eqn in jaxpr.eqns
        )

    assert not task_shaped(_jaxpr(mtl.chain(make(name, K), mtl.sum_tasks()), name))
    assert task_shaped(_jaxpr(optax.chain(make(name, K), mtl.sum_tasks()), name))


def test_the_fusion_check_sees_the_unfused_product():
    assert _task_shaped_products(_jaxpr(optax.chain(mtl.mgda(), mtl.sum_tasks()), "mgda")) == 1
    assert _task_shaped_products(_jaxpr(mtl.chain(mtl.mgda(), mtl.sum_tasks()), "mgda")) == 0


def test_mean_tasks_and_nested_chains_fuse():
    params, jac, kw = params_like(K), random_jac(1), update_kwargs("uncertainty_weighting", K)
    inner = mtl.chain(mtl.uncertainty_weighting(K), mtl.pcgrad())
    assert isinstance(inner, mtl.RowCombination)
    for reducer, plain_reducer in ((mtl.mean_tasks(), mtl.mean_tasks()), (mtl.sum_tasks(),) * 2):
        fused_tx = mtl.chain(inner, reducer)
        plain_tx = optax.chain(mtl.uncertainty_weighting(K), mtl.pcgrad(), plain_reducer)
        a, _ = fused_tx.update(jac, fused_tx.init(params), params, **kw)
        b, _ = plain_tx.update(jac, plain_tx.init(params), params, **kw)
        np.testing.assert_allclose(a["w"], b["w"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a["b"], b["b"], rtol=1e-5, atol=1e-6)


def test_shared_only_fuses_and_handles_an_empty_head_group():
    params = {"trunk": jnp.zeros((5, 3)), "head": jnp.zeros((3,))}
    rows = jax.random.normal(jax.random.key(2), (K, 18))
    jac = {"trunk": rows[:, :15].reshape(K, 5, 3), "head": rows[:, 15:]}
    labels = {"trunk": "shared", "head": "task_specific"}
    tx = mtl.shared_only(mtl.mgda(), labels)
    out, _ = jax.jit(tx.update)(jac, tx.init(params), params)
    w = mtl.mgda_weights(mtl.gramian({"t": jac["trunk"]}))
    np.testing.assert_allclose(out["trunk"], jnp.tensordot(w, jac["trunk"], 1), rtol=1e-5)
    np.testing.assert_allclose(out["head"], jac["head"].sum(0), rtol=1e-5)
    only = mtl.shared_only(mtl.mgda(), {"trunk": "shared", "head": "shared"})
    out, _ = jax.jit(only.update)(jac, only.init(params), params)
    assert out["head"].shape == (3,)
