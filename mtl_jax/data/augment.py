"""NYUv2 / Cityscapes training augmentation of the benchmark papers, in NumPy.

Random scale-crop with the scale drawn from {1.0, 1.2, 1.5}, then a horizontal flip with
probability 1/2 (MTAN issue 34 by Jialong Wu, used by MTAN, CAGrad, Nash-MTL, FAMO and LibMTL).
For a scale ``s``, a window of ``int(H / s) x int(W / s)`` pixels at a uniformly random position
is resized back to ``H x W``: image and normals bilinearly with ``align_corners=True``, labels and
depth by nearest neighbour (PyTorch's ``mode='nearest'`` index rule), and depth is divided by
``s`` (the camera moved closer). The flip negates the x component of the normals.

Checked against: LibMTL ``examples/nyu/create_dataset.py`` (``RandomScaleCrop`` and
``NYUv2.__getitem__``) and CAGrad ``cityscapes/create_dataset.py``
(``RandomScaleCropCityScapes``, which, like the reference, also divides Cityscapes disparity by
the scale). Resampling matches ``torch.nn.functional.interpolate`` to float32 rounding
(tests/test_data.py, reference marker). Random draws use NumPy instead of Python's ``random``.
Normals are not re-normalised after bilinear resampling, as in the reference.
"""

from __future__ import annotations

import numpy as np

SCALES: tuple[float, ...] = (1.0, 1.2, 1.5)


def _nearest_index(out_size: int, in_size: int) -> np.ndarray:
    # PyTorch (aten/src/ATen/native/UpSample.h, nearest_idx): floor(dst * (float)in/out).
    if out_size == in_size:
        return np.arange(out_size)
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def _linear_weights(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # align_corners=True: src = dst * (in - 1) / (out - 1), computed in float32 like PyTorch.
    scale = np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0)
    src = np.arange(out_size, dtype=np.float32) * scale
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, lam


def resize_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of ``x[h, w, C]`` to ``[height, width, C]`` with ``align_corners=True``."""
    y0, y1, ly = _linear_weights(height, x.shape[0])
    x0, x1, lx = _linear_weights(width, x.shape[1])
    ly = ly[:, None, None]
    lx = lx[None, :, None]
    # Interpolate along x once per input row, then along y: the same products and order as
    # PyTorch's kernel, h0 * (w0 * x00 + w1 * x01) + h1 * (w0 * x10 + w1 * x11).
    cols = x[:, x0] * (1 - lx) + x[:, x1] * lx
    return (cols[y0] * (1 - ly) + cols[y1] * ly).astype(x.dtype)


def resize_nearest(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of ``x[h, w, ...]`` to ``[height, width, ...]`` (PyTorch rule)."""
    return x[_nearest_index(height, x.shape[0])][:, _nearest_index(width, x.shape[1])]


def scale_crop(example: dict[str, np.ndarray], scale: float, top: int, left: int) -> dict:
    """Deterministic part of the random scale-crop: crop at (top, left), resize back.

    Args:
      example: dict with ``image`` [H, W, 3] and any of ``segmentation`` [H, W], ``depth``
        [H, W, 1], ``normal`` [H, W, 3]; other keys are passed through.
      scale: the zoom factor ``s``; the window is ``int(H / s) x int(W / s)``.
      top: first row of the window, in ``0 .. H - int(H / s)``.
      left: first column of the window, in ``0 .. W - int(W / s)``.

    Returns:
      A new dict with the same keys and shapes.
    """
    height, width = example["image"].shape[:2]
    h, w = int(height / scale), int(width / scale)
    out = dict(example)
    for key, value in example.items():
        if key not in ("image", "segmentation", "depth", "normal"):
            continue
        window = value[top : top + h, left : left + w]
        if key in ("image", "normal"):
            out[key] = resize_bilinear(window, height, width)
        else:
            out[key] = resize_nearest(window, height, width)
    if "depth" in out:
        out["depth"] = (out["depth"] / np.float32(scale)).astype(example["depth"].dtype)
    return out


def hflip(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Horizontal flip; negates the x component of ``normal``."""
    out = dict(example)
    for key in ("image", "segmentation", "depth", "normal"):
        if key in example:
            out[key] = np.ascontiguousarray(example[key][:, ::-1])
    if "normal" in out:
        out["normal"] = out["normal"].copy()
        out["normal"][..., 0] = -out["normal"][..., 0]
    return out


def random_scale_crop_flip(
    example: dict[str, np.ndarray], rng: np.random.Generator, scales: tuple[float, ...] = SCALES
) -> dict[str, np.ndarray]:
    """The papers' augmentation: random scale-crop, then a horizontal flip with probability 1/2.

    Args:
      example: one example (see `scale_crop`).
      rng: NumPy generator; the same generator state gives the same output.
      scales: candidate zoom factors.

    Returns:
      The augmented example (new arrays, same shapes and dtypes).
    """
    height, width = example["image"].shape[:2]
    scale = scales[int(rng.integers(len(scales)))]
    h, w = int(height / scale), int(width / scale)
    top = int(rng.integers(0, height - h + 1))
    left = int(rng.integers(0, width - w + 1))
    if scale != 1.0:
        example = scale_crop(example, scale, top, left)
    if rng.random() < 0.5:
        example = hflip(example)
    return example
