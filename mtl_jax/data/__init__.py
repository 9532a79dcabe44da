"""Benchmark datasets for the experiment harness: TFDS (array_record, no TensorFlow) + grain.

Interface used by the training loop (issue 6)::

    from mtl_jax import data
    info = data.dataset_info("nyuv2")          # tasks, input_shape, splits, instructions
    loader = data.make_loader("nyuv2", data_dir, "train", batch_size=2, seed=0, train=True)
    for batch in loader: ...                   # dict of NumPy arrays, incl. 'mask'
    state = loader.get_state()                 # JSON-serializable; loader.set_state(state)
    data.prepare("nyuv2", data_dir)            # optional: prepare the TFDS files up front

Datasets: ``nyuv2`` (segmentation 13 classes, depth, normal; 288x384), ``cityscapes``
(segmentation 7 classes, disparity; 128x256) and ``cityscapes19`` (19 classes), all in the
preprocessed ``.npy`` layout of MTAN that the benchmark papers use (see `dataset_info(name)
.instructions`). `fabricate` writes tiny copies in the same format.
"""

from mtl_jax.data.builders import prepare
from mtl_jax.data.loader import Loader, make_loader
from mtl_jax.data.specs import DATASETS, DataLayoutError, DatasetInfo, dataset_info

__all__ = [
    "DATASETS",
    "DataLayoutError",
    "DatasetInfo",
    "Loader",
    "dataset_info",
    "make_loader",
    "prepare",
]
