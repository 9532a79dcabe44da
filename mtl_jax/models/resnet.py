"""Dilated ResNet encoder with DeepLab-v3 ASPP task heads (LibMTL's NYUv2 / Cityscapes model).

Hard parameter sharing: one dilated ResNet (output stride 8: layers 3 and 4 keep their stride
and dilate instead) shared by all tasks, and one DeepLab head (ASPP + 3x3 conv + 1x1
classifier) per task; predictions are bilinearly resized to the input size
(``align_corners=True``, LibMTL's ``process_preds``).

References:
  He, Zhang, Ren, Sun. "Deep Residual Learning for Image Recognition." CVPR, 2016.
  Yu, Koltun, Funkhouser. "Dilated Residual Networks." CVPR, 2017.
  Chen, Papandreou, Schroff, Adam. "Rethinking Atrous Convolution for Semantic Image
  Segmentation." arXiv:1706.05587, 2017.
  Lin, Zhang. "LibMTL: A Python Library for Multi-Task Learning." JMLR, 2023.

  Checked against: LibMTL ``LibMTL/model/resnet_dilated.py`` (``_nostride_dilate``: the
  strided 3x3 conv of the first block gets dilation d/2, every other 3x3 conv d; d = 2 for
  layer3, 4 for layer4) and ``examples/nyu/aspp.py`` (``DeepLabHead``: ASPP with rates
  12/24/36 and image pooling, 256 channels, 1x1 projection with dropout 0.5). Deliberate
  differences: no ImageNet-pretrained weights (LibMTL loads torchvision's; we initialize with
  He-normal fan-out as torchvision does for training from scratch); ``width`` and
  ``aspp_channels`` are configurable so tests can use tiny models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mtl_jax.models import layers

_KAIMING = layers.variance_scaling(2.0, "fan_out", "normal")

# depth -> (block kind, blocks per stage)
RESNET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


def _conv(cin, cout, k, rngs, stride=1, dilation=1):
    return layers.conv(
        cin,
        cout,
        k,
        rngs=rngs,
        stride=stride,
        dilation=dilation,
        use_bias=False,
        kernel_init=_KAIMING,
    )


class _Block(nnx.Module):
    """A basic (two 3x3) or bottleneck (1x1-3x3-1x1, stride on the 3x3) residual block."""

    def __init__(self, kind, cin, planes, stride, first_dilation, dilation, rngs):
        self.kind = kind
        expansion = 1 if kind == "basic" else 4
        cout = planes * expansion
        if kind == "basic":
            self.convs = nnx.List(
                [
                    _conv(cin, planes, 3, rngs, stride, first_dilation),
                    _conv(planes, planes, 3, rngs, 1, dilation),
                ]
            )
        else:
            self.convs = nnx.List(
                [
                    _conv(cin, planes, 1, rngs),
                    _conv(planes, planes, 3, rngs, stride, first_dilation),
                    _conv(planes, cout, 1, rngs),
                ]
            )
        self.bns = nnx.List([layers.batch_norm(c.out_features, rngs=rngs) for c in self.convs])
        if stride != 1 or cin != cout:
            self.down_conv = _conv(cin, cout, 1, rngs, stride)
            self.down_bn = layers.batch_norm(cout, rngs=rngs)
        else:
            self.down_conv = None
            self.down_bn = None

    def __call__(self, x, train):
        ura = not train
        y = x
        n = len(self.convs)
        for i, (c, bn) in enumerate(zip(self.convs, self.bns, strict=True)):
            y = bn(c(y), use_running_average=ura)
            if i < n - 1:
                y = jax.nn.relu(y)
        if self.down_conv is not None:
            x = self.down_bn(self.down_conv(x), use_running_average=ura)
        return jax.nn.relu(x + y)


class DilatedResNet(nnx.Module):
    """ResNet-{18,34,50,101} without pooling/fc, dilated to output stride 8 (or 16).

    Args:
      depth: 18, 34, 50 or 101.
      width: channels of the stem and first stage (64 in the standard ResNet).
      dilate_scale: 8 (layers 3 and 4 dilated, LibMTL's default) or 16 (layer 4 only).
      in_channels: input channels.
      rngs: `nnx.Rngs`.
    """

    def __init__(
        self,
        depth: int = 50,
        *,
        width: int = 64,
        dilate_scale: int = 8,
        in_channels: int = 3,
        rngs: nnx.Rngs,
    ):
        if depth not in RESNET_DEPTHS:
            raise ValueError(
                f"DilatedResNet: depth must be one of {sorted(RESNET_DEPTHS)}, got {depth}."
            )
        if dilate_scale not in (8, 16):
            raise ValueError(f"DilatedResNet: dilate_scale must be 8 or 16, got {dilate_scale}.")
        kind, counts = RESNET_DEPTHS[depth]
        expansion = 1 if kind == "basic" else 4
        self.stem_conv = _conv(in_channels, width, 7, rngs, stride=2)
        self.stem_bn = layers.batch_norm(width, rngs=rngs)
        # stage -> dilation d (0 = not dilated): layer3 d=2 and layer4 d=4 for output stride 8.
        dil = {8: (0, 0, 2, 4), 16: (0, 0, 0, 2)}[dilate_scale]
        cin, stages = width, []
        for s, n in enumerate(counts):
            planes = width * 2**s
            stride = 1 if s == 0 else 2
            d = dil[s]
            blocks = []
            for b in range(n):
                if d:  # _nostride_dilate: strides removed, 3x3 convs dilated
                    first = d // 2 if (b == 0 and stride == 2) else d
                    blocks.append(_Block(kind, cin, planes, 1, first, d, rngs))
                else:
                    blocks.append(_Block(kind, cin, planes, stride if b == 0 else 1, 1, 1, rngs))
                cin = planes * expansion
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.feature_dim = cin

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = jax.nn.relu(self.stem_bn(self.stem_conv(x), use_running_average=not train))
        x = layers.max_pool(x, 3, 2, 1)
        for stage in self.stages:
            for block in stage:
                x = block(x, train)
        return x


class _CBR(nnx.Module):
    def __init__(self, cin, cout, k, rngs, dilation=1):
        self.conv = _conv(cin, cout, k, rngs, dilation=dilation)
        self.bn = layers.batch_norm(cout, rngs=rngs)

    def __call__(self, x, train):
        return jax.nn.relu(self.bn(self.conv(x), use_running_average=not train))


class DeepLabHead(nnx.Module):
    """ASPP (1x1, three atrous 3x3, image pooling; 1x1 projection + dropout) -> 3x3 -> 1x1."""

    def __init__(
        self,
        cin: int,
        cout: int,
        *,
        channels: int = 256,
        rates: Sequence[int] = (12, 24, 36),
        dropout: float = 0.5,
        rngs: nnx.Rngs,
    ):
        self.branches = nnx.List(
            [_CBR(cin, channels, 1, rngs)] + [_CBR(cin, channels, 3, rngs, r) for r in rates]
        )
        self.pool = _CBR(cin, channels, 1, rngs)
        self.project = _CBR((len(rates) + 2) * channels, channels, 1, rngs)
        self.dropout = dropout
        self.conv = _CBR(channels, channels, 3, rngs)
        self.classifier = layers.conv(channels, cout, 1, rngs=rngs, kernel_init=_KAIMING)

    def __call__(self, x, train, key=None):
        feats = [b(x, train) for b in self.branches]
        pooled = self.pool(jnp.mean(x, axis=(1, 2), keepdims=True), train)
        feats.append(jnp.broadcast_to(pooled, feats[0].shape))
        y = self.project(jnp.concatenate(feats, axis=-1), train)
        y = layers.dropout(y, self.dropout, key if train else None)
        return self.classifier(self.conv(y, train))


class ResNetDeepLab(nnx.Module):
    """Hard parameter sharing: dilated ResNet encoder + one DeepLab ASPP head per task.

    Args:
      tasks: task name -> output channels.
      depth, width, dilate_scale: of the `DilatedResNet` encoder.
      aspp_channels, aspp_rates, dropout: of each `DeepLabHead`.
      in_channels: input channels.
      rngs: `nnx.Rngs`.

    ``model(x, train, key)`` maps ``[B, H, W, C]`` to a dict task -> ``[B, H, W, out]``; ``key``
    (training only) drives the heads' dropout.
    """

    task_specific_modules = ("heads",)

    def __init__(
        self,
        tasks: Mapping[str, int],
        *,
        depth: int = 50,
        width: int = 64,
        dilate_scale: int = 8,
        aspp_channels: int = 256,
        aspp_rates: Sequence[int] = (12, 24, 36),
        dropout: float = 0.5,
        in_channels: int = 3,
        rngs: nnx.Rngs,
    ):
        self.tasks = tuple(tasks)
        self.encoder = DilatedResNet(
            depth, width=width, dilate_scale=dilate_scale, in_channels=in_channels, rngs=rngs
        )
        self.heads = nnx.Dict(
            {
                t: DeepLabHead(
                    self.encoder.feature_dim,
                    c,
                    channels=aspp_channels,
                    rates=tuple(aspp_rates),
                    dropout=dropout,
                    rngs=rngs,
                )
                for t, c in tasks.items()
            }
        )

    def __call__(self, x: jax.Array, train: bool = False, key: jax.Array | None = None):
        feat = self.encoder(x, train)
        n = len(self.tasks)
        keys = jax.random.split(key, n) if key is not None else [None] * n
        out = {}
        for t, k in zip(self.tasks, keys, strict=True):
            y = self.heads[t](feat, train, k)
            y = layers.resize_bilinear_align_corners(y, x.shape[1], x.shape[2])
            out[t] = layers.finalize_prediction(t, y)
        return out
