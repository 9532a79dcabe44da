"""Small real multi-task datasets built from data that ships with the install (no download).

``multidigits``: the MultiMNIST construction of Sener & Koltun (NeurIPS 2018) applied to the
1,797 real 8x8 handwritten digits bundled with scikit-learn (`sklearn.datasets.load_digits`, the
test set of the UCI "Optical Recognition of Handwritten Digits" data, Alpaydin & Kaynak 1998;
scikit-learn is in the ``[data]`` extra). Construction, all fixed by `MULTIDIGITS_SEED`:

  1. the 1,797 source digits are permuted; the first `MULTIDIGITS_TEST_SOURCES` (360) are the
     test sources, the other 1,437 the train sources, so no source digit is in both splits;
  2. each pair takes a left and a right source digit, drawn uniformly from its split's sources
     (two different sources), `MULTIDIGITS_PAIRS` pairs per split (10,000 train, 2,000 test);
  3. the canvas is 8x12: the left digit at columns 0..7, the right at columns 4..11, overlapping
     in columns 4..7 by the pixel-wise maximum; pixel values in [0, 1] (sklearn's 0..16 / 16).

Tasks: ``left`` and ``right`` digit (10 classes each). Examples: ``image`` (8, 12, 1) float32,
``left`` and ``right`` int32.

``penguins``: the Palmer penguins table (Gorman et al., PLoS ONE 2014; CC0), shipped in
``mtl_jax/third_party/palmerpenguins/`` (see PROVENANCE.md there). Rows with a missing value in a
used column are dropped (333 of 344 remain); a seeded permutation puts
`PENGUINS_TEST_FRACTION` of them (67) in the test split, the rest (266) in train. Inputs: bill
length, bill depth and flipper length (mm), standardized with the train split's mean and
standard deviation; tasks: ``species`` (3 classes: Adelie, Chinstrap, Gentoo), ``sex`` (2
classes: female, male), ``body_mass`` (regression target standardized with the train split's
statistics; `penguins_body_mass_stats` gives the grams). Examples: ``features`` (3,) float32,
``species`` and ``sex`` int32, ``body_mass`` (1,) float32.

Everything here is NumPy + the standard library (no TensorFlow); `mtl_jax.data.builders` turns
the arrays into TFDS array_record files read by the same loader as the other datasets.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import os

import numpy as np

MULTIDIGITS_SEED = 0
MULTIDIGITS_TEST_SOURCES = 360
MULTIDIGITS_PAIRS = {"train": 10_000, "test": 2_000}
MULTIDIGITS_CANVAS = (8, 12)
MULTIDIGITS_RIGHT_OFFSET = 4  # first column of the right digit

PENGUINS_SEED = 0
PENGUINS_TEST_FRACTION = 0.2
PENGUINS_SPECIES = ("Adelie", "Chinstrap", "Gentoo")
PENGUINS_SEXES = ("female", "male")
PENGUINS_INPUTS = ("bill_length_mm", "bill_depth_mm", "flipper_length_mm")
PENGUINS_CSV = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "third_party",
    "palmerpenguins",
    "penguins.csv",
)

SPLITS = ("train", "test")


# -- MultiDigits ------------------------------------------------------------------------------


@functools.cache
def digit_sources() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 scikit-learn digits as ``(images [N, 8, 8] float32 in [0, 1], labels [N])``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is in the [data] extra
        raise ImportError(
            "The 'multidigits' dataset is built from scikit-learn's bundled digits: "
            "pip install 'mtl_jax[data]' (or scikit-learn)."
        ) from e
    digits = load_digits()
    images = (np.asarray(digits.images, np.float64) / 16.0).astype(np.float32)
    labels = np.asarray(digits.target, np.int32)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def source_split(num_sources: int, seed: int = MULTIDIGITS_SEED) -> dict[str, np.ndarray]:
    """Disjoint sorted source indices per split: ``{'train': ..., 'test': ...}``."""
    perm = np.random.default_rng([seed, 0]).permutation(num_sources)
    return {
        "train": np.sort(perm[MULTIDIGITS_TEST_SOURCES:]),
        "test": np.sort(perm[:MULTIDIGITS_TEST_SOURCES]),
    }


def overlay(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Canvas ``[..., 8, 12]``: ``left`` at columns 0..7, ``right`` at 4..11, max where both."""
    h, w = MULTIDIGITS_CANVAS
    off = MULTIDIGITS_RIGHT_OFFSET
    canvas = np.zeros(left.shape[:-2] + (h, w), np.float32)
    canvas[..., :, : left.shape[-1]] = left
    canvas[..., :, off:] = np.maximum(canvas[..., :, off:], right)
    return canvas


def multidigits_pairs(split: str, seed: int = MULTIDIGITS_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Source indices ``(left [P], right [P])`` of the pairs of ``split`` (left != right)."""
    images, _ = digit_sources()
    pool = source_split(len(images), seed)[split]
    rng = np.random.default_rng([seed, 1, SPLITS.index(split)])
    n = MULTIDIGITS_PAIRS[split]
    i = rng.integers(0, len(pool), n)
    j = (i + rng.integers(1, len(pool), n)) % len(pool)  # uniform over the other sources
    return pool[i], pool[j]


@functools.cache
def multidigits(split: str) -> dict[str, np.ndarray]:
    """Examples of ``split`` ('train' or 'test'): ``image`` [P, 8, 12, 1], ``left``, ``right``."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r} for 'multidigits'; valid: {', '.join(SPLITS)}.")
    images, labels = digit_sources()
    left, right = multidigits_pairs(split)
    out = {
        "image": overlay(images[left], images[right])[..., None],
        "left": labels[left],
        "right": labels[right],
    }
    for v in out.values():
        v.setflags(write=False)
    return out


# -- Penguins ---------------------------------------------------------------------------------


@functools.cache
def read_penguins(path: str = PENGUINS_CSV) -> dict[str, np.ndarray]:
    """Parses the CSV; keeps rows with every used column present (``NA`` = missing).

    Returns:
      ``{'inputs': [N, 3] float64 (mm), 'species': [N] int32, 'sex': [N] int32,
      'body_mass_g': [N] float64}`` in file order.
    """
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    used = (*PENGUINS_INPUTS, "species", "sex", "body_mass_g")
    missing = [c for c in used if rows and c not in rows[0]]
    if missing or not rows:
        raise ValueError(f"{path}: expected columns {used}, missing {missing}.")
    rows = [r for r in rows if all(r[c] not in ("", "NA") for c in used)]
    for r in rows:
        if r["species"] not in PENGUINS_SPECIES or r["sex"] not in PENGUINS_SEXES:
            raise ValueError(f"{path}: unexpected species/sex in row {r}.")
    return {
        "inputs": np.array([[float(r[c]) for c in PENGUINS_INPUTS] for r in rows]),
        "species": np.array([PENGUINS_SPECIES.index(r["species"]) for r in rows], np.int32),
        "sex": np.array([PENGUINS_SEXES.index(r["sex"]) for r in rows], np.int32),
        "body_mass_g": np.array([float(r["body_mass_g"]) for r in rows]),
    }


def penguins_split(num_rows: int, seed: int = PENGUINS_SEED) -> dict[str, np.ndarray]:
    """Disjoint sorted row indices: ``round(PENGUINS_TEST_FRACTION * N)`` test, the rest train."""
    perm = np.random.default_rng([seed, 2]).permutation(num_rows)
    n_test = int(round(PENGUINS_TEST_FRACTION * num_rows))
    return {"train": np.sort(perm[n_test:]), "test": np.sort(perm[:n_test])}


def penguins_stats() -> dict[str, np.ndarray]:
    """Train-split mean and standard deviation (ddof 0) of the inputs and of body mass (g)."""
    raw = read_penguins()
    train = penguins_split(len(raw["species"]))["train"]
    x, m = raw["inputs"][train], raw["body_mass_g"][train]
    return {
        "inputs_mean": x.mean(0),
        "inputs_std": x.std(0),
        "body_mass_mean": np.float64(m.mean()),
        "body_mass_std": np.float64(m.std()),
    }


def penguins_body_mass_stats() -> tuple[float, float]:
    """``(mean, std)`` in grams: ``grams = mean + std * standardized``."""
    s = penguins_stats()
    return float(s["body_mass_mean"]), float(s["body_mass_std"])


@functools.cache
def penguins(split: str) -> dict[str, np.ndarray]:
    """Examples of ``split``: ``features`` [N, 3], ``species``, ``sex``, ``body_mass`` [N, 1]."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r} for 'penguins'; valid: {', '.join(SPLITS)}.")
    raw = read_penguins()
    rows = penguins_split(len(raw["species"]))[split]
    s = penguins_stats()
    out = {
        "features": ((raw["inputs"][rows] - s["inputs_mean"]) / s["inputs_std"]).astype(np.float32),
        "species": raw["species"][rows],
        "sex": raw["sex"][rows],
        "body_mass": ((raw["body_mass_g"][rows] - s["body_mass_mean"]) / s["body_mass_std"]).astype(
            np.float32
        )[:, None],
    }
    for v in out.values():
        v.setflags(write=False)
    return out


# -- common -----------------------------------------------------------------------------------

GENERATORS = {"multidigits": multidigits, "penguins": penguins}


def arrays(name: str, split: str) -> dict[str, np.ndarray]:
    """The arrays of embedded dataset ``name`` (one of `GENERATORS`), split ``split``."""
    if name not in GENERATORS:
        raise ValueError(f"{name!r} is not an embedded dataset; valid: {', '.join(GENERATORS)}.")
    return GENERATORS[name](split)


def fingerprint(name: str) -> str:
    """Hash of the generated arrays: a changed construction or source gives a fresh cache."""
    h = hashlib.sha1(name.encode())
    for split in SPLITS:
        for key, value in sorted(arrays(name, split).items()):
            h.update(f"{split}/{key}/{value.dtype}/{value.shape};".encode())
            h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()[:16]
