"""SegNet encoder-decoder: hard parameter sharing and MTAN (multi-task attention network).

The architectures of the NYUv2 / Cityscapes benchmark (MTAN, CAGrad, Nash-MTL, FAMO, LibMTL's
``main_segnet.py``), in NHWC. ``filters`` sets the widths of the five encoder levels; the
papers use ``(64, 128, 256, 512, 512)``, tests use tiny ones such as ``(4, 8, 8, 8, 8)``.

References:
  Badrinarayanan, Kendall, Cipolla. "SegNet: A Deep Convolutional Encoder-Decoder
  Architecture for Image Segmentation." TPAMI, 2017.
  Liu, Johns, Davison. "End-to-End Multi-Task Learning with Attention." CVPR, 2019.

  Checked against: Nash-MTL ``experiments/nyuv2/models.py`` (``_SegNet`` = SegNet-MTAN,
  ``SegNetSplit`` 'standard' = hard parameter sharing), module for module: the same layers,
  channel counts, max-unpooling with the pooling indices, bilinear ``align_corners=True``
  upsampling in the attention decoder, Xavier-normal conv init with zero bias, two-conv task
  heads. Differences: BatchNorm running variance uses the biased estimate (Flax) rather than
  PyTorch's unbiased one; the output activations are applied by `finalize_prediction`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mtl_jax.models import layers

DEFAULT_FILTERS = (64, 128, 256, 512, 512)


def _head(cin: int, cout: int, rngs: nnx.Rngs) -> layers.Sequence:
    """MTAN's prediction layer: 3x3 conv (cin -> cin) then 1x1 conv (cin -> cout), no norm."""

    class _Conv(nnx.Module):
        def __init__(self, conv):
            self.conv = conv

        def __call__(self, x, train):
            del train
            return self.conv(x)

    return layers.Sequence(
        _Conv(layers.conv(cin, cin, 3, rngs=rngs)), _Conv(layers.conv(cin, cout, 1, rngs=rngs))
    )


class _Backbone(nnx.Module):
    """SegNet's shared encoder-decoder (the global network of MTAN)."""

    def __init__(self, filters: Sequence[int], in_channels: int, rngs: nnx.Rngs):
        f = tuple(filters)
        if len(f) != 5:
            raise ValueError(f"SegNet: filters must have 5 entries, got {f}.")
        cbr = lambda a, b: layers.ConvBNReLU(a, b, rngs=rngs)  # noqa: E731
        self.encoder_block = nnx.List(
            [cbr(in_channels, f[0])] + [cbr(f[i], f[i + 1]) for i in range(4)]
        )
        self.decoder_block = nnx.List([cbr(f[0], f[0])] + [cbr(f[i + 1], f[i]) for i in range(4)])
        enc, dec = [cbr(f[0], f[0])], [cbr(f[0], f[0])]
        for i in range(4):
            if i == 0:
                enc.append(cbr(f[1], f[1]))
                dec.append(cbr(f[0], f[0]))
            else:
                enc.append(layers.Sequence(cbr(f[i + 1], f[i + 1]), cbr(f[i + 1], f[i + 1])))
                dec.append(layers.Sequence(cbr(f[i], f[i]), cbr(f[i], f[i])))
        self.conv_block_enc = nnx.List(enc)
        self.conv_block_dec = nnx.List(dec)

    def __call__(self, x: jax.Array, train: bool):
        enc, pooled, indices = [], x, []
        for i in range(5):
            e0 = self.encoder_block[i](pooled, train)
            e1 = self.conv_block_enc[i](e0, train)
            pooled, idx = layers.max_pool_with_argmax(e1)
            enc.append((e0, e1))
            indices.append(idx)
        dec, ups, d = [], [], pooled
        for i in range(5):
            up = layers.max_unpool(d, indices[-i - 1])
            d0 = self.decoder_block[-i - 1](up, train)
            d = self.conv_block_dec[-i - 1](d0, train)
            ups.append(up)
            dec.append(d)
        return enc, ups, dec


def _check_input(x: jax.Array) -> None:
    if x.shape[1] % 32 or x.shape[2] % 32:
        raise ValueError(
            f"SegNet needs input height and width divisible by 32 (5 poolings); got {x.shape[1:3]}."
        )


class SegNet(nnx.Module):
    """Hard parameter sharing: SegNet encoder-decoder shared, one two-conv head per task.

    Args:
      tasks: task name -> output channels (e.g. ``{'segmentation': 13, 'depth': 1}``).
      filters: the five level widths.
      in_channels: input channels (3 for RGB).
      rngs: `nnx.Rngs` for initialization.

    ``model(x, train)`` maps ``[B, H, W, C]`` (H, W divisible by 32) to a dict
    task -> ``[B, H, W, out_channels]``.
    """

    task_specific_modules = ("heads",)

    def __init__(
        self,
        tasks: Mapping[str, int],
        *,
        filters: Sequence[int] = DEFAULT_FILTERS,
        in_channels: int = 3,
        rngs: nnx.Rngs,
    ):
        self.tasks = tuple(tasks)
        self.backbone = _Backbone(filters, in_channels, rngs)
        self.heads = nnx.Dict({t: _head(filters[0], c, rngs) for t, c in tasks.items()})

    def __call__(self, x: jax.Array, train: bool = False, key: jax.Array | None = None):
        del key
        _check_input(x)
        _, _, dec = self.backbone(x, train)
        feat = dec[-1]
        return {t: layers.finalize_prediction(t, self.heads[t](feat, train)) for t in self.tasks}


def _att_layer(cin: int, cmid: int, cout: int, rngs: nnx.Rngs) -> nnx.Module:
    """MTAN's attention mask: 1x1 conv-BN-ReLU, 1x1 conv-BN-sigmoid."""

    class _Att(nnx.Module):
        def __init__(self):
            self.conv1 = layers.conv(cin, cmid, 1, rngs=rngs)
            self.bn1 = layers.batch_norm(cmid, rngs=rngs)
            self.conv2 = layers.conv(cmid, cout, 1, rngs=rngs)
            self.bn2 = layers.batch_norm(cout, rngs=rngs)

        def __call__(self, x, train):
            ura = not train
            x = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
            return jax.nn.sigmoid(self.bn2(self.conv2(x), use_running_average=ura))

    return _Att()


class SegNetMTAN(nnx.Module):
    """MTAN: the shared SegNet plus per-task soft-attention modules on every encoder/decoder level.

    Shared: the SegNet backbone and the shared attention convolutions (``encoder_block_att``,
    ``decoder_block_att``). Task specific: each task's attention masks (``task_attention``)
    and prediction head (``heads``). Requires ``filters[3] == filters[4]`` (as in the paper's
    ``(64, 128, 256, 512, 512)``), because the deepest decoder attention concatenates both.

    Args: as `SegNet`.
    """

    task_specific_modules = ("heads", "task_attention")

    def __init__(
        self,
        tasks: Mapping[str, int],
        *,
        filters: Sequence[int] = DEFAULT_FILTERS,
        in_channels: int = 3,
        rngs: nnx.Rngs,
    ):
        f = tuple(filters)
        if len(f) != 5 or f[3] != f[4]:
            raise ValueError(f"SegNetMTAN: filters must have 5 entries with f[3] == f[4]; got {f}.")
        self.tasks = tuple(tasks)
        self.backbone = _Backbone(f, in_channels, rngs)
        cbr = lambda a, b: layers.ConvBNReLU(a, b, rngs=rngs)  # noqa: E731
        self.encoder_block_att = nnx.List(
            [cbr(f[0], f[1]), cbr(f[1], f[2]), cbr(f[2], f[3]), cbr(f[3], f[4]), cbr(f[4], f[4])]
        )
        self.decoder_block_att = nnx.List(
            [cbr(f[0], f[0]), cbr(f[1], f[0]), cbr(f[2], f[1]), cbr(f[3], f[2]), cbr(f[4], f[4])]
        )

        def task_att():
            enc = [_att_layer(f[0], f[0], f[0], rngs)] + [
                _att_layer(2 * f[i + 1], f[i + 1], f[i + 1], rngs) for i in range(4)
            ]
            dec = [_att_layer(2 * f[0], f[0], f[0], rngs)] + [
                _att_layer(f[i + 1] + f[i], f[i], f[i], rngs) for i in range(4)
            ]
            return nnx.Dict({"encoder": nnx.List(enc), "decoder": nnx.List(dec)})

        self.task_attention = nnx.Dict({t: task_att() for t in tasks})
        self.heads = nnx.Dict({t: _head(f[0], c, rngs) for t, c in tasks.items()})

    def __call__(self, x: jax.Array, train: bool = False, key: jax.Array | None = None):
        del key
        _check_input(x)
        enc, ups, dec = self.backbone(x, train)
        out = {}
        for t in self.tasks:
            att = self.task_attention[t]
            a = None
            for j in range(5):
                inp = enc[j][0] if j == 0 else jnp.concatenate([enc[j][0], a], axis=-1)
                mask = att["encoder"][j](inp, train)
                a = self.encoder_block_att[j](mask * enc[j][1], train)
                a = layers.max_pool(a)
            for j in range(5):
                h, w = a.shape[1] * 2, a.shape[2] * 2
                a = layers.resize_bilinear_align_corners(a, h, w)
                a = self.decoder_block_att[-j - 1](a, train)
                mask = att["decoder"][-j - 1](jnp.concatenate([ups[j], a], axis=-1), train)
                a = mask * dec[j]
            out[t] = layers.finalize_prediction(t, self.heads[t](a, train))
        return out
