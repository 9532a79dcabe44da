"""Training and evaluation loop of the experiment harness.

``train_and_evaluate(config, workdir)`` is everything ``python -m mtl_jax.main`` does: build the
data pipeline (`mtl_jax.data`), the tasks (`mtl_jax.tasks`) and the model (`mtl_jax.models`),
then train with one jitted step::

    losses, J = mtl.value_and_jacobian(loss_fn)(params)         # per-task Jacobian [K, ...]
    J' = balancer chain from config.balancer (shared parameters only by default)
    g  = mtl.sum_tasks()(J')                                     # gradient
    params = optimizer(g)                                        # adam / sgd / ... + schedule

A lone loss-level balancer (a name in `mtl.LOSS_METHODS`) takes the one-backward path
`mtl.weighted_value_and_grad` instead. Each epoch the model is evaluated on the eval split,
per-task metrics and delta_m are written to TensorBoard and the log, and an orbax checkpoint
(parameters, batch statistics, optimizer and balancer state, data iterator position, eval
history) is saved in ``workdir/checkpoints``; running the same command again resumes from the
latest one. ``workdir/results.json`` holds the final metrics, the average over the last
``config.num_average_epochs`` evaluations (as the papers report), the per-epoch history and the
training log (``train_log``: every ``config.log_every_steps`` steps, the mean task losses, the
task weights of the step's gradient (`mtl.combination_weights`), pairwise task-gradient cosines
(Jacobian path) and seconds per step, evaluation time excluded).

Sharding: ``config.mesh`` names the device mesh as ``(axis, size)`` pairs (default
``(('data', -1),)``: data parallel over all devices; ``-1`` = the remaining devices), e.g.
``(('data', 4), ('model', 2))``. It must have a ``'data'`` axis: the batch is split over it.
Parameters are placed by ``config.sharding_rules`` (``(regex on the parameter path,
PartitionSpec entries)`` pairs, first match wins, `mtl_jax.sharding.tree_shardings`) and, with
``config.fsdp=True``, additionally split over the data axis (FSDP); optimizer and balancer state
follow their parameters (`mtl_jax.sharding.mirror_shardings`), Jacobian leaves follow their
parameter's sharding behind an unsharded task axis, everything else (step, BatchNorm statistics
of the global batch, K-vectors) is replicated. The train step is one ``jax.jit`` with these
in/out shardings and the state donated.

Failure handling (README "Failure handling"): `validate_config` rejects a bad config before
anything is built; a step with a non-finite task loss, Jacobian row or new state is skipped
inside jit and counted (`NonFiniteError` after ``config.max_consecutive_bad_steps`` in a row);
checkpoints are never written with non-finite values; ``results.json`` is written atomically.
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mtl_jax as mtl
from mtl_jax import models, sharding
from mtl_jax.transforms import finite as finite_lib

PyTree = Any


class ConfigError(ValueError):
    """An inconsistent or unknown setting in the experiment config (raised before compiling)."""


class NonFiniteError(FloatingPointError):
    """Training stopped: ``config.max_consecutive_bad_steps`` consecutive steps had non-finite
    task losses or gradients (all skipped), or a checkpoint would have held non-finite values."""


# ----------------------------------------------------------------------------------------------
# Balancer specs
# ----------------------------------------------------------------------------------------------


# Methods whose update needs this step's per-task validation losses (``val_losses=[K]``): the
# harness draws one batch of ``config.val_loss_split`` per step for them (`train_and_evaluate`).
VAL_LOSS_METHODS = frozenset({"coba"})
# Loss-level methods whose weights also need per-task gradient information (norms, excess risks
# from the Jacobian): they take the Jacobian path, never the one-backward loss-only path.
GRADIENT_LOSS_METHODS = frozenset({"gradnorm", "db_mtl", "excess_mtl"})


def parse_balancer(spec: Any) -> list[dict[str, Any]]:
    """Normalizes ``config.balancer`` to a list of ``{'name': ..., **kwargs}`` specs.

    Accepted forms (chained in order; empty = equal weighting, i.e. the plain sum of losses):

    * a string of comma-separated calls: ``'upgrad'``, ``'cagrad(c=0.4)'``,
      ``'uncertainty_weighting, pcgrad'`` (keyword values are Python literals);
    * a sequence of names and/or dicts ``{'name': 'cagrad', 'c': 0.4}``.

    Raises:
      ValueError: on a malformed string or an unknown method name (listing the valid names).
    """
    if spec is None:
        return []
    if isinstance(spec, str):
        text = spec.strip()
        if not text or text.lower() in ("ew", "none", "sum"):
            return []
        try:
            tree = ast.parse(f"({text},)", mode="eval").body
        except SyntaxError as e:
            raise ValueError(f"Cannot parse config.balancer={spec!r}: {e.msg}.") from None
        out = []
        for node in tree.elts:
            if isinstance(node, ast.Name):
                out.append({"name": node.id})
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args:
                try:
                    kw = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
                except ValueError:
                    raise ValueError(
                        f"config.balancer={spec!r}: keyword values must be literals."
                    ) from None
                out.append({"name": node.func.id, **kw})
            else:
                raise ValueError(
                    f"config.balancer={spec!r}: expected comma-separated `name` or "
                    "`name(key=value, ...)` items."
                )
    else:
        out = []
        for item in spec:
            if isinstance(item, str):
                out.extend(parse_balancer(item))
            else:
                item = dict(item)
                if "name" not in item:
                    raise ValueError(f"Balancer spec {item!r} has no 'name'.")
                out.append(item)
    for item in out:
        if item["name"] not in mtl.BALANCERS:
            raise ValueError(
                f"Unknown balancing method {item['name']!r} in config.balancer. Valid names: "
                f"{', '.join(sorted(mtl.BALANCERS))} (or '' for equal weighting)."
            )
    return out


def _with_num_tasks(spec: Mapping[str, Any], k: int) -> dict[str, Any]:
    spec = dict(spec)
    params = inspect.signature(getattr(mtl, spec["name"])).parameters
    if "num_tasks" in params and "num_tasks" not in spec:
        spec["num_tasks"] = k
    return spec


def _identity() -> optax.GradientTransformationExtraArgs:
    return optax.with_extra_args_support(optax.identity())


def build_balancer(specs: Sequence[Mapping[str, Any]], num_tasks: int):
    """The Jacobian -> Jacobian chain for ``specs`` (``num_tasks`` filled in where accepted)."""
    if not specs:
        return _identity()
    return mtl.build_chain([_with_num_tasks(s, num_tasks) for s in specs])


def equal_weighting(num_tasks: int) -> mtl.LossWeighting:
    """Weights all ones: the plain gradient of the summed losses (one backward pass)."""
    return mtl.LossWeighting(
        init=lambda: (),
        update=lambda losses, state, **_: (jnp.ones_like(losses), state),
        num_tasks=num_tasks,
        name="equal_weighting",
    )


def loss_weighting_for(specs: Sequence[Mapping[str, Any]], num_tasks: int):
    """The `mtl.LossWeighting` of a lone loss-level method (or of equal weighting for an empty
    chain), or None (then the Jacobian path)."""
    if not specs:
        return equal_weighting(num_tasks)
    if len(specs) != 1 or specs[0]["name"] not in mtl.LOSS_METHODS:
        return None
    if specs[0]["name"] in GRADIENT_LOSS_METHODS:
        return None
    factory = getattr(mtl, specs[0]["name"] + "_weighting", None)
    if factory is None:
        return None
    kwargs = {k: v for k, v in specs[0].items() if k != "name"}
    if "num_tasks" in inspect.signature(factory).parameters:
        kwargs.setdefault("num_tasks", num_tasks)
    return factory(**kwargs)


# ----------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------


OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "sgd")
LR_SCHEDULES: tuple[str, ...] = ("constant", "step", "cosine")


def make_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """Learning-rate schedule in steps from ``config.lr_schedule`` (epochs in the config)."""
    lr = config.learning_rate
    kind = config.get("lr_schedule", "constant")
    total = config.num_epochs * steps_per_epoch
    if kind == "constant":
        return optax.constant_schedule(lr)
    if kind == "step":  # StepLR(step_size=lr_decay_epochs, gamma=lr_decay_factor), per epoch
        every = max(1, int(config.lr_decay_epochs * steps_per_epoch))
        bounds = {every * i: config.lr_decay_factor for i in range(1, total // every + 1)}
        return optax.piecewise_constant_schedule(lr, bounds)
    if kind == "cosine":
        warmup = int(config.get("warmup_epochs", 0) * steps_per_epoch)
        return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(total, warmup + 1))
    raise ValueError(f"Unknown config.lr_schedule={kind!r}; valid: 'constant', 'step', 'cosine'.")


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int):
    """The optax optimizer (gradient -> update) from ``config.optimizer`` and the schedule."""
    schedule = make_schedule(config, steps_per_epoch)
    name = config.optimizer
    wd = config.get("weight_decay", 0.0)
    parts = []
    if config.get("grad_clip_norm", 0.0):
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if name == "adam":  # PyTorch Adam's weight_decay is L2 added to the gradient
        if wd:
            parts.append(optax.add_decayed_weights(wd))
        parts.append(optax.adam(schedule))
    elif name == "adamw":
        parts.append(optax.adamw(schedule, weight_decay=wd))
    elif name == "sgd":
        if wd:
            parts.append(optax.add_decayed_weights(wd))
        parts.append(optax.sgd(schedule, momentum=config.get("momentum", 0.0) or None))
    else:
        raise ValueError(f"Unknown config.optimizer={name!r}; valid: 'adam', 'adamw', 'sgd'.")
    return optax.chain(*parts), schedule


# ----------------------------------------------------------------------------------------------
# Config validation
# ----------------------------------------------------------------------------------------------


def _accepted(fn, skip: Sequence[str] = ()) -> list[str] | None:
    """Keyword names ``fn`` (a function or a class) accepts (None when it takes ``**kwargs``)."""
    params = inspect.signature(fn.__init__ if isinstance(fn, type) else fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.name not in skip and p.kind is not p.VAR_POSITIONAL]


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks ``config`` before any data is read or anything is compiled.

    Checked: the dataset, model, optimizer, learning-rate schedule and balancer names (the
    error lists the valid ones); the keyword arguments of the model and of every balancer (the
    error names the method and the arguments it accepts); a balancer's ``num_tasks`` against
    the dataset's tasks; ``num_devices`` against the visible devices; batch sizes divisible by
    the number of data-parallel devices; positive sizes and counts.

    Raises:
      ConfigError: (a ValueError) with a one-line explanation.
    """
    from mtl_jax import data as data_lib
    from mtl_jax import registry
    from mtl_jax import tasks as tasks_lib

    dataset = config.get("dataset")
    if dataset not in data_lib.DATASETS:
        raise ConfigError(
            f"Unknown config.dataset={dataset!r}; valid: {', '.join(data_lib.DATASETS)}."
        )
    task_names = [t.name for t in tasks_lib.get_tasks(dataset)]
    k = len(task_names)
    if config.get("num_tasks", None) not in (None, -1, k):
        raise ConfigError(
            f"config.num_tasks={config.num_tasks} but dataset {dataset!r} has {k} tasks "
            f"({', '.join(task_names)})."
        )

    model_cfg = dict(config.get("model") or {})
    model_name = model_cfg.pop("name", None)
    if model_name not in models.MODELS:
        raise ConfigError(
            f"Unknown config.model.name={model_name!r}; valid: {', '.join(sorted(models.MODELS))}."
        )
    accepted = _accepted(models.MODELS[model_name], skip=("self", "tasks", "rngs"))
    unknown = sorted(set(model_cfg) - set(accepted)) if accepted is not None else []
    if unknown:
        raise ConfigError(
            f"config.model: model {model_name!r} does not accept {', '.join(unknown)}; it "
            f"accepts: {', '.join(accepted)}."
        )

    if config.get("optimizer") not in OPTIMIZERS:
        raise ConfigError(
            f"Unknown config.optimizer={config.get('optimizer')!r}; valid: "
            f"{', '.join(map(repr, OPTIMIZERS))}."
        )
    if config.get("lr_schedule", "constant") not in LR_SCHEDULES:
        raise ConfigError(
            f"Unknown config.lr_schedule={config.lr_schedule!r}; valid: "
            f"{', '.join(map(repr, LR_SCHEDULES))}."
        )

    try:
        specs = parse_balancer(config.get("balancer"))
        for spec in specs:
            kwargs = {key: v for key, v in _with_num_tasks(spec, k).items() if key != "name"}
            registry.check_arguments(spec["name"], kwargs)
            if kwargs.get("num_tasks", k) != k:
                raise ConfigError(
                    f"config.balancer: {spec['name']}(num_tasks={kwargs['num_tasks']}) but "
                    f"dataset {dataset!r} has {k} tasks ({', '.join(task_names)})."
                )
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e).split("\n")[0]) from None

    for name in ("batch_size", "num_epochs"):
        if not isinstance(config.get(name), int) or config.get(name) < 1:
            raise ConfigError(f"config.{name}={config.get(name)!r} must be a positive integer.")
    if not config.get("learning_rate", 0) > 0:
        raise ConfigError(f"config.learning_rate={config.get('learning_rate')!r} must be positive.")
    if (config.get("max_consecutive_bad_steps", 10) or 0) < 0:
        raise ConfigError("config.max_consecutive_bad_steps must be >= 0 (0: never stop).")

    n_visible = len(jax.devices())
    n_dev = config.get("num_devices", -1)
    if n_dev not in (-1, None) and not 1 <= n_dev <= n_visible:
        raise ConfigError(
            f"config.num_devices={n_dev} but {n_visible} device(s) are visible "
            f"({jax.default_backend()}); use -1 for all of them."
        )
    try:  # the mesh (no compilation): axis sizes against the devices, a 'data' axis
        mesh = make_mesh(config)
        sharding_rules(config)
    except ValueError as e:
        raise ConfigError(str(e).split("\n")[0]) from None
    n_data, n_proc = mesh.shape["data"], jax.process_count()
    eval_bs = config.get("eval_batch_size", -1)
    eval_bs = config.batch_size if eval_bs in (-1, None) else eval_bs
    for name, bs in (("batch_size", config.batch_size), ("eval_batch_size", eval_bs)):
        if bs % n_data or bs % n_proc:
            raise ConfigError(
                f"config.{name}={bs} must be divisible by the size of the mesh's data axis "
                f"({n_data}) and the number of processes ({n_proc}); change it, "
                "--config.mesh or --config.num_devices."
            )


# ----------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------


class _TensorBoardWriter:
    """TensorBoard scalars + log lines without TensorFlow (clu's writers import TensorFlow)."""

    def __init__(self, logdir: str, just_logging: bool = False):
        self._writer = None
        if not just_logging:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self._writer = EventFileWriter(logdir)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        logging.info(
            "[%d] %s", step, ", ".join(f"{k}={float(v):.6g}" for k, v in sorted(scalars.items()))
        )
        if self._writer is not None:
            values = [Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
            self._writer.add_event(
                Event(wall_time=time.time(), step=int(step), summary=Summary(value=values))
            )

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def create_writer(workdir: str):
    """clu's default writer (TensorBoard + logging) when importable, else our equivalent."""
    just_logging = jax.process_index() > 0
    try:
        from clu import metric_writers

        return metric_writers.create_default_writer(workdir, just_logging=just_logging)
    except ImportError:  # clu.metric_writers needs TensorFlow
        return _TensorBoardWriter(workdir, just_logging=just_logging)


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes JSON to ``path`` atomically: a temporary file in the same directory, flushed to
    disk, then ``os.replace``. A reader (or a killed writer) sees the old file or the new one,
    never a partial one; on an error the temporary file is removed and the old file kept."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ----------------------------------------------------------------------------------------------
# Train state and steps
# ----------------------------------------------------------------------------------------------


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The mesh of ``config.mesh`` over the first ``config.num_devices`` devices (-1: all).

    ``config.mesh``: ``(axis, size)`` pairs or a mapping, one size may be -1 (the remaining
    devices); unset or empty: ``(('data', -1),)``, data parallel.
    """
    n = config.get("num_devices", -1)
    devices = jax.devices()
    n = len(devices) if n in (-1, None) else n
    if n > len(devices):
        raise ValueError(f"config.num_devices={n} but only {len(devices)} devices are visible.")
    axes = config.get("mesh", None) or (("data", -1),)
    if hasattr(axes, "items"):  # a dict or a ConfigDict
        axes = tuple(axes.items())
    mesh = sharding.make_mesh(axes, devices[:n])
    if "data" not in mesh.shape:
        raise ValueError(
            f"config.mesh={tuple(axes)} has no 'data' axis; the batch is split over it. "
            "Add one, e.g. (('data', -1), ('model', 2))."
        )
    return mesh


def sharding_rules(config: ml_collections.ConfigDict) -> tuple[sharding.Rule, ...]:
    """``config.sharding_rules`` as ``(regex, spec)`` pairs (spec: a tuple of axis names/None)."""
    rules = []
    for rule in config.get("sharding_rules", ()) or ():
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(
                f"config.sharding_rules entry {rule!r}: expected (regex, spec), e.g. "
                "(r\"trunk.*kernel\", (None, 'model'))."
            )
        pattern, spec = rule
        rules.append((pattern, None if spec is None else tuple(spec)))
    return tuple(rules)


class Trainer:
    """Holds the static pieces (model graph, transforms, tasks) and builds the jitted steps."""

    def __init__(self, config, tasks, model, mesh, steps_per_epoch):
        self.config = config
        self.tasks = tuple(tasks)
        self.num_tasks = len(self.tasks)
        self.mesh = mesh
        self.graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        self.labels = models.param_labels(model, params)
        self.specs = parse_balancer(config.balancer)
        self.needs_val_losses = any(s["name"] in VAL_LOSS_METHODS for s in self.specs)
        self.loss_weighting = (
            loss_weighting_for(self.specs, self.num_tasks)
            if config.get("loss_only_path", True)
            else None
        )
        # Jacobian path: Jacobian -> gradient, the balancer fused with the task sum (`mtl.chain`
        # reduces without writing the balanced K x P Jacobian).
        balancer = build_balancer(self.specs, self.num_tasks)
        if config.get("shared_only", True):
            self.balancer = mtl.shared_only(balancer, self.labels)
        else:
            self.balancer = mtl.chain(balancer, mtl.sum_tasks())
        self.optimizer, self.schedule = make_optimizer(config, steps_per_epoch)
        self.repl = NamedSharding(mesh, P())
        self.data_sharding = sharding.batch_sharding(mesh)
        self._init_params = params
        self._init_batch_stats = batch_stats
        fsdp_axis = "data" if config.get("fsdp", False) else None
        self.param_shardings = sharding.tree_shardings(
            params, mesh, sharding_rules(config), fsdp_axis
        )
        self.jac_shardings = jax.tree.map(sharding.jacobian_sharding, self.param_shardings)
        self.state_shardings = self._state_shardings()
        self._jit_train_step = jax.jit(
            self._train_step,
            in_shardings=(self.state_shardings, self.data_sharding, self.repl, self.data_sharding),
            out_shardings=(self.state_shardings, self.repl),
            donate_argnums=0,
        )
        self.eval_step = jax.jit(
            self._eval_step,
            in_shardings=(self.state_shardings, self.data_sharding, self.repl),
            out_shardings=self.repl,
        )

    def train_step(self, state, batch, epoch, val_batch=None):
        """One jitted step (the state is donated); ``val_batch``: see `_train_step`."""
        return self._jit_train_step(state, batch, epoch, val_batch)

    # -- state ------------------------------------------------------------------------------
    def _state_shardings(self) -> dict[str, PyTree]:
        """Parameters by the rules, optimizer/balancer state like their parameters, rest
        replicated."""
        shapes = jax.eval_shape(self._initial_state)
        params, mirror = self._init_params, sharding.mirror_shardings
        return {
            "step": self.repl,
            "params": self.param_shardings,
            "batch_stats": jax.tree.map(lambda _: self.repl, shapes["batch_stats"]),
            "balancer": mirror(shapes["balancer"], params, self.param_shardings, self.mesh),
            "opt": mirror(shapes["opt"], params, self.param_shardings, self.mesh),
            "nonfinite": jax.tree.map(lambda _: self.repl, shapes["nonfinite"]),
        }

    def init_state(self) -> dict[str, PyTree]:
        # Distinct buffers (an init may reuse one array in two fields; the step donates them).
        state = jax.tree.map(lambda x: jnp.array(x, copy=True), self._initial_state())
        return jax.device_put(state, self.state_shardings)

    def _initial_state(self) -> dict[str, PyTree]:
        params = self._init_params
        if self.loss_weighting is not None:
            bal_state = self.loss_weighting.init()
        else:
            bal_state = self.balancer.init(params)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "batch_stats": self._init_batch_stats,
            "balancer": bal_state,
            "opt": self.optimizer.init(params),
            # Skipped (non-finite) steps: in total and since the last good step.
            "nonfinite": {
                "bad_steps": jnp.zeros((), jnp.int32),
                "consecutive_bad_steps": jnp.zeros((), jnp.int32),
            },
        }

    # -- steps -------------------------------------------------------------------------------
    def _forward(self, params, batch_stats, batch, train, key=None):
        # Fresh BatchStat variables at the current trace level: merging the (closed-over) outer
        # ones inside the Jacobian's vjp and updating them raises nnx's TraceContextError.
        batch_stats = jax.tree.map(lambda x: x, batch_stats)
        model = nnx.merge(self.graphdef, params, batch_stats)
        preds = model(batch[self.config.get("input_key", "image")], train=train, key=key)
        return preds, nnx.state(model, nnx.BatchStat)

    def _losses(self, params, batch_stats, batch, key):
        preds, new_stats = self._forward(params, batch_stats, batch, True, key)
        losses = jnp.stack(
            [jnp.asarray(t.loss(preds[t.name], batch), jnp.float32) for t in self.tasks]
        )
        return losses, new_stats

    def _shared_leaves(self, tree):
        leaves = jax.tree.leaves(tree)
        labels = jax.tree.leaves(self.labels)
        return [x for x, lab in zip(leaves, labels, strict=True) if lab == "shared"]

    def _train_step(self, state, batch, epoch, val_batch=None):
        step = state["step"]
        key = jax.random.fold_in(jax.random.key(self.config.seed), step)
        params = state["params"]
        extra = {"step": step, "epoch": epoch}
        if val_batch is not None:  # per-task validation losses for CoBa-like methods
            preds, _ = self._forward(params, state["batch_stats"], val_batch, False)
            extra["val_losses"] = jnp.stack(
                [jnp.asarray(t.loss(preds[t.name], val_batch), jnp.float32) for t in self.tasks]
            )
        out = {}
        if self.loss_weighting is not None:
            fn = lambda p: self._losses(p, state["batch_stats"], batch, key)  # noqa: E731
            vg = mtl.weighted_value_and_grad(fn, self.loss_weighting, has_aux=True)
            (losses, weights, bal_state, new_stats), grads = vg(state["balancer"], params, **extra)
            out["weights"] = weights.astype(jnp.float32)
        else:
            fn = lambda p: self._losses(p, state["batch_stats"], batch, key)  # noqa: E731
            (losses, new_stats), jac = mtl.value_and_jacobian(
                fn,
                has_aux=True,
                strategy=self.config.get("jacobian_strategy", "auto"),
                chunk_size=self.config.get("jacobian_chunk_size", None),
            )(params)
            # Each Jacobian leaf as its parameter, behind an unsharded task axis.
            jac = jax.lax.with_sharding_constraint(jac, self.jac_shardings)
            grads, bal_state = self.balancer.update(
                jac, state["balancer"], params, task_losses=losses, **extra
            )
            shared_jac = self._shared_leaves(jac)
            gram = mtl.gramian(shared_jac)
            norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0))
            out["weights"] = mtl.combination_weights(
                shared_jac, self._shared_leaves(grads), gram=gram
            )
            out["cos"] = gram / jnp.maximum(jnp.outer(norms, norms), 1e-30)
        grads = jax.lax.with_sharding_constraint(grads, self.param_shardings)
        updates, opt_state = self.optimizer.update(grads, state["opt"], params)
        params = optax.apply_updates(params, updates)
        out["losses"] = losses
        out["grad_norm"] = optax.tree.norm(grads)
        new = {"params": params, "batch_stats": new_stats, "balancer": bal_state, "opt": opt_state}
        # Non-finite guard (no host sync): a NaN/inf task loss, Jacobian row (Jacobian path) or
        # resulting state leaves params, statistics, optimizer and balancer state as they were.
        jac_rows = jac if self.loss_weighting is None else None  # loss-only path: losses only
        task_ok = finite_lib.task_finite(losses, jac_rows)
        ok = jnp.all(task_ok) & finite_lib.all_finite(new)
        bad = jnp.logical_not(ok).astype(jnp.int32)
        old = {k: state[k] for k in new}
        guard = state["nonfinite"]
        new_state = {
            "step": step + 1,
            **finite_lib.select_tree(ok, new, old),
            "nonfinite": {
                "bad_steps": guard["bad_steps"] + bad,
                "consecutive_bad_steps": (guard["consecutive_bad_steps"] + 1) * bad,
            },
        }
        out["bad_tasks"] = jnp.logical_not(task_ok)
        out["nonfinite"] = new_state["nonfinite"]
        return new_state, out

    def _eval_step(self, state, batch, accs):
        preds, _ = self._forward(state["params"], state["batch_stats"], batch, False)
        return tuple(
            t.metric_update(acc, preds[t.name], batch)
            for t, acc in zip(self.tasks, accs, strict=True)
        )

    # -- data ----------------------------------------------------------------------------------
    def shard_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        return {
            k: jax.make_array_from_process_local_data(self.data_sharding, np.asarray(v))
            for k, v in batch.items()
        }

    def evaluate(self, state, loader, max_batches: int = -1) -> dict[str, float]:
        """Metrics over ``loader`` (the first ``max_batches`` batches when > 0)."""
        accs = jax.device_put(tuple(t.metric_init() for t in self.tasks), self.repl)
        for i, batch in enumerate(loader):
            if 0 < max_batches <= i:
                break
            accs = self.eval_step(state, self.shard_batch(batch), accs)
        accs = jax.device_get(accs)
        metrics = {}
        for t, acc in zip(self.tasks, accs, strict=True):
            for name, value in t.metric_compute(acc).items():
                metrics[f"{t.name}/{name}"] = float(value)
        return metrics


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def _checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
    # Orbax writes each step to `<step>.orbax-checkpoint-tmp-*` and renames it when complete
    # (atomic on POSIX file systems): a step killed mid-write is never listed or restored, and
    # its leftover temporary directory is removed when the next run starts.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.get("max_checkpoints_to_keep", 2),
        create=True,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), options=options)


def _save(mngr, state, meta) -> None:
    step = int(jax.device_get(state["step"]))
    if not bool(jax.device_get(_all_finite(state))):  # never write a NaN checkpoint
        bad = [
            jax.tree_util.keystr(path)
            for path, x in jax.tree_util.tree_flatten_with_path(state)[0]
            if not bool(jax.device_get(_all_finite(x)))
        ]
        raise NonFiniteError(
            f"Refusing to save the checkpoint of step {step}: non-finite values in "
            f"{', '.join(bad[:5])}. The previous checkpoint is kept."
        )
    leaves = jax.tree.leaves(state)
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave({"leaves": leaves}), meta=ocp.args.JsonSave(meta)
        ),
        force=True,
    )
    mngr.wait_until_finished()


_all_finite = jax.jit(finite_lib.all_finite)


def _restore(mngr, state):
    """Restores the latest checkpoint into the structure (and shardings) of ``state``."""
    step = mngr.latest_step()
    if step is None:
        return state, None
    leaves, treedef = jax.tree.flatten(state)
    target = {"leaves": [ocp.utils.to_shape_dtype_struct(x) for x in leaves]}
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        ),
    )
    return jax.tree.unflatten(treedef, restored["state"]["leaves"]), restored["meta"]


# ----------------------------------------------------------------------------------------------
# Main loop
# ----------------------------------------------------------------------------------------------


def _delta_m(metrics, baseline, higher_is_better):
    from mtl_jax import metrics as metrics_lib

    keys = [k for k in baseline if k in metrics]
    if not keys or len(keys) < len(baseline):
        return None
    return float(
        metrics_lib.delta_m(
            {k: metrics[k] for k in keys},
            {k: baseline[k] for k in keys},
            {k: higher_is_better[k] for k in keys},
        )
    )


def _baseline(config, dataset: str) -> dict[str, float]:
    """``config.baseline`` ((metric, value) pairs; empty: no delta_m), else the library's."""
    if "baseline" in config:
        return {k: float(v) for k, v in dict(config.baseline).items()}
    from mtl_jax import metrics as metrics_lib

    return dict(metrics_lib.BASELINES.get(dataset, {}))


def _average(history: Sequence[Mapping[str, float]]) -> dict[str, float]:
    keys = set().union(*history) if history else set()
    return {
        k: float(np.mean([h[k] for h in history if k in h and h[k] is not None]))
        for k in sorted(keys)
        if any(k in h and h[k] is not None for h in history)
    }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains and evaluates as ``config`` says, checkpointing into (and resuming from) ``workdir``.

    Returns:
      The content of ``workdir/results.json``: ``final`` (last evaluation), ``average``
      (mean over the last ``config.num_average_epochs`` evaluations, as the papers report),
      ``history`` (one entry per evaluation), ``steps``, ``balancer``.
    """
    from mtl_jax import data as data_lib
    from mtl_jax import tasks as tasks_lib

    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    dataset = config.dataset
    info = data_lib.dataset_info(dataset)
    tasks = tasks_lib.get_tasks(dataset)
    mesh = make_mesh(config)
    n_dev = mesh.devices.size
    n_proc = jax.process_count()
    eval_bs = config.get("eval_batch_size", -1)
    eval_bs = config.batch_size if eval_bs in (-1, None) else eval_bs
    loader_kw = dict(shard_index=jax.process_index(), shard_count=n_proc)
    train_loader = data_lib.make_loader(
        dataset,
        config.data_dir,
        info.train_split,
        batch_size=config.batch_size // n_proc,
        seed=config.seed,
        train=True,
        augment=config.get("augment", False),
        num_epochs=None,
        **loader_kw,
    )
    steps_per_epoch = train_loader.steps_per_epoch
    if config.get("steps_per_epoch", -1) not in (-1, None):
        steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch)
    total_steps = config.num_epochs * steps_per_epoch
    if config.get("num_train_steps", -1) not in (-1, None):
        total_steps = min(total_steps, config.num_train_steps)

    model_cfg = dict(config.model)
    model_name = model_cfg.pop("name")
    model = models.build_model(
        model_name, {t.name: t.out_channels for t in tasks}, seed=config.seed, **model_cfg
    )
    trainer = Trainer(config, tasks, model, mesh, steps_per_epoch)
    del model
    val_loader = None
    if trainer.needs_val_losses:
        # One batch per step from the validation split (shuffled, repeated, its own seed).
        val_loader = data_lib.make_loader(
            dataset,
            config.data_dir,
            config.get("val_loss_split") or info.eval_split,
            batch_size=config.batch_size // n_proc,
            seed=config.seed + 1,
            train=True,
            num_epochs=None,
            **loader_kw,
        )
    state = trainer.init_state()
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    logging.info(
        "mtl_jax: %s, model %s (%d parameters), tasks %s, balancer %s (%s path), "
        "mesh %s (%d devices), %d steps/epoch, %d steps.",
        dataset,
        model_name,
        n_params,
        [t.name for t in tasks],
        trainer.specs or "equal weighting",
        "loss-only" if trainer.loss_weighting is not None else "Jacobian",
        dict(mesh.shape),
        n_dev,
        steps_per_epoch,
        total_steps,
    )

    mngr = _checkpoint_manager(workdir, config)
    state, meta = _restore(mngr, state)
    history: list[dict[str, float]] = []
    train_log: list[dict[str, Any]] = []
    if meta is not None:
        train_loader.set_state(meta["loader"])
        if val_loader is not None and "val_loader" in meta:
            val_loader.set_state(meta["val_loader"])
        history = list(meta["history"])
        train_log = list(meta.get("train_log", []))
        logging.info("Resumed from step %d in %s.", int(state["step"]), workdir)
    step = int(jax.device_get(state["step"]))

    writer = create_writer(workdir)
    baseline = _baseline(config, dataset)
    hib = {f"{t.name}/{k}": v for t in tasks for k, v in t.higher_is_better.items()}
    names = [t.name for t in tasks]
    log_every = max(1, config.get("log_every_steps", 50))
    eval_every = max(1, config.get("eval_every_epochs", 1))
    ckpt_every = max(1, config.get("checkpoint_every_epochs", 1))

    def evaluate(epoch):
        eval_loader = data_lib.make_loader(
            dataset,
            config.data_dir,
            info.eval_split,
            batch_size=eval_bs // n_proc,
            seed=config.seed,
            train=False,
            **loader_kw,
        )
        t0 = time.time()
        metrics = trainer.evaluate(state, eval_loader, config.get("eval_steps", -1) or -1)
        dm = _delta_m(metrics, baseline, hib)
        if dm is not None:
            metrics["delta_m"] = dm
        writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
        writer.write_scalars(step, {"eval/seconds": time.time() - t0})
        history.append({"epoch": epoch, "step": step, **metrics})
        return metrics

    def checkpoint():
        loader_state = train_loader.get_state()
        ckpt_meta = {"loader": loader_state, "history": history, "train_log": train_log}
        ckpt_meta["step"] = step
        if val_loader is not None:
            ckpt_meta["val_loader"] = val_loader.get_state()
        _save(mngr, state, ckpt_meta)

    max_bad = config.get("max_consecutive_bad_steps", 10) or 0
    ckpt_every_steps = config.get("checkpoint_every_steps", -1) or -1

    def check_nonfinite(at_step: int, out) -> None:
        """Logs a skipped (non-finite) step and which tasks; stops after too many in a row."""
        bad_tasks, counts = jax.device_get((out["bad_tasks"], out["nonfinite"]))
        consecutive = int(counts["consecutive_bad_steps"])
        if not consecutive:
            return
        which = [n for n, b in zip(names, bad_tasks, strict=True) if b]
        what = (
            f"loss or gradient of task(s) {', '.join(which)}"
            if which
            else "balanced gradient or new state (all task losses and gradients finite)"
        )
        logging.warning(
            "step %d: non-finite %s; update skipped (%d in a row, %d in total).",
            at_step,
            what,
            consecutive,
            int(counts["bad_steps"]),
        )
        scalars = {f"train/nonfinite/{n}": float(b) for n, b in zip(names, bad_tasks, strict=True)}
        writer.write_scalars(at_step, {"train/skipped_steps": counts["bad_steps"], **scalars})
        if max_bad and consecutive >= max_bad:
            raise NonFiniteError(
                f"Stopped at step {at_step}: {consecutive} consecutive steps with a non-finite "
                f"{what} (config.max_consecutive_bad_steps={max_bad}). Those steps were skipped, "
                "so parameters and checkpoints are finite; lower the learning rate, set "
                "config.grad_clip_norm, or check the data and the loss of the task(s) named."
            )

    buffer: list[dict[str, jax.Array]] = []
    t_log, steps_logged = time.time(), 0
    t_start, step_start = time.time(), step
    it = iter(train_loader)
    val_it = iter(val_loader) if val_loader is not None else None
    pending = None  # (step, out) of the previous step: checked one step behind, no stall
    while step < total_steps:
        epoch = step // steps_per_epoch
        batch = trainer.shard_batch(next(it))
        val_batch = trainer.shard_batch(next(val_it)) if val_it is not None else None
        state, out = trainer.train_step(state, batch, jnp.int32(epoch), val_batch)
        step += 1
        if pending is not None:
            check_nonfinite(*pending)
        pending = (step, out)
        buffer.append(out)
        steps_logged += 1
        if step % log_every == 0 or step == total_steps or step == step_start + 1:
            outs = jax.device_get(buffer)
            buffer = []
            dt = (time.time() - t_log) / max(steps_logged, 1)
            t_log, steps_logged = time.time(), 0
            scalars = {"train/step_time_s": dt, "train/lr": float(trainer.schedule(step - 1))}
            scalars["train/skipped_steps"] = int(outs[-1]["nonfinite"]["bad_steps"])
            # Averages over the steps that were applied (all of them if every one was skipped).
            good = [o for o in outs if not o["nonfinite"]["consecutive_bad_steps"]] or outs
            losses = np.mean([o["losses"] for o in good], axis=0)
            weights = np.mean([o["weights"] for o in good], axis=0)
            scalars["train/grad_norm"] = float(np.mean([o["grad_norm"] for o in good]))
            for i, name in enumerate(names):
                scalars[f"train/loss/{name}"] = losses[i]
                scalars[f"train/weight/{name}"] = weights[i]
            entry = {"step": step, "step_time_s": dt, "losses": losses.tolist()}
            entry["weights"] = weights.tolist()
            if "cos" in outs[0]:
                cos = np.mean([o["cos"] for o in good], axis=0)
                entry["cos"] = cos.tolist()
                for i in range(len(names)):
                    for j in range(i + 1, len(names)):
                        scalars[f"train/cos/{names[i]}-{names[j]}"] = cos[i, j]
            train_log.append(entry)
            writer.write_scalars(step, scalars)
            rate = (time.time() - t_start) / max(step - step_start, 1)
            logging.info(
                "step %d/%d (epoch %d/%d) | %.3f s/step | ETA %s",
                step,
                total_steps,
                epoch + 1,
                config.num_epochs,
                rate,
                _fmt_time(rate * (total_steps - step)),
            )
        end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
        done_epoch = (step - 1) // steps_per_epoch + 1
        do_eval = end_of_epoch and (done_epoch % eval_every == 0 or step == total_steps)
        do_ckpt = (end_of_epoch and (done_epoch % ckpt_every == 0 or step == total_steps)) or (
            ckpt_every_steps > 0 and step % ckpt_every_steps == 0
        )
        if do_eval or do_ckpt:
            check_nonfinite(*pending)
            pending = None
        t_eval = time.time()
        if do_eval:
            evaluate(done_epoch)
        if do_ckpt:
            checkpoint()
        if end_of_epoch:
            writer.flush()
        t_log += time.time() - t_eval  # train/step_time_s counts training steps only
    if pending is not None:
        check_nonfinite(*pending)
    if not history or history[-1]["step"] != step:
        evaluate(math.ceil(step / steps_per_epoch))
        checkpoint()
    n_avg = config.get("num_average_epochs", 10)
    results = {
        "dataset": dataset,
        "model": model_name,
        "balancer": trainer.specs,
        "steps": step,
        "final": {k: v for k, v in history[-1].items() if k not in ("epoch", "step")},
        "average": _average(
            [{k: v for k, v in h.items() if k not in ("epoch", "step")} for h in history[-n_avg:]]
        ),
        "num_averaged": len(history[-n_avg:]),
        "history": history,
        "train_log": train_log,
        "skipped_steps": int(jax.device_get(state["nonfinite"]["bad_steps"])),
        "baseline": baseline,
        "config": json.loads(config.to_json_best_effort()),
    }
    if jax.process_index() == 0:
        write_json_atomic(os.path.join(workdir, "results.json"), results)
    writer.flush()
    writer.close()
    mngr.close()
    return results
