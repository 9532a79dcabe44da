"""F-MTL: seeking task-based flat regions (per-task sharpness-aware minimization).

F-MTL needs the task losses at perturbed parameters, which a Jacobian -> Jacobian transform
cannot evaluate. It is split in two pieces:

* `f_mtl_value_and_jacobian` wraps the per-task loss function (like `mtl.value_and_jacobian`)
  and returns, besides the losses and the plain Jacobian ``J`` (rows ``g_k``), the *flat*
  Jacobian ``H`` whose row k is ``h_k = grad L_k(theta + eps_k) - g_k`` with the per-task
  SAM perturbation ``eps_k = rho * g_k / ||g_k||``.
* `f_mtl` is the transform: ``f_mtl(balancer)`` aggregates ``J`` and ``H`` *separately* with
  the balancer (two independent states) and adds the results, as the authors do
  (``param.grad = agg(g) + agg(h)``). It reads ``H`` from the ``flat_jacobian`` extra arg::

      fn = mtl.f_mtl_value_and_jacobian(loss_fn, rho=2.0)
      tx = optax.chain(mtl.f_mtl(mtl.mgda()), mtl.sum_tasks(), optax.adam(1e-3))
      losses, jac, flat = fn(params, batch)
      updates, state = tx.update(jac, state, params, task_losses=losses, flat_jacobian=flat)

The authors' "a-" variants (aggregate the SAM gradients ``g_k + h_k`` directly) are any
balancer applied to ``jax.tree.map(jnp.add, jac, flat)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_jax import jacobian as jac_lib
from mtl_jax.transforms import _seed_utils as tu

PyTree = Any


def _group_norms(rows: list[jax.Array], groups: list[Any]) -> list[jax.Array]:
    """Per leaf, the [K] norms of each task row over all leaves sharing the leaf's group."""
    sq = [jnp.sum(jnp.reshape(r, (r.shape[0], -1)).astype(jnp.float32) ** 2, axis=1) for r in rows]
    totals: dict[Any, jax.Array] = {}
    for g, s in zip(groups, sq, strict=True):
        totals[g] = totals[g] + s if g in totals else s
    return [jnp.sqrt(totals[g]) for g in groups]


def task_perturbations(
    jac: PyTree,
    params: PyTree,
    rho: float,
    *,
    adaptive: bool = False,
    param_labels: PyTree | Callable[[PyTree], PyTree] | None = None,
    eps: float = 1e-12,
) -> PyTree:
    """The K per-task SAM perturbations ``eps_k`` as a Jacobian-shaped pytree [K, *param].

    ``eps_k = rho * T^2 g_k / ||T g_k||`` with ``T = |theta|`` when ``adaptive`` (ASAM) and
    ``T = 1`` otherwise. With ``param_labels`` the norm is taken separately within each label
    group (the authors normalize the shared encoder and each task head separately).
    """
    leaves, treedef = jax.tree_util.tree_flatten(jac)
    p_leaves = treedef.flatten_up_to(params)
    groups = tu.aligned_leaves(param_labels, jac, params, None, "param_labels")
    scaled = [
        (jnp.abs(p)[None] * g if adaptive else g) for g, p in zip(leaves, p_leaves, strict=True)
    ]
    norms = _group_norms(scaled, groups)
    out = []
    for g, p, n in zip(leaves, p_leaves, norms, strict=True):
        scale = rho / (n + eps)
        direction = (jnp.square(p)[None] * g) if adaptive else g
        pert = direction.astype(jnp.float32) * jnp.reshape(scale, (-1,) + (1,) * (g.ndim - 1))
        out.append(pert.astype(g.dtype))
    return treedef.unflatten(out)


def f_mtl_value_and_jacobian(
    fun: Callable[..., Any],
    rho: float = 2.0,
    *,
    adaptive: bool = True,
    param_labels: PyTree | Callable[[PyTree], PyTree] | None = None,
    has_aux: bool = False,
    strategy: jac_lib.Strategy = "auto",
) -> Callable[..., Any]:
    """Wraps a per-task loss function to return the F-MTL (flat-region) Jacobians.

    Costs two forward passes and 2K backward passes: one `mtl.value_and_jacobian` at
    ``theta`` giving ``g_k``, then, for each task k, the gradient of loss k alone at
    ``theta + eps_k``. Differentiates the first positional argument.

    Args:
      fun: ``fun(params, *args, **kwargs)`` returning the [K] per-task losses (or
        ``(losses, aux)`` with ``has_aux``).
      rho: perturbation radius (``--rho``, default 2 in the authors' NYUv2 script). ``rho=0``
        gives a zero flat Jacobian, i.e. plain training.
      adaptive: ASAM-style perturbation ``rho * theta^2 g / || |theta| g ||`` (the authors'
        ``--adaptive``, default True).
      param_labels: optional pytree (structure of the parameters) or function of the
        parameters giving a label per leaf; the perturbation of each task is normalized
        separately within each label group. The authors normalize the shared encoder and
        the task heads separately: pass e.g. ``mtl.label_by_path(params, 'heads')``. None
        normalizes over all parameters (plain per-task SAM).
      has_aux: as in `mtl.value_and_jacobian`; aux is from the unperturbed pass.
      strategy: how the K perturbed gradients are laid out: ``'vmap'``, ``'unrolled'``
        (a Python loop of K VJPs, fastest on CPU) or ``'auto'`` (as `mtl.auto_strategy`).

    Returns:
      A function with ``fun``'s signature returning ``(losses, jac, flat_jac)`` (or
      ``((losses, aux), jac, flat_jac)``): ``jac`` as from `mtl.value_and_jacobian`, and
      ``flat_jac`` with rows ``h_k = grad L_k(theta + eps_k) - g_k``, same shapes and dtypes.

    Example:
      >>> import jax.numpy as jnp, mtl_jax as mtl
      >>> f = lambda w: jnp.stack([jnp.sum(w ** 4), jnp.sum((w - 1.0) ** 2)])
      >>> fn = mtl.f_mtl_value_and_jacobian(f, rho=0.1, adaptive=False)
      >>> losses, jac, flat = fn(jnp.ones(3))
      >>> flat.shape
      (2, 3)

    References:
      Phan, Tran, Tran, Tran, Truong, Lei, Ho, Phung, Le. Improving Multi-task Learning via
      Seeking Task-based Flat Regions, arXiv 2211.13723 (2022); published as Beyond Losses
      Reweighting: Empowering Multi-Task Learning via the Generalization Perspective, ICCV
      2025.

      Checked against: authors' code, github.com/VietHoang1512/FS-MTL ``nyuv2/train.py``
      (stages 1 and 2 of the training loop).
    """
    if not rho >= 0:
        raise ValueError(f"f_mtl_value_and_jacobian: rho must be >= 0, got {rho}.")
    if strategy not in jac_lib.STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r}; valid: {', '.join(jac_lib.STRATEGIES)}.")
    vaj = jac_lib.value_and_jacobian(fun, has_aux=has_aux, strategy=strategy)

    @functools.wraps(fun)
    def wrapped(params, *args, **kwargs):
        out, jac = vaj(params, *args, **kwargs)
        losses = out[0] if has_aux else out
        k = losses.shape[0]
        perts = task_perturbations(jac, params, rho, adaptive=adaptive, param_labels=param_labels)

        def task_grad(pert, onehot):
            shifted = jax.tree.map(lambda p, e: p + e.astype(p.dtype), params, pert)

            def losses_at(p):
                res = fun(p, *args, **kwargs)
                return res[0] if has_aux else res

            _, vjp_fn = jax.vjp(losses_at, shifted)
            return vjp_fn(onehot.astype(losses.dtype))[0]

        eye = jnp.eye(k, dtype=losses.dtype)
        layout = jac_lib.auto_strategy(k)[0] if strategy == "auto" else strategy
        if layout == "unrolled":
            rows = [task_grad(jax.tree.map(lambda e, i=i: e[i], perts), eye[i]) for i in range(k)]
            sam_jac = jax.tree.map(lambda *xs: jnp.stack(xs), *rows)
        else:
            sam_jac = jax.vmap(task_grad)(perts, eye)
        flat = jax.tree.map(lambda s, g: (s - g).astype(g.dtype), sam_jac, jac)
        return out, jac, flat

    return wrapped


class FMTLState(NamedTuple):
    """State of `f_mtl`: the states of the two aggregations."""

    loss_state: Any
    flat_state: Any


def _identity() -> optax.GradientTransformationExtraArgs:
    return optax.GradientTransformationExtraArgs(
        lambda params: optax.EmptyState(),
        lambda updates, state, params=None, **extra: (updates, state),
    )


def f_mtl(
    balancer: optax.GradientTransformation | None = None,
    flat_balancer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
    """F-MTL aggregation: ``balancer(J) + flat_balancer(H)``, a Jacobian -> Jacobian transform.

    ``J`` is the Jacobian being transformed (rows ``g_k``) and ``H`` the flat Jacobian from
    `f_mtl_value_and_jacobian` (rows ``h_k``), passed as the ``flat_jacobian`` extra arg. The
    two are aggregated separately, each with its own state, and the results added row-wise,
    so ``optax.chain(mtl.f_mtl(b), mtl.sum_tasks())`` gives ``agg(g) + agg(h)`` as in the
    authors' code. With ``rho = 0`` (``H = 0``) it reduces to ``balancer`` (for balancers that
    map a zero Jacobian to zero, as all re-combination methods do).

    Inside `mtl.shared_only` the transform sees only the shared leaves; ``flat_jacobian`` may be
    given for all parameters and is restricted to the same leaves. The authors give each task
    head its SAM gradient ``g_k + h_k``: ``mtl.shared_only(mtl.f_mtl(b), labels,
    task_specific=mtl.f_mtl())``.

    Args:
      balancer: Jacobian -> Jacobian transform for ``J`` (None: identity, so the output rows
        are ``g_k + h_k``, the per-task SAM gradients).
      flat_balancer: transform for ``H`` (None: a second, independent copy of ``balancer``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its update requires
      ``flat_jacobian=...`` and forwards the other extra args (``task_losses``) to both
      aggregations.

    Example:
      >>> import jax.numpy as jnp, optax, mtl_jax as mtl
      >>> f = lambda w: jnp.stack([jnp.sum(w ** 4), jnp.sum((w - 1.0) ** 2)])
      >>> w = jnp.ones(3)
      >>> losses, jac, flat = mtl.f_mtl_value_and_jacobian(f, rho=0.1)(w)
      >>> tx = optax.chain(mtl.f_mtl(mtl.mean_tasks()), optax.sgd(0.1))
      >>> upd, _ = tx.update(jac, tx.init(w), w, flat_jacobian=flat)

    References:
      Phan et al. Improving Multi-task Learning via Seeking Task-based Flat Regions, arXiv
      2211.13723 (2022) / ICCV 2025.

      Checked against: authors' code, github.com/VietHoang1512/FS-MTL ``nyuv2/train.py``
      (methods ``mgda`` / ``pcgrad`` / ``cagrad``: ``agg(g) + agg(h)``). Difference: the
      aggregation is any mtl_jax transform; the authors' ``mgda`` additionally normalizes
      each ``g_k`` and ``h_k`` and multiplies by K (a balancer choice, see the tests).
    """
    inner_g = balancer if balancer is not None else _identity()
    inner_h = flat_balancer if flat_balancer is not None else inner_g

    def init_fn(params):
        return FMTLState(inner_g.init(params), inner_h.init(params))

    def update_fn(updates, state, params=None, *, flat_jacobian=None, **extra_args):
        if flat_jacobian is None:
            raise ValueError(
                "f_mtl needs the flat Jacobian: call tx.update(jac, state, params, "
                "flat_jacobian=flat) with the output of mtl.f_mtl_value_and_jacobian."
            )
        leaves, treedef = tu.flatten(updates)
        try:
            flat_leaves = treedef.flatten_up_to(flat_jacobian)
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"f_mtl: flat_jacobian must have the structure of the Jacobian: {e}"
            ) from None
        flat_leaves = [
            u if tu.is_masked(u) else jnp.asarray(h).astype(u.dtype)
            for u, h in zip(leaves, flat_leaves, strict=True)
        ]
        for u, h in zip(leaves, flat_leaves, strict=True):
            if not tu.is_masked(u) and u.shape != h.shape:
                raise ValueError(
                    f"f_mtl: flat_jacobian leaf has shape {h.shape}, the Jacobian {u.shape}."
                )
        flat = treedef.unflatten(flat_leaves)
        out_g, g_state = inner_g.update(updates, state.loss_state, params, **extra_args)
        out_h, h_state = inner_h.update(flat, state.flat_state, params, **extra_args)
        out = jax.tree.map(lambda a, b: (a + b).astype(a.dtype), out_g, out_h)
        return out, FMTLState(g_state, h_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
