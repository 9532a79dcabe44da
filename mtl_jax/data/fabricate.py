"""Tiny fabricated copies of the benchmark datasets, in their exact on-disk format.

Used by the tests (so the real builders and pipeline are what gets tested) and for trying the
harness without the real data::

    from mtl_jax.data import fabricate
    fabricate.write_fake_nyuv2("/tmp/fake_nyuv2", n_train=4, n_val=3)

The arrays are random but obey the format: full resolution, labels in ``0..C-1`` with ``-1``
holes, depth with invalid zeros, unit normals with zero (invalid) pixels, float32 on disk like
the authors' files.
"""

from __future__ import annotations

import os

import numpy as np

from mtl_jax.data import specs


def _fake_example(layout: specs.Layout, rng: np.random.Generator, dtype) -> dict[str, np.ndarray]:
    out = {}
    h, w = layout.info.input_shape[:2]
    invalid = rng.random((h, w)) < 0.05  # pixels without ground truth
    for field in layout.fields:
        if field.key == "image":
            a = rng.random(field.shape)
        elif field.num_classes is not None:
            a = rng.integers(0, field.num_classes, size=field.shape)
            a[invalid] = -1
        elif field.key == "depth":
            a = rng.uniform(0.5, 10.0, size=field.shape)
            a[invalid] = 0.0
        elif field.key == "normal":
            a = rng.normal(size=field.shape)
            a /= np.linalg.norm(a, axis=-1, keepdims=True)
            a[invalid] = 0.0
        else:  # pragma: no cover - every field of every layout is handled above
            raise AssertionError(field)
        out[field.folder] = a.astype(dtype)
    return out


def write_fake(
    name: str, root: str, n_train: int = 4, n_val: int = 3, seed: int = 0, dtype=np.float32
) -> str:
    """Writes a fabricated copy of dataset ``name`` to ``root``; returns ``root``.

    Args:
      name: one of `mtl_jax.data.DATASETS`.
      root: output directory (created; existing files with the same names are overwritten).
      n_train: examples in ``train``.
      n_val: examples in ``val``.
      seed: NumPy seed; the same seed writes the same files.
      dtype: on-disk dtype of every array (the real files are float32).
    """
    layout = specs.get_layout(name)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for field in layout.fields:
            os.makedirs(os.path.join(root, split, field.folder), exist_ok=True)
        for i in range(n):
            for folder, array in _fake_example(layout, rng, dtype).items():
                np.save(os.path.join(root, split, folder, f"{i}.npy"), array)
    return root


def write_fake_nyuv2(root: str, n_train: int = 4, n_val: int = 3, seed: int = 0) -> str:
    """Writes a tiny NYUv2 copy (MTAN layout, 288x384, 13 classes) to ``root``."""
    return write_fake("nyuv2", root, n_train=n_train, n_val=n_val, seed=seed)


def write_fake_cityscapes(
    root: str, n_train: int = 4, n_val: int = 3, seed: int = 0, num_classes: int = 7
) -> str:
    """Writes a tiny Cityscapes copy (MTAN layout, 128x256, ``label_7`` or ``label_19``)."""
    if num_classes not in (7, 19):
        raise ValueError(f"num_classes must be 7 or 19, got {num_classes}.")
    name = "cityscapes" if num_classes == 7 else "cityscapes19"
    return write_fake(name, root, n_train=n_train, n_val=n_val, seed=seed)
