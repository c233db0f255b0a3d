r"""Entry point: train and evaluate the IsoMax-family experiments, or re-evaluate a workdir.

Usage (from the repository root)::

  # The default CPU experiment (SoftMax vs IsoMax vs IsoMax+ on CIFAR-10; see its config).
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
  # in every process; each one reads its own part of every batch, process 0 writes the report.

Any config field can be overridden, e.g. `--config.num_epochs=10 --config.runs=3`. The whole
config is checked before anything is trained (bad keys, names, data or devices fail in seconds).

Exit status: 0 done; 2 refused to start or stopped on a problem with the run (config, a locked
workdir, no intact checkpoint, a diverged loss); 74 a file of the workdir could not be written
(no space, quota, permissions; the message names the path, the error and the free space); 75
stopped by SIGTERM/SIGINT after saving the step in flight (the message names it; rerun the same
command to resume). A multi-host run whose process died ends in the others with JAX's own 134
after `ISOMAX_HEARTBEAT_TIMEOUT_S` (docs/reliability.md).
On a CPU-only machine the batch is split over one host device per core (`--cpu_devices`), which
uses every core: XLA:CPU runs each convolution on one core.
"""

import logging as std_logging
import os
import sys

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
flags.DEFINE_integer(
    "cpu_devices",
    0,
    "Host (CPU) devices to split the batch over when JAX runs on CPU; 0 = one per available "
    "core, lowered to a divisor of both batch sizes. No effect on GPU/TPU runs.",
)
flags.DEFINE_bool("verbose", False, "Keep TensorFlow, tfds, Orbax and JAX INFO logging.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])

# Collectives between host devices time out after 40 s by default and then abort the process;
# on a loaded machine a device thread can be descheduled that long, so allow 15 minutes.
_XLA_CPU_FLAGS = (
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120",
    "--xla_cpu_collective_call_terminate_timeout_seconds=900",
    "--xla_cpu_collective_timeout_seconds=900",
)


def host_device_count(requested: int, batch_sizes: tuple[int, ...]) -> int:
    """`requested` if > 0, else the largest count <= the available cores dividing every batch."""
    if requested > 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(d for d in range(1, max(cores or 1, 1) + 1) if all(b % d == 0 for b in batch_sizes))


def configure_xla(cpu_devices: int) -> None:
    """Adds the host-device count and collective timeouts to XLA_FLAGS (before JAX starts)."""
    flags_now = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in _XLA_CPU_FLAGS if f.split("=")[0] not in flags_now]
    if "xla_force_host_platform_device_count" not in flags_now:
        extra.insert(0, f"--xla_force_host_platform_device_count={cpu_devices}")
    os.environ["XLA_FLAGS"] = " ".join([flags_now, *extra]).strip()


class _Quiet(std_logging.Filter):
    """Drops INFO records of third-party libraries (tfds, Orbax, JAX backend probing)."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/experiments/" in record.pathname


def configure_logging(verbose: bool) -> None:
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()  # the one-off OOD builds; our own bars stay
    logging.get_absl_handler().addFilter(_Quiet())
    for name in ("tensorflow", "jax._src.xla_bridge", "absl"):
        std_logging.getLogger(name).addFilter(_Quiet())


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    config = FLAGS.config
    configure_xla(host_device_count(FLAGS.cpu_devices, (config.batch_size, config.eval_batch_size)))
    configure_logging(FLAGS.verbose)
    # JAX (and everything that imports it) is imported only now: XLA reads its flags once.
    import jax

    from experiments import train_eval, training, validate
    from isomax_jax import checkpointing, distributed, locking, run_metadata

    # Multi-process runs (ISOMAX_COORDINATOR_ADDRESS/..., Slurm, Open MPI, multi-host Cloud TPU)
    # are initialised before any other JAX call; a single process is left as it is.
    distributed.initialize()
    logging.info(
        "JAX process %d/%d, devices %s", jax.process_index(), jax.process_count(), jax.devices()
    )
    try:
        train_eval.run(config, FLAGS.workdir, mode=FLAGS.mode)
    except (
        validate.ConfigError,
        training.TrainingDivergedError,
        locking.WorkdirLockedError,
        checkpointing.CheckpointCorruptedError,
    ) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except run_metadata.RunDirectoryWriteError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(74)  # EX_IOERR
    except distributed.Preempted as err:
        print(f"preempted: {err}", file=sys.stderr, flush=True)
        sys.exit(distributed.PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    app.run(main)
