r"""Palmer penguins: three tasks of mixed type from three body measurements (tabular).

Inputs: bill length, bill depth and flipper length (standardized); tasks: ``species`` (3
classes), ``sex`` (2 classes), ``body_mass`` (regression on the standardized mass; metrics
also in grams). 266 train / 67 test penguins, shipped with mtl_jax (CC0; see
``mtl_jax/third_party/palmerpenguins/PROVENANCE.md``). Species is nearly separable from these
inputs while sex and body mass are not: the task losses differ in scale and difficulty, which
is where balancing matters. Shared MLP trunk + one head per task, Adam, full-batch-ish steps.

Run::

  python -m mtl_jax.main --config=experiments/penguins.py --workdir=/tmp/penguins

  python -m mtl_jax.main --config=experiments/penguins.py --config.balancer=upgrad \
      --workdir=/tmp/penguins_upgrad

  python -m mtl_jax.main --config=experiments/penguins.py:smoke --workdir=/tmp/penguins_smoke

No single-task baselines are stored (``baseline = ()``): delta_m is not computed until the
comparison runner measures them. Re-running a command resumes from its workdir's checkpoint.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variants = set(filter(None, (arg or "").split(",")))
    unknown = variants - {"smoke"}
    if unknown:
        raise ValueError(f"Unknown penguins.py variant(s) {sorted(unknown)}; valid: smoke.")
    c = ml_collections.ConfigDict()
    c.dataset = "penguins"
    c.data_dir = ""  # embedded: nothing to download (set it only to choose the TFDS cache)
    c.input_key = "features"
    c.augment = False
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "mlp"
    c.model.in_features = 3
    c.model.hidden = (64, 64)
    c.model.head_hidden = (32,)
    c.model.dropout = 0.0

    c.balancer = ""  # '' = equal weighting; names: mtl_jax.BALANCERS
    c.shared_only = True
    c.loss_only_path = True
    c.val_loss_split = ""  # split for methods needing validation losses (coba); "": eval
    c.jacobian_strategy = "auto"
    c.jacobian_chunk_size = ml_collections.FieldReference(None, field_type=int)

    c.optimizer = "adam"
    c.learning_rate = 3e-3
    c.weight_decay = 0.0
    c.momentum = 0.9
    c.grad_clip_norm = 0.0
    c.lr_schedule = "constant"
    c.lr_decay_epochs = 100
    c.lr_decay_factor = 0.5
    c.warmup_epochs = 0

    c.batch_size = 32
    c.eval_batch_size = 67  # the whole test split in one batch
    c.num_epochs = 30
    c.steps_per_epoch = -1  # -1: one pass over the 266 training penguins (8 steps)
    c.num_train_steps = -1
    c.eval_steps = -1
    c.eval_every_epochs = 10
    c.checkpoint_every_epochs = 30
    c.max_checkpoints_to_keep = 1
    c.checkpoint_every_steps = -1  # > 0: also every that many steps (-1: per epoch only)
    c.max_consecutive_bad_steps = 10  # non-finite steps in a row before stopping (0: never)
    c.log_every_steps = 40
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
    c.baseline = ()

    if "smoke" in variants:
        c.num_epochs = 2
        c.steps_per_epoch = 2
        c.eval_every_epochs = 1
        c.log_every_steps = 1
    return c
