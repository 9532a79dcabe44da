"""Input pipeline: grain over the TFDS array_record data source.

One pipeline for training and evaluation (``grain.MapDataset``, random access, so the iterator
position is a single integer and resuming is exact)::

    per-epoch order  train: global shuffle of the split by (seed, epoch), then host shard
                     h of S takes positions h, h + S, ... (floor(n / S) each, disjoint);
                     eval: the split in file order, host h takes examples h, h + S, ...
    epoch length     a multiple of batch_size: the tail is dropped (drop_remainder) or padded
                     with zero examples whose 'mask' is False; every host gets the same
                     number of batches
    augmentation     optional, per example, seeded by (seed, shard, position in the stream)
    batching         grain ``to_iter_dataset`` (threaded read-ahead) + ``batch``

Every batch is a dict of NumPy arrays: ``image`` [B, H, W, 3] float32, the task targets
(``segmentation`` [B, H, W] int32 with -1 = ignore, ``depth`` [B, H, W, 1] float32, ``normal``
[B, H, W, 3] float32) and ``mask`` [B] bool (all True unless the batch is padded).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from mtl_jax.data import augment as augment_lib
from mtl_jax.data import builders, specs

_STATE_KEYS = (
    "dataset",
    "split",
    "seed",
    "train",
    "augment",
    "batch_size",
    "shard_index",
    "shard_count",
    "drop_remainder",
    "worker_count",
)


def _allow_grain_flag_access() -> None:
    """Lets grain read its absl flags outside an ``absl.app.run`` entry point.

    grain's multiprocessing prefetch reads ``--grain_*`` absl flags; in a process whose flags
    were never parsed (a bare script, pytest) that raises ``UnparsedFlagAccessError``. Under
    ``absl.app.run`` (``mtl_jax.main``) the flags are already parsed and this does nothing.
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class _Element:
    """Position j of the stream -> (example with 'mask') or a masked zero example."""

    def __init__(self, real: grain.MapDataset, n_real: int, stride: int, epoch_len: int, pad):
        self._real = real
        self._n_real = n_real  # real examples per epoch on this shard
        self._stride = stride  # len(real): offset between epochs in `real`
        self._epoch_len = epoch_len
        self._pad = pad

    def __call__(self, j: int, _) -> dict[str, np.ndarray]:
        # j: position in the (repeated) stream; `map_with_index` passes it unreduced.
        epoch, k = divmod(int(j), self._epoch_len)
        if k >= self._n_real:
            return dict(self._pad, mask=np.zeros((), bool))
        # Indexing past len(real) selects the next epoch's shuffle (grain reseeds per epoch).
        example = self._real[epoch * self._stride + k]
        return dict(example, mask=np.ones((), bool))


class _ArraySource:
    """A whole split in memory (column arrays), indexable like a TFDS data source.

    Used for the small embedded datasets: reading them once beats decoding one array_record
    per example and step (~0.3 ms each on a loaded CPU).
    """

    def __init__(self, source):
        n = len(source)
        examples = source.__getitems__(list(range(n))) if n else []
        self._columns = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[index] for k, v in self._columns.items()}


def _augment(example: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    if not example["mask"]:
        return example
    return augment_lib.random_scale_crop_flip(example, rng)


class Loader:
    """Iterable of batches with an exactly resumable position.

    Iterating yields batches from the current position. A finite loader (eval, or
    ``num_epochs`` set) that has been exhausted starts a fresh pass on the next ``iter()``, so
    ``for batch in eval_loader`` runs one full pass each time. ``get_state()`` returns a
    JSON-serializable dict; ``set_state(state)`` continues exactly after the last batch
    yielded before ``get_state()`` was called.

    Attributes:
      steps_per_epoch: batches per epoch (per host).
      num_examples: examples in the split (all shards; excludes padding).
      info: the dataset's `DatasetInfo`.
    """

    def __init__(
        self,
        dataset: grain.MapDataset,
        config: dict[str, Any],
        *,
        steps_per_epoch: int,
        num_examples: int,
        info: specs.DatasetInfo,
        read_options: grain.ReadOptions,
        worker_count: int = 0,
    ):
        self._dataset = dataset
        self._config = config
        self._read_options = read_options
        self._worker_count = worker_count
        self.steps_per_epoch = steps_per_epoch
        self.num_examples = num_examples
        self.info = info
        self._iterator = None
        self._exhausted = False

    @property
    def batch_size(self) -> int:
        return self._config["batch_size"]

    def _new_iterator(self):
        ds = self._dataset.to_iter_dataset(self._read_options)
        if self._worker_count > 0:
            _allow_grain_flag_access()
            # Workers read and augment single examples; batching stays in this process so the
            # batches (and the padding at the end of each epoch) are the same for any worker
            # count.
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._worker_count))
        return iter(ds.batch(self.batch_size, drop_remainder=True))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if self._iterator is None or self._exhausted:
            self._iterator = self._new_iterator()
            self._exhausted = False
        return self._generate()

    def _generate(self) -> Iterator[dict[str, np.ndarray]]:
        iterator = self._iterator
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                if iterator is self._iterator:
                    self._exhausted = True
                return
            yield batch

    def close(self) -> None:
        """Stops read-ahead threads and worker processes (a later ``iter()`` starts afresh
        unless `set_state` is called)."""
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None
        self._exhausted = False

    def __len__(self) -> int:
        """Batches per epoch (``steps_per_epoch``)."""
        return self.steps_per_epoch

    def get_state(self) -> dict[str, Any]:
        """JSON-serializable position (plus the settings it is valid for)."""
        if self._iterator is None:
            position = {"next_index": 0}
        else:
            position = self._iterator.get_state()
        return dict(self._config, iterator=position, exhausted=self._exhausted)

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from ``state`` (from `get_state` of a loader with the same settings).

        Raises:
          ValueError: when ``state`` was produced by a loader with other settings (dataset,
            split, seed, batch size, sharding, ...), since the position would mean other data.
        """
        diff = {k: (state.get(k), v) for k, v in self._config.items() if state.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r} != now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"Loader state does not match this loader's settings ({detail}).")
        self._iterator = self._new_iterator()
        self._iterator.set_state(dict(state["iterator"]))
        self._exhausted = bool(state.get("exhausted", False))


def make_loader(
    name: str,
    data_dir: str,
    split: str,
    *,
    batch_size: int,
    seed: int,
    train: bool,
    augment: bool = False,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    drop_remainder: bool | None = None,
    cache_dir: str | None = None,
    read_threads: int | None = None,
    worker_count: int = 0,
) -> Loader:
    """Builds the input pipeline of one split of a benchmark dataset.

    The first call prepares the TFDS array_record files from the raw ``.npy`` layout (cached, see
    `mtl_jax.data.builders.prepare`); later calls reuse them.

    Args:
      name: one of `DATASETS` ('nyuv2', 'cityscapes', 'cityscapes19', 'multidigits',
        'penguins').
      data_dir: raw dataset root, holding ``train/`` and ``val/``; ignored (may be ``''``) for
        the embedded datasets 'multidigits' and 'penguins' unless it is where to cache them.
      split: 'train' or 'val' ('train' or 'test' for the embedded datasets).
      batch_size: examples per batch on this host.
      seed: shuffling and augmentation seed (train).
      train: True: reshuffled every epoch, infinite unless ``num_epochs``; False: file order,
        every example of the split exactly once per pass over all shards.
      augment: apply the papers' random scale-crop + flip (`mtl_jax.data.augment`).
      num_epochs: passes before the iterator stops (train default: infinite; eval default: 1).
      shard_index: this host's shard (``jax.process_index()``).
      shard_count: number of shards (``jax.process_count()``).
      drop_remainder: drop the incomplete last batch of each epoch (default: ``train``);
        otherwise it is padded with zero examples marked ``mask=False``.
      cache_dir: where prepared files go (default ``$MTL_JAX_TFDS_DIR`` or
        ``<data_dir>/_tfds``).
      read_threads: threads reading and augmenting examples ahead of the consumer (default
        ``min(4, cpu_count)``; 0 for the embedded datasets, which are read into memory once);
        0 reads in the consumer's thread.
      worker_count: > 0 reads and augments in that many worker processes (grain
        ``mp_prefetch``); same batches and resumable state as 0, but each worker first pays
        a process start (seconds: it imports the library); worth it when augmentation or
        decoding, not the model, is the bottleneck. Run under ``if __name__ == "__main__":``.

    Returns:
      A `Loader`.

    Raises:
      ValueError: unknown dataset or split, bad batch or shard arguments, malformed files.
      mtl_jax.data.DataLayoutError: missing data, with the expected layout and where to get it.
    """
    layout = specs.get_layout(name)
    if split not in layout.info.splits:
        raise ValueError(
            f"Unknown split {split!r} for {name!r}; valid: {', '.join(layout.info.splits)}."
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"Need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}.")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}.")
    if drop_remainder is None:
        drop_remainder = train
    if not train and num_epochs is None:
        num_epochs = 1

    builder = builders.prepare(name, data_dir, cache_dir)
    source = builder.as_data_source(split=split)
    if layout.info.embedded:
        source = _ArraySource(source)
    n = len(source)
    ds = grain.MapDataset.source(source)
    if train:
        per_shard = n // shard_count
        real = ds.shuffle(seed=_derive_seed(seed, 0))
        real = real[shard_index : shard_index + shard_count * per_shard : shard_count]
        n_real = per_shard
        longest = per_shard
    else:
        real = ds[shard_index::shard_count]
        n_real = len(real)
        longest = math.ceil(n / shard_count)
        per_shard = n // shard_count
    if drop_remainder:  # every shard must yield the same number of batches
        steps = per_shard // batch_size
    else:
        steps = math.ceil(longest / batch_size)
    if steps == 0:
        raise ValueError(
            f"Split {split!r} of {name!r} at {data_dir} has {n} examples: fewer than one batch "
            f"of {batch_size} per shard (shard_count={shard_count}, drop_remainder=True)."
        )
    epoch_len = steps * batch_size
    pad = {
        f.key: np.zeros(f.shape, np.int32 if f.num_classes is not None else np.float32)
        for f in layout.fields
    }
    stream = grain.MapDataset.range(epoch_len)
    if num_epochs is not None or train:
        stream = stream.repeat(num_epochs)
    stream = stream.map_with_index(
        _Element(real, min(n_real, epoch_len), len(real), epoch_len, pad)
    )
    if augment:
        stream = stream.random_map(_augment, seed=_derive_seed(seed, 1, shard_index))
    if worker_count < 0:
        raise ValueError(f"worker_count must be >= 0, got {worker_count}.")
    if read_threads is None:
        # In-memory embedded data: threads only contend for the GIL (10x slower measured).
        threaded = worker_count == 0 and not layout.info.embedded
        read_threads = min(4, os.cpu_count() or 1) if threaded else 0
    read_options = grain.ReadOptions(
        num_threads=read_threads, prefetch_buffer_size=max(2 * batch_size, read_threads)
    )
    config = {
        "dataset": name,
        "split": split,
        "seed": int(seed),
        "train": bool(train),
        "augment": bool(augment),
        "batch_size": int(batch_size),
        "shard_index": int(shard_index),
        "shard_count": int(shard_count),
        "drop_remainder": bool(drop_remainder),
        "worker_count": int(worker_count),  # the iterator state's format depends on it
    }
    assert tuple(config) == _STATE_KEYS
    return Loader(
        stream,
        config,
        steps_per_epoch=steps,
        num_examples=n,
        info=layout.info,
        read_options=read_options,
        worker_count=worker_count,
    )
