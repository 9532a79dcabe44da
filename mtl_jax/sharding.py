"""Device meshes and parameter sharding rules (data parallel, FSDP, model parallel).

A mesh is given by named axis sizes, e.g. ``{'data': 4, 'model': 2}`` (``-1``: all remaining
devices). Parameters are placed by regex rules on their path (big_vision style): the first rule
whose pattern matches the parameter path (``jax.tree_util.keystr``) gives its
``PartitionSpec``; unmatched parameters are replicated. With ``fsdp_axis='data'`` every
parameter additionally shards its largest evenly divisible dimension over the data axis
(ZeRO-3 / FSDP style), so parameter and optimizer memory shrink with the number of devices.

The per-task Jacobian follows its parameter's sharding with the task axis in front, never
sharded (`jacobian_sharding`): every Gramian-based method then sees the same K x K Gramian
whatever the mesh (a sum over leaves becomes one all-reduce), and everything after it is in
K-space.

Example::

    mesh = mtl.sharding.make_mesh({'data': 4, 'model': 2})
    shardings = mtl.sharding.tree_shardings(
        params, mesh, rules=[(r"dense.*\\['w'\\]", (None, 'model'))], fsdp_axis='data')
    params = jax.device_put(params, shardings)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any
Rule = tuple[str, Sequence[str | None] | None]


def make_mesh(
    axes: Mapping[str, int] | Sequence[tuple[str, int]],
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh with named axes of the given sizes (one size may be -1: the remaining devices).

    Axis types are ``Auto`` (jax 0.10 defaults to ``Explicit``, under which jitting the
    Jacobian of a batch-sharded loss fails; see FACTS.md).

    Raises:
      ValueError: if the mesh needs more devices than are available, naming both numbers.
    """
    items = list(axes.items()) if isinstance(axes, Mapping) else [tuple(a) for a in axes]
    if not items:
        raise ValueError("A mesh needs at least one axis, e.g. {'data': -1}.")
    devices = list(devices if devices is not None else jax.devices())
    names = tuple(name for name, _ in items)
    sizes = [int(size) for _, size in items]
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f"At most one mesh axis may be -1; got {dict(items)}.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"Mesh axis sizes must be positive or -1; got {dict(items)}.")
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"Mesh {dict(items)}: {len(devices)} devices are not divisible by {known}."
            )
        sizes[sizes.index(-1)] = len(devices) // known
    need = int(np.prod(sizes))
    if need > len(devices):
        raise ValueError(
            f"Mesh {dict(zip(names, sizes, strict=True))} needs {need} devices but only "
            f"{len(devices)} are available (jax.devices()). Reduce the mesh, or on CPU simulate "
            "devices with XLA_FLAGS=--xla_force_host_platform_device_count=N."
        )
    grid = np.asarray(devices[:need], dtype=object).reshape(sizes)
    return Mesh(grid, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def _check_spec(path: str, shape: tuple[int, ...], spec: tuple, mesh: Mesh) -> None:
    if len(spec) > len(shape):
        raise ValueError(
            f"Sharding rule gives {P(*spec)} for parameter {path} of shape {shape}: "
            "more entries than dimensions."
        )
    for dim, axis in zip(shape, spec, strict=False):
        if axis is None:
            continue
        axis_names = axis if isinstance(axis, tuple) else (axis,)
        for a in axis_names:
            if a not in mesh.shape:
                raise ValueError(
                    f"Sharding rule for {path} names mesh axis {a!r}; the mesh has "
                    f"{tuple(mesh.shape)}."
                )
        size = int(np.prod([mesh.shape[a] for a in axis_names]))
        if dim % size:
            raise ValueError(
                f"Parameter {path} of shape {shape}: dimension {dim} is not divisible by mesh "
                f"axis {axis!r} of size {size} (rule {P(*spec)})."
            )


def _fsdp(shape: tuple[int, ...], spec: tuple, mesh: Mesh, axis: str) -> tuple:
    used = {a for s in spec if s is not None for a in (s if isinstance(s, tuple) else (s,))}
    if axis in used or mesh.shape[axis] == 1:
        return spec
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    size = mesh.shape[axis]
    candidates = [i for i, d in enumerate(shape) if spec[i] is None and d % size == 0]
    if not candidates:
        return spec  # too small or indivisible: stays replicated along the data axis
    best = max(candidates, key=lambda i: shape[i])
    return spec[:best] + (axis,) + spec[best + 1 :]


def partition_spec(
    path: str,
    shape: tuple[int, ...],
    mesh: Mesh,
    rules: Sequence[Rule] = (),
    fsdp_axis: str | None = None,
) -> P:
    """The ``PartitionSpec`` of one parameter from the rules (first match wins)."""
    spec: tuple = ()
    for pattern, rule_spec in rules:
        if re.search(pattern, path):
            spec = tuple(rule_spec or ())
            break
    _check_spec(path, shape, spec, mesh)
    if fsdp_axis is not None:
        if fsdp_axis not in mesh.shape:
            raise ValueError(f"fsdp_axis {fsdp_axis!r} is not a mesh axis of {dict(mesh.shape)}.")
        spec = _fsdp(shape, spec, mesh, fsdp_axis)
    return P(*spec)


def tree_shardings(
    tree: PyTree,
    mesh: Mesh,
    rules: Sequence[Rule] = (),
    fsdp_axis: str | None = None,
) -> PyTree:
    """``NamedSharding`` for every leaf of ``tree`` (parameters or anything shaped like them)."""

    def one(path, leaf):
        shape = tuple(np.shape(leaf))
        spec = partition_spec(jax.tree_util.keystr(path), shape, mesh, rules, fsdp_axis)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, tree)


def jacobian_sharding(param_sharding: NamedSharding) -> NamedSharding:
    """The sharding of a Jacobian leaf: the parameter's, behind an unsharded task axis."""
    return NamedSharding(param_sharding.mesh, P(None, *param_sharding.spec))


def mirror_shardings(tree: PyTree, params: PyTree, param_shardings: PyTree, mesh: Mesh) -> PyTree:
    """Shardings for a tree holding copies of the parameters (optimizer or balancer state).

    A leaf whose path ends with a parameter's path (e.g. ``[0].mu['trunk'][0]['kernel']`` for
    ``['trunk'][0]['kernel']``) takes that parameter's sharding if it has the parameter's shape,
    or its `jacobian_sharding` if it has shape ``[K, *param.shape]``; every other leaf (step
    counters, K-vectors, K x K matrices) is replicated.
    """
    by_path = {}
    for (path, p), sh in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(param_shardings), strict=True
    ):
        by_path[jax.tree_util.keystr(path)] = (tuple(np.shape(p)), sh)
    # Longest match first: ``['enc']['w']`` must win over a root-level ``['w']``.
    suffixes = sorted(by_path, key=len, reverse=True)

    def one(path, leaf):
        name, shape = jax.tree_util.keystr(path), tuple(np.shape(leaf))
        for suffix in suffixes:
            if name.endswith(suffix):
                p_shape, sh = by_path[suffix]
                if shape == p_shape:
                    return sh
                if shape[1:] == p_shape and len(shape) == len(p_shape) + 1:
                    return jacobian_sharding(sh)
                break
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, data_axis: str = "data") -> NamedSharding:
    """Leading (batch) dimension split over the data axis, the rest replicated."""
    return NamedSharding(mesh, P(data_axis))
