"""Building blocks shared by the dense-prediction models (NHWC, Flax NNX).

Every module takes ``train`` explicitly in ``__call__`` (BatchNorm uses batch statistics and
updates its running averages when ``train=True``) and dropout takes an explicit PRNG key, so a
model is a pure function of ``(params, batch_stats, inputs, key)`` once split with `nnx.split`.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

# PyTorch's BatchNorm2d defaults (momentum 0.1 in PyTorch's convention is 0.9 in Flax's).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


_NHWC = ("NHWC", "HWIO", "NHWC")


def _same_or_explicit_pads(padding, in_hw, kernel_hw, strides, dilation):
    if isinstance(padding, str):
        eff = [d * (k - 1) + 1 for k, d in zip(kernel_hw, dilation, strict=True)]
        return [tuple(p) for p in jax.lax.padtype_to_pads(in_hw, eff, strides, padding)]
    return [tuple(int(v) for v in p) for p in padding]


def _pad_and_out_hw(x: jax.Array, kernel_hw, strides, pads, dilation):
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    ho, wo = (
        (n - d * (k - 1) - 1) // s + 1
        for n, k, s, d in zip(xp.shape[1:3], kernel_hw, strides, dilation, strict=True)
    )
    return xp, ho, wo


def _tap(xs: jax.Array, i: int, j: int, rows: int, wo: int, strides, dilation) -> jax.Array:
    """The input pixels kernel tap ``(i, j)`` meets for ``rows`` x ``wo`` outputs of ``xs``."""
    (sh, sw), (dh, dw) = strides, dilation
    start = (0, i * dh, j * dw, 0)
    limit = (xs.shape[0], i * dh + (rows - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, xs.shape[3])
    return jax.lax.slice(xs, start, limit, (1, sh, sw, 1))


def _shifted_matmul_conv(x: jax.Array, w: jax.Array, strides, pads, dilation) -> jax.Array:
    """``conv(x, w)`` (NHWC / HWIO) as a sum over kernel taps of strided-slice matmuls.

    Linear in ``w``; its transpose (the weight gradient) is one ``[C_in, B*H*W] x [B*H*W, C_out]``
    matmul per tap, which XLA's CPU backend runs faster than the weight-gradient convolution it
    emits for ``lax.conv_general_dilated``. Used for deep contractions (`_IM2COL_MAX_DEPTH`).
    """
    kh, kw, cin, cout = w.shape
    xp, ho, wo = _pad_and_out_hw(x, (kh, kw), strides, pads, dilation)
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = _tap(xp, i, j, ho, wo, strides, dilation).reshape(-1, cin)
            term = jnp.dot(tap, w[i, j], preferred_element_type=jnp.float32)
            out = term if out is None else out + term
    return out.reshape(x.shape[0], ho, wo, cout).astype(jnp.result_type(x.dtype, w.dtype))


# Bytes of im2col patches per block (a few per 2 MiB L2 cache), and the contraction length
# kh * kw * C_in above which the per-tap form was faster (measured: README "Benchmarks").
_IM2COL_BLOCK_BYTES = 3 << 19
_IM2COL_MAX_DEPTH = 2304


def _largest_divisor(n: int, fits: Callable[[int], bool]) -> int:
    return max([d for d in range(1, n + 1) if n % d == 0 and fits(d)] or [1])


def _blocked_im2col_conv(x: jax.Array, w: jax.Array, strides, pads, dilation) -> jax.Array:
    """``conv(x, w)`` (NHWC / HWIO) as one im2col matmul per cache-sized block of outputs.

    Linear in ``w``. A block is several whole samples, or some output rows of one sample when
    a sample's patches exceed `_IM2COL_BLOCK_BYTES`; ``jax.lax.map`` runs the blocks and
    ``jax.checkpoint`` makes the transpose re-build each block's patches instead of storing
    them all. The transpose -- the weight gradient -- is thus a loop of
    ``[kh*kw*C_in, rows] x [rows, C_out]`` matmuls on patches that stay in cache, which on CPU
    beats both the per-tap form (nine passes over the input and output gradient) and one
    whole-batch im2col (patches kh*kw times the input, written to and read from memory).
    """
    kh, kw, cin, cout = w.shape
    b = x.shape[0]
    xp, ho, wo = _pad_and_out_hw(x, (kh, kw), strides, pads, dilation)
    row_bytes = kh * kw * cin * x.dtype.itemsize  # the patches of one output pixel
    if ho * wo * row_bytes <= _IM2COL_BLOCK_BYTES:
        cb, rows = _largest_divisor(b, lambda d: d * ho * wo * row_bytes <= _IM2COL_BLOCK_BYTES), ho
    else:
        cb, rows = 1, _largest_divisor(ho, lambda r: r * wo * row_bytes <= _IM2COL_BLOCK_BYTES)
    num_b, num_r = b // cb, ho // rows
    in_rows = (rows - 1) * strides[0] + dilation[0] * (kh - 1) + 1
    w_mat = w.reshape(kh * kw * cin, cout)

    def block(index: jax.Array) -> jax.Array:
        n, r = index // num_r, index % num_r
        start = (n * cb, r * rows * strides[0], 0, 0)
        xs = jax.lax.dynamic_slice(xp, start, (cb, in_rows, xp.shape[2], cin))
        taps = [_tap(xs, i, j, rows, wo, strides, dilation) for i in range(kh) for j in range(kw)]
        patches = jnp.concatenate(taps, axis=-1).reshape(-1, kh * kw * cin)
        return jnp.dot(patches, w_mat, preferred_element_type=jnp.float32)

    if num_b * num_r == 1:
        out = block(jnp.zeros((), jnp.int32))[None]
    else:
        out = jax.lax.map(jax.checkpoint(block), jnp.arange(num_b * num_r))
    out = out.reshape(num_b, num_r, cb, rows, wo, cout).transpose(0, 2, 1, 3, 4, 5)
    return out.reshape(b, ho, wo, cout).astype(jnp.result_type(x.dtype, w.dtype))


# The forms of the kernel and input derivatives on CPU (`conv_general_dilated`'s
# ``cpu_kernel_grad`` and ``cpu_input_grad``).
CPU_KERNEL_GRADS = ("auto", "im2col", "per_tap", "xla")
CPU_INPUT_GRADS = ("auto", "phases", "xla")


def _cpu_linear_in_w(x: jax.Array, w: jax.Array, strides, pads, dilation, form: str):
    kh, kw, cin, _ = w.shape
    if form == "auto":
        form = "im2col" if kh * kw * cin <= _IM2COL_MAX_DEPTH else "per_tap"
    if form == "xla":
        return _xla_conv(x, w, strides, pads, dilation)
    fn = _blocked_im2col_conv if form == "im2col" else _shifted_matmul_conv
    return fn(x, w, strides, pads, dilation)


def _xla_conv(x: jax.Array, w: jax.Array, strides, pads, dilation) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, w, strides, pads, rhs_dilation=dilation, dimension_numbers=_NHWC
    )


def _phase_conv(x: jax.Array, w: jax.Array, strides, pads) -> jax.Array:
    """A strided, undilated ``conv(x, w)`` as a sum of stride-1 convolutions over input phases.

    Linear in ``x``. Output ``o`` reads input ``s*o + i - lo`` through tap ``i``; that input
    lies in phase ``(i - lo) mod s`` (the sub-image ``x[phase::s]``), at index ``o + c`` for
    a constant ``c`` per tap, so each phase meets the taps ``w[i0::s]`` in a stride-1 (VALID,
    after padding or cropping the phase by ``-c``) convolution. Its transpose -- the input
    gradient -- is stride-1 convolutions and interleaving, where XLA's transpose of a strided
    convolution is one over an input dilated with zeros (which it multiplies by).
    """
    kernel_hw, in_hw = w.shape[:2], x.shape[1:3]
    out_hw = [
        (n + lo + hi - k) // s + 1
        for n, (lo, hi), k, s in zip(in_hw, pads, kernel_hw, strides, strict=True)
    ]
    out = None
    for phase in itertools.product(*(range(s) for s in strides)):
        taps, crops = [], []
        per_axis = zip(phase, strides, kernel_hw, pads, in_hw, out_hw, strict=True)
        for p, s, k, (lo, _), n, o in per_axis:
            first = (p + lo) % s  # the first tap i with (i - lo) mod s == p
            num_taps, c = len(range(first, k, s)), (first - lo - p) // s
            taps.append(slice(first, None, s))
            crops.append((-c, o - 1 + c + num_taps - len(range(p, n, s)), 0))
        sub_w = w[taps[0], taps[1]]
        if sub_w.size == 0:  # a phase no tap reads (kernel smaller than the stride)
            continue
        xs = x[:, phase[0] :: strides[0], phase[1] :: strides[1], :]
        xs = jax.lax.pad(xs, jnp.zeros((), x.dtype), ((0, 0, 0), *crops, (0, 0, 0)))
        term = jax.lax.conv_general_dilated(xs, sub_w, (1, 1), "VALID", dimension_numbers=_NHWC)
        out = term if out is None else out + term
    return out


def _cpu_linear_in_x(x: jax.Array, w: jax.Array, strides, pads, dilation, form: str):
    if all(d == 1 for d in dilation) and (
        form == "phases" or (form == "auto" and any(s > 1 for s in strides))
    ):
        return _phase_conv(x, w, strides, pads)
    return _xla_conv(x, w, strides, pads, dilation)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def _conv_nhwc(x: jax.Array, w: jax.Array, strides, pads, dilation, forms) -> jax.Array:
    return _xla_conv(x, w, strides, pads, dilation)


@_conv_nhwc.defjvp
def _conv_nhwc_jvp(strides, pads, dilation, forms, primals, tangents):
    x, w = primals
    dx, dw = tangents
    kernel_form, input_form = forms
    out = _conv_nhwc(x, w, strides, pads, dilation, forms)
    # Both terms in a form linear in the tangent whose transpose is fast on CPU (input
    # phases; blocked im2col or tap matmuls), XLA's convolution elsewhere.
    d_from_x = jax.lax.platform_dependent(
        dx,
        w,
        cpu=lambda a, b: _cpu_linear_in_x(a, b, strides, pads, dilation, input_form),
        default=lambda a, b: _xla_conv(a, b, strides, pads, dilation),
    )
    d_from_w = jax.lax.platform_dependent(
        x,
        dw,
        cpu=lambda a, b: _cpu_linear_in_w(a, b, strides, pads, dilation, kernel_form),
        default=lambda a, b: _xla_conv(a, b, strides, pads, dilation),
    )
    return out, d_from_x + d_from_w.astype(d_from_x.dtype)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    *,
    cpu_kernel_grad: str = "auto",
    cpu_input_grad: str = "auto",
    **kwargs,
) -> jax.Array:
    """`jax.lax.conv_general_dilated` with fast gradients on XLA's CPU backend.

    Same signature and forward result; pass it as ``nnx.Conv(..., conv_general_dilated=...)``.
    For 2-D NHWC / HWIO convolutions without input dilation or grouping, the derivatives are
    defined (as a JVP, so forward and reverse mode both work) by forms linear in the tangent
    whose transposes XLA's CPU backend runs well:

    * w.r.t. the kernel, a loop over cache-sized blocks of im2col matmuls (contractions
      ``kh*kw*C_in <= 2304``) or a sum over kernel taps of strided-slice matmuls (deeper ones),
      where XLA's own is a batch-contracting convolution, its slowest convolution on CPU;
    * w.r.t. the input of a strided, undilated convolution, a sum of stride-1 convolutions over
      the input's phases, where XLA's own convolves an input dilated with zeros.

    Measured speed-ups (the benchmark CNN's and the full-resolution SegNet's convolutions):
    README "Benchmarks". On GPU/TPU (`jax.lax.platform_dependent`) XLA's own convolutions are
    used. Any other configuration is passed to `jax.lax.conv_general_dilated` unchanged.

    ``cpu_kernel_grad`` / ``cpu_input_grad`` pick the CPU forms by hand (e.g. to time them on
    another CPU, with ``functools.partial``): ``'auto'`` (the rules above), ``'im2col'``,
    ``'per_tap'`` or ``'xla'`` (XLA's own convolution) for the kernel; ``'auto'``,
    ``'phases'`` (also for a stride-1 convolution: one phase) or ``'xla'`` for the input
    (a dilated kernel always uses XLA's).
    """
    for name, value, valid in (
        ("cpu_kernel_grad", cpu_kernel_grad, CPU_KERNEL_GRADS),
        ("cpu_input_grad", cpu_input_grad, CPU_INPUT_GRADS),
    ):
        if value not in valid:
            raise ValueError(
                f"conv_general_dilated: unknown {name} {value!r}; valid: {', '.join(valid)}."
            )
    dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    ndim = lhs.ndim - 2
    ones = (1,) * ndim
    fast = (
        ndim == 2
        and dn == nhwc
        and tuple(lhs_dilation or ones) == ones
        and feature_group_count == 1
        and batch_group_count == 1
        and precision is None
        and preferred_element_type is None
        and not any(v is not None for v in kwargs.values())
    )
    if fast:
        strides = tuple(int(s) for s in window_strides)
        dilation = tuple(int(d) for d in (rhs_dilation or ones))
        pads = _same_or_explicit_pads(padding, lhs.shape[1:3], rhs.shape[:2], strides, dilation)
        fast = all(lo >= 0 and hi >= 0 for lo, hi in pads)
    if not fast:
        return jax.lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
            **kwargs,
        )
    forms = (cpu_kernel_grad, cpu_input_grad)
    return _conv_nhwc(lhs, rhs, strides, tuple(pads), dilation, forms)


_TRUNCATED_NORMAL_STD = 0.87962566103423978  # std of a standard normal truncated to [-2, 2]


def variance_scaling(scale: float, mode: str, distribution: str) -> Callable[..., jax.Array]:
    """`jax.nn.initializers.variance_scaling` (default axes), drawn as a flat vector.

    Returns the same values as the jax initializer for every shape (threefry draws the same
    bits for ``shape`` and for its flattening), but compiles the draw for a 1-D shape: on XLA's
    CPU backend a random draw of a 4-D kernel shape takes seconds to compile (2-5 s per distinct
    shape against 0.3 s flat, measured), so building SegNet-MTAN's 25 conv kernels took 19 s,
    14 of them compiling ``truncated_normal``.

    Args:
      scale: the variance scale (1 for Glorot / LeCun, 2 for He / Kaiming).
      mode: ``'fan_in'``, ``'fan_out'``, ``'fan_avg'`` or ``'fan_geo_avg'``.
      distribution: ``'truncated_normal'``, ``'normal'`` or ``'uniform'``.
    """
    modes = ("fan_in", "fan_out", "fan_avg", "fan_geo_avg")
    distributions = ("truncated_normal", "normal", "uniform")
    if mode not in modes:
        raise ValueError(f"variance_scaling: unknown mode {mode!r}; valid: {', '.join(modes)}.")
    if distribution not in distributions:
        raise ValueError(
            f"variance_scaling: unknown distribution {distribution!r}; "
            f"valid: {', '.join(distributions)}."
        )
    reference = jax.nn.initializers.variance_scaling(scale, mode, distribution)

    def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        shape = tuple(int(d) for d in shape)
        if len(shape) < 2:
            return reference(key, shape, dtype)
        receptive = math.prod(shape[:-2])
        fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
        fan = {
            "fan_in": fan_in,
            "fan_out": fan_out,
            "fan_avg": (fan_in + fan_out) / 2.0,
            "fan_geo_avg": math.sqrt(fan_in * fan_out),
        }[mode]
        std = math.sqrt(scale / max(1.0, fan))
        n = math.prod(shape)
        if distribution == "truncated_normal":
            unit = jax.random.truncated_normal(key, -2.0, 2.0, (n,), dtype)
            flat = std / _TRUNCATED_NORMAL_STD * unit
        elif distribution == "normal":
            flat = std * jax.random.normal(key, (n,), dtype)
        else:
            bound = math.sqrt(3.0) * std
            flat = jax.random.uniform(key, (n,), dtype, -bound, bound)
        return flat.reshape(shape)

    return init


# Glorot (Xavier) normal and LeCun normal, as in `jax.nn.initializers`, drawn flat.
xavier_normal = functools.partial(variance_scaling, 1.0, "fan_avg", "truncated_normal")
lecun_normal = functools.partial(variance_scaling, 1.0, "fan_in", "truncated_normal")


def conv(
    cin: int,
    cout: int,
    kernel: int,
    *,
    rngs: nnx.Rngs,
    stride: int = 1,
    dilation: int = 1,
    use_bias: bool = True,
    kernel_init=None,
) -> nnx.Conv:
    """A 2-D convolution with PyTorch's explicit padding ``dilation * (kernel - 1) // 2``."""
    pad = dilation * (kernel - 1) // 2
    if kernel_init is None:  # MTAN: xavier_normal_ weights, zero bias
        kernel_init = xavier_normal()
    return nnx.Conv(
        cin,
        cout,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        kernel_dilation=(dilation, dilation),
        use_bias=use_bias,
        kernel_init=kernel_init,
        conv_general_dilated=conv_general_dilated,
        rngs=rngs,
    )


def batch_norm(features: int, *, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)


class ConvBNReLU(nnx.Module):
    """conv -> BatchNorm -> ReLU (MTAN's ``conv_layer``)."""

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs, kernel: int = 3, **conv_kw):
        self.conv = conv(cin, cout, kernel, rngs=rngs, **conv_kw)
        self.bn = batch_norm(cout, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x), use_running_average=not train))


class Sequence(nnx.Module):
    """Applies modules taking ``(x, train)`` in order."""

    def __init__(self, *layers: nnx.Module):
        self.layers = nnx.List(layers)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for layer in self.layers:
            x = layer(x, train)
        return x


def max_pool_with_argmax(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """2x2 / stride-2 max pooling that also returns the argmax within each window.

    The indices (0..3, row-major inside the window; the first maximum on ties, as PyTorch)
    feed `max_unpool`, which is what SegNet's decoder uses to upsample.
    """
    b, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"max_pool_with_argmax: spatial size {(h, w)} must be even.")
    win = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
    win = win.reshape(b, h // 2, w // 2, c, 4)
    idx = jnp.argmax(win, axis=-1)
    return jnp.max(win, axis=-1), idx


def max_unpool(x: jax.Array, idx: jax.Array) -> jax.Array:
    """Inverse of `max_pool_with_argmax`: each value goes back to its argmax, zeros elsewhere."""
    b, h, w, c = x.shape
    win = jax.nn.one_hot(idx, 4, dtype=x.dtype) * x[..., None]
    win = win.reshape(b, h, w, c, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return win.reshape(b, 2 * h, 2 * w, c)


def max_pool(x: jax.Array, window: int = 2, stride: int = 2, padding: int = 0) -> jax.Array:
    """Max pooling of ``[B, H, W, C]`` (PyTorch's ``MaxPool2d`` with explicit ``padding``).

    Non-overlapping windows (``window == stride``, no padding, H and W divisible) are a chain
    of ``where(t > m, t, m)`` over the window's taps in row-major order: the same values, and
    the gradient goes to the first maximum of each window exactly as with ``reduce_window``
    (and PyTorch), without XLA's ``select_and_scatter``, whose CPU backward is ~15x slower.
    """
    b, h, w, c = x.shape
    if window == stride and padding == 0 and h % window == 0 and w % window == 0:
        win = x.reshape(b, h // window, window, w // window, window, c)
        out = None
        for i in range(window):
            for j in range(window):
                tap = win[:, :, i, :, j, :]
                out = tap if out is None else jnp.where(tap > out, tap, out)
        return out
    pad = ((padding, padding), (padding, padding))
    return nnx.max_pool(x, (window, window), strides=(stride, stride), padding=pad)


def _interp_axis(x: jax.Array, axis: int, out: int) -> jax.Array:
    n = x.shape[axis]
    if n == out:
        return x
    if n == 1:
        return jnp.repeat(x, out, axis=axis)
    pos = jnp.arange(out, dtype=jnp.float32) * ((n - 1) / max(out - 1, 1))
    lo = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, n - 2)
    frac = (pos - lo).astype(x.dtype)
    shape = [1] * x.ndim
    shape[axis] = out
    frac = frac.reshape(shape)
    return jnp.take(x, lo, axis=axis) * (1 - frac) + jnp.take(x, lo + 1, axis=axis) * frac


def resize_bilinear_align_corners(x: jax.Array, height: int, width: int) -> jax.Array:
    """Bilinear resize of ``[B, H, W, C]`` with PyTorch's ``align_corners=True`` convention.

    (`jax.image.resize` uses half-pixel centres, i.e. ``align_corners=False``.)
    """
    return _interp_axis(_interp_axis(x, 1, height), 2, width)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when ``key`` is None (evaluation) or ``rate == 0``."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def finalize_prediction(task: str, x: jax.Array) -> jax.Array:
    """The benchmark models' output activation for a task, by task name.

    MTAN / Nash-MTL / FAMO output log-probabilities for segmentation and unit vectors for
    surface normals; both are idempotent under a loss that re-applies them (log-softmax of
    log-probabilities is unchanged; a unit vector normalizes to itself).
    """
    if task == "segmentation":
        return jax.nn.log_softmax(x, axis=-1)
    if task == "normal":  # rsqrt of a clamped square norm: no NaN gradient at x = 0
        sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
        return (x * jax.lax.rsqrt(jnp.maximum(sq, 1e-24))).astype(x.dtype)
    return x
