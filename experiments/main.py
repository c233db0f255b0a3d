r"""Entry point: train and evaluate the IsoMax-family experiments, or re-evaluate a workdir.

Usage (from the repository root)::

  # The default CPU experiment (SoftMax vs IsoMax vs IsoMax+ on CIFAR-10, ~25 min on 2 cores).
  python -m experiments.main --config experiments/configs/default.py --workdir runs/default

  # A cell of the papers' tables, 5 seeds (GPU box / TPU VM; uses every local device).
  python -m experiments.main \
      --config experiments/configs/paper.py:densenet_bc100,cifar10,isomax \
      --workdir runs/densenet-c10-isomax --config.runs=5

  # Re-evaluate the checkpoints of a finished workdir and rewrite its report.
  python -m experiments.main --config experiments/configs/default.py --workdir runs/default \
      --mode=evaluate

  # Multi-host (TPU pod slice, Slurm/MPI, or processes launched by hand with
  # ISOMAX_COORDINATOR_ADDRESS, ISOMAX_NUM_PROCESSES, ISOMAX_PROCESS_ID): run the same command
  # in every process; each one reads its own shard of the data, process 0 writes the report.

Any config field can be overridden, e.g. `--config.num_epochs=10 --config.runs=3`.
"""

import logging as std_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard and the report.")
flags.DEFINE_enum(
    "mode",
    "train_and_evaluate",
    ["train_and_evaluate", "evaluate"],
    "`train_and_evaluate` trains (resuming from checkpoints in the workdir), then evaluates; "
    "`evaluate` loads the final checkpoints of the workdir and writes the report.",
)
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietOrbax(std_logging.Filter):
    """Drops Orbax's per-checkpoint INFO lines (a dozen per save) so progress lines stay legible."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.get_absl_handler().addFilter(_QuietOrbax())
    import jax

    from isomax_jax import distributed

    # Multi-process runs (ISOMAX_COORDINATOR_ADDRESS/..., Slurm, Open MPI, multi-host Cloud TPU)
    # are initialised before any other JAX call; a single process is left as it is.
    distributed.initialize()
    logging.info(
        "JAX process %d/%d, local devices %s",
        jax.process_index(),
        jax.process_count(),
        jax.local_devices(),
    )

    from experiments import evaluate, train_eval

    if FLAGS.mode == "train_and_evaluate":
        train_eval.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    else:
        evaluate.evaluate_workdir(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
