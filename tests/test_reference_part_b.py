"""Reference comparisons for PCGrad, GradVac, CAGrad, GradDrop, Nash-MTL, FairGrad, SDMGrad,
MoDo (TorchJD 0.18) and MoCo (LibMTL, re-derived in PyTorch).

Run with ``python -m pytest -q -m reference tests/test_reference_part_b.py -s`` (prints the
measured deviations). Needs the ``reference`` extra (torch 2.13.0 CPU, torchjd 0.18, and cvxpy
with the CLARABEL and ECOS solvers for TorchJD's CAGrad and NashMTL).

Our transforms run in float32; the references run in float64 on the same Jacobians. Where a
reference draws random numbers (task orders, GradDrop's uniforms), ours are injected into it
by patching ``torch.randperm`` / ``torch.rand``.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_jax as mtl
from mtl_jax.transforms.graddrop import graddrop_uniforms
from mtl_jax.transforms.pcgrad import _task_orders

torch = pytest.importorskip("torch")
aggregation = pytest.importorskip("torchjd.aggregation")

pytestmark = pytest.mark.reference

N_CASES = 60
DIM = 32


def random_jacobians(n_cases: int = N_CASES, dim: int = DIM, seed: int = 0) -> list[np.ndarray]:
    """K from 2 to 10; Gaussian, conflicting (shared direction with flipped signs) and badly
    scaled rows (norms over six orders of magnitude)."""
    rng = np.random.default_rng(seed)
    out = []
    for idx in range(n_cases):
        k = 2 + idx % 9
        kind = (idx // 9) % 3
        rows = rng.normal(size=(k, dim))
        if kind == 1:
            common = rng.normal(size=dim)
            signs = rng.choice([-1.0, 1.0], size=k)
            signs[0], signs[-1] = 1.0, -1.0
            rows = signs[:, None] * common + 0.5 * rows
        elif kind == 2:
            rows = rows * 10.0 ** rng.uniform(-3, 3, size=(k, 1))
        out.append(rows)
    return out


def deviation(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(1 - cosine, relative norm error) of ours vs the reference."""
    ours, ref = np.asarray(ours, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    nr, no = np.linalg.norm(ref), np.linalg.norm(ours)
    if nr == 0 and no == 0:
        return 0.0, 0.0
    cos = float(ours @ ref / max(nr * no, 1e-300))
    return 1.0 - cos, float(np.linalg.norm(ours - ref) / max(nr, 1e-300))


class Tally:
    def __init__(self, name: str):
        self.name, self.cos, self.rel, self.n = name, 0.0, 0.0, 0

    def add(self, ours, ref):
        c, r = deviation(ours, ref)
        self.cos, self.rel, self.n = max(self.cos, c), max(self.rel, r), self.n + 1

    def check(self, cos_tol: float, rel_tol: float):
        print(
            f"\n[reference] {self.name}: {self.n} comparisons, max(1 - cos) = {self.cos:.2e}, "
            f"max rel err = {self.rel:.2e} (tolerances {cos_tol:.0e}, {rel_tol:.0e})"
        )
        assert self.cos <= cos_tol, self.name
        assert self.rel <= rel_tol, self.name


_JITTED: dict = {}


def chained(factory, **kwargs):
    """``chain(factory(**kwargs), sum_tasks)`` and its jitted update, cached (compile once)."""
    key = (factory.__name__, tuple(sorted(kwargs.items())))
    if key not in _JITTED:
        tx = optax.chain(factory(**kwargs), mtl.sum_tasks())
        _JITTED[key] = (tx, jax.jit(tx.update))
    return _JITTED[key]


def direction(factory, jacs, *, prng_seed=None, extra_per_step=None, **kwargs):
    """Runs ``chain(factory(**kwargs), sum_tasks)`` over a sequence of Jacobians.

    ``prng_seed`` replaces the method's PRNG key (same as constructing it with ``seed=``).
    """
    tx, update = chained(factory, **kwargs)
    state = tx.init(jnp.zeros(jacs[0].shape[1:], jnp.float32))
    if prng_seed is not None:
        state = (state[0]._replace(key=jax.random.key(prng_seed)), *state[1:])
    outs = []
    for t, jac in enumerate(jacs):
        extra = {key: fn(t) for key, fn in (extra_per_step or {}).items()}
        d, state = update(jnp.asarray(jac, jnp.float32), state, None, **extra)
        outs.append(np.asarray(d, np.float64))
    return outs


def orders_sequence(seed: int, k: int, steps: int) -> list[np.ndarray]:
    """The task orders our pcgrad/gradvac draw at each step (same key chain as the state)."""
    key = jax.random.key(seed)
    out = []
    for _ in range(steps):
        key, sub = jax.random.split(key)
        out.append(np.asarray(_task_orders(sub, k)))
    return out


@contextlib.contextmanager
def patched(name: str, values):
    """Makes ``torch.<name>`` return the given tensors in sequence."""
    it = iter(values)
    original = getattr(torch, name)
    setattr(torch, name, lambda *a, **kw: next(it))
    try:
        yield
    finally:
        setattr(torch, name, original)


def t64(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, np.float64))


# ----------------------------------------------------------------------------------------------
# Exact methods: cosine >= 0.9999 and relative error <= 1e-3.


def test_pcgrad_matches_torchjd():
    tally = Tally("pcgrad vs TorchJD PCGrad")
    for idx, rows in enumerate(random_jacobians()):
        k = rows.shape[0]
        (ours,) = direction(mtl.pcgrad, [rows], prng_seed=idx)
        (orders,) = orders_sequence(idx, k, 1)
        perms = [torch.as_tensor(o, dtype=torch.long) for o in orders]
        with patched("randperm", perms):
            ref = aggregation.PCGrad()(t64(rows)).numpy()
        tally.add(ours, ref)
    tally.check(1e-4, 1e-3)


def test_gradvac_matches_torchjd_over_consecutive_steps():
    tally = Tally("gradvac vs TorchJD GradVac (25 steps each)")
    rng = np.random.default_rng(5)
    for idx, rows in enumerate(random_jacobians()[:20]):
        k = rows.shape[0]
        # A slowly drifting Jacobian so that the EMA targets matter.
        jacs = [rows + 0.3 * np.abs(rows).mean() * rng.normal(size=rows.shape) for _ in range(25)]
        ours = direction(mtl.gradvac, jacs, prng_seed=idx, num_tasks=k)
        perms = []
        for orders in orders_sequence(idx, k, len(jacs)):
            for i in range(k):
                pos = [j if j < i else j - 1 for j in orders[i] if j != i]
                perms.append(torch.as_tensor(pos, dtype=torch.long))
        ref_agg = aggregation.GradVac()
        with patched("randperm", perms):
            refs = [ref_agg(t64(j)).numpy() for j in jacs]
        for o, r in zip(ours, refs, strict=True):
            tally.add(o, r)
    tally.check(1e-4, 1e-3)


@pytest.mark.parametrize("leak", [None, 0.3])
def test_graddrop_matches_torchjd(leak):
    tally = Tally(f"graddrop(leak={leak}) vs TorchJD GradDrop")
    for idx, rows in enumerate(random_jacobians()):
        k = rows.shape[0]
        (ours,) = direction(mtl.graddrop, [rows], prng_seed=idx, leak=leak)
        _, sub = jax.random.split(jax.random.key(idx))
        u = np.asarray(graddrop_uniforms(sub, jnp.asarray(rows, jnp.float32)), np.float64)
        ref_leak = None if leak is None else torch.full((k,), leak, dtype=torch.float64)
        with patched("rand", [torch.as_tensor(u)]):
            ref = aggregation.GradDrop(leak=ref_leak)(t64(rows)).numpy()
        tally.add(ours, ref)
    tally.check(1e-4, 1e-3)


# ----------------------------------------------------------------------------------------------
# Iterative methods.


@pytest.mark.parametrize("c", [0.4, 0.0, 1.0])
def test_cagrad_matches_torchjd(c):
    pytest.importorskip("cvxpy")
    tally = Tally(f"cagrad(c={c}) vs TorchJD CAGrad (cvxpy/CLARABEL)")
    for rows in random_jacobians():
        (ours,) = direction(mtl.cagrad, [rows], c=c)
        ref = aggregation.CAGrad(c=c)(t64(rows)).numpy()
        tally.add(ours, ref)
    # Both sides solve the dual iteratively (CLARABEL interior point ~1e-8; ours float32
    # projected gradient + exact support solve); float32 Gramians of rows scaled over six
    # orders of magnitude limit agreement to ~1e-5 in direction.
    tally.check(1e-4, 1e-3)


def bargaining_residual(alpha: np.ndarray, rows: np.ndarray) -> float:
    """max_i |alpha_i (G alpha)_i - 1|: zero at the Nash-MTL solution."""
    return float(np.max(np.abs(alpha * ((rows @ rows.T) @ alpha) - 1.0)))


# The reference (cvxpy/ECOS sequence of convex problems) does not always solve its own
# problem: on rows with norms spread over orders of magnitude its alpha can leave the
# bargaining equation violated by 1e2-1e4 (ECOS failures fall back to the previous alpha; the
# stop rule tests the equation on the Frobenius-normalized Gramian). Where the reference's alpha
# satisfies the equation (residual <= 1e-3) we require the usual agreement; elsewhere we
# require ours to satisfy the equation (residual <= 1e-3) and record the count.
NASH_REF_SOLVED = 1e-3


def test_nash_mtl_matches_torchjd():
    pytest.importorskip("cvxpy")
    tally = Tally("nash_mtl(max_norm=0) vs TorchJD NashMTL(max_norm=0), reference solved")
    unsolved = 0
    for rows in random_jacobians():
        k = rows.shape[0]
        (ours,) = direction(mtl.nash_mtl, [rows], num_tasks=k, max_norm=0.0)
        agg = aggregation.NashMTL(n_tasks=k, max_norm=0.0)
        ref = agg(t64(rows)).numpy()
        ref_alpha = np.asarray(agg.weighting.prvs_alpha, np.float64)
        our_alpha = np.linalg.lstsq(rows.T, ours, rcond=None)[0]
        assert bargaining_residual(our_alpha, rows) <= 1e-3
        if bargaining_residual(ref_alpha, rows) <= NASH_REF_SOLVED:
            tally.add(ours, ref)
        else:
            unsolved += 1
    print(f"\n[reference] nash_mtl: reference alpha off the bargaining equation in {unsolved}/60")
    assert tally.n >= 40
    tally.check(1e-4, 1e-3)


def test_nash_mtl_matches_torchjd_over_consecutive_steps():
    pytest.importorskip("cvxpy")
    tally = Tally("nash_mtl vs TorchJD NashMTL (max_norm=1, 8 steps each, warm starts)")
    rng = np.random.default_rng(7)
    for rows in random_jacobians()[::4]:
        k = rows.shape[0]
        jacs = [rows + 0.2 * np.abs(rows).mean() * rng.normal(size=rows.shape) for _ in range(8)]
        ours = direction(mtl.nash_mtl, jacs, num_tasks=k)
        agg = aggregation.NashMTL(n_tasks=k)
        for o, j in zip(ours, jacs, strict=True):
            ref = agg(t64(j)).numpy()
            if bargaining_residual(np.asarray(agg.weighting.prvs_alpha, np.float64), j) <= 1e-3:
                tally.add(o, ref)
    assert tally.n >= 60
    tally.check(1e-4, 1e-3)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_fairgrad_matches_torchjd(alpha):
    """Same policy as Nash-MTL: scipy's least_squares (from uniform weights, bounds w >= 0)
    stops short of the solution on some badly scaled Jacobians (up to 14/60 at alpha = 5);
    there we only require our weights to solve the equation, elsewhere the usual agreement."""
    tally = Tally(f"fairgrad(alpha={alpha}) vs TorchJD FairGrad (scipy), reference solved")
    unsolved = 0
    for rows in random_jacobians():
        (ours,) = direction(mtl.fairgrad, [rows], alpha=alpha)
        ref_w = aggregation.FairGrad(alpha=alpha).gramian_weighting(t64(rows @ rows.T)).numpy()
        g = rows @ rows.T
        res = np.max(np.abs(g @ ref_w - ref_w ** (-1 / alpha)) / ref_w ** (-1 / alpha))
        if res <= 1e-3:
            tally.add(ours, ref_w @ rows)
        else:
            unsolved += 1
    print(f"\n[reference] fairgrad({alpha}): reference off its equation in {unsolved}/60")
    assert tally.n >= 40
    tally.check(1e-4, 1e-3)


# ----------------------------------------------------------------------------------------------
# Stochastic methods with state: consecutive steps on independent mini-batch Jacobians.


def _three_batches(rows: np.ndarray, rng: np.random.Generator, steps: int):
    noise = 0.5 * np.abs(rows).mean()
    return [
        tuple(rows + noise * rng.normal(size=rows.shape) for _ in range(3)) for _ in range(steps)
    ]


def _stochastic_directions(factory, batches, **kwargs):
    """Ours: update Jacobian = batch 3 (zeta), weight Jacobians = batches 1, 2 (xi, xi')."""
    tx, update = chained(factory, **kwargs)
    state = tx.init(jnp.zeros(batches[0][0].shape[1:], jnp.float32))
    outs, weights = [], []
    for j1, j2, j3 in batches:
        f32 = lambda x: jnp.asarray(x, jnp.float32)
        d, state = update(f32(j3), state, None, weight_jacobians=(f32(j1), f32(j2)))
        outs.append(np.asarray(d, np.float64))
        weights.append(np.asarray(state[0].weights, np.float64))
    return outs, weights


def test_sdmgrad_matches_torchjd_over_consecutive_steps():
    """25 consecutive steps with a stable inner step size (lr = 1): exact agreement."""
    tally = Tally("sdmgrad(lr=1) vs TorchJD SDMGradWeighting(lr=1) (25 steps each)")
    rng = np.random.default_rng(11)
    for rows in random_jacobians()[:30]:
        k = rows.shape[0]
        batches = _three_batches(rows, rng, 25)
        ours, _ = _stochastic_directions(mtl.sdmgrad, batches, num_tasks=k, lr=1.0)
        weighting = aggregation.SDMGradWeighting(lr=1.0)
        for o, (j1, j2, j3) in zip(ours, batches, strict=True):
            w = weighting(t64(j1) @ t64(j2).T).numpy()
            tally.add(o, w @ j3)
    tally.check(1e-4, 1e-3)


def test_sdmgrad_default_lr_as_close_as_torchjd_float32():
    """With the default lr = 10 the inner solver (20 projected momentum steps) is not
    contractive: float32 and float64 runs drift apart, TorchJD's own included (measured: 1 - cos
    up to 1.35 over 25-step runs). So at the default we check each step from synced inner
    weights and require ours to be within 2x (+1e-6) of TorchJD-float32's deviation from
    TorchJD-float64."""
    rng = np.random.default_rng(12)
    worst_ours = worst_t32 = 0.0
    for rows in random_jacobians()[:30]:
        k = rows.shape[0]
        batches = _three_batches(rows, rng, 10)
        ours, our_w = _stochastic_directions(mtl.sdmgrad, batches, num_tasks=k)
        w64, w32 = aggregation.SDMGradWeighting(), aggregation.SDMGradWeighting()
        for t, (o, (j1, j2, j3)) in enumerate(zip(ours, batches, strict=True)):
            a = j1 @ j2.T
            if t > 0:
                w64(t64(a))  # initializes the state key; its weights are overwritten below
                w32(torch.as_tensor(a, dtype=torch.float32))
                w64._w = t64(our_w[t - 1])
                w32._w = torch.as_tensor(our_w[t - 1], dtype=torch.float32)
            r64 = w64(t64(a)).numpy() @ j3
            r32 = w32(torch.as_tensor(a, dtype=torch.float32)).numpy().astype(np.float64) @ j3
            dev_ours, dev_t32 = deviation(o, r64)[1], deviation(r32, r64)[1]
            worst_ours, worst_t32 = max(worst_ours, dev_ours), max(worst_t32, dev_t32)
    print(
        f"\n[reference] sdmgrad(lr=10) vs TorchJD float64: max rel err ours {worst_ours:.2e}, "
        f"TorchJD float32 {worst_t32:.2e}"
    )
    assert worst_ours <= 2.0 * worst_t32 + 1e-6


def test_modo_matches_torchjd_over_consecutive_steps():
    tally = Tally("modo vs TorchJD MoDoWeighting (25 steps each)")
    rng = np.random.default_rng(13)
    for rows in random_jacobians()[:30]:
        k = rows.shape[0]
        batches = _three_batches(rows, rng, 25)
        # Rows scaled so that gamma * G is O(1): with TorchJD's gamma = 0.1 on raw Gramians the
        # simplex projection saturates at a vertex after one step and the check is trivial.
        batches = [
            tuple(j / np.sqrt(np.mean(rows**2) * rows.shape[1] / 5.0) for j in b) for b in batches
        ]
        gamma = 0.1
        ours, _ = _stochastic_directions(mtl.modo, batches, num_tasks=k, gamma=gamma)
        weighting = aggregation.MoDoWeighting(gamma=gamma, rho=0.1)
        for o, (j1, j2, j3) in zip(ours, batches, strict=True):
            w = weighting(t64(j1) @ t64(j2).T).numpy()
            tally.add(o, w @ j3)
    tally.check(1e-4, 1e-3)


class LibMTLMoCo:
    """LibMTL ``LibMTL/weighting/MoCo.py`` (``MoCo.backward``), re-derived in PyTorch.

    grads_k <- g_k / (||g_k|| + 1e-8) * loss_k;  y <- y - beta/t^beta_sigma (y - grads);
    lambd <- softmax(lambd - gamma/t^gamma_sigma (y y^T + rho I) lambd);  update = y^T lambd.
    """

    def __init__(self, k, dim, beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0):
        self.step = 0
        self.y = torch.zeros(k, dim, dtype=torch.float64)
        self.lambd = torch.ones(k, dtype=torch.float64) / k
        self.beta, self.beta_sigma, self.gamma, self.gamma_sigma, self.rho = (
            beta,
            beta_sigma,
            gamma,
            gamma_sigma,
            rho,
        )

    def __call__(self, grads, losses):
        self.step += 1
        grads = grads.clone()
        for tn in range(grads.shape[0]):
            grads[tn] = grads[tn] / (grads[tn].norm() + 1e-8) * losses[tn]
        self.y = self.y - (self.beta / self.step**self.beta_sigma) * (self.y - grads)
        eye = torch.eye(grads.shape[0], dtype=torch.float64)
        self.lambd = torch.softmax(
            self.lambd
            - (self.gamma / self.step**self.gamma_sigma)
            * (self.y @ self.y.t() + self.rho * eye)
            @ self.lambd,
            -1,
        )
        return self.y.t() @ self.lambd


@pytest.mark.parametrize("rho", [0.0, 0.1])
def test_moco_matches_libmtl_over_consecutive_steps(rho):
    tally = Tally(f"moco(rho={rho}) vs LibMTL MoCo re-derivation (25 steps each)")
    rng = np.random.default_rng(17)
    for rows in random_jacobians()[:30]:
        k = rows.shape[0]
        jacs = [rows + 0.5 * np.abs(rows).mean() * rng.normal(size=rows.shape) for _ in range(25)]
        losses = [rng.uniform(0.5, 2.0, size=k) for _ in jacs]
        ours = direction(
            mtl.moco,
            jacs,
            extra_per_step={"task_losses": lambda t: jnp.asarray(losses[t], jnp.float32)},
            num_tasks=k,
            rho=rho,
        )
        ref = LibMTLMoCo(k, rows.shape[1], rho=rho)
        for t, (o, j) in enumerate(zip(ours, jacs, strict=True)):
            tally.add(o, ref(t64(j), t64(losses[t])).numpy())
    tally.check(1e-4, 1e-3)
