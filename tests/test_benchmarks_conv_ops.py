"""benchmarks/conv_ops.py: the timed ops compute what their rows say, and tabulate."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from benchmarks import conv_ops


def test_timed_ops_are_the_convolution_and_its_two_gradients():
    fns = conv_ops.jax_ops(hw=8, cin=4, cout=6, stride=2)
    assert set(fns) == set(conv_ops.OPS)
    y = fns["forward"]()
    dw_xla, dw_ours = fns["kernel grad (XLA)"](), fns["kernel grad (ours)"]()
    assert y.shape == (conv_ops.BATCH, 4, 4, 6) and dw_ours.shape == (3, 3, 4, 6)
    assert fns["input grad"]().shape == (conv_ops.BATCH, 8, 8, 4)
    np.testing.assert_allclose(dw_ours, dw_xla, rtol=1e-4, atol=1e-4 * float(abs(dw_xla).max()))


def test_table_sums_the_step_convolutions_and_ratios():
    ms = {}
    for name, *_ in conv_ops.CONVS:
        for op in conv_ops.OPS:
            if conv_ops.in_step(name, op):
                ms[f"jax {name} {op}"] = 2.0 if op != "kernel grad (XLA)" else 9.0
        for op in ("forward", "input grad", "kernel grad"):
            if conv_ops.in_step(name, op):
                ms[f"torch {name} {op}"] = 1.0
    ms["jax EW step"], ms["torch EW step"] = 30.0, 20.0
    machine = {"backend": "cpu", "cpu_count": 2, "jax": jax.__version__, "date": "today"}
    results = {"ms": ms, "machine": machine, "repeats": 1, "num_tasks": 3, "torch_threads": 2}
    table = conv_ops.to_markdown(results)
    # 8 convolution ops in a step (conv1 has no input gradient), XLA's kernel grad not summed.
    assert "| sum | our step's convolutions | 16.0 | 8.0 | 2.00x |" in table
    assert "| whole | EW step (+ Adam) | 30.0 | 20.0 | 1.50x |" in table
    assert "| conv2 | kernel grad (XLA) | 9.0 | 1.0 | 9.00x |" in table


@pytest.mark.reference
def test_torch_ops_shapes_match_ours():
    torch_fns = conv_ops.torch_ops(hw=8, cin=4, cout=6, stride=2)
    assert tuple(torch_fns["forward"]().shape) == (conv_ops.BATCH, 6, 4, 4)
    assert tuple(torch_fns["kernel grad"]().shape) == (6, 4, 3, 3)
