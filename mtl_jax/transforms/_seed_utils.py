"""Small pytree helpers shared by the seed-method transforms (FULLER, sparse training, F-MTL).

They let a transform take a label / mask pytree with the structure of the *full* parameters
and still work inside ``optax.partition`` / `mtl.shared_only`, where the updates it sees carry
``optax.MaskedNode`` in place of the leaves of the other partition.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import optax

PyTree = Any


def is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def flatten(tree: PyTree) -> tuple[list[Any], Any]:
    """Leaves and treedef of ``tree``, with ``optax.MaskedNode`` kept as a leaf."""
    return jax.tree_util.tree_flatten(tree, is_leaf=is_masked)


def row_shapes(jac: PyTree) -> PyTree:
    """One Jacobian row as ``ShapeDtypeStruct`` leaves: what a parameter-shaped label fn sees."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), jac, is_leaf=is_masked
    )


def aligned_leaves(
    spec: PyTree | Callable[[PyTree], PyTree] | None,
    updates: PyTree,
    params: PyTree | None,
    default: Any,
    name: str,
) -> list[Any]:
    """The entries of ``spec`` (labels, flags) aligned with the leaves of ``updates``.

    Args:
      spec: a pytree with the structure of the parameters, a function of the parameters
        returning one, a string (a regular expression searched in each leaf's path as written
        by ``jax.tree_util.keystr``, e.g. ``"encoder.*fc"``: True where it matches, False
        elsewhere; the form a config string can carry), or None (every leaf gets ``default``).
      updates: the Jacobian pytree the transform received (may contain ``MaskedNode``).
      params: the parameters passed to the update (a callable ``spec`` is called on them; on
        one Jacobian row's shapes when they are not given).
      default: value for every leaf when ``spec`` is None.
      name: the argument name, for error messages.
    """
    leaves, treedef = flatten(updates)
    if spec is None:
        return [default] * len(leaves)
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as e:
            raise ValueError(f"{name}={spec!r} is not a valid regular expression: {e}.") from None
        paths = jax.tree_util.tree_flatten_with_path(updates, is_leaf=is_masked)[0]
        flags = [bool(pattern.search(jax.tree_util.keystr(p))) for p, _ in paths]
        if not any(flags):
            shown = ", ".join(jax.tree_util.keystr(p) for p, _ in paths[:8])
            raise ValueError(
                f"{name}={spec!r} matches none of the parameter paths (e.g. {shown}); "
                "write a regular expression searched in these paths."
            )
        return flags
    if callable(spec):
        spec = spec(params if params is not None else row_shapes(updates))
    try:
        return treedef.flatten_up_to(spec)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{name} must have the structure of the parameters (or be a function of them "
            f"returning one): {e}"
        ) from None
