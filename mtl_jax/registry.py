"""Balancing methods by name: the explicit list the harness and the common tests use.

No import-time registration: a name here is looked up with ``getattr(mtl_jax, name)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import optax

from mtl_jax.transforms import base

# Jacobian -> Jacobian balancing methods (README method table; METHODS.md section 1).
JACOBIAN_METHODS: tuple[str, ...] = (
    "scalarize",
    # -- Jacobian-level methods (issue 4) go here --
    # part A
    "mgda",
    "upgrad",
    "dualproj",
    "imtl_g",
    "aligned_mtl",
    "conflict_free",
    "krum",
    "trimmed_mean",
    # part B
    "pcgrad",
    "cagrad",
    "graddrop",
    "gradvac",
    "nash_mtl",
    "fairgrad",
    "moco",
    "sdmgrad",
    "modo",
    # part C (f_mtl needs the flat_jacobian extra arg and rep_mtl is a loss term: not here)
    "fuller",
    "sparse_training",
)

# Loss-level methods: weights from losses, rows scaled (METHODS.md section 2).
LOSS_METHODS: tuple[str, ...] = (
    # -- loss-level methods (issue 5) go here --
    # part E (seed-paper loss-level methods)
    "igb",
    "coba",
    "worst_task",
    "median_normalize",
    "inverse_variance",
    "adaptive_task_balancing",
    "task_schedule",
    "log_class_scaling",
    # part D (LibMTL loss-level methods)
    "uncertainty_weighting",
    "gradnorm",
    "dwa",
    "rlw",
    "gls",
    "imtl_l",
    "db_mtl",
    "famo",
    "stch",
    "excess_mtl",
)

BALANCERS: tuple[str, ...] = JACOBIAN_METHODS + LOSS_METHODS
REDUCERS: tuple[str, ...] = ("sum_tasks", "mean_tasks")


def _factory(name: str):
    import mtl_jax  # local import: mtl_jax imports this module

    if name not in BALANCERS + REDUCERS or not hasattr(mtl_jax, name):
        raise ValueError(
            f"Unknown balancing method {name!r}. Valid names: {', '.join(sorted(BALANCERS))}; "
            f"reducers: {', '.join(REDUCERS)}."
        )
    return getattr(mtl_jax, name)


def get_balancer(name: str, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
    """Builds the balancing transform ``name`` with ``kwargs``.

    Raises:
      ValueError: for an unknown name (listing the valid ones) or keyword arguments the method
        does not accept (listing the ones it does).
    """
    check_arguments(name, kwargs)
    return _factory(name)(**kwargs)


def check_arguments(name: str, kwargs: Mapping[str, Any]) -> None:
    """Checks that method ``name`` exists and accepts ``kwargs``, without building it.

    Raises:
      ValueError: as `get_balancer`.
    """
    sig = inspect.signature(_factory(name))
    try:
        sig.bind(**kwargs)
    except TypeError as e:
        accepted = ", ".join(p.name for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD)
        raise ValueError(
            f"Bad arguments for balancing method {name!r}: {e}. It accepts: {accepted or '(none)'}."
        ) from None


def build_chain(
    specs: Sequence[Mapping[str, Any] | str], num_tasks: int | None = None
) -> optax.GradientTransformationExtraArgs:
    """Chains Jacobian -> Jacobian methods given as names or ``{'name': ..., **kwargs}`` specs.

    The result (`mtl.chain`) still maps a Jacobian to a Jacobian; append a reducer
    (``mtl.chain(build_chain(...), mtl.sum_tasks())`` fuses the last row combination with it).

    Args:
      specs: method names, or mappings with a ``'name'`` and the method's keyword arguments
        (optionally nested under ``'kwargs'``).
      num_tasks: if given, passed to every method whose factory takes ``num_tasks`` and whose
        spec does not set it.
    """
    txs = []
    for spec in specs:
        if isinstance(spec, str):
            name, kwargs = spec, {}
        else:
            spec = dict(spec)
            if "name" not in spec:
                raise ValueError(f"Balancer spec {spec!r} has no 'name' field.")
            name = spec.pop("name")
            kwargs = dict(spec.pop("kwargs", {}), **spec)
        if num_tasks is not None and "num_tasks" in inspect.signature(_factory(name)).parameters:
            kwargs.setdefault("num_tasks", num_tasks)
        txs.append(get_balancer(name, **kwargs))
    return base.chain(*txs)
