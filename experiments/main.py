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

  # Multi-host (TPU pod slice, or one process per GPU host): run the same command on every
  # host with --distributed; each process reads its own shard of the data.

Any config field can be overridden, e.g. `--config.num_epochs=10 --config.runs=3`.
"""

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
flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() first (multi-host runs; the coordinator is "
    "auto-detected on TPU VMs and SLURM, else set JAX_COORDINATOR_ADDRESS etc.).",
)
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import jax  # imported here so that --distributed can initialise first

    if FLAGS.distributed:
        jax.distributed.initialize()
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
