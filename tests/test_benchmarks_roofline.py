"""benchmarks/roofline.py: the FLOP count is the model's, and the 3x cell is the right rate."""

from __future__ import annotations

import jax
import pytest

from benchmarks import roofline


def test_counted_flops_match_xla_count_of_our_ew_step():
    # XLA's count adds elementwise ops (ReLU, bias, softmax, ...) and is backend-defined, so
    # the two agree to a few percent; a wrong layer shape would be off by far more.
    xla = roofline.xla_gflop_of_ew_step(3)
    if xla is None:
        pytest.skip("this backend has no cost analysis")
    counted = roofline.step_gflop(3, roofline.ONE_BACKWARD)
    assert abs(counted - xla) / xla < 0.05, (counted, xla)


def test_full_jacobian_adds_one_encoder_backward_per_extra_task():
    one = [roofline.step_gflop(k, roofline.ONE_BACKWARD) for k in (1, 2, 3)]
    full = [roofline.step_gflop(k, roofline.FULL) for k in (1, 2, 3)]
    assert full[0] == pytest.approx(one[0])
    backward = full[1] - one[1]
    assert backward > 0.5 * one[0]  # an encoder backward pass costs about twice the forward
    assert full[2] - one[2] == pytest.approx(2 * backward)
    with pytest.raises(ValueError, match="unknown path"):
        roofline.step_gflop(3, "two forwards")


def test_table_gives_the_rate_a_3x_lead_needs_against_the_dense_peak():
    gflop = roofline.step_gflop(3, roofline.ONE_BACKWARD)
    peak_s = 2 * roofline.MATMUL_N**3 / 100e9  # a 100 GFLOP/s matmul
    ms = {"XLA matmul": 1e3 * peak_s, "ours EW": 100.0, "PyTorch EW": 50.0}
    row = {
        "K": 3,
        "ms": ms,
        "gflop": {"ours EW": gflop, "PyTorch EW": gflop},
        "matmul_gflops": {"XLA matmul": 100.0},
    }
    machine = {"backend": "cpu", "cpu_count": 2, "jax": jax.__version__, "date": "today"}
    results = {"machine": machine, "repeats": 1, "rows": [row]}
    results["xla_gflop_ew_step_k3"] = results["counted_gflop_ew_step_k3"] = gflop
    table = roofline.to_markdown(results)
    needed = 3 * gflop / 0.050  # GFLOP/s for ours to take a third of the peer's 50 ms
    assert f"| 3 | ours EW | PyTorch EW | 0.50x | 16.7 ms = {needed:.0f} GFLOP/s |" in table
    assert f"**{needed:.0f}%**" in table  # of a 100 GFLOP/s peak
    assert f"| 3 | ours EW | {gflop:.2f} | 100.0 | {gflop * 10:.0f} | {gflop * 10:.0f}% |" in table
