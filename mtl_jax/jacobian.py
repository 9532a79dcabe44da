"""Per-task Jacobian engine and task-axis utilities.

A multi-task loss function returns a vector of K per-task losses. Its per-task Jacobian is a
pytree shaped like the parameters whose every leaf has a leading task axis of size K: row k is
the gradient of loss k. Everything else in mtl_jax consumes that pytree.

The engine computes it with one forward pass (a single `jax.vjp`) and K vector-Jacobian
products against one-hot cotangents. How the K products are laid out matters a lot by backend
(see `benchmarks/jacobian.py` and the README table), so several strategies are offered:

* ``'unrolled'``: the K VJP calls are unrolled in the traced graph (fastest on CPU).
* ``'vmap'``: one VJP vmapped over the K one-hot cotangents (a single batched backward pass;
  the usual choice on accelerators, but about twice the temporary memory).
* ``chunk_size=c``: vmap over chunks of ``c`` cotangents, the chunks unrolled; bounds the
  memory of the batched backward pass for hundreds of tasks.
* ``'auto'``: picks one of the above from the backend and K (see `auto_strategy`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Strategy = Literal["auto", "vmap", "unrolled"]
STRATEGIES = ("auto", "vmap", "unrolled")

# K above which 'auto' stops unrolling on CPU: the graph (and compile time) grows with K.
_CPU_UNROLL_MAX_TASKS = 64
_CPU_LARGE_K_CHUNK = 8


def auto_strategy(num_tasks: int, backend: str | None = None) -> tuple[str, int | None]:
    """The (strategy, chunk_size) that ``strategy='auto'`` uses.

    Chosen from `benchmarks/jacobian.py` (see the README): on CPU, unrolled VJP calls beat
    the batched (vmap) backward pass by 2-3x at every K measured and use less memory; beyond
    `_CPU_UNROLL_MAX_TASKS` tasks the graph is chunked to keep compile time bounded. On GPU
    and TPU a batched backward pass fills the device better, so ``'vmap'`` is used.
    """
    backend = backend or jax.default_backend()
    if backend == "cpu":
        if num_tasks <= _CPU_UNROLL_MAX_TASKS:
            return "unrolled", None
        return "vmap", _CPU_LARGE_K_CHUNK
    return "vmap", None


def check_losses(losses: Any) -> None:
    shape = getattr(losses, "shape", None)
    if shape is None or len(shape) != 1:
        got = f"a {type(losses).__name__}" if shape is None else f"shape {tuple(shape)}"
        raise ValueError(
            "value_and_jacobian: `fun` must return a 1-D vector of per-task losses (shape [K]); "
            f"got {got}. "
            "Stack the task losses, e.g. `jnp.stack([loss_a, loss_b])`."
        )
    if shape[0] == 0:
        raise ValueError("value_and_jacobian: `fun` returned an empty loss vector (K = 0).")


def _stack_rows(rows: Sequence[PyTree]) -> PyTree:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *rows)


def _concat_chunks(chunks: Sequence[PyTree]) -> PyTree:
    if len(chunks) == 1:
        return chunks[0]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *chunks)


def jacobian_rows(
    vjp_fn: Callable[[jax.Array], PyTree],
    num_tasks: int,
    dtype: Any,
    strategy: Strategy = "auto",
    chunk_size: int | None = None,
) -> PyTree:
    """Calls ``vjp_fn`` on the K one-hot cotangents and stacks the results on a task axis.

    This is the engine under `value_and_jacobian`; use it directly when you already hold a VJP
    function (e.g. the representation-level Jacobian of a shared encoder's output).

    Args:
      vjp_fn: a VJP function from ``jax.vjp`` of a function with a [K] output.
      num_tasks: K.
      dtype: dtype of the output (of the cotangents).
      strategy: ``'auto'``, ``'vmap'`` or ``'unrolled'``.
      chunk_size: if set, rows are computed ``chunk_size`` at a time (vmapped within a chunk,
        chunks unrolled). Overrides the strategy's own layout.

    Returns:
      Whatever ``vjp_fn`` returns, with every leaf given a leading axis of size K.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown Jacobian strategy {strategy!r}; valid: {', '.join(STRATEGIES)}.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}.")
    if strategy == "auto" and chunk_size is None:
        strategy, chunk_size = auto_strategy(num_tasks)
    eye = jnp.eye(num_tasks, dtype=dtype)
    if chunk_size is not None and chunk_size < num_tasks:
        batched = jax.vmap(vjp_fn)
        chunks = [batched(eye[s : s + chunk_size]) for s in range(0, num_tasks, chunk_size)]
        return _concat_chunks(chunks)
    if strategy == "unrolled":
        return _stack_rows([vjp_fn(eye[k]) for k in range(num_tasks)])
    return jax.vmap(vjp_fn)(eye)


def value_and_jacobian(
    fun: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    *,
    strategy: Strategy = "auto",
    chunk_size: int | None = None,
) -> Callable[..., Any]:
    """Creates a function that evaluates ``fun`` and its per-task Jacobian.

    ``fun`` returns a 1-D vector of K per-task losses (or ``(losses, aux)`` with
    ``has_aux=True``). The Jacobian costs one forward pass plus K backward passes: a single
    ``jax.vjp`` whose VJP function is applied to the K one-hot cotangents.

    Args:
      fun: function returning per-task losses of shape [K].
      argnums: as in ``jax.grad``: which positional argument(s) to differentiate.
      has_aux: as in ``jax.value_and_grad``.
      strategy: ``'auto'`` (default), ``'vmap'`` or ``'unrolled'``; see the module docstring.
      chunk_size: compute the K rows ``chunk_size`` at a time to bound memory.

    Returns:
      A function with the signature of ``fun`` returning ``(losses, jac)`` or
      ``((losses, aux), jac)``, where ``jac`` has the structure of ``args[argnums]`` and every
      leaf has shape ``[K, *param_leaf.shape]`` (a tuple of such pytrees when ``argnums`` is a
      sequence).

    Example:
      >>> import jax.numpy as jnp, mtl_jax as mtl
      >>> f = lambda w: jnp.stack([jnp.sum(w ** 2), jnp.sum(w)])
      >>> losses, jac = mtl.value_and_jacobian(f)(jnp.ones(3))
      >>> jac.shape
      (2, 3)
    """
    multiple = not isinstance(argnums, int)
    argnums_t = tuple(argnums) if multiple else (argnums,)

    @functools.wraps(fun)
    def wrapped(*args, **kwargs):
        for i in argnums_t:
            if i >= len(args):
                raise ValueError(
                    f"value_and_jacobian: argnums={argnums} but only {len(args)} positional "
                    "arguments were given."
                )

        def partial_fun(*diff_args):
            full = list(args)
            for i, a in zip(argnums_t, diff_args, strict=True):
                full[i] = a
            out = fun(*full, **kwargs)
            if has_aux:
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise ValueError(
                        "value_and_jacobian(has_aux=True): `fun` must return (losses, aux); "
                        f"got {type(out).__name__}."
                    )
                losses, aux = out
            else:
                losses, aux = out, None
            check_losses(losses)
            return losses, aux

        diff_args = tuple(args[i] for i in argnums_t)
        losses, vjp_fn, aux = jax.vjp(partial_fun, *diff_args, has_aux=True)
        jac = jacobian_rows(vjp_fn, losses.shape[0], losses.dtype, strategy, chunk_size)
        if not multiple:
            jac = jac[0]
        return ((losses, aux), jac) if has_aux else (losses, jac)

    return wrapped


# ----------------------------------------------------------------------------------------------
# Task-axis utilities.


def num_tasks(jac: PyTree, params: PyTree | None = None) -> int:
    """The size K of the task axis, after checking that ``jac`` is a per-task Jacobian.

    Args:
      jac: a pytree whose every leaf has a leading task axis.
      params: optional parameters; if given, every Jacobian leaf must be ``[K, *param.shape]``.
        This catches a plain gradient passed where a Jacobian is expected.

    Raises:
      ValueError: naming the offending leaf path and shapes.
    """
    leaves = jax.tree_util.tree_leaves_with_path(jac)
    if not leaves:
        raise ValueError("Expected a per-task Jacobian pytree, got an empty pytree.")
    k = None
    first_path = None
    for path, leaf in leaves:
        shape = jnp.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"Jacobian leaf {path_str(path)} is a scalar; every leaf needs a "
                "leading task axis [K, ...]. Did you pass a gradient instead of the Jacobian "
                "from mtl.value_and_jacobian?"
            )
        if k is None:
            k, first_path = shape[0], path
        elif shape[0] != k:
            raise ValueError(
                "Jacobian leaves disagree on the task axis: "
                f"{path_str(first_path)} has K={k} but "
                f"{path_str(path)} has shape {tuple(shape)}. Every leaf must be "
                "[K, *param_shape]; did you pass a gradient instead of a Jacobian?"
            )
    if params is not None:
        jac_paths = jax.tree_util.tree_structure(jac)
        par_paths = jax.tree_util.tree_structure(params)
        if jac_paths == par_paths:
            for (path, leaf), p in zip(leaves, jax.tree.leaves(params), strict=True):
                if tuple(jnp.shape(leaf)[1:]) != tuple(jnp.shape(p)):
                    raise ValueError(
                        f"Jacobian leaf {path_str(path)} has shape "
                        f"{tuple(jnp.shape(leaf))}, expected [K, *{tuple(jnp.shape(p))}] for "
                        "its parameter. Balancing transforms take the per-task Jacobian "
                        "(mtl.value_and_jacobian), not a gradient."
                    )
    return int(k)


def path_str(path: tuple[Any, ...]) -> str:
    """A readable pytree path for error messages (``'<root>'`` for a bare array)."""
    return jax.tree_util.keystr(path) or "<root>"


def _flat_rows(leaf: jax.Array) -> jax.Array:
    return jnp.reshape(leaf, (leaf.shape[0], -1))


def gramian(jac: PyTree) -> jax.Array:
    """The K x K Gramian ``G = J J^T`` of a per-task Jacobian, summed over leaves.

    Accumulates in float32 (or float64 when the leaves are float64) whatever the leaf dtype. With
    sharded parameters XLA turns the sum over a sharded leaf into one all-reduce. On a single
    CPU device, leaves of 32768 or more parameters per task are summed over column blocks (2x
    faster there); elsewhere each leaf is one dot.
    """
    k = num_tasks(jac)
    leaves = jax.tree.leaves(jac)
    acc = jnp.result_type(jnp.float32, *[leaf.dtype for leaf in leaves])
    g = jnp.zeros((k, k), acc)
    for leaf in leaves:
        rows = _flat_rows(leaf)
        if rows.shape[1] >= 2 * _GRAM_COLUMN_BLOCK and jax.device_count() == 1:
            # XLA's CPU dot of [K, n] x [n, K] with a long n runs far below the FLOP rate (35
            # GFLOP/s at K=40, 5 at K=3, on 2 cores): on CPU, sum the Gramians of [K, 16384]
            # column blocks instead (80 and 10 GFLOP/s), each block fitting in cache.
            # Measured in one process (`benchmarks/gramian.py`, README): [40, 1.1M] 128
            # -> 47 ms, [10, 1M] 17.5 -> 10.5 ms, [3, 23M] 221 -> 34 ms. Single-device only: a
            # dynamic slice of a sharded axis would gather it.
            part = jax.lax.platform_dependent(
                rows,
                cpu=functools.partial(_gram_by_column_blocks, acc=acc),
                default=functools.partial(_gram_dot, acc=acc),
            )
        else:
            part = _gram_dot(rows, acc)
        g = g + part
    return g


# Columns per block of `_gram_by_column_blocks` (8192-32768 measured equal at K = 3-40).
_GRAM_COLUMN_BLOCK = 16384


def _gram_by_column_blocks(rows: jax.Array, acc) -> jax.Array:
    """``rows @ rows.T`` as a sum over [K, c] column blocks (a fixed-trip `fori_loop`)."""
    k, n = rows.shape
    c = _GRAM_COLUMN_BLOCK
    m = n // c

    def body(i, g):
        x = jax.lax.dynamic_slice_in_dim(rows, i * c, c, axis=1)
        return g + _gram_matmul(x, acc)

    g = jax.lax.fori_loop(0, m, body, jnp.zeros((k, k), acc))
    if m * c < n:
        g = g + _gram_matmul(rows[:, m * c :], acc)
    return g


def _gram_matmul(rows: jax.Array, acc) -> jax.Array:
    return jnp.matmul(rows, rows.T, preferred_element_type=acc, precision=jax.lax.Precision.HIGHEST)


def _gram_dot(rows: jax.Array, acc) -> jax.Array:
    """``rows @ rows.T`` in one dot (few tasks: through the [K * b, n / b] view below)."""
    k = rows.shape[0]
    blocks = _gram_blocks(k, rows.shape[1])
    # Few tasks: view each row as b contiguous column blocks ([K * b, n / b], a free reshape),
    # take that matrix's Gramian and sum its b diagonal blocks. Same sum; but XLA's CPU dot is
    # far below memory speed for [K, n] x [n, K] with small K (measured, one process: [3, 23M]
    # 255 -> 85 ms, [10, 1.1M] 75 -> 24 ms with b = 8), and the b-fold FLOPs are cheap while
    # K * b stays small. Used for small leaves and on meshes.
    full = _gram_matmul(rows.reshape(k * blocks, -1), acc)
    if blocks > 1:
        full = jnp.trace(full.reshape(k, blocks, k, blocks), axis1=1, axis2=3)
    return full


def _gram_blocks(k: int, n: int) -> int:
    """Column blocks per row for `_gram_dot`: 8 up to 12 tasks (best of 1-16 measured at K=3 and
    K=10), 1 beyond (no gain at K=40), at most n / 4096, and a divisor of n."""
    b = min(8 if k <= 12 else 1, max(1, n // 4096))
    while b > 1 and n % b:
        b -= 1
    return b


def scale_rows(jac: PyTree, weights: jax.Array) -> PyTree:
    """``diag(weights) @ J``: row k of every leaf multiplied by ``weights[k]``."""

    def scale(leaf):
        w = weights.astype(leaf.dtype) if weights.dtype != leaf.dtype else weights
        return leaf * jnp.reshape(w, (-1,) + (1,) * (leaf.ndim - 1))

    return jax.tree.map(scale, jac)


def combine_rows(jac: PyTree, matrix: jax.Array) -> PyTree:
    """``matrix @ J`` for a [K_out, K] matrix: each output row a combination of task rows."""

    def combine(leaf):
        rows = _flat_rows(leaf)
        out = jnp.matmul(matrix.astype(rows.dtype), rows, precision=jax.lax.Precision.HIGHEST)
        return jnp.reshape(out, (matrix.shape[0],) + leaf.shape[1:])

    return jax.tree.map(combine, jac)


def weighted_sum(jac: PyTree, weights: jax.Array) -> PyTree:
    """``weights @ J``: the gradient-shaped combination ``sum_k weights[k] * J[k]``.

    A contraction (a dot), not ``jnp.sum(weights[:, None] * J, axis=0)``: on XLA CPU a
    reduction over the leading axis of a [40, 4096, 256] leaf is 35-70x slower than the dot.
    """

    def reduce(leaf):
        return jnp.tensordot(weights.astype(leaf.dtype), leaf, axes=1)

    return jax.tree.map(reduce, jac)


def combination_weights(jac: PyTree, grad: PyTree, gram: jax.Array | None = None) -> jax.Array:
    """The task weights of a combined gradient: ``lambda`` with ``J^T lambda`` closest to ``d``.

    ``lambda = pinv(G) J d`` for the Jacobian ``J`` (leaves with a leading task axis), its
    Gramian ``G = J J^T`` and a gradient ``d`` (the same leaves without it), e.g. what
    ``mtl.chain(method, mtl.sum_tasks())`` returned. Exact for every method whose output is a
    combination of the task gradients (``d = sum_k lambda_k g_k``: MGDA, PCGrad, UPGrad,
    Nash-MTL, a scalarization, ...) when the task gradients are linearly independent; the
    minimum-norm such weights otherwise; the least-squares fit for the others (GradDrop,
    TrimmedMean, sparse training). For logging what a balancer did in a training loop (the
    harness logs it as ``train/weight/<task>``); costs one read of ``J`` (plus the Gramian if not
    given) and a K x K pseudo-inverse, in float32 with relative cut-off ``10 K eps``.

    Args:
      jac: the Jacobian pytree (leading task axis K).
      grad: the gradient pytree, same structure without the task axis.
      gram: ``J J^T`` if already computed (`gramian` of the same leaves).

    Returns:
      [K] float32 weights.
    """
    leaves = jax.tree.leaves(jac)
    grads = jax.tree.leaves(grad)
    if len(leaves) != len(grads):
        raise ValueError(
            f"combination_weights: jac has {len(leaves)} leaves but grad has {len(grads)}; "
            "pass the gradient of the same parameters (no task axis)."
        )
    jd = sum(
        jnp.tensordot(j.astype(jnp.float32), g.astype(jnp.float32), axes=g.ndim)
        for j, g in zip(leaves, grads, strict=True)
    )
    g = gram if gram is not None else gramian(jac)
    k = g.shape[0]
    cutoff = 10 * k * jnp.finfo(jnp.float32).eps
    return jnp.linalg.pinv(g.astype(jnp.float32), rtol=cutoff, hermitian=True) @ jd


def reduce_rows(
    leaf: jax.Array,
    fn: Callable[[jax.Array], jax.Array] | None = None,
    op: Callable[[jax.Array, jax.Array], jax.Array] = jnp.add,
    weights: Sequence[float] | None = None,
) -> jax.Array:
    """``op``-reduction over the task axis of ``fn(row)``: ``fn(J[0]) op ... op fn(J[K-1])``.

    For elementwise reductions across tasks (a sum of absolute values, a maximum) of one
    Jacobian leaf [K, ...]. Written as a chain of K row slices, which XLA fuses with ``fn`` into
    a single pass over the leaf: on XLA CPU ``jnp.sum(jnp.abs(x), axis=0)`` over a
    [40, 4096, 256] leaf took 35x longer, ``jnp.max(x, axis=0)`` 12x. For a plain (weighted) sum
    use `weighted_sum` (a dot, about twice as fast again).

    Args:
      leaf: [K, ...] Jacobian leaf.
      fn: elementwise function applied to each row first (default identity).
      op: associative binary elementwise reduction (default ``jnp.add``).
      weights: optional static [K] factors (Python floats or a NumPy vector) each row is
        multiplied by after ``fn``: ``sum_k w_k fn(J_k)`` with the default ``op``.

    Returns:
      An array of shape ``leaf.shape[1:]``.
    """
    rows = [leaf[k] if fn is None else fn(leaf[k]) for k in range(leaf.shape[0])]
    if weights is not None:
        rows = [w * row for w, row in zip(np.asarray(weights).tolist(), rows, strict=True)]
    out = rows[0]
    for row in rows[1:]:
        out = op(out, row)
    return out


# ----------------------------------------------------------------------------------------------
# Large-K path: the Gramian and the combined gradient without ever holding the K x P Jacobian.


def value_and_gramian(
    fun: Callable[..., Any],
    argnums: int = 0,
    has_aux: bool = False,
    *,
    chunk_size: int = 8,
) -> Callable[..., Any]:
    """Evaluates ``fun``, the K x K Gramian of its Jacobian, and a VJP to combine the rows.

    For hundreds or thousands of tasks the Jacobian (K x P) may not fit in memory. Every
    Gramian-based method's output is a combination ``v^T J`` of the task gradients (a row
    re-combination ``A J`` is reduced by `sum_tasks` to ``(A^T 1)^T J``), so it only needs
    the Gramian and one more backward pass. This computes, with one linearization of ``fun``:

    * ``G[rows c, :] = J (J_c)^T`` chunk by chunk: ``chunk_size`` VJPs give the rows ``J_c``,
      then ``chunk_size`` JVPs of the same linearization give their inner products with every
      task gradient. Peak memory is ``chunk_size`` rows, not K; the cost is K VJPs + K JVPs.
    * ``combine(v)``: one VJP, returning the gradient-shaped ``v^T J``.

    Args:
      fun: returns per-task losses [K] (or ``(losses, aux)`` with ``has_aux``).
      argnums: which positional argument to differentiate (an int).
      has_aux: as in ``jax.value_and_grad``.
      chunk_size: rows per chunk (memory vs. loop overhead). The chunks run in a ``lax.map``.

    Returns:
      A function returning ``(losses, gramian, combine)`` (``((losses, aux), gramian, combine)``
      with ``has_aux``), to be called inside ``jit``. ``combine`` maps [K] weights to a pytree
      shaped like ``args[argnums]``.

    Example:
      >>> losses, g, combine = mtl.value_and_gramian(loss_fn)(params, batch)  # doctest: +SKIP
      >>> grad = combine(mtl.mgda_weights(g))                                   # doctest: +SKIP
    """
    if not isinstance(argnums, int):
        raise ValueError("value_and_gramian takes a single integer argnums.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}.")

    def wrapped(*args, **kwargs):
        def partial_fun(x):
            full = list(args)
            full[argnums] = x
            out = fun(*full, **kwargs)
            losses = out[0] if has_aux else out
            check_losses(losses)
            return out

        primal = args[argnums]
        if has_aux:
            losses, jvp_fn, aux = jax.linearize(partial_fun, primal, has_aux=True)
        else:
            losses, jvp_fn = jax.linearize(partial_fun, primal)
        transpose = jax.linear_transpose(jvp_fn, primal)
        vjp_fn = lambda v: transpose(v)[0]
        k = losses.shape[0]
        c = min(chunk_size, k)
        n_chunks = -(-k // c)
        eye = jnp.eye(n_chunks * c, k, dtype=losses.dtype).reshape(n_chunks, c, k)

        def gram_chunk(cotangents):
            rows = jax.vmap(vjp_fn)(cotangents)  # c rows of J, [c, *primal]
            return jax.vmap(jvp_fn)(rows)  # [c, K] = J_c J^T

        g = jax.lax.map(gram_chunk, eye).reshape(n_chunks * c, k)[:k]
        acc = jnp.result_type(jnp.float32, g.dtype)
        g = g.astype(acc)
        g = 0.5 * (g + g.T)

        def combine(weights):
            return vjp_fn(weights.astype(losses.dtype))

        head = (losses, aux) if has_aux else losses
        return head, g, combine

    return wrapped
