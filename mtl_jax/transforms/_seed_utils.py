"""Small pytree helpers shared by the seed-method transforms (FULLER, sparse training, F-MTL).

They let a transform take a label / mask pytree with the structure of the *full* parameters
and still work inside ``optax.partition`` / `mtl.shared_only`, where the updates it sees carry
``optax.MaskedNode`` in place of the leaves of the other partition.
"""

from __future__ import annotations

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
        returning one, or None (every leaf gets ``default``).
      updates: the Jacobian pytree the transform received (may contain ``MaskedNode``).
      params: the parameters passed to the update (a callable ``spec`` is called on them; on
        one Jacobian row's shapes when they are not given).
      default: value for every leaf when ``spec`` is None.
      name: the argument name, for error messages.
    """
    leaves, treedef = flatten(updates)
    if spec is None:
        return [default] * len(leaves)
    if callable(spec):
        spec = spec(params if params is not None else row_shapes(updates))
    try:
        return treedef.flatten_up_to(spec)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{name} must have the structure of the parameters (or be a function of them "
            f"returning one): {e}"
        ) from None
