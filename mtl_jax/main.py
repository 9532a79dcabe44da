"""Entry point: ``python -m mtl_jax.main --config=experiments/nyud.py --workdir=DIR``.

Every config field can be overridden on the command line (``--config.num_epochs=2``,
``--config.balancer='cagrad(c=0.4)'``); a config file may take an argument after a colon
(``--config=experiments/nyud.py:smoke``). All logic is in `mtl_jax.train.train_and_evaluate`;
running the same command again resumes from the latest checkpoint in ``--workdir``.

Multi-host (e.g. a Cloud TPU pod slice, see ``launch/tpu.py``): run the same command on every
host with ``--config.distributed=True`` (or the environment variable ``MTL_JAX_DISTRIBUTED=1``);
`jax.distributed.initialize()` then connects the processes (on Cloud TPU, SLURM and other
supported clusters it finds the coordinator itself; elsewhere set ``JAX_COORDINATOR_ADDRESS=
host:port``, ``MTL_JAX_NUM_PROCESSES`` and ``MTL_JAX_PROCESS_ID``; on CPU also
``JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo``). Each host reads its own shard of the data;
only process 0 writes TensorBoard summaries and results.json (orbax coordinates checkpoints).
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (e.g. experiments/nyud.py).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard and results.json.")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed(config) -> bool:
    """Calls `jax.distributed.initialize()` if ``config.distributed`` or ``MTL_JAX_DISTRIBUTED=1``.

    Must run before anything else touches jax devices. ``MTL_JAX_NUM_PROCESSES`` and
    ``MTL_JAX_PROCESS_ID``, if set, are passed on (clusters jax cannot detect by itself).
    Returns whether it initialized.
    """
    env = os.environ.get("MTL_JAX_DISTRIBUTED", "").strip().lower()
    if env not in ("", "0", "1", "true", "false"):
        raise ValueError(f"MTL_JAX_DISTRIBUTED={env!r}: expected 1/true or 0/false.")
    if not (config.get("distributed", False) or env in ("1", "true")):
        return False
    import jax

    kwargs = {}
    for key, var in (
        ("num_processes", "MTL_JAX_NUM_PROCESSES"),
        ("process_id", "MTL_JAX_PROCESS_ID"),
    ):
        if os.environ.get(var):
            kwargs[key] = int(os.environ[var])
    jax.distributed.initialize(**kwargs)
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    initialize_distributed(flags.FLAGS.config)
    from mtl_jax import train  # after flag parsing: keeps `--help` fast

    logging.info("Config:\n%s", flags.FLAGS.config)
    try:
        results = train.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except train.ConfigError as e:  # one line, no traceback: nothing has run yet
        raise app.UsageError(f"Bad config: {e}") from None
    _print_results(flags.FLAGS.config, flags.FLAGS.workdir, results)


def _print_results(config, workdir, results) -> None:
    """Per-task results table on stdout (process 0)."""
    import jax

    from mtl_jax import metrics, tasks

    if jax.process_index() != 0:
        return
    hib = tasks.higher_is_better(tasks.get_tasks(config.dataset))
    print(
        f"\n{config.dataset}: {results['steps']} steps, balancer "
        f"{results['balancer'] or 'equal weighting'}; test metrics:\n"
        f"{metrics.format_results_table(results, hib)}\n"
        f"TensorBoard: tensorboard --logdir={workdir}   results: {workdir}/results.json",
        flush=True,
    )


if __name__ == "__main__":
    app.run(main)
