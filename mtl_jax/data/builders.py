"""TFDS builders for the preprocessed ``.npy`` benchmark copies, without TensorFlow.

Each builder reads a user-supplied directory (TFDS "manual download": ``manual_dir``), validates
every file, and writes ``array_record`` files with `tfds.features.Tensor` features; they are read
back with `builder.as_data_source(split)` (random access, NumPy dicts). Neither step needs
TensorFlow (the default tfrecord format, ``Image`` features and ``as_dataset`` would).

The prepared files are cached under ``cache_dir/<fingerprint>/<builder name>/<version>/``, where the
fingerprint hashes the names, sizes and modification times of the raw files, so editing or
replacing the raw data triggers a fresh preparation instead of serving stale records. The default
``cache_dir`` is ``<data_dir>/_tfds`` (override with the ``MTL_JAX_TFDS_DIR`` environment
variable or the ``cache_dir`` argument, e.g. when ``data_dir`` is read-only).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from mtl_jax.data import specs

try:
    import tensorflow_datasets as tfds
except ImportError as e:  # pragma: no cover - exercised only without the [data] extra
    raise ImportError(
        "mtl_jax.data needs tensorflow-datasets, array_record and grain (no TensorFlow): "
        "pip install 'mtl_jax[data]'"
    ) from e

CACHE_ENV = "MTL_JAX_TFDS_DIR"


class _NpyBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared builder: one Tensor feature per field of the dataset layout."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Preprocessed .npy copy (MTAN layout) as array_record.",
        "1.1.0": "Tensors stored as raw bytes (60x faster preparation).",
    }
    DATASET: str = ""  # key into specs.LAYOUTS, set by subclasses
    # Nothing is downloaded, so there are no URL checksums to look up next to the code. TFDS's
    # default `code_path` lookup imports `importlib_resources`, which is not installed.
    code_path = None

    @classmethod
    def _layout(cls) -> specs.Layout:
        return specs.get_layout(cls.DATASET)

    def _info(self) -> tfds.core.DatasetInfo:
        layout = self._layout()
        features = {}
        for field in layout.fields:
            dtype = np.int32 if field.num_classes is not None else np.float32
            # BYTES: one raw buffer per array. The default encoding writes a protobuf
            # float/int64 list element by element (~0.2 s per NYUv2 image).
            features[field.key] = tfds.features.Tensor(
                shape=field.shape, dtype=dtype, encoding=tfds.features.Encoding.BYTES
            )
        return tfds.core.DatasetInfo(
            builder=self,
            description=layout.info.instructions,
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,  # record i is file i.npy (eval order = file order)
            homepage="https://github.com/lorenmt/mtan",
        )

    def _split_generators(self, dl_manager):
        data_dir = os.fspath(dl_manager.manual_dir)
        counts = specs.check_layout(self.DATASET, data_dir)
        return {split: self._generate_examples(data_dir, split, n) for split, n in counts.items()}

    def _generate_examples(self, data_dir: str, split: str, n: int):
        for i in range(n):
            yield i, specs.load_example(self.DATASET, data_dir, split, i)


class MtlJaxNyuv2(_NpyBuilder, skip_registration=True):
    """NYUv2, 13-class segmentation + depth + normals, 288x384 (MTAN preprocessing)."""

    name = "mtl_jax_nyuv2"
    DATASET = "nyuv2"
    MANUAL_DOWNLOAD_INSTRUCTIONS = specs.LAYOUTS["nyuv2"].info.instructions


class MtlJaxCityscapes(_NpyBuilder, skip_registration=True):
    """Cityscapes, 7-class segmentation + disparity, 128x256 (MTAN preprocessing)."""

    name = "mtl_jax_cityscapes"
    DATASET = "cityscapes"
    MANUAL_DOWNLOAD_INSTRUCTIONS = specs.LAYOUTS["cityscapes"].info.instructions


class MtlJaxCityscapes19(_NpyBuilder, skip_registration=True):
    """Cityscapes, 19-class segmentation + disparity, 128x256 (MTAN preprocessing)."""

    name = "mtl_jax_cityscapes19"
    DATASET = "cityscapes19"
    MANUAL_DOWNLOAD_INSTRUCTIONS = specs.LAYOUTS["cityscapes19"].info.instructions


BUILDERS: dict[str, type[_NpyBuilder]] = {
    b.DATASET: b for b in (MtlJaxNyuv2, MtlJaxCityscapes, MtlJaxCityscapes19)
}


def fingerprint(name: str, data_dir: str) -> str:
    """Hash of the raw files' names, sizes and mtimes (layout must already be valid)."""
    layout = specs.get_layout(name)
    h = hashlib.sha1(name.encode())
    for split in layout.info.splits:
        split_dir = os.path.join(data_dir, split)
        for field in layout.fields:
            folder = specs.resolve_folder(layout, split_dir, field)
            h.update(folder.encode())
            with os.scandir(folder) as entries:
                for entry in sorted(entries, key=lambda e: e.name):
                    st = entry.stat()
                    h.update(f"{entry.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def prepare(name: str, data_dir: str, cache_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Validates ``data_dir``, prepares the array_record files once, returns the builder.

    Args:
      name: one of `mtl_jax.data.DATASETS`.
      data_dir: the raw dataset root (holding ``train/`` and ``val/``).
      cache_dir: where to write the prepared files; default ``$MTL_JAX_TFDS_DIR`` or
        ``<data_dir>/_tfds``.

    Preparation happens once per raw-data version; with several processes sharing a file
    system (multi-host), call this once (e.g. on one host) before starting them all, since
    concurrent preparations of the same cache directory race.

    Returns:
      A prepared TFDS builder; ``builder.as_data_source(split)`` gives random access.

    Raises:
      mtl_jax.data.DataLayoutError: missing folders or files (with instructions).
      ValueError: a malformed file, named.
    """
    specs.check_layout(name, data_dir)
    cache_dir = cache_dir or os.environ.get(CACHE_ENV) or os.path.join(data_dir, "_tfds")
    tfds_dir = os.path.join(cache_dir, fingerprint(name, data_dir))
    try:
        os.makedirs(tfds_dir, exist_ok=True)
    except OSError as e:
        raise OSError(
            f"Cannot create the cache for the prepared {name!r} files at {tfds_dir!r} ({e}). "
            f"Pass cache_dir= or set ${CACHE_ENV} to a writable directory."
        ) from e
    builder = BUILDERS[name](data_dir=tfds_dir, file_format="array_record")
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(
            manual_dir=os.path.abspath(data_dir), try_download_gcs=False
        ),
    )
    return builder
