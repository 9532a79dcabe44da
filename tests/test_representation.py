"""Representation-level balancing (MGDA-UB): equals the full path for an identity encoder,
costs one backward pass through the encoder, works with any Gramian weighting."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_jax as mtl

K, B, D = 3, 8, 5


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "z": jnp.asarray(rng.normal(size=(B, D)), jnp.float32),  # "features" as parameters
        "heads": jnp.asarray(rng.normal(size=(K, D)), jnp.float32),
    }


def head_losses(params, z, target):
    pred = z @ params["heads"].T  # [B, K]
    return jnp.mean((pred - target) ** 2, axis=0)


TARGET = jnp.asarray(np.random.default_rng(1).normal(size=(B, K)), jnp.float32)


@pytest.mark.parametrize(
    "weight_fn",
    [mtl.mgda_weights, mtl.upgrad_weights, mtl.imtl_g_weights, mtl.conflict_free_weights],
    ids=["mgda", "upgrad", "imtl_g", "config"],
)
def test_identity_encoder_equals_full_jacobian_path(weight_fn):
    """With z = params['z'] the representation Jacobian IS the shared-parameter Jacobian."""
    params = make_params()
    step = mtl.representation_value_and_grad(lambda p, t: p["z"], head_losses, weight_fn)
    out = jax.jit(step)(params, TARGET)

    def full_loss(p):
        return head_losses(p, p["z"], TARGET)

    losses, jac = mtl.value_and_jacobian(full_loss)(params)
    w = weight_fn(mtl.gramian(jac["z"]))
    expected = mtl.weighted_sum(jac, w)
    np.testing.assert_allclose(out.losses, losses, rtol=1e-6)
    np.testing.assert_allclose(out.weights, w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out.gramian, mtl.gramian(jac["z"]), rtol=1e-5)
    for key in params:
        np.testing.assert_allclose(out.grads[key], expected[key], rtol=1e-4, atol=1e-6)


def test_one_backward_pass_through_the_encoder():
    """The encoder's VJP rule is traced once (K times for the full per-task Jacobian)."""
    calls = {"bwd": 0}

    @jax.custom_vjp
    def encoder(w, x):
        return jnp.tanh(x @ w)

    def fwd(w, x):
        y = jnp.tanh(x @ w)
        return y, (w, x, y)

    def bwd(res, ct):
        calls["bwd"] += 1
        w, x, y = res
        g = ct * (1 - y**2)
        return x.T @ g, g @ w.T

    encoder.defvjp(fwd, bwd)
    rng = np.random.default_rng(2)
    params = {
        "enc": jnp.asarray(rng.normal(size=(4, D)), jnp.float32),
        "heads": jnp.asarray(rng.normal(size=(K, D)), jnp.float32),
    }
    x = jnp.asarray(rng.normal(size=(B, 4)), jnp.float32)
    step = mtl.representation_value_and_grad(
        lambda p, x, t: encoder(p["enc"], x),
        lambda p, z, x, t: head_losses(p, z, t),
        mtl.mgda_weights,
        strategy="unrolled",
    )
    out = jax.jit(step)(params, x, TARGET)
    assert calls["bwd"] == 1
    # The full path needs K encoder backward passes.
    calls["bwd"] = 0

    def full_loss(p):
        return head_losses(p, encoder(p["enc"], x), TARGET)

    _, jac = jax.jit(mtl.value_and_jacobian(full_loss, strategy="unrolled"))(params)
    assert calls["bwd"] == K
    # And the result is the gradient of the weighted loss.
    ref = jax.grad(lambda p: jnp.dot(out.weights, full_loss(p)))(params)
    for key in params:
        np.testing.assert_allclose(out.grads[key], ref[key], rtol=1e-4, atol=1e-6)


def test_loss_normalized_mgda_gets_the_losses_and_aux():
    params = make_params(3)
    weight_fn = functools.partial(mtl.mgda_weights, normalization_type="loss")

    def with_aux(p, z, t):
        losses = head_losses(p, z, t)
        return losses, {"sum": jnp.sum(losses)}

    step = mtl.representation_value_and_grad(lambda p, t: p["z"], with_aux, weight_fn, has_aux=True)
    out = jax.jit(step)(params, TARGET)
    expected = mtl.mgda_weights(out.gramian, "loss", task_losses=out.losses)
    np.testing.assert_allclose(out.weights, expected, rtol=1e-5)
    np.testing.assert_allclose(out.aux["sum"], jnp.sum(out.losses), rtol=1e-6)


def test_bad_weight_fn_output():
    step = mtl.representation_value_and_grad(
        lambda p, t: p["z"], head_losses, lambda g: jnp.ones(K + 1)
    )
    with pytest.raises(ValueError, match="weight_fn returned shape"):
        step(make_params(), TARGET)
