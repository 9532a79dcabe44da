"""One training step per method: ours (JAX) against the PyTorch peers, TorchJD and LibMTL.

Same model on both sides: the HPS CNN of `benchmarks/common.py` (shared conv encoder, 1.11M
parameters, K linear heads, batch 64 of 32x32x3, float32), re-built in PyTorch with the same
shapes. A step is forward, per-task gradients, aggregation and an Adam step:

* ours, full Jacobian: ``mtl.value_and_jacobian`` + ``mtl.shared_only(method)`` (heads get
  their own task gradients, as in both peers) + ``optax.adam``, one ``jax.jit``;
* ours, representation level (Gramian-based methods): `mtl.representation_value_and_grad` with
  the method's ``*_weights`` function + Adam;
* ours, loss path (loss-level methods): `mtl.weighted_value_and_grad` + Adam;
* TorchJD 0.18, as its MTL example trains a shared encoder: ``mtl_backward(losses,
  features=z)``, ``jac_to_grad(encoder.parameters(), aggregator)``, ``optimizer.step()``;
* LibMTL's way, re-created here because the LibMTL wheel on PyPI (1.1.5, 2022) cannot be
  imported with this torch (``import LibMTL`` needs ``torchvision.models.utils``, gone from
  torchvision) and lacks most methods: `LibMTLStyle` reproduces the calling pattern of
  LibMTL's ``weighting/abstract_weighting.py`` (``_compute_grad``: a Python loop over tasks of
  ``losses[k].backward(retain_graph=True)``, copying the shared gradients into a [K, P] matrix,
  ``_reset_grad`` / ``_backward_new_grads``) and each ``weighting/<Method>.py``'s ``backward``
  step by step, driven as ``trainer.py`` does (``zero_grad``, ``backward``, ``step``; FAMO's extra
  no-grad forward and ``update_w``). Source: github.com/median-research-group/LibMTL at
  4336804 (MIT license). One deviation: ``Aligned_MTL`` calls ``torch.symeig``, removed from
  PyTorch; ``torch.linalg.eigh`` is used instead.

Per method and K, every variant is timed round-robin in one process (`common.time_interleaved`:
median of rounds, two warm-up calls excluded), so ratios come from the same rounds. PyTorch is
limited to the threads XLA's CPU client uses (one intra-op pool of ``os.cpu_count()`` threads).

    python -m benchmarks.peers --tasks 2 3 10 40
    python -m benchmarks.peers --tasks 3 --methods mgda famo --repeats 3

Writes ``peers.json`` and ``peers.md`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_jax as mtl
from benchmarks import common

THREADS = os.cpu_count() or 1
EW = "ours (EW)"
LR = 1e-3


class Method(NamedTuple):
    """How each side runs one method (``None``: that side has no such method)."""

    ours: Callable[[int], Any] | None  # K -> Jacobian transform (full path; not for loss-level)
    weights: Callable[..., jax.Array] | None  # Gramian -> weights (representation level)
    loss: Callable[[int], Any] | None  # K -> LossWeighting (loss path)
    torchjd: str | None  # torchjd.aggregation class
    libmtl: str | None  # LibMTL weighting class (re-created below)


def _pcgrad_weights(gram: jax.Array) -> jax.Array:
    return mtl.pcgrad_weights(gram, jax.random.key(0))


METHODS: dict[str, Method] = {
    "ew": Method(None, None, None, "Mean", "EW"),
    "mgda": Method(lambda k: mtl.mgda(), mtl.mgda_weights, None, "MGDA", "MGDA"),
    "pcgrad": Method(lambda k: mtl.pcgrad(), _pcgrad_weights, None, "PCGrad", "PCGrad"),
    "cagrad": Method(lambda k: mtl.cagrad(), mtl.cagrad_weights, None, "CAGrad", "CAGrad"),
    "nash_mtl": Method(
        lambda k: mtl.nash_mtl(k), mtl.nash_mtl_weights, None, "NashMTL", "Nash_MTL"
    ),
    "upgrad": Method(lambda k: mtl.upgrad(), mtl.upgrad_weights, None, "UPGrad", "UPGrad"),
    "aligned_mtl": Method(
        lambda k: mtl.aligned_mtl(), mtl.aligned_mtl_weights, None, "AlignedMTL", "Aligned_MTL"
    ),
    "imtl_g": Method(lambda k: mtl.imtl_g(), mtl.imtl_g_weights, None, "IMTLG", "IMTL"),
    "dualproj": Method(lambda k: mtl.dualproj(), mtl.dualproj_weights, None, "DualProj", None),
    "gradvac": Method(lambda k: mtl.gradvac(k), None, None, "GradVac", "GradVac"),
    "uncertainty_weighting": Method(None, None, mtl.uncertainty_weighting_weighting, None, "UW"),
    "dwa": Method(None, None, mtl.dwa_weighting, None, "DWA"),
    "famo": Method(None, None, mtl.famo_weighting, None, "FAMO"),
    "rlw": Method(None, None, mtl.rlw_weighting, None, "RLW"),
    "gls": Method(None, None, mtl.gls_weighting, None, "GLS"),
}


# --- ours (JAX) ------------------------------------------------------------------------------


def _labels(params: dict) -> dict:
    return {
        "encoder": jax.tree.map(lambda _: "shared", params["encoder"]),
        "heads": jax.tree.map(lambda _: "task_specific", params["heads"]),
    }


def _features(params: dict, batch: dict) -> jax.Array:
    return common.encode(params["encoder"], batch["x"])


def _head_losses(params: dict, z: jax.Array, batch: dict) -> jax.Array:
    return common.head_losses(params["heads"], z, batch["y"])


def our_steps(
    name: str, params: dict, batch: dict, full: bool = True
) -> dict[str, Callable[[], Any]]:
    """``variant -> step()``: jitted full training steps (Adam included) of ``name``.

    Each ``step()`` returns ``(new_params, new_opt_state[, new_method_state])``. Every method
    gets ``'ours (EW)'`` (grad of the summed loss + Adam), the cost floor its paths are compared
    to in the same rounds; ``full=False`` leaves out the full-Jacobian path.
    """
    spec, k = METHODS[name], batch["y"].shape[1]
    opt = optax.adam(LR)
    opt_state = opt.init(params)
    steps = {}

    def adam(grads, opt_state, params):
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def ew(params, opt_state, batch):
        grads = jax.grad(lambda p: jnp.sum(common.task_losses(p, batch)))(params)
        return adam(grads, opt_state, params)

    ew_jit = jax.jit(ew)
    steps[EW] = lambda: ew_jit(params, opt_state, batch)

    if spec.ours is not None and full:
        tx = mtl.shared_only(spec.ours(k), _labels(params))
        tx_state = tx.init(params)

        def full(params, tx_state, opt_state, batch):
            losses, jac = mtl.value_and_jacobian(common.task_losses)(params, batch)
            grads, tx_state = tx.update(jac, tx_state, params, task_losses=losses)
            return (*adam(grads, opt_state, params), tx_state)

        full_jit = jax.jit(full)
        steps["ours (full Jacobian)"] = lambda: full_jit(params, tx_state, opt_state, batch)

    if spec.weights is not None:
        rep_vg = mtl.representation_value_and_grad(_features, _head_losses, spec.weights)

        def rep(params, opt_state, batch):
            return adam(rep_vg(params, batch).grads, opt_state, params)

        rep_jit = jax.jit(rep)
        steps["ours (representation)"] = lambda: rep_jit(params, opt_state, batch)

    if spec.loss is not None:
        lw = spec.loss(k)
        loss_vg = mtl.weighted_value_and_grad(common.task_losses, lw)
        lw_state = lw.init()

        def loss_path(params, lw_state, opt_state, batch):
            (_, _, lw_state), grads = loss_vg(lw_state, params, batch)
            return (*adam(grads, opt_state, params), lw_state)

        loss_jit = jax.jit(loss_path)
        steps["ours (loss path)"] = lambda: loss_jit(params, lw_state, opt_state, batch)
    return steps


# --- the PyTorch model -----------------------------------------------------------------------


def torch_model(num_tasks: int, width: int = 32, hidden: int = 256):
    """The HPS CNN of `common.init_hps_cnn` in PyTorch: encoder + ``ModuleList`` of K heads."""
    import torch
    from torch import nn

    encoder = nn.Sequential(
        nn.Conv2d(3, width, 3, 1, 1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, 2, 1),
        nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, 2, 1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 2 * width, hidden),
        nn.ReLU(),
    )
    heads = nn.ModuleList([nn.Linear(hidden, common.NUM_CLASSES) for _ in range(num_tasks)])
    model = nn.ModuleDict({"encoder": encoder, "heads": heads})
    return model.to(torch.float32)


def torch_batch(num_tasks: int, batch_size: int = 64, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, 32, 32, generator=g)
    y = torch.randint(0, common.NUM_CLASSES, (batch_size, num_tasks), generator=g)
    return x, y


def _torch_losses(model, z, y) -> list:
    import torch.nn.functional as F  # noqa: N812

    return [F.cross_entropy(head(z), y[:, k]) for k, head in enumerate(model["heads"])]


# --- TorchJD ---------------------------------------------------------------------------------


def torchjd_step(name: str, model, x, y) -> Callable[[], None]:
    """One TorchJD 0.18 step: ``mtl_backward`` + ``jac_to_grad`` (its documented MTL recipe)."""
    import torch
    from torchjd import aggregation
    from torchjd.autojac import jac_to_grad, mtl_backward

    k = y.shape[1]
    cls = getattr(aggregation, METHODS[name].torchjd)
    kwargs = {"NashMTL": {"n_tasks": k}, "CAGrad": {"c": 0.4}}.get(METHODS[name].torchjd, {})
    aggregator = cls(**kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=LR)

    def step() -> None:
        opt.zero_grad()
        z = model["encoder"](x)
        losses = _torch_losses(model, z, y)
        mtl_backward(losses, features=z)
        jac_to_grad(model["encoder"].parameters(), aggregator)
        opt.step()

    return step


def torch_ew_step(model, x, y) -> Callable[[], None]:
    """Plain PyTorch equal weighting: ``sum(losses).backward()``."""
    import torch

    opt = torch.optim.Adam(model.parameters(), lr=LR)

    def step() -> None:
        opt.zero_grad()
        losses = _torch_losses(model, model["encoder"](x), y)
        torch.stack(losses).sum().backward()
        opt.step()

    return step


# --- LibMTL's calling pattern ----------------------------------------------------------------


class LibMTLStyle:
    """LibMTL's ``AbsWeighting`` machinery and the ``backward`` of its weighting classes.

    Re-created from LibMTL ``weighting/abstract_weighting.py`` and ``weighting/<Method>.py`` (see
    the module docstring) with LibMTL's default hyper-parameters (``LibMTL/config.py``): MGDA
    ``mgda_gn='none'``, CAGrad ``calpha=0.5, rescale=1``, Nash_MTL ``update_weights_every=1,
    optim_niter=20, max_norm=1.0``, UPGrad ``norm_eps=reg_eps=1e-4``, GradVac ``beta=0.5``
    whole-model group, DWA ``T=2`` (in its second epoch, so the loss-ratio branch runs), FAMO
    ``w_lr=0.025, gamma=1e-3``.
    """

    def __init__(self, name: str, model, x, y):
        import torch

        self.torch = torch
        self.name, self.model, self.x, self.y = name, model, x, y
        self.task_num = y.shape[1]
        self.shared = list(model["encoder"].parameters())
        self.grad_index = [p.numel() for p in self.shared]
        self.grad_dim = sum(self.grad_index)
        self.device = torch.device("cpu")
        extra = []
        k = self.task_num
        if name == "UW":
            self.loss_scale = torch.nn.Parameter(torch.full((k,), -0.5))
            extra = [self.loss_scale]
        elif name == "IMTL":
            self.loss_scale = torch.nn.Parameter(torch.zeros(k))
            extra = [self.loss_scale]
        elif name == "DWA":
            self.epoch = 2
            self.train_loss_buffer = np.random.default_rng(0).uniform(1, 2, (k, 3))
        elif name == "FAMO":
            self.min_losses = torch.zeros(k)
            self.w = torch.zeros(k, requires_grad=True)
            self.w_opt = torch.optim.Adam([self.w], lr=0.025, weight_decay=1e-3)
        elif name == "GradVac":
            self.rho_t = torch.zeros(k, k, 1)
        elif name == "Nash_MTL":
            self._nash_init()
        self.opt = torch.optim.Adam(list(model.parameters()) + extra, lr=LR)

    # -- AbsWeighting ---------------------------------------------------------------------

    def _grad2vec(self):
        return self.torch.cat(
            [
                p.grad.reshape(-1) if p.grad is not None else self.torch.zeros(p.numel())
                for p in self.shared
            ]
        )

    def _zero_shared(self) -> None:
        for p in self.shared:
            if p.grad is not None:
                p.grad.zero_()

    def _compute_grad(self, losses, mode: str = "backward"):
        grads = self.torch.zeros(self.task_num, self.grad_dim)
        for tn in range(self.task_num):
            if mode == "backward":
                losses[tn].backward(retain_graph=(tn + 1) != self.task_num)
                grads[tn] = self._grad2vec()
            else:
                g = self.torch.autograd.grad(losses[tn], self.shared, retain_graph=True)
                grads[tn] = self.torch.cat([gi.reshape(-1) for gi in g])
            self._zero_shared()
        return grads

    def _reset_grad(self, new_grads) -> None:
        beg = 0
        for p, n in zip(self.shared, self.grad_index, strict=True):
            p.grad = new_grads[beg : beg + n].reshape(p.shape).clone()
            beg += n

    def _backward_new_grads(self, weights, grads) -> None:
        self._reset_grad(sum(weights[i] * grads[i] for i in range(self.task_num)))

    # -- trainer.py's step ----------------------------------------------------------------

    def _losses(self):
        z = self.model["encoder"](self.x)
        return self.torch.stack(_torch_losses(self.model, z, self.y))

    def step(self) -> None:
        losses = self._losses()
        self.opt.zero_grad(set_to_none=False)
        getattr(self, "_" + self.name.lower())(losses)
        self.opt.step()
        if self.name == "FAMO":
            with self.torch.no_grad():
                new_losses = self._losses()
            self._famo_update_w(new_losses)

    # -- weighting/<Method>.py ------------------------------------------------------------

    def _ew(self, losses) -> None:
        losses.sum().backward()

    def _mgda(self, losses) -> None:
        grads = self._compute_grad(losses)
        sol = self._min_norm_element(grads)
        self._backward_new_grads(sol, grads)

    def _min_norm_element(self, grads):
        """LibMTL's ``MGDA._find_min_norm_element`` (MultiObjectiveOptimization's solver)."""
        torch = self.torch
        gg = grads @ grads.t()
        n = grads.shape[0]

        def line(v1v1, v1v2, v2v2):
            if v1v2 >= v1v1:
                return 0.999, v1v1
            if v1v2 >= v2v2:
                return 0.001, v2v2
            gamma = -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))
            return gamma, v2v2 + gamma * (v1v2 - v2v2)

        dmin, sol = 1e8, None
        for i in range(n):
            for j in range(i + 1, n):
                c, d = line(gg[i, i], gg[i, j], gg[j, j])
                if d < dmin:
                    dmin, sol = d, ((i, j), c)
        vec = torch.zeros(n)
        vec[sol[0][0]] = sol[1]
        vec[sol[0][1]] = 1 - sol[1]
        if n < 3:
            return vec

        def simplex(y):
            s = torch.sort(y, descending=True)[0]
            tmpsum, tmax_f = 0.0, (torch.sum(y) - 1.0) / n
            for i in range(n - 1):
                tmpsum += s[i]
                tmax = (tmpsum - 1) / (i + 1.0)
                if tmax > s[i + 1]:
                    tmax_f = tmax
                    break
            return torch.clamp(y - tmax_f, min=0.0)

        def next_point(cur, grad):
            proj = grad - torch.sum(grad) / n
            tm1 = -1.0 * cur[proj < 0] / proj[proj < 0]
            tm2 = (1.0 - cur[proj > 0]) / proj[proj > 0]
            t = torch.ones(1)
            if (tm1 > 1e-7).sum() > 0:
                t = torch.min(tm1[tm1 > 1e-7])
            if (tm2 > 1e-7).sum() > 0:
                t = torch.min(t, torch.min(tm2[tm2 > 1e-7]))
            return simplex(proj * t + cur)

        for _ in range(250):
            new = next_point(vec, -1.0 * gg @ vec)
            v1v1 = torch.sum(vec[:, None] * vec[None, :] * gg)
            v1v2 = torch.sum(vec[:, None] * new[None, :] * gg)
            v2v2 = torch.sum(new[:, None] * new[None, :] * gg)
            c, _ = line(v1v1, v1v2, v2v2)
            new_vec = c * vec + (1 - c) * new
            if torch.sum(torch.abs(new_vec - vec)) < 1e-5:
                return vec
            vec = new_vec
        return vec

    def _pcgrad(self, losses) -> None:
        grads = self._compute_grad(losses)
        pc = grads.clone()
        for i in range(self.task_num):
            order = list(range(self.task_num))
            random.shuffle(order)
            for j in order:
                g_ij = self.torch.dot(pc[i], grads[j])
                if g_ij < 0:
                    pc[i] -= g_ij * grads[j] / (grads[j].norm().pow(2) + 1e-8)
        self._reset_grad(pc.sum(0))

    def _cagrad(self, losses, calpha: float = 0.5) -> None:
        from scipy.optimize import minimize

        grads = self._compute_grad(losses)
        gg = (grads @ grads.t()).numpy()
        x0 = np.ones(self.task_num) / self.task_num
        c = calpha * np.sqrt(gg.mean() + 1e-8) + 1e-8

        def objective(x):
            return float(x @ gg @ x0 + c * np.sqrt(x @ gg @ x + 1e-8))

        res = minimize(
            objective,
            x0,
            bounds=[(0, 1)] * self.task_num,
            constraints={"type": "eq", "fun": lambda x: 1 - sum(x)},
        )
        w = self.torch.as_tensor(res.x, dtype=self.torch.float32)
        gw = (grads * w[:, None]).sum(0)
        g = grads.mean(0) + c / (gw.norm() + 1e-8) * gw
        self._reset_grad(g / (1 + calpha**2))

    def _nash_init(self) -> None:
        import cvxpy as cp

        k = self.task_num
        self.prvs_alpha = np.ones(k, dtype=np.float32)
        self.alpha_param = cp.Variable(shape=(k,), nonneg=True)
        self.prvs_alpha_param = cp.Parameter(shape=(k,), value=self.prvs_alpha)
        self.g_param = cp.Parameter(shape=(k, k), value=np.eye(k))
        self.norm_param = cp.Parameter(shape=(1,), value=np.array([1.0]))
        g_prvs = self.g_param @ self.prvs_alpha_param
        phi_tag = 1 / self.prvs_alpha_param + (1 / g_prvs) @ self.g_param
        phi_alpha = phi_tag @ (self.alpha_param - self.prvs_alpha_param)
        g_alpha = self.g_param @ self.alpha_param
        constraints = [
            -cp.log(self.alpha_param[i] * self.norm_param) - cp.log(g_alpha[i]) <= 0
            for i in range(k)
        ]
        obj = cp.Minimize(cp.sum(g_alpha) + phi_alpha / self.norm_param)
        self.prob = cp.Problem(obj, constraints)

    def _nash_mtl(self, losses, optim_niter: int = 20, max_norm: float = 1.0) -> None:
        import cvxpy as cp

        grads = self._compute_grad(losses, mode="autograd")
        gtg = grads @ grads.t()
        norm = gtg.norm().numpy().reshape((1,))
        gtg = (gtg / norm.item()).numpy()
        self.g_param.value, self.norm_param.value = gtg, norm
        alpha_t = self.prvs_alpha
        for _ in range(optim_niter):
            self.alpha_param.value = alpha_t
            self.prvs_alpha_param.value = alpha_t
            try:
                self.prob.solve(solver=cp.ECOS, warm_start=True, max_iters=100)
            except Exception:  # noqa: BLE001 - LibMTL's bare except
                self.alpha_param.value = self.prvs_alpha_param.value
            if (
                self.alpha_param.value is None
                or np.linalg.norm(gtg @ alpha_t - 1 / (alpha_t + 1e-10)) < 1e-3
                or np.linalg.norm(self.alpha_param.value - self.prvs_alpha_param.value) < 1e-6
            ):
                break
            alpha_t = self.alpha_param.value
        if alpha_t is not None:
            self.prvs_alpha = alpha_t
        alpha = self.torch.from_numpy(np.asarray(self.prvs_alpha)).to(self.torch.float32)
        self.torch.sum(alpha * losses).backward()
        self.torch.nn.utils.clip_grad_norm_(self.shared, max_norm)

    def _upgrad(self, losses, eps: float = 1e-4) -> None:
        from qpsolvers import solve_qp

        grads = self._compute_grad(losses)
        k = self.task_num
        gram = grads @ grads.t()
        trace = gram.diagonal().sum()
        gram = self.torch.zeros_like(gram) if trace < eps else gram / trace
        g = (gram + eps * self.torch.eye(k)).numpy().astype(np.float64)
        u = np.eye(k) / k
        w = np.stack([solve_qp(g, np.zeros(k), -np.eye(k), -ui, solver="quadprog") for ui in u])
        weights = self.torch.as_tensor(w, dtype=self.torch.float32).sum(0)
        self._backward_new_grads(weights, grads)

    def _aligned_mtl(self, losses) -> None:
        torch = self.torch
        grads = self._compute_grad(losses)
        m = grads @ grads.t()
        lmbda, v = torch.linalg.eigh(m)  # LibMTL: torch.symeig (removed from PyTorch)
        tol = torch.max(lmbda) * max(m.shape) * torch.finfo().eps
        rank = int(sum(lmbda > tol))
        order = torch.argsort(lmbda, descending=True)
        lmbda, v = lmbda[order][:rank], v[:, order][:, :rank]
        b = lmbda[-1].sqrt() * ((v @ torch.diag(1 / lmbda.sqrt())) @ v.t())
        self._backward_new_grads(b.sum(0), grads)

    def _imtl(self, losses) -> None:
        torch = self.torch
        losses = self.loss_scale.exp() * losses - self.loss_scale
        grads = self._compute_grad(losses)
        unit = grads / torch.norm(grads, p=2, dim=-1, keepdim=True)
        d = grads[0:1].repeat(self.task_num - 1, 1) - grads[1:]
        u = unit[0:1].repeat(self.task_num - 1, 1) - unit[1:]
        alpha = (grads[0] @ u.t()) @ torch.inverse(d @ u.t())
        alpha = torch.cat((1 - alpha.sum().unsqueeze(0), alpha), dim=0)
        self._backward_new_grads(alpha, grads)

    def _gradvac(self, losses, beta: float = 0.5) -> None:
        grads = self._compute_grad(losses)
        pc = grads.clone()
        rho_t = self.rho_t
        for i in range(self.task_num):
            order = [j for j in range(self.task_num) if j != i]
            random.shuffle(order)
            for j in order:
                rho = self.torch.dot(pc[i], grads[j]) / (pc[i].norm() * grads[j].norm() + 1e-8)
                if rho < rho_t[i, j, 0]:
                    t = rho_t[i, j, 0]
                    w = (
                        pc[i].norm()
                        * (t * (1 - rho**2).sqrt() - rho * (1 - t**2).sqrt())
                        / (grads[j].norm() * (1 - t**2).sqrt() + 1e-8)
                    )
                    pc[i] += grads[j] * w
                rho_t[i, j, 0] = (1 - beta) * rho_t[i, j, 0] + beta * rho
        self._reset_grad(pc.sum(0))

    def _uw(self, losses) -> None:
        (losses / (2 * self.loss_scale.exp()) + self.loss_scale / 2).sum().backward()

    def _dwa(self, losses, temp: float = 2.0) -> None:
        buf = self.train_loss_buffer
        ratio = self.torch.Tensor(buf[:, self.epoch - 1] / buf[:, self.epoch - 2])
        weight = self.task_num * self.torch.softmax(ratio / temp, dim=-1)
        (losses * weight).sum().backward()

    def _rlw(self, losses) -> None:
        weight = self.torch.softmax(self.torch.randn(self.task_num), dim=-1)
        (losses * weight).sum().backward()

    def _gls(self, losses) -> None:
        self.torch.pow(losses.prod(), 1.0 / self.task_num).backward()

    def _famo(self, losses) -> None:
        self.prev_losses = losses
        z = self.torch.softmax(self.w, -1)
        d = losses - self.min_losses + 1e-8
        c = (z / d).sum().detach()
        (d.log() * z / c).sum().backward()

    def _famo_update_w(self, curr_losses) -> None:
        torch = self.torch
        delta = (self.prev_losses - self.min_losses + 1e-8).log() - (
            curr_losses - self.min_losses + 1e-8
        ).log()
        with torch.enable_grad():
            d = torch.autograd.grad(torch.softmax(self.w, -1), self.w, grad_outputs=delta.detach())
        self.w_opt.zero_grad(set_to_none=False)
        self.w.grad = d[0]
        self.w_opt.step()


# --- the benchmark ---------------------------------------------------------------------------


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
        import torchjd  # noqa: F401
    except ImportError:
        return False
    return True


def _set_torch_threads() -> None:
    import torch

    torch.set_num_threads(THREADS)


def step_fns(
    name: str,
    k: int,
    peers: bool,
    width: int = 32,
    hidden: int = 256,
    batch_size: int = 64,
    full: bool = True,
) -> dict[str, Callable[[], Any]]:
    """``variant -> step()`` for one method and K: ours, and (with ``peers``) TorchJD / LibMTL."""
    params = common.init_hps_cnn(jax.random.key(0), k, width=width, hidden=hidden)
    batch = common.make_batch(jax.random.key(1), k, batch_size)
    fns = our_steps(name, params, batch, full)
    if peers:
        import torch

        torch.manual_seed(0)
        x, y = torch_batch(k, batch_size)
        spec = METHODS[name]
        if name == "ew":
            fns["PyTorch (sum().backward())"] = torch_ew_step(torch_model(k, width, hidden), x, y)
        if spec.torchjd is not None:
            fns["TorchJD"] = torchjd_step(name, torch_model(k, width, hidden), x, y)
        if spec.libmtl is not None:
            fns["LibMTL"] = LibMTLStyle(spec.libmtl, torch_model(k, width, hidden), x, y).step
    return fns


def run(
    tasks: list[int],
    methods: list[str],
    repeats: int,
    peers: bool = True,
    width: int = 32,
    hidden: int = 256,
    batch_size: int = 64,
    out: str | None = None,
    name: str = "peers",
    full: bool = True,
) -> dict:
    """Times every (K, method); with ``out``, rewrites the outputs after each row."""
    if peers:
        _set_torch_threads()
    results = {
        "machine": common.machine_description(),
        "threads": {
            "xla": f"XLA CPU client default: one intra-op pool of os.cpu_count() = {THREADS}",
            "torch": f"torch.set_num_threads({THREADS})" if peers else None,
        },
        "model": {"width": width, "hidden": hidden, "batch_size": batch_size},
        "rows": [],
    }
    if peers:
        from importlib.metadata import version

        results["machine"]["torch"] = version("torch")
        results["machine"]["torchjd"] = version("torchjd")
    start = time.perf_counter()
    for k in tasks:
        for method in methods:
            fns = step_fns(method, k, peers, width, hidden, batch_size, full)
            times = common.time_interleaved(fns, (), repeats, warmup=1)
            row = {"K": k, "method": method, "ms": {v: t * 1e3 for v, t in times.items()}}
            results["rows"].append(row)
            print(
                f"K={k:3d} {method:22s} "
                + "  ".join(f"{v}: {t * 1e3:.1f} ms" for v, t in times.items()),
                flush=True,
            )
            results["wall_s"] = time.perf_counter() - start
            if out is not None:
                common.write_outputs(name, out, results, to_markdown(results))
    return results


def fastest_ours(ms: dict[str, float]) -> tuple[str, float]:
    """The fastest of our paths for the method (EW itself only for the EW row)."""
    ours = {v: t for v, t in ms.items() if v.startswith("ours") and v != EW} or {EW: ms[EW]}
    best = min(ours, key=ours.get)
    return best, ours[best]


def to_markdown(results: dict) -> str:
    head = ["K", "method", "ours EW", "ours full Jacobian", "ours fastest path"]
    head += ["TorchJD", "LibMTL"]
    body = []
    for r in results["rows"]:
        ms = r["ms"]
        ew, full = ms[EW], ms.get("ours (full Jacobian)")
        best_name, best = fastest_ours(ms)
        label = best_name.removeprefix("ours (").removesuffix(")")
        full_s = "-" if full is None else f"{full:.0f} ms ({full / ew:.2f}x EW)"
        cells = [r["K"], r["method"], f"{ew:.0f} ms", full_s]
        cells.append(f"{best:.0f} ms ({label}, {best / ew:.2f}x EW)")
        for peer in ("TorchJD", "LibMTL"):
            t = ms.get(peer)
            if t is None:
                cells.append("-")
            elif full is None or full == best:
                cells.append(f"{t:.0f} ms: {t / best:.2f}x")
            else:
                cells.append(f"{t:.0f} ms: {t / full:.2f}x / {t / best:.2f}x")
        body.append(cells)
    m, th = results["machine"], results["threads"]
    note = (
        "Median step time (forward, per-task gradients, aggregation, Adam), all variants of a "
        "row timed round-robin in the same rounds; peer cells: time, then peer / ours-full-"
        "Jacobian and peer / ours-fastest-path (one ratio where they coincide; > 1: ours "
        f"faster). backend={m['backend']}, {m['cpu_count']} CPUs, jax {m['jax']}, "
        f"torch {m.get('torch')}, torchjd {m.get('torchjd')}; threads: {th['xla']}; "
        f"{th['torch']}; {m['date']}; wall {results['wall_s'] / 60:.0f} min.\n\n"
    )
    return note + common.markdown_table(head, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 3, 10, 40])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds")
    parser.add_argument("--no-peers", action="store_true", help="time ours only (no torch)")
    parser.add_argument("--no-full", action="store_true", help="leave out our full-Jacobian path")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="peers", help="output file name (without suffix)")
    args = parser.parse_args()
    peers = not args.no_peers
    if peers and not torch_available():
        raise SystemExit(
            "benchmarks.peers needs torch and torchjd: pip install torch==2.13.0 && "
            'pip install -e ".[reference]" (or pass --no-peers).'
        )
    results = run(
        args.tasks,
        args.methods,
        args.repeats,
        peers=peers,
        out=args.out,
        name=args.name,
        full=not args.no_full,
    )
    print(to_markdown(results))
    print("wrote", *(os.path.join(args.out, f"{args.name}.{ext}") for ext in ("json", "md")))


if __name__ == "__main__":
    main()
