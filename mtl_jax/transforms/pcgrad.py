"""Projection methods: PCGrad and GradVac, both computed in K-space on the Gramian.

Every projected row is a combination of the original task gradients,
``g_i^PC = sum_k C[i, k] g_k``, so the whole surgery runs on the K x K Gramian ``G = J J^T``:
``g_i^PC . g_j = (C G)[i, j]`` and ``||g_i^PC||^2 = (C G C^T)[i, i]``. A projection of row
``i`` along ``g_j`` only changes ``C[i, j]``. The transforms return ``C J`` (each task's
projected gradient, applied with `mtl.combine_rows`), so ``sum_tasks`` gives the method's
direction ``(1^T C) J`` and a later method in a chain sees the projected task gradients.

Task orders are random, as in the references: one permutation per task, drawn from the PRNG
key in the transform's state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_jax import jacobian as jac_lib
from mtl_jax.transforms import base
from mtl_jax.transforms.base import check_num_tasks

PyTree = Any


def _task_orders(key: jax.Array, k: int) -> jax.Array:
    """[K, K] int32: row i is a random permutation of range(K) (the visiting order for task i)."""
    keys = jax.random.split(key, k)
    return jax.vmap(lambda kk: jax.random.permutation(kk, k))(keys).astype(jnp.int32)


def _as_float32(g: jax.Array) -> jax.Array:
    dtype = jnp.result_type(g.dtype, jnp.float32)
    g = g.astype(dtype)
    return 0.5 * (g + g.T)


# ----------------------------------------------------------------------------------------------
# PCGrad


class PCGradState(NamedTuple):
    """State of `pcgrad`: the PRNG key for the task orders."""

    key: jax.Array


def pcgrad_matrix(gramian: jax.Array, orders: jax.Array) -> jax.Array:
    """The K x K combination matrix ``C`` of PCGrad: projected rows are ``C J``.

    For each task i (independently), visit the other tasks j in the order ``orders[i]``
    (task i itself is skipped) and, if the current projected gradient conflicts with the
    original ``g_j`` (``g_i^PC . g_j < 0``), remove its component along ``g_j``:
    ``g_i^PC -= (g_i^PC . g_j / ||g_j||^2) g_j``.

    Args:
      gramian: [K, K] Gramian ``J J^T``.
      orders: [K, K] integer array, row i a permutation of ``range(K)``.

    Returns:
      [K, K] matrix ``C`` (float32 or wider) with ``g_i^PC = sum_k C[i, k] g_k``.
    """
    g = _as_float32(gramian)
    k = g.shape[0]
    diag = jnp.diag(g)

    def one_task(i, order):
        def body(s, c):
            j = order[s]
            inner = g[j] @ c
            gjj = diag[j]
            project = (j != i) & (inner < 0) & (gjj > 0)
            delta = jnp.where(project, inner / jnp.where(gjj > 0, gjj, 1.0), 0.0)
            return c.at[j].add(-delta)

        c0 = jnp.zeros((k,), g.dtype).at[i].set(1.0)
        return jax.lax.fori_loop(0, k, body, c0)

    c = jax.vmap(one_task)(jnp.arange(k), orders)
    return jnp.where(jnp.all(jnp.isfinite(c)), c, jnp.eye(k, dtype=g.dtype))


def pcgrad_weights(gramian: jax.Array, key: jax.Array) -> jax.Array:
    """PCGrad's weights ``w = 1^T C``: the PCGrad direction is ``w^T J``.

    For representation-level use or a PyTorch-style loop: random task orders from ``key``.

    Args:
      gramian: [K, K] Gramian.
      key: a PRNG key.

    Returns:
      [K] weights (float32).
    """
    c = pcgrad_matrix(gramian, _task_orders(key, gramian.shape[0]))
    return jnp.sum(c, axis=0)


def pcgrad(seed: int = 0) -> optax.GradientTransformationExtraArgs:
    """PCGrad: project each task gradient off the gradients it conflicts with.

    Returns the projected task gradients ``g_i^PC`` (a Jacobian), so
    ``optax.chain(mtl.pcgrad(), mtl.sum_tasks())`` is the PCGrad update ``sum_i g_i^PC``.
    Computed Gramian-first: a K x K combination matrix (`pcgrad_matrix`) applied with
    `mtl.combine_rows`; the per-task visiting orders are random permutations drawn from the key
    in the state (a fresh one every step), as in both references.

    Args:
      seed: seed of the PRNG key for the task orders.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` mapping a Jacobian to a Jacobian.

    Example:
      >>> import jax.numpy as jnp, optax, mtl_jax as mtl
      >>> jac = jnp.array([[1.0, 0.0], [-1.0, 1.0]])
      >>> tx = optax.chain(mtl.pcgrad(), mtl.sum_tasks())
      >>> d, _ = tx.update(jac, tx.init(jnp.zeros(2)))
      >>> [round(float(x), 3) for x in d]
      [0.5, 1.5]

    References:
      Yu, Kumar, Gupta, Levine, Hausman, Finn. Gradient Surgery for Multi-Task Learning.
      NeurIPS 2020.

      Checked against: TorchJD 0.18 ``PCGrad`` (``aggregation/_pcgrad.py``), same orders
      injected: identical to float tolerance. Like TorchJD, task i skips itself and divides by
      ``||g_j||^2`` without an epsilon (a zero ``g_j`` never conflicts). LibMTL
      (``weighting/PCGrad.py``) also visits task i itself and adds 1e-8 to ``||g_j||^2``.
    """

    def init_fn(params):
        del params
        return PCGradState(key=jax.random.key(seed))

    def weights_fn(updates, state, params=None, **extra_args):
        del extra_args
        k = jac_lib.num_tasks(updates, params)
        key, sub = jax.random.split(state.key)
        c = pcgrad_matrix(jac_lib.gramian(updates), _task_orders(sub, k))
        return c, PCGradState(key=key)

    return base.row_weighting(init_fn, weights_fn)


# ----------------------------------------------------------------------------------------------
# GradVac


class GradVacState(NamedTuple):
    """State of `gradvac`: EMA targets ``phi_hat[i, j]`` of the cosine similarities, and a key."""

    phi_hat: jax.Array
    key: jax.Array


def gradvac_matrix(
    gramian: jax.Array,
    phi_hat: jax.Array,
    orders: jax.Array,
    beta: float = 0.5,
    eps: float = 1e-8,
) -> tuple[jax.Array, jax.Array]:
    """One GradVac step in K-space: the combination matrix ``C`` and the new EMA targets.

    For task i, visit the other tasks j in ``orders[i]`` (i itself skipped). With
    ``phi = cos(g_i^PC, g_j)`` and target ``phi_hat[i, j]``: if ``phi < phi_hat``, add
    ``w g_j`` to ``g_i^PC`` with
    ``w = ||g_i^PC|| (phi_hat sqrt(1-phi^2) - phi sqrt(1-phi_hat^2)) /
    (||g_j|| sqrt(1-phi_hat^2) + eps)``; then ``phi_hat[i, j] <- (1-beta) phi_hat + beta phi``.

    Args:
      gramian: [K, K] Gramian.
      phi_hat: [K, K] EMA targets (zeros at the first step).
      orders: [K, K] integer array, row i a permutation of ``range(K)``.
      beta: EMA rate of the targets.
      eps: added to the denominators.

    Returns:
      ``(C, new_phi_hat)``: projected rows are ``C J``.
    """
    g = _as_float32(gramian)
    k = g.shape[0]
    phi_hat = phi_hat.astype(g.dtype)
    norms = jnp.sqrt(jnp.maximum(jnp.diag(g), 0.0))

    def one_task(i, order, targets):
        def body(s, carry):
            c, cg, targets = carry
            j = order[s]
            visit = j != i
            dot = cg[j]
            norm_i = jnp.sqrt(jnp.maximum(cg @ c, 0.0))
            norm_j = norms[j]
            phi = dot / (norm_i * norm_j + eps)
            target = targets[j]
            sq_phi = jnp.sqrt(jnp.maximum(1.0 - phi * phi, 0.0))
            sq_hat = jnp.sqrt(jnp.maximum(1.0 - target * target, 0.0))
            w = norm_i * (target * sq_phi - phi * sq_hat) / (norm_j * sq_hat + eps)
            w = jnp.where(visit & (phi < target), w, 0.0)
            c = c.at[j].add(w)
            cg = cg + w * g[j]
            new_target = jnp.where(visit, (1.0 - beta) * target + beta * phi, target)
            return c, cg, targets.at[j].set(new_target)

        c0 = jnp.zeros((k,), g.dtype).at[i].set(1.0)
        c, _, targets = jax.lax.fori_loop(0, k, body, (c0, g[i], targets))
        return c, targets

    c, new_phi = jax.vmap(one_task)(jnp.arange(k), orders, phi_hat)
    ok = jnp.all(jnp.isfinite(c)) & jnp.all(jnp.isfinite(new_phi))
    c = jnp.where(ok, c, jnp.eye(k, dtype=g.dtype))
    new_phi = jnp.where(ok, new_phi, phi_hat)
    return c, new_phi


def gradvac(
    num_tasks: int, beta: float = 0.5, eps: float = 1e-8, seed: int = 0
) -> optax.GradientTransformationExtraArgs:
    """GradVac (Gradient Vaccine): pull pairwise gradient similarities up to their EMA targets.

    Returns the corrected task gradients (a Jacobian); ``sum_tasks`` then gives the GradVac
    update. Gramian-first (`gradvac_matrix`); the EMA targets ``phi_hat`` (K x K, zeros at
    start) and the PRNG key for the random task orders live in the state. Like TorchJD's
    default, the whole Jacobian is one group; for per-layer groups (LibMTL's ``group_type``),
    apply a separate ``gradvac`` per parameter group with ``optax.partition``.

    Args:
      num_tasks: K.
      beta: EMA rate of the similarity targets, in [0, 1] (TorchJD and LibMTL default 0.5;
        the paper used 1e-2 on its multilingual benchmarks).
      eps: non-negative constant added to denominators.
      seed: seed of the PRNG key for the task orders.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` mapping a Jacobian to a Jacobian.

    Example:
      >>> import jax.numpy as jnp, optax, mtl_jax as mtl
      >>> tx = optax.chain(mtl.gradvac(num_tasks=2), mtl.sum_tasks())
      >>> jac = jnp.array([[1.0, 0.0], [-1.0, 1.0]])
      >>> d, state = tx.update(jac, tx.init(jnp.zeros(2)))
      >>> d.shape
      (2,)

    References:
      Wang, Tsvetkov, Firat, Cao. Gradient Vaccine: Investigating and Improving Multi-task
      Optimization in Massively Multilingual Models. ICLR 2021.

      Checked against: TorchJD 0.18 ``GradVac`` (``aggregation/_gradvac.py``), same orders
      injected, 20 consecutive steps: identical to float tolerance. LibMTL
      (``weighting/GradVac.py``) has the same update (it writes the EMA target ``rho_T``).
    """
    if num_tasks < 1:
        raise ValueError(f"gradvac: num_tasks must be a positive integer, got {num_tasks}.")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"gradvac: beta must be in [0, 1], got {beta}.")
    if eps < 0:
        raise ValueError(f"gradvac: eps must be non-negative, got {eps}.")

    def init_fn(params):
        del params
        return GradVacState(
            phi_hat=jnp.zeros((num_tasks, num_tasks), jnp.float32), key=jax.random.key(seed)
        )

    def weights_fn(updates, state, params=None, **extra_args):
        del extra_args
        k = jac_lib.num_tasks(updates, params)
        check_num_tasks("gradvac", num_tasks, k)
        key, sub = jax.random.split(state.key)
        c, phi_hat = gradvac_matrix(
            jac_lib.gramian(updates), state.phi_hat, _task_orders(sub, k), beta, eps
        )
        new_state = GradVacState(phi_hat=phi_hat.astype(state.phi_hat.dtype), key=key)
        return c, new_state

    return base.row_weighting(init_fn, weights_fn)
