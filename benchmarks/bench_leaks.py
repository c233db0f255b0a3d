"""Slow leaks: host memory (RSS) and open file descriptors over thousands of tiny training steps
with frequent checkpoint saves.

The loop is the experiments' (``experiments/training.py``) on a tiny model: a jitted, sharded
train step over the host devices, :class:`isomax_jax.checkpointing.RunCheckpointer` asked
:meth:`~isomax_jax.checkpointing.RunCheckpointer.due` after every step (with a
:class:`~isomax_jax.distributed.PreemptionNotice`, as the experiments run), a background
(asynchronous) Orbax save with fingerprints every ``--save-every`` steps, the oldest checkpoints
deleted (``keep=2``), metrics fetched every step. Every ``--sample-every`` steps the pending save
is waited for, the garbage collector run, and ``VmRSS`` (``/proc/self/status``) and the number of
entries of ``/proc/self/fd`` recorded.

Reported: the curve, and the growth from the first sample after the warm-up (``--warmup``
steps: compilation, Orbax's thread pools) to the last. No leak: RSS growth well under 5 %, no
descriptor growth. ``tests/test_reliability.py`` runs the same loop for 600 steps.

Usage::

    python benchmarks/bench_leaks.py                     # 2,000 steps, a save every 10
    python benchmarks/bench_leaks.py --steps 5000 --save-every 5 --json leaks.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from isomax_jax import checkpointing, distributed, heads, parallel, train  # noqa: E402


class TinyNet(nn.Module):
    """conv -> mean pool -> IsoMax+ head: the ``isomax_jax.models`` API, a few hundred params."""

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        del train
        features = jnp.mean(nn.relu(nn.Conv(8, (3, 3), strides=(2, 2))(x)), axis=(1, 2))
        logits = heads.IsoMaxPlusHead(10, name="classifier")(features)
        return (logits, features) if return_features else logits


def rss_mib() -> float:
    """This process's resident set size (``VmRSS``), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def open_fds() -> int:
    """Open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


def run(
    workdir: str | os.PathLike,
    *,
    steps: int,
    save_every: int,
    sample_every: int,
    batch_size: int = 16,
) -> list[dict[str, float]]:
    """Trains ``steps`` tiny steps into ``workdir``; returns the samples
    ``{"step", "rss_mib", "fds", "loss", "time_s"}`` (the first at step 0, after setup)."""
    mesh = parallel.data_mesh()
    state = train.create_train_state(
        TinyNet(), key=jax.random.key(0), tx=train.reference_optimizer(0.05),
        loss=train.LossConfig("isomax_plus"), input_shape=(1, 8, 8, 3),
    )  # fmt: skip
    state = parallel.replicate_state(state, mesh)
    step_fn = parallel.sharded_train_step(mesh)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(64, batch_size, 8, 8, 3)).astype(np.float32)
    labels = rng.integers(0, 10, size=(64, batch_size)).astype(np.int32)
    samples, start, loss = [], time.monotonic(), float("nan")

    def sample(step: int) -> None:
        gc.collect()
        samples.append({"step": step, "rss_mib": rss_mib(), "fds": open_fds(), "loss": loss,
                        "time_s": time.monotonic() - start})  # fmt: skip

    with distributed.PreemptionNotice() as notice:
        ckpt = checkpointing.RunCheckpointer(
            workdir, save_every_steps=save_every, keep=2, preemption=notice
        )
        sample(0)
        for step in range(steps):
            batch = {"image": images[step % 64], "label": labels[step % 64]}
            state, metrics = step_fn(state, parallel.shard_batch(batch, mesh))
            loss = float(metrics["loss"])  # fetched every step, as a report would
            done = step + 1
            if ckpt.due(done, final=done == steps):
                ckpt.save(jax.device_get(state), force=True)
            if done % sample_every == 0:
                ckpt.wait()
                sample(done)
        ckpt.close()
    return samples


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--sample-every", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=200, help="steps before the baseline")
    parser.add_argument("--workdir", help="default: a temporary folder, removed at the end")
    parser.add_argument("--json", help="also write the samples here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_leaks_") as tmp:
        samples = run(
            args.workdir or tmp, steps=args.steps, save_every=args.save_every,
            sample_every=args.sample_every,
        )  # fmt: skip
    print(f"{args.steps} steps, a save every {args.save_every} ({args.steps // args.save_every} "
          f"saves), {jax.device_count()} host devices, jax {jax.__version__}")  # fmt: skip
    print(f"{'step':>6} {'RSS MiB':>9} {'fds':>5} {'loss':>8} {'s':>7}")
    for s in samples:
        print(f"{s['step']:>6} {s['rss_mib']:>9.1f} {s['fds']:>5} {s['loss']:>8.4f} "
              f"{s['time_s']:>7.1f}")  # fmt: skip
    warm = [s for s in samples if s["step"] >= args.warmup]
    first, last = warm[0], warm[-1]
    rss = last["rss_mib"] / first["rss_mib"] - 1
    fds = last["fds"] - first["fds"]
    print(f"after the warm-up (step {first['step']} -> {last['step']}): RSS "
          f"{first['rss_mib']:.1f} -> {last['rss_mib']:.1f} MiB ({rss:+.2%}), max "
          f"{max(s['rss_mib'] for s in warm):.1f}; open descriptors {first['fds']} -> "
          f"{last['fds']} ({fds:+d}), max {max(s['fds'] for s in warm)}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "samples": samples}, f, indent=1)
    return 0 if rss < 0.05 and fds <= 0 else 1


if __name__ == "__main__":
    sys.exit(main())
