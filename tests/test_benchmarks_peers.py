"""The PyTorch-peer benchmark (`benchmarks/peers.py`) and the loss-path benchmark's GradNorm rows.

The default tests build and run the JAX side on a tiny model; the ``reference`` tests run the
PyTorch side (TorchJD and the LibMTL re-creation) on the same tiny model. No timing asserts.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

import mtl_jax as mtl
from benchmarks import common, loss_path, peers

TINY = {"width": 4, "hidden": 8, "batch_size": 4}


def _finite_and_moved(new, old) -> None:
    new_leaves, old_leaves = jax.tree.leaves(new), jax.tree.leaves(old)
    assert all(np.all(np.isfinite(x)) for x in new_leaves)
    assert any(not np.allclose(a, b) for a, b in zip(new_leaves, old_leaves, strict=True))


@pytest.mark.slow  # three compilations (~40 s here); the tiny run below covers the JAX side
def test_our_steps_train():
    k = 3
    params = common.init_hps_cnn(jax.random.key(0), k, width=4, hidden=8)
    batch = common.make_batch(jax.random.key(1), k, 4)
    steps = peers.our_steps("mgda", params, batch)
    assert set(steps) == {peers.EW, "ours (full Jacobian)", "ours (representation)"}
    for step in steps.values():
        _finite_and_moved(step()[0], params)


def test_run_tiny_jax_side_and_table():
    results = peers.run([2], ["ew", "famo"], repeats=1, peers=False, **TINY)
    assert [(r["K"], r["method"]) for r in results["rows"]] == [(2, "ew"), (2, "famo")]
    assert set(results["rows"][0]["ms"]) == {peers.EW}
    assert set(results["rows"][1]["ms"]) == {peers.EW, "ours (loss path)"}
    assert all(t > 0 for r in results["rows"] for t in r["ms"].values())
    table = peers.to_markdown(results)
    assert "| 2 | famo |" in table and "(loss path, " in table


def test_loss_path_gradnorm_rows_compute_the_same_step():
    """The benchmark's dense split of the CNN gives the mask-Jacobian path's weights and grads."""
    k = 3
    params = common.init_hps_cnn(jax.random.key(0), k, width=4, hidden=8)
    batch = common.make_batch(jax.random.key(1), k, 5)
    lw = mtl.gradnorm_weighting(k, optimizer=optax.sgd(1.0))
    dense, mask = (jax.jit(loss_path.gradnorm_step(lw, dense=d)) for d in (True, False))
    s1 = s2 = lw.init()
    for _ in range(3):  # call 0 records L(0); calls 1, 2 use (and learn from) the norms
        (losses, w1, s1), g1 = dense(s1, params, batch)
        (_, w2, s2), g2 = mask(s2, params, batch)
        np.testing.assert_allclose(w1, w2, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        params = jax.tree.map(lambda p, g: p - 0.5 * g, params, g1)
    assert not np.allclose(np.asarray(w1), 1.0)


def test_loss_path_covers_every_loss_method_with_a_one_backward_path():
    assert set(loss_path.METHODS) | set(loss_path.NO_LOSS_PATH) == set(mtl.registry.LOSS_METHODS)
    for name in loss_path.METHODS:  # every constructor call is valid
        assert loss_path.weighting(name, 3).num_tasks == 3, name


@pytest.mark.reference
def test_torch_side_tiny():
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchjd")
    k = 3
    model = peers.torch_model(k, width=4, hidden=8)
    jax_params = common.init_hps_cnn(jax.random.key(0), k, width=4, hidden=8)
    assert sum(p.numel() for p in model.parameters()) == common.num_params(jax_params)

    x, y = peers.torch_batch(k, batch_size=4)
    for name, spec in peers.METHODS.items():
        for side in ("TorchJD", "LibMTL"):
            if (spec.torchjd if side == "TorchJD" else spec.libmtl) is None:
                continue
            torch.manual_seed(0)
            model = peers.torch_model(k, width=4, hidden=8)
            before = [p.detach().clone() for p in model.parameters()]
            if side == "TorchJD":
                step = peers.torchjd_step(name, model, x, y)
            else:
                step = peers.LibMTLStyle(spec.libmtl, model, x, y).step
            step()
            step()
            after = [p.detach() for p in model.parameters()]
            assert all(torch.isfinite(p).all() for p in after), (name, side)
            moved = [not torch.allclose(a, b) for a, b in zip(after, before, strict=True)]
            assert any(moved), (name, side)


@pytest.mark.reference
def test_libmtl_ew_matches_plain_pytorch_step():
    torch = pytest.importorskip("torch")
    k = 2
    x, y = peers.torch_batch(k, batch_size=4)
    torch.manual_seed(0)
    a = peers.torch_model(k, width=4, hidden=8)
    torch.manual_seed(0)
    b = peers.torch_model(k, width=4, hidden=8)
    peers.LibMTLStyle("EW", a, x, y).step()
    peers.torch_ew_step(b, x, y)()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)
