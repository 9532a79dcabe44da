"""On-disk layouts of the benchmark datasets, their validation, and `DatasetInfo`.

The layouts are the preprocessed ``.npy`` copies the multi-task benchmark papers distribute
(MTAN, CAGrad, Nash-MTL, FAMO, LibMTL all read the same files)::

    ROOT/{train,val}/image/{i}.npy      float, (H, W, 3), in [0, 1]
    ROOT/{train,val}/label/{i}.npy      (H, W), classes 0..C-1, -1 = ignore   (NYUv2)
    ROOT/{train,val}/label_7/{i}.npy    (H, W), 7 classes, -1 = ignore        (Cityscapes)
    ROOT/{train,val}/depth/{i}.npy      float, (H, W, 1), 0 = invalid
    ROOT/{train,val}/normal/{i}.npy     float, (H, W, 3), unit vectors, 0 = invalid (NYUv2)

with ``i`` running over ``0 .. n-1``. "val" is the split every paper reports as the test split.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

_NYUV2_URL = "https://www.dropbox.com/sh/86nssgwm6hm3vkb/AACrnUQ4GxpdrBbLjb6n-mWNa?dl=0"
_CITYSCAPES_URL = "https://www.dropbox.com/sh/gaw6vh6qusoyms6/AADwWi0Tp3E3M4B2xzeGlsEna?dl=0"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset.

    Attributes:
      name: dataset name as accepted by `make_loader` (one of `DATASETS`).
      tasks: task names, in the order of `mtl_jax.tasks.get_tasks(name)`.
      input_shape: ``(H, W, C)`` of one image.
      splits: expected number of examples per split in the full dataset.
      train_split: split used for training.
      eval_split: split the papers report (their "test" numbers come from it).
      instructions: how to obtain the data and the expected on-disk layout (for the embedded
        datasets: where the data comes from).
      input_key: batch key of the model input.
      embedded: True when the data ships with the install (no ``data_dir`` needed).
    """

    name: str
    tasks: tuple[str, ...]
    input_shape: tuple[int, ...]
    splits: dict[str, int]
    train_split: str
    eval_split: str
    instructions: str
    input_key: str = "image"
    embedded: bool = False


@dataclasses.dataclass(frozen=True)
class Field:
    """One per-example file: ``ROOT/<split>/<folder>/<i>.npy`` -> batch key ``key``."""

    key: str  # batch key ('image', 'segmentation', 'depth', 'normal', ...)
    folder: str  # folder name on disk
    shape: tuple[int, ...]
    num_classes: int | None = None  # labels only: values in {-1, 0, ..., num_classes - 1}


@dataclasses.dataclass(frozen=True)
class Layout:
    """Everything the builder and the validation need to know about one dataset."""

    info: DatasetInfo
    fields: tuple[Field, ...]
    tfds_name: str  # name of the TFDS builder class (unique in the TFDS registry)
    folder_aliases: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


_NYUV2_INSTRUCTIONS = f"""\
NYUv2 (13-class segmentation, depth, surface normals), preprocessed by Liu et al. (MTAN, CVPR 2019)
and used unchanged by CAGrad, Nash-MTL, FAMO and LibMTL. It cannot be redistributed: download it
yourself from the MTAN authors' link
  {_NYUV2_URL}
(see https://github.com/lorenmt/mtan, "Datasets"), unpack it, and pass the folder that contains
`train/` and `val/` as data_dir. Expected layout (i = 0 .. n-1, any float dtype):
  DATA_DIR/train/image/{{i}}.npy    (288, 384, 3)  RGB in [0, 1]
  DATA_DIR/train/label/{{i}}.npy    (288, 384)     classes 0..12, -1 = ignore
  DATA_DIR/train/depth/{{i}}.npy    (288, 384, 1)  metres, 0 = invalid
  DATA_DIR/train/normal/{{i}}.npy   (288, 384, 3)  unit normals, 0 = invalid
  DATA_DIR/val/...                 same four folders
with 795 train and 654 val examples."""

_CITYSCAPES_INSTRUCTIONS = f"""\
Cityscapes (segmentation + disparity), the 128x256 copy preprocessed by Liu et al. (MTAN, CVPR
2019) and used by CAGrad, Nash-MTL, FAMO and LibMTL. Cityscapes requires registration at
https://www.cityscapes-dataset.com and cannot be redistributed: get the preprocessed copy from the
MTAN authors' link
  {_CITYSCAPES_URL}
(see https://github.com/lorenmt/mtan, "Update - Jun 2019"), unpack it, and pass the folder that
contains `train/` and `val/` as data_dir. Expected layout (i = 0 .. n-1, any float dtype):
  DATA_DIR/train/image/{{{{i}}}}.npy    (128, 256, 3)  RGB in [0, 1]
  DATA_DIR/train/{{label}}/{{{{i}}}}.npy  (128, 256)     classes 0..{{c}}, -1 = ignore
  DATA_DIR/train/depth/{{{{i}}}}.npy    (128, 256, 1)  disparity, 0 = invalid
  DATA_DIR/val/...                 same folders
with 2975 train and 500 val examples."""


def _cityscapes_layout(
    name: str, num_classes: int, folder: str, aliases: tuple[str, ...]
) -> Layout:
    instructions = _CITYSCAPES_INSTRUCTIONS.format(label=folder, c=num_classes - 1)
    if aliases:
        instructions += (
            f"\nA `{aliases[0]}` folder is accepted in place of `{folder}` (LibMTL's "
            "`cityscapes2` copy renames it)."
        )
    return Layout(
        info=DatasetInfo(
            name=name,
            tasks=("segmentation", "depth"),
            input_shape=(128, 256, 3),
            splits={"train": 2975, "val": 500},
            train_split="train",
            eval_split="val",
            instructions=instructions,
        ),
        fields=(
            Field("image", "image", (128, 256, 3)),
            Field("segmentation", folder, (128, 256), num_classes=num_classes),
            Field("depth", "depth", (128, 256, 1)),
        ),
        tfds_name=f"mtl_jax_{name}",
        folder_aliases={folder: aliases} if aliases else {},
    )


LAYOUTS: dict[str, Layout] = {
    "nyuv2": Layout(
        info=DatasetInfo(
            name="nyuv2",
            tasks=("segmentation", "depth", "normal"),
            input_shape=(288, 384, 3),
            splits={"train": 795, "val": 654},
            train_split="train",
            eval_split="val",
            instructions=_NYUV2_INSTRUCTIONS,
        ),
        fields=(
            Field("image", "image", (288, 384, 3)),
            Field("segmentation", "label", (288, 384), num_classes=13),
            Field("depth", "depth", (288, 384, 1)),
            Field("normal", "normal", (288, 384, 3)),
        ),
        tfds_name="mtl_jax_nyuv2",
    ),
    "cityscapes": _cityscapes_layout("cityscapes", 7, "label_7", ("label",)),
    "cityscapes19": _cityscapes_layout("cityscapes19", 19, "label_19", ()),
}

_MULTIDIGITS_INSTRUCTIONS = """\
MultiDigits: the MultiMNIST construction (Sener & Koltun, NeurIPS 2018) on the 1,797 real 8x8
digits bundled with scikit-learn (UCI Optical Recognition of Handwritten Digits). Nothing to
download: it is generated from `sklearn.datasets.load_digits` (scikit-learn is in the [data]
extra). 8x12 canvas, left digit at columns 0..7, right digit at 4..11, overlapping by max; tasks
`left` and `right` (10 classes each); 10,000 train / 2,000 test pairs drawn from disjoint source
digits (1,437 / 360), fixed seed. See mtl_jax/data/embedded.py."""

_PENGUINS_INSTRUCTIONS = """\
Palmer penguins (Gorman, Williams & Fraser, PLoS ONE 2014; CC0), shipped with mtl_jax in
mtl_jax/third_party/palmerpenguins/ (see PROVENANCE.md). Nothing to download. Inputs: bill length,
bill depth, flipper length (standardized with train statistics); tasks: `species` (3 classes),
`sex` (2 classes), `body_mass` (regression, standardized; metrics also in grams). The 333 complete
rows are split 266 train / 67 test with a fixed seed. See mtl_jax/data/embedded.py."""

LAYOUTS["multidigits"] = Layout(
    info=DatasetInfo(
        name="multidigits",
        tasks=("left", "right"),
        input_shape=(8, 12, 1),
        splits={"train": 10_000, "test": 2_000},
        train_split="train",
        eval_split="test",
        instructions=_MULTIDIGITS_INSTRUCTIONS,
        embedded=True,
    ),
    fields=(
        Field("image", "image", (8, 12, 1)),
        Field("left", "left", (), num_classes=10),
        Field("right", "right", (), num_classes=10),
    ),
    tfds_name="mtl_jax_multidigits",
)
LAYOUTS["penguins"] = Layout(
    info=DatasetInfo(
        name="penguins",
        tasks=("species", "sex", "body_mass"),
        input_shape=(3,),
        splits={"train": 266, "test": 67},
        train_split="train",
        eval_split="test",
        instructions=_PENGUINS_INSTRUCTIONS,
        input_key="features",
        embedded=True,
    ),
    fields=(
        Field("features", "features", (3,)),
        Field("species", "species", (), num_classes=3),
        Field("sex", "sex", (), num_classes=2),
        Field("body_mass", "body_mass", (1,)),
    ),
    tfds_name="mtl_jax_penguins",
)

DATASETS: tuple[str, ...] = tuple(LAYOUTS)


def get_layout(name: str) -> Layout:
    """Returns the layout of dataset ``name``; ValueError listing the valid names otherwise."""
    if name not in LAYOUTS:
        raise ValueError(f"Unknown dataset {name!r}; valid names: {', '.join(DATASETS)}.")
    return LAYOUTS[name]


def dataset_info(name: str) -> DatasetInfo:
    """Returns the `DatasetInfo` of ``name`` (ValueError listing valid names if unknown)."""
    return get_layout(name).info


class DataLayoutError(FileNotFoundError):
    """The dataset directory is missing or does not have the expected layout."""


def _where(layout: Layout, data_dir: str) -> str:
    return f"\nLooked in: {os.path.abspath(data_dir)}\n\n{layout.info.instructions}"


_NPY = re.compile(r"^(\d+)\.npy$")


def resolve_folder(layout: Layout, split_dir: str, field: Field) -> str:
    """Returns the directory holding ``field`` in ``split_dir`` (honouring folder aliases)."""
    for folder in (field.folder, *layout.folder_aliases.get(field.folder, ())):
        path = os.path.join(split_dir, folder)
        if os.path.isdir(path):
            return path
    return os.path.join(split_dir, field.folder)


def check_layout(name: str, data_dir: str, splits: tuple[str, ...] | None = None) -> dict[str, int]:
    """Checks the directory structure and returns the number of examples per split.

    Checks that every folder exists, holds ``0.npy .. {n-1}.npy`` with no gaps, and that all
    folders of a split hold the same indices. Per-file shapes and values are checked when the
    file is read (`load_example`).

    Raises:
      DataLayoutError: naming what is missing, where it looked, the expected layout and where to
        get the data.
    """
    layout = get_layout(name)
    if not data_dir:
        raise DataLayoutError(
            f"No data directory given for dataset {name!r} (set config.data_dir)."
            + _where(layout, ".")
        )
    if not os.path.isdir(data_dir):
        raise DataLayoutError(
            f"Data directory for {name!r} does not exist: {data_dir}" + _where(layout, data_dir)
        )
    counts = {}
    for split in splits or tuple(layout.info.splits):
        split_dir = os.path.join(data_dir, split)
        if not os.path.isdir(split_dir):
            raise DataLayoutError(
                f"Missing split folder {split_dir!r} for dataset {name!r}."
                + _where(layout, data_dir)
            )
        indices = None
        for field in layout.fields:
            folder = resolve_folder(layout, split_dir, field)
            if not os.path.isdir(folder):
                raise DataLayoutError(
                    f"Missing folder {folder!r} ({field.key} of split {split!r}) for dataset "
                    f"{name!r}." + _where(layout, data_dir)
                )
            found = sorted(
                int(m.group(1)) for f in os.listdir(folder) if (m := _NPY.match(f)) is not None
            )
            if not found:
                raise DataLayoutError(
                    f"Empty split: no '<i>.npy' files in {folder!r} for dataset {name!r}."
                    + _where(layout, data_dir)
                )
            if found != list(range(len(found))):
                missing = sorted(set(range(found[-1] + 1)) - set(found))[:5]
                raise DataLayoutError(
                    f"Files in {folder!r} are not numbered 0..{len(found) - 1}: missing "
                    f"{', '.join(f'{i}.npy' for i in missing)}." + _where(layout, data_dir)
                )
            if indices is None:
                indices = found
            elif len(found) != len(indices):
                raise DataLayoutError(
                    f"Split {split!r} of {name!r} has {len(indices)} images but {len(found)} "
                    f"files in {folder!r}; every folder needs one file per image."
                    + _where(layout, data_dir)
                )
        counts[split] = len(indices)
    return counts


def load_example(name: str, data_dir: str, split: str, index: int) -> dict[str, np.ndarray]:
    """Reads and validates example ``index`` of ``split``; returns batch-keyed arrays.

    Images and dense float targets are cast to float32, labels to int32.

    Raises:
      ValueError: naming the file, when its shape is wrong, its values are not finite, or a label
        is not an integer in ``{-1, 0, ..., C-1}``.
    """
    layout = get_layout(name)
    split_dir = os.path.join(data_dir, split)
    example = {}
    for field in layout.fields:
        path = os.path.join(resolve_folder(layout, split_dir, field), f"{index}.npy")
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file
            raise ValueError(
                f"Cannot read {path!r} as a .npy array ({type(e).__name__}: {e}); expected a "
                f"NumPy array of shape {field.shape} for {field.key!r} of dataset {name!r} "
                "(a truncated or corrupted copy? copy the file again)."
            ) from e
        if array.shape != field.shape:
            raise ValueError(
                f"{path}: shape {array.shape}, expected {field.shape} for {field.key!r} of "
                f"dataset {name!r}." + _where(layout, data_dir)
            )
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise ValueError(
                f"{path}: dtype {array.dtype}, expected a real float or integer array for "
                f"{field.key!r} of dataset {name!r}."
            )
        if not np.all(np.isfinite(array)):
            raise ValueError(
                f"{path}: contains NaN or infinite values; expected finite values for "
                f"{field.key!r} (invalid pixels are 0 for depth/normal, -1 for labels)."
            )
        if field.num_classes is None:
            example[field.key] = array.astype(np.float32)
            continue
        labels = array.astype(np.int32)
        bad = (labels != array) | (labels < -1) | (labels >= field.num_classes)
        if np.any(bad):
            values = np.unique(array[bad])[:5]
            raise ValueError(
                f"{path}: label values {values.tolist()} out of range; expected integers in "
                f"0..{field.num_classes - 1} or -1 (ignore) for dataset {name!r}."
            )
        example[field.key] = labels
    return example
