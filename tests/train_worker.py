"""Tiny model, deterministic batches and a training worker for the train/parallel tests.

Imported by the tests (``TinyCNN``, ``make_batch``, ``train_loop``) and run as a subprocess by
``test_multihost.py`` (several processes on loopback: training, a preemption, a dead peer),
``test_checkpointing.py`` (a run that is SIGKILLed midway, then resumed) and
``test_preemption.py`` (SIGTERM/SIGINT midway). Usage::

    python tests/train_worker.py --out params.npz --steps 3 [--workdir DIR --save-every 2
        --kill-after 3 [--kill-process 1]] [--step-delay 0.05] [--head softmax]

It prints ``step N`` after every step (flushed), and on a preemption notice it saves the step in
flight, prints ``preempted at step N`` and exits with ``PREEMPTED_EXIT_CODE``. Multi-process runs
take the ``ISOMAX_*`` variables of :mod:`isomax_jax.distributed`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class TinyCNN(nn.Module):
    """conv-BN-relu -> global mean pool -> head ``classifier``; the ``isomax_jax.models`` API."""

    num_classes: int = 10
    features: int = 8
    head: str = "softmax"
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        x = nn.Conv(self.features, (3, 3), strides=(2, 2), use_bias=False)(x)
        x = nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-5, axis_name=self.bn_axis_name
        )(x)
        x = nn.relu(x)
        features = jnp.mean(x, axis=(1, 2))
        if self.head == "softmax":
            logits = nn.Dense(self.num_classes, name="classifier")(features)
        else:
            from isomax_jax import heads

            cls = {
                "isomax": heads.IsoMaxHead,
                "isomax_plus": heads.IsoMaxPlusHead,
                "dismax": heads.DisMaxHead,
            }[self.head]
            logits = cls(self.num_classes, name="classifier")(features)
        return (logits, features) if return_features else logits


def make_batch(step: int, *, batch_size: int, seed: int = 0, size: int = 8, num_classes: int = 10):
    """The deterministic global batch of ``step``: NumPy ``{"image", "label"}``."""
    rng = np.random.default_rng([seed, step])
    return {
        "image": rng.normal(size=(batch_size, size, size, 3)).astype(np.float32),
        "label": rng.integers(0, num_classes, size=(batch_size,)).astype(np.int32),
    }


def init_state(*, head: str = "softmax", seed: int = 0, size: int = 8, lr: float = 0.1, **kw):
    """A TinyCNN train state with the reference optimiser."""
    from isomax_jax import train

    model = TinyCNN(head=head, **kw)
    return train.create_train_state(
        model,
        key=jax.random.key(seed),
        tx=train.reference_optimizer(lr),
        loss=train.LossConfig(head),
        input_shape=(1, size, size, 3),
    )


def flat_params(params) -> dict[str, np.ndarray]:
    """``{"['a']['kernel']": array}`` of a params pytree (fetched to host)."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {jax.tree_util.keystr(p): np.asarray(jax.device_get(v)) for p, v in leaves}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16, help="global batch size")
    parser.add_argument("--head", default="softmax")
    parser.add_argument("--workdir")
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--kill-after", type=int, default=-1)
    parser.add_argument("--kill-process", type=int, default=-1, help="-1: every process")
    parser.add_argument("--step-delay", type=float, default=0.0, help="seconds after each step")
    args = parser.parse_args(argv)

    from isomax_jax import distributed

    distributed.initialize(initialization_timeout=60)
    with distributed.PreemptionNotice() as notice:
        try:
            state = _train(args, notice)
        except distributed.Preempted as e:
            print(f"preempted at step {e.step}", flush=True)
            return distributed.PREEMPTED_EXIT_CODE
    if jax.process_index() == 0:
        layout = distributed.device_layout()
        counts = {"process_count": layout["process_count"], "device_count": layout["device_count"]}
        np.savez(args.out, **flat_params(state.params), **{f"__{k}": v for k, v in counts.items()})
    return 0


def _train(args, notice):
    """The training loop of the experiments, on TinyCNN: saved when the checkpointer says so,
    stopped with ``Preempted`` after saving a preemption's step."""
    from isomax_jax import checkpointing, distributed, parallel, run_metadata

    mesh = parallel.data_mesh()
    step_fn = parallel.sharded_train_step(mesh)
    state = parallel.replicate_state(init_state(head=args.head), mesh)

    ckpt = None
    if args.workdir:
        ignored = ("kill_after", "kill_process", "step_delay", "out")
        config = {k: v for k, v in vars(args).items() if k not in ignored}
        run_metadata.write_run_metadata(args.workdir, config=config, seed=0)
        ckpt = checkpointing.RunCheckpointer(
            args.workdir, save_every_steps=args.save_every, preemption=notice
        )
        state = ckpt.restore_latest(state)

    n_proc, pid = jax.process_count(), jax.process_index()
    local = args.batch_size // n_proc
    for step in range(int(state.step), args.steps):
        batch = make_batch(step, batch_size=args.batch_size)
        mine = {k: v[pid * local : (pid + 1) * local] for k, v in batch.items()}
        state, _ = step_fn(state, parallel.shard_batch(mine, mesh))
        done = step + 1
        print(f"step {done}", flush=True)
        if ckpt is not None:
            if ckpt.due(done, final=done == args.steps):
                ckpt.save(state, force=True)
            if ckpt.preempted_step is not None and done < args.steps:
                ckpt.close()
                raise distributed.Preempted(f"saved step {done}", step=done)
        if done == args.kill_after and args.kill_process in (-1, pid):
            if ckpt is not None:
                ckpt.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(args.step_delay)
    if ckpt is not None:
        ckpt.close()
    return state


if __name__ == "__main__":
    sys.exit(main())
