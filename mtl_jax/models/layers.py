"""Building blocks shared by the dense-prediction models (NHWC, Flax NNX).

Every module takes ``train`` explicitly in ``__call__`` (BatchNorm uses batch statistics and
updates its running averages when ``train=True``) and dropout takes an explicit PRNG key, so a
model is a pure function of ``(params, batch_stats, inputs, key)`` once split with `nnx.split`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# PyTorch's BatchNorm2d defaults (momentum 0.1 in PyTorch's convention is 0.9 in Flax's).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


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
        kernel_init = nnx.initializers.xavier_normal()
    return nnx.Conv(
        cin,
        cout,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        kernel_dilation=(dilation, dilation),
        use_bias=use_bias,
        kernel_init=kernel_init,
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
