"""benchmarks/gramian.py: both Gramian paths are really taken, agree, and tabulate."""

from __future__ import annotations

import jax
import numpy as np

import mtl_jax as mtl
from benchmarks import gramian as bg


def test_paths_differ_in_program_and_agree_in_value():
    jac = {"w": jax.random.normal(jax.random.key(0), (3, 70_000))}
    programs, values = {}, {}
    for path in bg.PATHS:
        with bg._path(path):
            programs[path] = str(jax.make_jaxpr(lambda j: mtl.gramian(j))(jac))  # fresh: no cache
            values[path] = jax.jit(lambda j: mtl.gramian(j))(jac)
    if jax.device_count() == 1:
        assert "scan" in programs["column blocks"] or "while" in programs["column blocks"]
    assert "scan" not in programs["one dot"] and "while" not in programs["one dot"]
    w = np.asarray(jac["w"], np.float64)
    ref = w @ w.T
    for path in bg.PATHS:  # float32 sums of 70,000 products: error relative to the diagonal
        np.testing.assert_allclose(values[path], ref, rtol=1e-5, atol=1e-6 * ref.max())


def test_gramian_alone_and_table():
    r = bg.gramian_alone(2, repeats=1)
    assert set(r["ms"]) == {"sum_tasks", *bg.PATHS} and r["num_params"] > 1_000_000
    assert all(v > 0 for v in r["gflops"].values())
    table = bg.to_markdown(
        {
            "machine": {"backend": "cpu", "cpu_count": 2, "jax": jax.__version__, "date": "now"},
            "alone": {2: r},
        }
    )
    assert "| 2 |" in table and "column blocks" in table
