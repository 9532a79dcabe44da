"""Small hard-parameter-sharing models for the embedded datasets (Flax NNX).

A shared trunk and one head per task, as `SegNet` but for per-example predictions: the model
maps an input batch ``[B, ...]`` to a dict task -> ``[B, out_channels]`` (logits for
classification tasks, values for regression). The trunk is shared; everything under ``heads``
is task specific (`mtl_jax.models.param_labels`).

* `MLP` (``'mlp'``): flatten, ``hidden`` Dense+ReLU layers (optional dropout), then per task
  ``head_hidden`` Dense+ReLU layers and a Dense output. For tabular data (Penguins) and as the
  fully connected MultiMNIST baseline.
* `ConvNet` (``'convnet'``): a LeNet-style trunk (3x3 conv + ReLU blocks, 2x2 max pooling after
  each block) and a Dense+ReLU layer, then the same heads: the MultiMNIST model of Sener &
  Koltun (NeurIPS 2018, a LeNet trunk with per-task fully connected heads), scaled to 8x12
  canvases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
from flax import nnx

from mtl_jax.models import layers


def _dense_stack(sizes: Sequence[int], rngs: nnx.Rngs) -> nnx.List:
    pairs = zip(sizes[:-1], sizes[1:], strict=True)
    return nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in pairs])


class _Head(nnx.Module):
    """``head_hidden`` Dense+ReLU layers then a Dense output layer."""

    def __init__(self, cin: int, hidden: Sequence[int], cout: int, rngs: nnx.Rngs):
        self.hidden = _dense_stack((cin, *hidden), rngs)
        self.out = nnx.Linear(([cin, *hidden])[-1], cout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.hidden:
            x = jax.nn.relu(layer(x))
        return self.out(x)


def _split_key(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    return [None] * n if key is None else list(jax.random.split(key, n))


class MLP(nnx.Module):
    """Shared MLP trunk + one head per task (hard parameter sharing).

    Args:
      tasks: task name -> output size (classes for classification, 1 for a scalar target).
      in_features: size of one flattened input example (e.g. 3 for Penguins, 96 for an 8x12
        MultiDigits canvas).
      hidden: widths of the shared Dense+ReLU layers.
      head_hidden: widths of each head's Dense+ReLU layers before its output layer.
      dropout: dropout rate after every shared layer (training only).
      rngs: `nnx.Rngs` for initialization.

    ``model(x, train, key)`` maps ``[B, ...]`` to a dict task -> ``[B, out]``; ``key`` drives
    dropout when ``train``.
    """

    task_specific_modules = ("heads",)

    def __init__(
        self,
        tasks: Mapping[str, int],
        *,
        in_features: int,
        hidden: Sequence[int] = (64, 64),
        head_hidden: Sequence[int] = (),
        dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MLP: dropout must be in [0, 1), got {dropout}.")
        self.tasks = tuple(tasks)
        self.in_features = int(in_features)
        self.dropout = float(dropout)
        self.trunk = _dense_stack((self.in_features, *hidden), rngs)
        width = ([self.in_features, *hidden])[-1]
        self.heads = nnx.Dict({t: _Head(width, head_hidden, c, rngs) for t, c in tasks.items()})

    def __call__(self, x: jax.Array, train: bool = False, key: jax.Array | None = None):
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"MLP: input has {x.shape[1]} features per example, expected {self.in_features}."
            )
        keys = _split_key(key if train else None, len(self.trunk))
        for layer, k in zip(self.trunk, keys, strict=True):
            x = layers.dropout(jax.nn.relu(layer(x)), self.dropout, k)
        return {t: self.heads[t](x) for t in self.tasks}


class ConvNet(nnx.Module):
    """LeNet-style shared conv trunk + one fully connected head per task.

    Args:
      tasks: task name -> output size.
      input_shape: ``(H, W, C)`` of one example (``(8, 12, 1)`` for MultiDigits).
      channels: output channels of the 3x3 conv + ReLU + 2x2 max-pool blocks (H and W must
        stay >= 1 after the poolings).
      hidden: width of the shared Dense+ReLU layer after the conv blocks.
      head_hidden: widths of each head's Dense+ReLU layers.
      dropout: dropout rate on the shared representation (training only).
      rngs: `nnx.Rngs` for initialization.
    """

    task_specific_modules = ("heads",)

    def __init__(
        self,
        tasks: Mapping[str, int],
        *,
        input_shape: Sequence[int] = (8, 12, 1),
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        head_hidden: Sequence[int] = (),
        dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"ConvNet: dropout must be in [0, 1), got {dropout}.")
        h, w, c = (int(v) for v in input_shape)
        self.tasks = tuple(tasks)
        self.input_shape = (h, w, c)
        self.dropout = float(dropout)
        chans = (c, *channels)
        self.convs = nnx.List(
            [
                nnx.Conv(
                    a,
                    b,
                    (3, 3),
                    padding="SAME",
                    conv_general_dilated=layers.conv_general_dilated,
                    kernel_init=layers.lecun_normal(),  # nnx's default, drawn flat
                    rngs=rngs,
                )
                for a, b in zip(chans[:-1], chans[1:], strict=True)
            ]
        )
        for _ in channels:
            h, w = h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"ConvNet: {len(channels)} poolings are too many for {input_shape}.")
        self.fc = nnx.Linear(h * w * chans[-1], hidden, rngs=rngs)
        self.heads = nnx.Dict({t: _Head(hidden, head_hidden, n, rngs) for t, n in tasks.items()})

    def __call__(self, x: jax.Array, train: bool = False, key: jax.Array | None = None):
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"ConvNet: input shape {x.shape}, expected [B, *{self.input_shape}].")
        for conv in self.convs:
            x = layers.max_pool(jax.nn.relu(conv(x)), 2, 2)
        x = jax.nn.relu(self.fc(x.reshape(x.shape[0], -1)))
        x = layers.dropout(x, self.dropout, key if train else None)
        return {t: self.heads[t](x) for t in self.tasks}


__all__ = ["MLP", "ConvNet"]
