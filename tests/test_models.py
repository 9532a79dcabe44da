"""Tests of the dense-prediction models (mtl_jax/models).

Architectures are checked against the reference implementations by exact parameter counts
re-derived from their source (Nash-MTL ``experiments/nyuv2/models.py`` for SegNet / MTAN,
torchvision's ResNet as wrapped by LibMTL ``LibMTL/model/resnet_dilated.py``, LibMTL
``examples/nyu/aspp.py`` for the DeepLab head), the pooling / upsampling primitives against NumPy
re-derivations of PyTorch's semantics, and forward passes of tiny instances for shapes, output
activations and the shared / task-specific labels.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl_jax import models
from mtl_jax.models import layers

NYU = {"segmentation": 13, "depth": 1, "normal": 3}


def count(model_fn) -> int:
    abstract = nnx.eval_shape(model_fn)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


# -- parameter counts re-derived from the reference code ----------------------------------------


def conv_layer(cin, cout):  # nn.Conv2d(3x3, bias) + BatchNorm2d (weight, bias)
    return 9 * cin * cout + cout + 2 * cout


def att_layer(c0, c1, c2):  # 1x1 conv + BN, 1x1 conv + BN
    return c0 * c1 + c1 + 2 * c1 + c1 * c2 + c2 + 2 * c2


def pred_layer(c0, cout):  # 3x3 conv (c0 -> c0) + 1x1 conv (c0 -> cout), both with bias
    return 9 * c0 * c0 + c0 + c0 * cout + cout


def segnet_backbone(f):
    n = conv_layer(3, f[0]) + conv_layer(f[0], f[0])  # encoder_block[0], decoder_block[0]
    for i in range(4):
        n += conv_layer(f[i], f[i + 1]) + conv_layer(f[i + 1], f[i])
    n += 2 * conv_layer(f[0], f[0])  # conv_block_enc[0], conv_block_dec[0]
    for i in range(4):
        if i == 0:
            n += conv_layer(f[1], f[1]) + conv_layer(f[0], f[0])
        else:
            n += 2 * conv_layer(f[i + 1], f[i + 1]) + 2 * conv_layer(f[i], f[i])
    return n


def mtan_count(f, outs):
    n = segnet_backbone(f)
    k = len(outs)
    n += k * (att_layer(f[0], f[0], f[0]) + att_layer(2 * f[0], f[0], f[0]))
    for i in range(4):
        n += k * att_layer(2 * f[i + 1], f[i + 1], f[i + 1])
        n += k * att_layer(f[i + 1] + f[i], f[i], f[i])
    n += conv_layer(f[0], f[1]) + conv_layer(f[0], f[0])  # encoder/decoder_block_att[0]
    for i in range(4):
        if i < 3:
            n += conv_layer(f[i + 1], f[i + 2]) + conv_layer(f[i + 1], f[i])
        else:
            n += 2 * conv_layer(f[i + 1], f[i + 1])
    return n + sum(pred_layer(f[0], c) for c in outs)


def test_segnet_mtan_parameter_count_matches_reference():
    f = (64, 128, 256, 512, 512)
    got = count(lambda: models.SegNetMTAN(NYU, filters=f, rngs=nnx.Rngs(0)))
    assert got == mtan_count(f, NYU.values())


def test_segnet_split_parameter_count_matches_reference():
    f = (64, 128, 256, 512, 512)
    got = count(lambda: models.SegNet(NYU, filters=f, rngs=nnx.Rngs(0)))
    assert got == segnet_backbone(f) + sum(pred_layer(64, c) for c in NYU.values())


@pytest.mark.parametrize(
    "depth,expected",
    # torchvision resnet18 / resnet50 totals (11,689,512 / 25,557,032) minus the fc layer.
    [(18, 11_689_512 - 513_000), (50, 25_557_032 - 2_049_000)],
)
def test_dilated_resnet_parameter_count_matches_torchvision(depth, expected):
    assert count(lambda: models.DilatedResNet(depth, rngs=nnx.Rngs(0))) == expected


def test_deeplab_head_parameter_count_matches_libmtl():
    c, cin, out = 256, 2048, 13
    expected = (
        (cin * c + 2 * c)  # 1x1 branch
        + 3 * (9 * cin * c + 2 * c)  # atrous branches
        + (cin * c + 2 * c)  # image pooling
        + (5 * c * c + 2 * c)  # projection
        + (9 * c * c + 2 * c)  # 3x3 conv
        + (c * out + out)  # classifier
    )
    assert count(lambda: models.DeepLabHead(cin, out, rngs=nnx.Rngs(0))) == expected


# -- primitives ----------------------------------------------------------------------------------


def test_max_pool_with_argmax_and_unpool_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 6, 3)).astype(np.float32)
    x[0, 0, 0, 0] = x[0, 0, 1, 0] = x[0, 1, 0, 0] = x[0, 1, 1, 0] = 5.0  # tie: first wins
    pooled, idx = layers.max_pool_with_argmax(jnp.asarray(x))
    up = np.asarray(layers.max_unpool(pooled, idx))
    expected_pool = np.zeros((2, 2, 3, 3), np.float32)
    expected_up = np.zeros_like(x)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                for c in range(3):
                    win = x[b, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2, c].reshape(-1)
                    a = int(np.argmax(win))  # PyTorch: first maximum, row-major in the window
                    expected_pool[b, i, j, c] = win[a]
                    expected_up[b, 2 * i + a // 2, 2 * j + a % 2, c] = win[a]
    np.testing.assert_array_equal(np.asarray(pooled), expected_pool)
    np.testing.assert_array_equal(up, expected_up)
    assert up[0, 0, 0, 0] == 5.0 and up[0, 0, 1, 0] == 0.0


_NHWC = ("NHWC", "HWIO", "NHWC")
_CONV_CASES = [  # input, kernel, strides, padding, kernel dilation
    ((2, 9, 11, 3), (3, 3, 3, 5), (1, 1), "SAME", (1, 1)),
    ((2, 9, 11, 3), (3, 3, 3, 5), (2, 2), "SAME", (1, 1)),
    ((2, 9, 11, 3), (3, 3, 3, 5), (2, 1), "VALID", (1, 1)),
    ((2, 12, 12, 4), (3, 3, 4, 2), (1, 1), ((2, 2), (2, 2)), (2, 2)),
    ((1, 8, 8, 2), (1, 1, 2, 3), (1, 1), ((0, 0), (0, 0)), (1, 1)),
    ((2, 10, 9, 3), (5, 5, 3, 4), (2, 2), ((3, 1), (2, 3)), (1, 1)),
    ((2, 7, 8, 3), (1, 1, 3, 4), (2, 2), "VALID", (1, 1)),  # phases no tap reads
    ((1, 10, 11, 2), (3, 3, 2, 3), (3, 3), "SAME", (1, 1)),
    ((2, 3, 3, 2), (3, 3, 2, 2), (2, 2), ((0, 4), (2, 0)), (1, 1)),  # crops a phase
    ((2, 9, 9, 2), (3, 3, 2, 2), (2, 2), "SAME", (2, 2)),  # strided and dilated: XLA's dx
]


def _normal(seed: int, shape) -> jax.Array:
    """Standard-normal test data from NumPy: a jax.random draw of a 4-D shape compiles for
    seconds on XLA's CPU backend."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _conv_derivatives(conv, x, w, ct, strides, padding, dilation):
    """Value, VJP (both arguments), JVP, and a vmapped kernel VJP of ``conv``, in one jit."""

    def f(x, w):
        return conv(x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=_NHWC)

    @jax.jit
    def run(x, w, ct):
        y, vjp = jax.vjp(f, x, w)
        tangent = jax.jvp(f, (x, w), (0.3 * x, 0.7 * w))[1]
        batched = jax.vmap(lambda c: vjp(c)[1])(jnp.stack([ct, -2.0 * ct]))
        return (y, *vjp(ct), tangent, batched)

    return run(x, w, ct)


# How the CPU kernel derivative is cut up: (patch bytes per block, in samples or output rows
# when a string, and the max im2col contraction).
_BLOCKINGS = {
    "one block": (layers._IM2COL_BLOCK_BYTES, layers._IM2COL_MAX_DEPTH),
    "two samples per block": ("2 samples", layers._IM2COL_MAX_DEPTH),
    "a row per block": (1, layers._IM2COL_MAX_DEPTH),
    "two rows per block": ("2 rows", layers._IM2COL_MAX_DEPTH),
    "per-tap matmuls": (layers._IM2COL_BLOCK_BYTES, 0),
}


def _set_blocking(monkeypatch, blocking, xs, ws, strides, padding, dilation):
    budget, depth = _BLOCKINGS[blocking]
    if isinstance(budget, str):
        pads = layers._same_or_explicit_pads(padding, xs[1:3], ws[:2], strides, dilation)
        ho, wo = (
            (n + lo + hi - d * (k - 1) - 1) // s + 1
            for n, (lo, hi), k, s, d in zip(xs[1:3], pads, ws[:2], strides, dilation, strict=True)
        )
        pixel = ws[0] * ws[1] * ws[2] * 4  # patch bytes of one output pixel
        budget = 2 * (ho * wo if budget == "2 samples" else wo) * pixel
    monkeypatch.setattr(layers, "_IM2COL_BLOCK_BYTES", budget)
    monkeypatch.setattr(layers, "_IM2COL_MAX_DEPTH", depth)


@pytest.mark.parametrize("blocking", list(_BLOCKINGS))
@pytest.mark.parametrize("xs,ws,strides,padding,dilation", _CONV_CASES)
def test_conv_general_dilated_equals_lax_in_every_derivative(
    xs, ws, strides, padding, dilation, blocking, monkeypatch
):
    """Our conv (im2col / tap-matmul kernel derivative on CPU) == lax's: value, VJP, JVP, vmap;
    for every way the blocked im2col form splits the batch, and for the per-tap form."""
    if blocking == "two samples per block":
        xs = (4, *xs[1:])  # two blocks of two samples
    _set_blocking(monkeypatch, blocking, xs, ws, strides, padding, dilation)
    x = _normal(0, xs)
    w = _normal(1, ws)
    out_shape = jax.eval_shape(
        lambda: jax.lax.conv_general_dilated(
            x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=_NHWC
        )
    ).shape
    ct = _normal(2, out_shape)
    args = (x, w, ct, strides, padding, dilation)
    ref = _conv_derivatives(jax.lax.conv_general_dilated, *args)
    ours = _conv_derivatives(layers.conv_general_dilated, *args)
    np.testing.assert_array_equal(np.asarray(ours[0]), np.asarray(ref[0]))  # same forward op
    for name, a, b in zip(("dx", "dw", "jvp", "vmapped dw"), ref[1:], ours[1:], strict=True):
        tol = 1e-5 * float(jnp.max(jnp.abs(a)))
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=tol, err_msg=name)


@pytest.mark.parametrize(
    "budget,blocks", [(layers._IM2COL_BLOCK_BYTES, None), ("sample", 2), (1, 2 * 5)]
)
def test_conv_kernel_derivative_runs_in_the_chosen_blocks(budget, blocks, monkeypatch):
    """The blocked im2col form loops over ``blocks`` blocks (none when all fits in one)."""
    x, w = _normal(0, (2, 9, 11, 3)), _normal(1, (3, 3, 3, 5))  # SAME, stride 2: 5 x 6 out
    monkeypatch.setattr(
        layers, "_IM2COL_BLOCK_BYTES", 5 * 6 * 27 * 4 if budget == "sample" else budget
    )
    conv = functools.partial(layers.conv_general_dilated, dimension_numbers=_NHWC)
    ct = _normal(2, (2, 5, 6, 5))
    jaxpr = str(
        jax.make_jaxpr(lambda w: jax.vjp(lambda w: conv(x, w, (2, 2), "SAME"), w)[1](ct))(w)
    )
    lengths = re.findall(r"length=(\d+)", jaxpr)
    assert lengths == ([] if blocks is None else [str(blocks)])


@pytest.mark.parametrize("form", ["phases", "xla"])
@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
def test_conv_cpu_input_grad_can_be_picked_by_hand(form, strides):
    """Both input-gradient forms give lax's; 'phases' is stride-1 convolutions only."""
    x, w = _normal(0, (2, 9, 11, 3)), _normal(1, (3, 3, 3, 5))
    ct = _normal(2, jax.eval_shape(lambda: _lax_nhwc(x, w, strides)).shape)

    def input_grad(conv):
        def grad(x):
            _, vjp = jax.vjp(lambda x: conv(x, w, strides, "SAME", dimension_numbers=_NHWC), x)
            return vjp(ct)[0]

        return grad

    ours = functools.partial(layers.conv_general_dilated, cpu_input_grad=form)
    ref = jax.jit(input_grad(jax.lax.conv_general_dilated))(x)
    np.testing.assert_allclose(jax.jit(input_grad(ours))(x), ref, rtol=1e-5, atol=1e-5)
    hlo = jax.jit(input_grad(ours)).lower(x).as_text()
    lhs_dilated = "lhs_dilate = [2, 2]" in hlo
    assert lhs_dilated == (form == "xla" and strides == (2, 2))


def _lax_nhwc(x, w, strides):
    return jax.lax.conv_general_dilated(x, w, strides, "SAME", dimension_numbers=_NHWC)


@pytest.mark.parametrize("form", ["im2col", "per_tap", "xla"])
def test_conv_cpu_kernel_grad_can_be_picked_by_hand(form, monkeypatch):
    """Each named form gives lax's kernel gradient; 'im2col' is used even above the depth
    where 'auto' switches to per-tap matmuls (no loop unless blocks are asked for)."""
    monkeypatch.setattr(layers, "_IM2COL_MAX_DEPTH", 0)
    monkeypatch.setattr(layers, "_IM2COL_BLOCK_BYTES", 1)  # a row per block for 'im2col'
    x, w, ct = _normal(0, (2, 9, 11, 3)), _normal(1, (3, 3, 3, 5)), _normal(2, (2, 5, 6, 5))

    def kernel_grad(conv):
        def grad(w):
            _, vjp = jax.vjp(lambda w: conv(x, w, (2, 2), "SAME", dimension_numbers=_NHWC), w)
            return vjp(ct)[0]

        return grad

    ours = functools.partial(layers.conv_general_dilated, cpu_kernel_grad=form)
    ref = jax.jit(kernel_grad(jax.lax.conv_general_dilated))(w)
    np.testing.assert_allclose(jax.jit(kernel_grad(ours))(w), ref, rtol=1e-5, atol=1e-5)
    lengths = re.findall(r"length=(\d+)", str(jax.make_jaxpr(kernel_grad(ours))(w)))
    assert lengths == (["10"] if form == "im2col" else [])


def test_conv_unknown_cpu_grad_forms_list_the_valid_ones():
    x, w = _normal(0, (1, 4, 4, 2)), _normal(1, (3, 3, 2, 2))
    with pytest.raises(ValueError, match="unknown cpu_kernel_grad 'fast'.*auto, im2col, per_tap"):
        layers.conv_general_dilated(x, w, (1, 1), "SAME", cpu_kernel_grad="fast")
    with pytest.raises(ValueError, match="unknown cpu_input_grad 'im2col'.*auto, phases, xla"):
        layers.conv_general_dilated(x, w, (1, 1), "SAME", cpu_input_grad="im2col")


@pytest.mark.parametrize("blocking", list(_BLOCKINGS))
def test_conv_general_dilated_second_order_equals_lax(blocking, monkeypatch):
    """The custom JVP is differentiable again (Hessian w.r.t. the kernel)."""
    _set_blocking(monkeypatch, blocking, (2, 5, 6, 2), (3, 3, 2, 3), (2, 2), "SAME", (1, 1))
    x = _normal(0, (2, 5, 6, 2))
    w = _normal(1, (3, 3, 2, 3))

    def hess(conv):
        def f(w):
            y = conv(x, w, (2, 2), "SAME", dimension_numbers=_NHWC)
            return jnp.sum(jnp.sin(y))

        return jax.jit(jax.hessian(f))(w)

    np.testing.assert_allclose(
        np.asarray(hess(layers.conv_general_dilated)),
        np.asarray(hess(jax.lax.conv_general_dilated)),
        rtol=1e-4,
        atol=1e-4,
    )


def test_conv_general_dilated_falls_back_to_lax_for_other_configurations():
    x = _normal(0, (2, 6, 6, 4))
    w = _normal(1, (3, 3, 2, 4))
    grouped = dict(feature_group_count=2, dimension_numbers=_NHWC)
    np.testing.assert_array_equal(
        np.asarray(layers.conv_general_dilated(x, w, (1, 1), "SAME", **grouped)),
        np.asarray(jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", **grouped)),
    )
    xn = jnp.transpose(x, (0, 3, 1, 2))  # NCHW / OIHW: lax's default layout
    wn = jnp.transpose(_normal(2, (3, 3, 4, 5)), (3, 2, 0, 1))
    np.testing.assert_array_equal(
        np.asarray(
            layers.conv_general_dilated(xn, wn, (1, 1), ((1, 1), (1, 1)), lhs_dilation=(2, 2))
        ),
        np.asarray(
            jax.lax.conv_general_dilated(xn, wn, (1, 1), ((1, 1), (1, 1)), lhs_dilation=(2, 2))
        ),
    )


def test_conv_layer_uses_the_fast_conv_and_matches_flax_default():
    ours = layers.conv(3, 4, 3, rngs=nnx.Rngs(0), stride=2, dilation=1)
    plain = nnx.Conv(3, 4, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), rngs=nnx.Rngs(0))
    plain.kernel.value, plain.bias.value = ours.kernel.value, ours.bias.value
    assert ours.conv_general_dilated is layers.conv_general_dilated
    x = _normal(3, (2, 8, 8, 3))

    @nnx.jit
    def grads(m):
        return nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(m)

    g_ours, g_plain = grads(ours), grads(plain)
    np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(plain(x)), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(g_ours.kernel.value), np.asarray(g_plain.kernel.value), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("distribution", ["truncated_normal", "normal", "uniform"])
@pytest.mark.parametrize("mode", ["fan_in", "fan_out", "fan_avg", "fan_geo_avg"])
def test_flat_variance_scaling_equals_jax_initializer(mode, distribution):
    """Same values as `jax.nn.initializers.variance_scaling` (dense shapes: cheap to compile)."""
    key = jax.random.key(7)
    for shape in [(7, 9), (5, 2)]:
        ours = layers.variance_scaling(2.0, mode, distribution)(key, shape)
        ref = jax.nn.initializers.variance_scaling(2.0, mode, distribution)(key, shape)
        assert ours.shape == ref.shape and ours.dtype == ref.dtype
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-6, atol=1e-7)


def test_flat_variance_scaling_counts_the_receptive_field_in_every_fan():
    # One 4-D reference draw (XLA CPU compiles it in seconds); the fans differ in every mode.
    key, shape = jax.random.key(7), (3, 3, 8, 16)
    for mode in ["fan_in", "fan_out", "fan_avg", "fan_geo_avg"]:
        ours = layers.variance_scaling(2.0, mode, "normal")(key, shape)
        ref = jax.nn.initializers.variance_scaling(2.0, mode, "normal")(key, shape)
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-6, atol=1e-7)


def test_models_draw_their_kernels_as_flax_and_jax_would():
    """layers.conv's default is flax's xavier_normal; ConvNet keeps nnx's lecun_normal."""
    conv = layers.conv(1, 4, 3, rngs=nnx.Rngs(0))  # the ConvNet's kernel shape: one compile
    ref = nnx.initializers.xavier_normal()(nnx.Rngs(0).params(), (3, 3, 1, 4))
    np.testing.assert_allclose(np.asarray(conv.kernel[...]), np.asarray(ref), rtol=1e-6)
    net = models.build_model("convnet", {"a": 2}, input_shape=(8, 8, 1), channels=(4,))
    plain = nnx.Conv(1, 4, (3, 3), padding="SAME", rngs=nnx.Rngs(0))
    np.testing.assert_allclose(
        np.asarray(net.convs[0].kernel[...]), np.asarray(plain.kernel[...]), rtol=1e-6
    )
    with pytest.raises(ValueError, match="unknown mode 'fan'; valid: fan_in"):
        layers.variance_scaling(1.0, "fan", "normal")
    with pytest.raises(ValueError, match="unknown distribution 'cauchy'"):
        layers.variance_scaling(1.0, "fan_in", "cauchy")


@pytest.mark.parametrize(
    "shape,window,stride,padding",
    [
        ((2, 6, 8, 3), 2, 2, 0),
        ((2, 6, 9, 3), 3, 3, 0),
        ((2, 7, 8, 3), 2, 2, 0),
        ((2, 8, 8, 3), 3, 2, 1),
    ],
)
def test_max_pool_equals_reduce_window_with_first_max_gradient(shape, window, stride, padding):
    """Values and gradients equal flax's reduce_window pooling, ties included (first max)."""
    x = jnp.asarray(np.random.default_rng(0).integers(0, 3, shape).astype(np.float32))  # ties

    def ref(x):
        pad = ((padding, padding), (padding, padding))
        return nnx.max_pool(x, (window, window), strides=(stride, stride), padding=pad)

    def ours(x):
        return layers.max_pool(x, window, stride, padding)

    y = ref(x)
    np.testing.assert_array_equal(np.asarray(ours(x)), np.asarray(y))
    ct = jax.random.normal(jax.random.PRNGKey(1), y.shape)
    np.testing.assert_array_equal(
        np.asarray(jax.vjp(ours, x)[1](ct)[0]), np.asarray(jax.vjp(ref, x)[1](ct)[0])
    )


def test_resize_bilinear_align_corners_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 3, 4, 2)).astype(np.float32)
    out = np.asarray(layers.resize_bilinear_align_corners(jnp.asarray(x), 6, 8))

    def ref(x, h, w):  # align_corners=True: output i samples input i * (n - 1) / (m - 1)
        res = np.zeros((x.shape[0], h, w, x.shape[3]), np.float64)
        for i in range(h):
            for j in range(w):
                y, z = i * (x.shape[1] - 1) / (h - 1), j * (x.shape[2] - 1) / (w - 1)
                y0, z0 = min(int(y), x.shape[1] - 2), min(int(z), x.shape[2] - 2)
                dy, dz = y - y0, z - z0
                res[:, i, j] = (
                    x[:, y0, z0] * (1 - dy) * (1 - dz)
                    + x[:, y0 + 1, z0] * dy * (1 - dz)
                    + x[:, y0, z0 + 1] * (1 - dy) * dz
                    + x[:, y0 + 1, z0 + 1] * dy * dz
                )
        return res

    np.testing.assert_allclose(out, ref(x, 6, 8), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[:, 0, 0], x[:, 0, 0])  # corners kept
    np.testing.assert_allclose(out[:, -1, -1], x[:, -1, -1])


@pytest.mark.reference
def test_resize_and_unpool_match_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 4, 6, 3)).astype(np.float32)
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    ref = F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=True)
    got = layers.resize_bilinear_align_corners(jnp.asarray(x), 8, 12)
    np.testing.assert_allclose(np.asarray(got), ref.permute(0, 2, 3, 1).numpy(), atol=1e-5)
    pooled, idx = torch.nn.MaxPool2d(2, 2, return_indices=True)(t)
    ref_up = torch.nn.MaxUnpool2d(2, 2)(pooled, idx).permute(0, 2, 3, 1).numpy()
    got_up = layers.max_unpool(*layers.max_pool_with_argmax(jnp.asarray(x)))
    np.testing.assert_array_equal(np.asarray(got_up), ref_up)


# -- tiny forward passes -------------------------------------------------------------------------

TINY = {
    "segnet": dict(filters=(2, 4, 4, 4, 4)),
    "segnet_mtan": dict(filters=(2, 4, 4, 4, 4)),
    "resnet_deeplab": dict(depth=18, width=2, aspp_channels=4),
}


@pytest.mark.parametrize(
    "name",
    # Tracing and compiling one of these models costs 20-60 s of CPU here, so all are `slow`
    # (the default suite still builds each and checks its parameter count against the reference).
    [pytest.param(n, marks=pytest.mark.slow) for n in ("segnet_mtan", "segnet", "resnet_deeplab")],
)
def test_forward_shapes_activations_and_labels(name):
    model = models.build_model(name, NYU, seed=0, **TINY[name])
    x = jax.random.uniform(jax.random.key(0), (2, 32, 64, 3))
    out = model(x, train=False)  # eager: cheaper than compiling for one call
    assert set(out) == set(NYU)
    for t, c in NYU.items():
        assert out[t].shape == (2, 32, 64, c)
        assert np.all(np.isfinite(out[t]))
    np.testing.assert_allclose(jax.nn.logsumexp(out["segmentation"], axis=-1), 0.0, atol=1e-5)
    norm = np.linalg.norm(out["normal"], axis=-1)  # unit vectors (0 where the raw output is 0)
    assert np.all(np.isclose(norm, 1.0, atol=1e-5) | (norm == 0.0)) and np.mean(norm) > 0.5
    params = nnx.state(model, nnx.Param)
    labels = models.param_labels(model, params)
    flat = jax.tree_util.tree_leaves_with_path(labels)
    task_specific = {jax.tree_util.keystr(p) for p, lab in flat if lab == "task_specific"}
    assert task_specific and len(task_specific) < len(flat)
    assert all(any(m in p for m in model.task_specific_modules) for p in task_specific)


def test_build_model_and_mtan_errors():
    with pytest.raises(ValueError, match="Valid models:.*segnet_mtan"):
        models.build_model("unet", NYU)
    with pytest.raises(ValueError, match=r"f\[3\] == f\[4\]"):
        models.SegNetMTAN(NYU, filters=(2, 4, 8, 16, 32), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="divisible by 32"):
        models.SegNet(NYU, filters=(2, 2, 2, 2, 2), rngs=nnx.Rngs(0))(jnp.zeros((1, 48, 48, 3)))
    with pytest.raises(ValueError, match="depth must be one of"):
        models.DilatedResNet(42, rngs=nnx.Rngs(0))
