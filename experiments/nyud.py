r"""NYUv2 (13-class segmentation, depth, surface normals): the multi-task benchmark setting.

Default (``experiments/nyud.py``): SegNet-MTAN, Adam lr 1e-4, batch size 2, 200 epochs, the
learning rate halved after 100 epochs, data augmentation on, results averaged over the last 10
epochs -- the setting of MTAN (Liu et al., CVPR 2019), CAGrad (Liu et al., NeurIPS 2021),
Nash-MTL (Navon et al., ICML 2022) and FAMO (Liu et al., NeurIPS 2023); checked against
Nash-MTL ``experiments/nyuv2/trainer.py`` (``lr=1e-4, n_epochs=200, batch_size=2``,
``StepLR(step_size=100, gamma=0.5)``, ``--apply-augmentation`` default True) and FAMO's copy.

Variants (``--config=experiments/nyud.py:VARIANT``, comma-separated to combine):
  ``mtan`` (default), ``segnet`` (hard parameter sharing SegNet, Nash-MTL's ``SegNetSplit``),
  ``resnet`` (LibMTL ``examples/nyu/main.py``: dilated ResNet-50 + DeepLab ASPP heads, batch 8,
  Adam lr 1e-4 with weight decay 1e-5, step schedule 100 epochs x 0.5, no augmentation; LibMTL
  uses ImageNet-pretrained weights, we train from scratch), ``smoke`` (a tiny model, 2 epochs of
  2 steps, evaluation on 2 batches: checks the whole pipeline in about a minute on a CPU).

Run (the data: see ``mtl_jax.data.dataset_info('nyuv2').instructions``)::

  python -m mtl_jax.main --config=experiments/nyud.py --config.data_dir=/data/nyuv2 \
      --config.balancer=upgrad --workdir=/tmp/nyud_upgrad

  python -m mtl_jax.main --config=experiments/nyud.py:smoke --config.data_dir=/data/nyuv2 \
      --workdir=/tmp/nyud_smoke

Re-running a command resumes from the latest checkpoint in ``--workdir``.
"""

import ml_collections

# Single-task baselines (SegNet-MTAN trained on each task alone) used by Nash-MTL and FAMO for
# delta_m: Nash-MTL (Navon et al., ICML 2022) Table 2 / FAMO Table 3 "STL" row.
BASELINE = (
    ("segmentation/mIoU", 0.3830),
    ("segmentation/pixAcc", 0.6376),
    ("depth/abs_err", 0.6754),
    ("depth/rel_err", 0.2780),
    ("normal/mean", 25.01),
    ("normal/median", 19.21),
    ("normal/<11.25", 0.3014),
    ("normal/<22.5", 0.5720),
    ("normal/<30", 0.6915),
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variants = set(filter(None, (arg or "mtan").split(",")))
    unknown = variants - {"mtan", "segnet", "resnet", "smoke"}
    if unknown:
        raise ValueError(
            f"Unknown nyud.py variant(s) {sorted(unknown)}; valid: mtan, segnet, resnet, smoke."
        )
    c = ml_collections.ConfigDict()
    c.dataset = "nyuv2"
    c.data_dir = ""  # the folder holding train/ and val/ (required)
    c.augment = True
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "segnet_mtan"
    c.model.filters = (64, 128, 256, 512, 512)

    # Balancer chain: '' = equal weighting (sum of losses); e.g. 'upgrad', 'cagrad(c=0.4)',
    # 'uncertainty_weighting, pcgrad'. Names: mtl_jax.BALANCERS.
    c.balancer = ""
    c.shared_only = True  # balance the shared parameters only; heads get their own gradients
    c.loss_only_path = True  # a lone loss-level method uses one backward pass
    c.val_loss_split = ""  # split for methods needing validation losses (coba); "": eval
    c.jacobian_strategy = "auto"
    c.jacobian_chunk_size = ml_collections.FieldReference(None, field_type=int)

    c.optimizer = "adam"
    c.learning_rate = 1e-4
    c.weight_decay = 0.0
    c.momentum = 0.9  # sgd only
    c.grad_clip_norm = 0.0
    c.lr_schedule = "step"  # 'constant' | 'step' | 'cosine'
    c.lr_decay_epochs = 100
    c.lr_decay_factor = 0.5
    c.warmup_epochs = 0

    c.batch_size = 2
    c.eval_batch_size = 2
    c.num_epochs = 200
    c.steps_per_epoch = -1  # -1: one pass over the training split
    c.num_train_steps = -1  # -1: num_epochs * steps_per_epoch
    c.eval_steps = -1  # -1: the whole eval split
    c.eval_every_epochs = 1
    c.checkpoint_every_epochs = 1
    c.max_checkpoints_to_keep = 2
    c.checkpoint_every_steps = -1  # > 0: also every that many steps (-1: per epoch only)
    c.max_consecutive_bad_steps = 10  # non-finite steps in a row before stopping (0: never)
    c.log_every_steps = 100
    c.num_average_epochs = 10
    c.num_devices = -1  # data-parallel over all local devices
    # Scale (README "Scale"): the device mesh as (axis, size) pairs (-1: the remaining devices;
    # the batch is split over 'data'), e.g. --config.mesh='(("data", 4), ("model", 2))';
    # parameter sharding rules ((regex on the parameter path, PartitionSpec entries) pairs, first
    # match wins), FSDP over the data axis, and multi-host jax.distributed.initialize().
    c.mesh = (("data", -1),)
    c.sharding_rules = ()
    c.fsdp = False
    c.distributed = False  # or MTL_JAX_DISTRIBUTED=1
    c.baseline = BASELINE  # (metric, value) pairs: metric names contain dots

    if "segnet" in variants:
        c.model.name = "segnet"
    if "resnet" in variants:
        c.model = ml_collections.ConfigDict(
            {"name": "resnet_deeplab", "depth": 50, "width": 64, "aspp_channels": 256}
        )
        c.batch_size = 8
        c.eval_batch_size = 8
        c.weight_decay = 1e-5
        c.augment = False
    if "smoke" in variants:
        if c.model.name == "resnet_deeplab":
            c.model.depth, c.model.width, c.model.aspp_channels = 18, 4, 8
        else:
            c.model.filters = (4, 8, 8, 8, 8)
        c.batch_size = 2
        c.eval_batch_size = 2
        c.num_epochs = 2
        c.steps_per_epoch = 2
        c.eval_steps = 2
        c.log_every_steps = 1
        c.num_average_epochs = 2
    return c
