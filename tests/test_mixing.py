"""Task-mixing samplers: exact analytic probabilities, empirical rates, determinism by seed."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from mtl_jax import mixing

SIZES = [1_000_000, 50_000, 2_000, 100]


def binomial_ok(counts: np.ndarray, n: int, p: np.ndarray, sigmas: float = 5.0) -> bool:
    """Empirical frequencies within ``sigmas`` binomial standard deviations of ``p``."""
    freq = counts / n
    sd = np.sqrt(p * (1 - p) / n)
    return bool(np.all(np.abs(freq - p) <= sigmas * sd + 1e-12))


def test_proportional_probs_exact():
    p = mixing.proportional_probs([3, 1, 0, 4])
    np.testing.assert_array_equal(p, [3 / 8, 1 / 8, 0.0, 4 / 8])


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 5.0])
def test_temperature_probs_exact(temperature):
    n = np.asarray(SIZES, np.float64)
    ref = n ** (1 / temperature) / np.sum(n ** (1 / temperature))
    np.testing.assert_allclose(mixing.temperature_probs(SIZES, temperature), ref, rtol=1e-12)


def test_temperature_limits_and_overflow():
    np.testing.assert_allclose(
        mixing.temperature_probs(SIZES, 1.0), mixing.proportional_probs(SIZES), rtol=1e-12
    )
    np.testing.assert_array_equal(mixing.temperature_probs(SIZES, np.inf), [0.25] * 4)
    # n^(1/T) would overflow float64 (1e300^10); log-space is exact.
    p = mixing.temperature_probs([1e300, 1e299], 0.1)
    np.testing.assert_allclose(p, [1 / (1 + 1e-10), 1e-10 / (1 + 1e-10)], rtol=1e-9)
    # Flatter with larger T: the smallest task's share grows monotonically.
    shares = [mixing.temperature_probs(SIZES, t)[-1] for t in (1, 2, 5, 100)]
    assert np.all(np.diff(shares) > 0)
    with pytest.raises(ValueError, match="temperature"):
        mixing.temperature_probs(SIZES, 0.0)
    with pytest.raises(ValueError, match="dataset_sizes"):
        mixing.temperature_probs([1, -1], 1.0)


def test_ratio_preserving_counts_exact():
    np.testing.assert_array_equal(mixing.ratio_preserving_counts([0.5, 0.3, 0.2], 10), [5, 3, 2])
    # 7 * [0.5, 0.3, 0.2] = [3.5, 2.1, 1.4]: floors [3, 2, 1], one left -> largest remainder 0.5.
    np.testing.assert_array_equal(mixing.ratio_preserving_counts([0.5, 0.3, 0.2], 7), [4, 2, 1])
    # Ties go to the lower index.
    np.testing.assert_array_equal(mixing.ratio_preserving_counts([1, 1, 1], 4), [2, 1, 1])
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = rng.dirichlet(np.ones(5))
        b = int(rng.integers(0, 200))
        c = mixing.ratio_preserving_counts(p, b)
        assert c.sum() == b
        assert np.all((c == np.floor(p * b)) | (c == np.ceil(p * b)))


def test_ratio_preserving_select_fills_quotas_from_kept_candidates():
    task_ids = [0, 1, 0, 2, 1, 0, 2, 0, 1, 1]
    keep = [1, 1, 0, 1, 0, 1, 1, 1, 1, 1]  # filtered: zero-advantage prompts dropped
    idx, missing = mixing.ratio_preserving_select(task_ids, keep, [0.5, 0.25, 0.25], 4)
    np.testing.assert_array_equal(idx, [0, 1, 3, 5])  # quotas [2, 1, 1], first kept of each
    np.testing.assert_array_equal(missing, [0, 0, 0])
    idx, missing = mixing.ratio_preserving_select(task_ids, keep, [0.0, 0.0, 1.0], 4)
    np.testing.assert_array_equal(idx, [3, 6])
    np.testing.assert_array_equal(missing, [0, 0, 2])


def test_order_matters_probs_phases():
    pre = mixing.order_matters_probs(0, SIZES, high_resource=[0, 1], switch_step=10)
    np.testing.assert_allclose(pre, [1e6 / 1.05e6, 5e4 / 1.05e6, 0, 0], rtol=1e-12)
    np.testing.assert_array_equal(
        mixing.order_matters_probs(9, SIZES, [0, 1], 10, temperature=3.0),
        mixing.order_matters_probs(0, SIZES, [0, 1], 10, temperature=3.0),
    )
    post = mixing.order_matters_probs(10, SIZES, [0, 1], 10, temperature=3.0)
    np.testing.assert_allclose(post, mixing.temperature_probs(SIZES, 3.0), rtol=1e-12)
    # Default high-resource set: the largest task.
    np.testing.assert_array_equal(mixing.order_matters_probs(0, SIZES, switch_step=1), [1, 0, 0, 0])
    bool_mask = mixing.order_matters_probs(0, SIZES, [True, False, True, False], 1)
    np.testing.assert_allclose(bool_mask, [1e6 / 1.002e6, 0, 2e3 / 1.002e6, 0], rtol=1e-12)
    with pytest.raises(ValueError, match="high_resource"):
        mixing.order_matters_probs(0, SIZES, [7], 1)


def test_example_tasks_empirical_rates():
    p = mixing.temperature_probs(SIZES, 2.0)
    sampler = mixing.TaskSampler(p, seed=3)
    n_steps, batch = 100, 2000
    counts = np.zeros(len(p))
    for step in range(n_steps):
        ids = sampler.example_tasks(step, batch)
        assert ids.shape == (batch,) and ids.dtype.kind == "i"
        counts += np.bincount(ids, minlength=len(p))
    assert binomial_ok(counts, n_steps * batch, p)


def test_batch_task_empirical_rates():
    p = mixing.proportional_probs([5, 3, 2])
    sampler = mixing.TaskSampler(p, seed=11)
    n = 20_000
    counts = np.bincount([sampler.batch_task(s) for s in range(n)], minlength=3)
    assert binomial_ok(counts, n, p)


def test_ratio_preserving_sampler_exact_counts_every_batch():
    p = np.array([0.55, 0.3, 0.15])
    sampler = mixing.TaskSampler(p, seed=0, ratio_preserving=True)
    for step in range(30):
        ids = sampler.example_tasks(step, 32)
        # 32 p = [17.6, 9.6, 4.8]: floors [17, 9, 4]; 2 left -> remainders 0.8 (task 2),
        # then the 0.6 tie -> lower index (task 0).
        np.testing.assert_array_equal(np.bincount(ids, minlength=3), [18, 9, 5])
    # Shuffled, not sorted.
    assert not np.all(np.diff(sampler.example_tasks(0, 32)) >= 0)


def test_scheduled_sampler_follows_order_matters():
    schedule = functools.partial(
        mixing.order_matters_probs,
        dataset_sizes=SIZES,
        high_resource=[0],
        switch_step=50,
        temperature=5.0,
    )
    sampler = mixing.TaskSampler(schedule, seed=1)
    early = np.concatenate([sampler.example_tasks(s, 256) for s in range(50)])
    assert np.all(early == 0)
    late = np.concatenate([sampler.example_tasks(s, 1000) for s in range(50, 150)])
    p = mixing.temperature_probs(SIZES, 5.0)
    assert binomial_ok(np.bincount(late, minlength=4), late.size, p)
    np.testing.assert_array_equal(sampler.probs(49), [1, 0, 0, 0])


def test_deterministic_by_seed_and_step():
    p = mixing.temperature_probs(SIZES, 3.0)
    a = mixing.TaskSampler(p, seed=7)
    b = mixing.TaskSampler(p, seed=7)
    c = mixing.TaskSampler(p, seed=8)
    np.testing.assert_array_equal(a.example_tasks(5, 500), b.example_tasks(5, 500))
    # Resumable: step 5's draws do not depend on what was drawn before.
    b.example_tasks(0, 100)
    b.batch_task(3)
    np.testing.assert_array_equal(a.example_tasks(5, 500), b.example_tasks(5, 500))
    assert not np.array_equal(a.example_tasks(5, 500), c.example_tasks(5, 500))
    assert not np.array_equal(a.example_tasks(5, 500), a.example_tasks(6, 500))
    assert [a.batch_task(s) for s in range(20)] == [b.batch_task(s) for s in range(20)]
    with pytest.raises(ValueError, match="step"):
        a.example_tasks(-1, 4)
