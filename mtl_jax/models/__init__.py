"""Dense-prediction multi-task models for the experiment harness (Flax NNX, NHWC).

``build_model(name, tasks, **kwargs)`` builds one by name; every model maps an image batch
``[B, H, W, C]`` to a dict task -> prediction ``[B, H, W, out_channels]`` and is called as
``model(x, train, key)`` (``key`` drives dropout, if any). `param_labels` marks each parameter
``'shared'`` or ``'task_specific'`` for `mtl.shared_only`.

* ``'segnet'``: SegNet encoder-decoder shared, two-conv head per task (hard parameter sharing).
* ``'segnet_mtan'``: MTAN (SegNet + per-task attention), the NYUv2/Cityscapes benchmark model of
  MTAN, CAGrad, Nash-MTL and FAMO.
* ``'resnet_deeplab'``: dilated ResNet-18/34/50/101 shared + DeepLab ASPP head per task (LibMTL).
* ``'mlp'``, ``'convnet'``: small shared trunks + per-task heads for the embedded per-example
  datasets (MultiDigits, Penguins); their outputs are ``[B, out_channels]`` (`mlp.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from mtl_jax.models.layers import finalize_prediction
from mtl_jax.models.mlp import MLP, ConvNet
from mtl_jax.models.resnet import DeepLabHead, DilatedResNet, ResNetDeepLab
from mtl_jax.models.segnet import SegNet, SegNetMTAN

MODELS: dict[str, type[nnx.Module]] = {
    "segnet": SegNet,
    "segnet_mtan": SegNetMTAN,
    "resnet_deeplab": ResNetDeepLab,
    "mlp": MLP,  # embedded datasets (mtl_jax/models/mlp.py): per-example heads [B, out]
    "convnet": ConvNet,
}


def build_model(name: str, tasks: Mapping[str, int], *, seed: int = 0, **kwargs: Any) -> nnx.Module:
    """Builds model ``name`` for ``tasks`` (task name -> output channels).

    Raises:
      ValueError: for an unknown name, listing the valid ones.
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}. Valid models: {', '.join(sorted(MODELS))}.")
    return MODELS[name](dict(tasks), rngs=nnx.Rngs(seed), **kwargs)


def param_labels(model: nnx.Module, params: Any) -> Any:
    """The ``'shared'`` / ``'task_specific'`` label pytree of ``nnx.state(model, nnx.Param)``.

    A parameter is task specific when it lives under one of the model's
    ``task_specific_modules`` (its heads, MTAN's per-task attention).
    """
    prefixes = tuple(getattr(model, "task_specific_modules", ("heads",)))

    def label(path, _):
        top = getattr(path[0], "key", getattr(path[0], "name", None)) if path else None
        return "task_specific" if top in prefixes else "shared"

    return jax.tree_util.tree_map_with_path(label, params)


__all__ = [
    "MLP",
    "MODELS",
    "ConvNet",
    "DeepLabHead",
    "DilatedResNet",
    "ResNetDeepLab",
    "SegNet",
    "SegNetMTAN",
    "build_model",
    "finalize_prediction",
    "param_labels",
]
