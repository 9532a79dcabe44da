"""benchmarks/conv_ops.py: the timed ops compute what their rows say, and tabulate."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from benchmarks import conv_ops


def test_timed_ops_are_the_convolution_and_its_two_gradients():
    fns = conv_ops.jax_ops(h=8, w=10, cin=4, cout=6, stride=2, batch=3)
    assert set(fns) == set(conv_ops.OPS)
    y = fns["forward"]()
    dw_xla = fns["kernel grad (XLA)"]()
    assert y.shape == (3, 4, 5, 6) and dw_xla.shape == (3, 3, 4, 6)
    dx_xla = fns["input grad (XLA)"]()
    assert dx_xla.shape == (3, 8, 10, 4)
    for alt, ref in (
        ("input grad (ours)", dx_xla),
        ("kernel grad (per-tap)", dw_xla),
        ("kernel grad (ours)", dw_xla),
    ):
        tol = 1e-4 * float(abs(ref).max())
        np.testing.assert_allclose(fns[alt](), ref, rtol=1e-4, atol=tol, err_msg=alt)


def _fake_results(model: str) -> dict:
    ms = {}
    batch, convs = conv_ops.MODELS[model]
    for name, *_ in convs:
        for op in conv_ops.OPS:
            if conv_ops.in_step(convs, name, op):
                ms[f"jax {name} {op}"] = 9.0 if op in conv_ops.ALTERNATIVES else 2.0
        for op in ("forward", "input grad", "kernel grad"):
            if conv_ops.in_step(convs, name, op):
                ms[f"torch {name} {op}"] = 1.0
    if model == "cnn":
        ms["jax EW step"], ms["torch EW step"] = 30.0, 20.0
    machine = {"backend": "cpu", "cpu_count": 2, "jax": jax.__version__, "date": "today"}
    return {
        "ms": ms,
        "machine": machine,
        "model": model,
        "batch": batch,
        "repeats": 1,
        "num_tasks": 3,
        "torch_threads": 2,
    }


def test_table_sums_the_step_convolutions_and_ratios():
    table = conv_ops.to_markdown(_fake_results("cnn"))
    # 8 convolution ops in a step (conv1 has no input gradient), the alternatives not summed.
    assert "| sum | our step's convolutions | 16.0 | 8.0 | 2.00x |" in table
    assert "| whole | EW step (+ Adam) | 30.0 | 20.0 | 1.50x |" in table
    assert "| conv2 | kernel grad (XLA) | 9.0 | 1.0 | 9.00x |" in table
    assert "| conv2 | kernel grad (per-tap) | 9.0 | 1.0 | 9.00x |" in table
    assert "| conv2 | input grad (XLA) | 9.0 | 1.0 | 9.00x |" in table
    assert "| conv1 | input grad" not in table


def test_segnet_table_has_its_nine_convolutions_and_no_step_row():
    table = conv_ops.to_markdown(_fake_results("segnet"))
    # 9 convs x 3 step ops (forward, input grad, our kernel grad), less the first input grad.
    assert "| sum | our step's convolutions | 52.0 | 26.0 | 2.00x |" in table
    assert "EW step" not in table and "| 288x384 64->64 | input grad (ours) | 2.0 |" in table
    assert "segnet, batch 2" in table


@pytest.mark.reference
def test_torch_ops_shapes_match_ours():
    torch_fns = conv_ops.torch_ops(h=8, w=10, cin=4, cout=6, stride=2, batch=3)
    assert tuple(torch_fns["forward"]().shape) == (3, 6, 4, 5)
    assert tuple(torch_fns["input grad"]().shape) == (3, 4, 8, 10)
    assert tuple(torch_fns["kernel grad"]().shape) == (6, 4, 3, 3)
