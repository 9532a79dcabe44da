r"""MultiDigits (MultiMNIST on scikit-learn's real 8x8 digits): the quick-start experiment.

Two real handwritten digits overlapped on an 8x12 canvas; tasks: the left and the right digit
(10 classes each); 10,000 train / 2,000 test pairs from disjoint source digits, generated from
the data bundled with scikit-learn (no download; see `mtl_jax.data.embedded`). The MultiMNIST
construction of Sener & Koltun (NeurIPS 2018), whose setting this follows at a smaller scale:
a LeNet-style shared trunk with one fully connected head per task (`mtl_jax.models.ConvNet`),
Adam, equal weighting unless ``--config.balancer`` says otherwise.

Run (trains, evaluates every epoch, writes TensorBoard logs and results.json to the workdir,
prints a per-task table)::

  python -m mtl_jax.main --config=experiments/multidigits.py --workdir=/tmp/mtl_quickstart

  python -m mtl_jax.main --config=experiments/multidigits.py --config.balancer=mgda \
      --workdir=/tmp/multidigits_mgda

  python -m mtl_jax.main --config=experiments/multidigits.py:smoke --workdir=/tmp/md_smoke

Variants (``--config=experiments/multidigits.py:VARIANT``, comma-separated to combine):
``convnet`` (default), ``mlp`` (fully connected trunk 96-256-256), ``smoke`` (a few steps).

No single-task baselines are stored (``baseline = ()``): delta_m is not computed until a run of
the comparison runner measures them. Re-running a command resumes from the latest checkpoint
in ``--workdir`` (use a fresh workdir for a fresh run).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variants = set(filter(None, (arg or "convnet").split(",")))
    unknown = variants - {"convnet", "mlp", "smoke"}
    if unknown:
        raise ValueError(
            f"Unknown multidigits.py variant(s) {sorted(unknown)}; valid: convnet, mlp, smoke."
        )
    c = ml_collections.ConfigDict()
    c.dataset = "multidigits"
    c.data_dir = ""  # embedded: nothing to download (set it only to choose the TFDS cache)
    c.input_key = "image"
    c.augment = False
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "convnet"
    c.model.input_shape = (8, 12, 1)
    c.model.channels = (32, 64)
    c.model.hidden = 128
    c.model.head_hidden = (64,)
    c.model.dropout = 0.0

    # Balancer chain: '' = equal weighting (sum of losses); e.g. 'mgda', 'upgrad',
    # 'cagrad(c=0.4)'. Names: mtl_jax.BALANCERS.
    c.balancer = ""
    c.shared_only = True
    c.loss_only_path = True
    c.val_loss_split = ""  # split for methods needing validation losses (coba); "": eval
    c.jacobian_strategy = "auto"
    c.jacobian_chunk_size = ml_collections.FieldReference(None, field_type=int)

    c.optimizer = "adam"
    c.learning_rate = 1e-3
    c.weight_decay = 0.0
    c.momentum = 0.9  # sgd only
    c.grad_clip_norm = 0.0
    c.lr_schedule = "constant"  # 'constant' | 'step' | 'cosine'
    c.lr_decay_epochs = 10
    c.lr_decay_factor = 0.5
    c.warmup_epochs = 0

    c.batch_size = 256
    c.eval_batch_size = 500
    c.num_epochs = 10
    c.steps_per_epoch = -1  # -1: one pass over the 10,000 training pairs (39 steps)
    c.num_train_steps = -1
    c.eval_steps = -1
    c.eval_every_epochs = 1
    c.checkpoint_every_epochs = 5
    c.max_checkpoints_to_keep = 1
    c.checkpoint_every_steps = -1  # > 0: also every that many steps (-1: per epoch only)
    c.max_consecutive_bad_steps = 10  # non-finite steps in a row before stopping (0: never)
    c.log_every_steps = 39
    c.num_average_epochs = 1
    c.num_devices = -1
    # Scale (README "Scale"): the device mesh as (axis, size) pairs (-1: the remaining devices;
    # the batch is split over 'data'), e.g. --config.mesh='(("data", 4), ("model", 2))';
    # parameter sharding rules ((regex on the parameter path, PartitionSpec entries) pairs, first
    # match wins), FSDP over the data axis, and multi-host jax.distributed.initialize().
    c.mesh = (("data", -1),)
    c.sharding_rules = ()
    c.fsdp = False
    c.distributed = False  # or MTL_JAX_DISTRIBUTED=1
    c.baseline = ()  # (metric, value) pairs of single-task runs; empty: no delta_m

    if "mlp" in variants:
        c.model = ml_collections.ConfigDict(
            {"name": "mlp", "in_features": 96, "hidden": (256, 256), "head_hidden": (64,)}
        )
        c.model.dropout = 0.0
    if "smoke" in variants:
        c.num_epochs = 2
        c.steps_per_epoch = 3
        c.eval_steps = 1
        c.log_every_steps = 1
    return c
