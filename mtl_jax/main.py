"""Entry point: ``python -m mtl_jax.main --config=experiments/nyud.py --workdir=DIR``.

Every config field can be overridden on the command line (``--config.num_epochs=2``,
``--config.balancer='cagrad(c=0.4)'``); a config file may take an argument after a colon
(``--config=experiments/nyud.py:smoke``). All logic is in `mtl_jax.train.train_and_evaluate`;
running the same command again resumes from the latest checkpoint in ``--workdir``.
"""

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (e.g. experiments/nyud.py).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard and results.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from mtl_jax import train  # after flag parsing: keeps `--help` fast

    logging.info("Config:\n%s", flags.FLAGS.config)
    results = train.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
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
