"""The CAGrad toy problem: loss values, Pareto front, and the experiment runner."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import mtl_jax as mtl
from experiments import toy as toy_config
from mtl_jax import toy


def reference_losses(x1: float, x2: float, scale: float) -> np.ndarray:
    """Direct NumPy transcription of the formulas (CAGrad toy.py; Nash-MTL's scale on f1)."""
    f1 = np.log(max(abs(0.5 * (-x1 - 7) - np.tanh(-x2)), 5e-6)) + 6
    f2 = np.log(max(abs(0.5 * (-x1 + 3) + np.tanh(-x2) + 2), 5e-6)) + 6
    c1 = max(np.tanh(x2 * 0.5), 0)
    f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    c2 = max(np.tanh(-x2 * 0.5), 0)
    return np.array([(f1 * c1 + f1_sq * c2) * scale, f2 * c1 + f2_sq * c2])


def test_losses_match_formula():
    for x1, x2 in [(-8.5, 7.5), (0.0, 0.0), (9.0, -1.0), (3.0, -8.3)]:
        for scale in (1.0, 0.1):
            np.testing.assert_allclose(
                toy.toy_losses(jnp.array([x1, x2]), scale),
                reference_losses(x1, x2, scale),
                rtol=1e-5,
                atol=1e-5,
            )


def test_pareto_front_is_non_dominated_and_spans_the_segment():
    front = toy.pareto_front(1.0, n=401)
    assert np.all(np.diff(front[:, 0]) >= 0) and np.all(np.diff(front[:, 1]) < 0)
    # The ends are the single-task optima, x = (7, -8.36) for f1 and (-7, -8.36) for f2.
    best1 = reference_losses(7.0, -8.3552, 1.0)
    best2 = reference_losses(-7.0, -8.3552, 1.0)
    assert abs(front[0, 0] - best1[0]) < 0.05 and abs(front[-1, 1] - best2[1]) < 0.05
    assert toy.distance_to_front(best1[None], front)[0] < 0.05


def test_equal_weighting_reaches_the_front_from_the_easy_start():
    traj = toy.run_method(
        mtl.scalarize(jnp.array([0.5, 0.5])), (-8.5, -5.0), steps=4000, lr=1e-2, record_every=100
    )
    final = np.asarray(toy.toy_losses(jnp.asarray(traj[-1])))
    assert toy.distance_to_front(final[None], toy.pareto_front(1.0))[0] < 0.1


def test_runner_writes_plot_table_and_json(tmp_path):
    config = toy_config.get_config("cagrad")
    config.steps = 100
    config.record_every = 50
    config.methods = config.methods[:2]
    toy.main(config, str(tmp_path))
    assert (tmp_path / "toy.png").stat().st_size > 1000
    data = json.loads((tmp_path / "toy.json").read_text())
    assert set(data["methods"]) == {m.get("label", m["name"]) for m in config.methods}
    assert "| ew |" in (tmp_path / "toy.md").read_text()


@pytest.mark.slow
def test_famo_reaches_the_front_from_9_9_with_the_authors_toy_settings():
    # The authors' toy run (Cranial-XIX/FAMO experiments/toy/run.sh) uses gamma=0 (no weight
    # decay on the logits) and min_losses=(-21 * scale, -21); with the library default
    # gamma=1e-3 FAMO stalls from (9, 9) on the plateau of the scaled first loss.
    config = toy_config.get_config("nash")
    spec = dict(next(m for m in config.methods if m["name"] == "famo"))
    assert spec["gamma"] == 0.0 and tuple(spec["min_losses"]) == (-2.1, -21.0)
    front = toy.pareto_front(config.scale)

    def distance(**kwargs):
        traj = toy.run_method(
            mtl.famo(2, **kwargs), (9.0, 9.0), steps=config.steps, scale=config.scale,
            record_every=500,
        )  # fmt: skip
        final = np.asarray(toy.toy_losses(jnp.asarray(traj[-1]), config.scale))
        return toy.distance_to_front(final[None], front)[0]

    assert distance(**{k: v for k, v in spec.items() if k != "name"}) < config.front_tolerance
    assert distance(gamma=1e-3, min_losses=spec["min_losses"]) > 1.0
