"""One model of an experiment: its training plan, schedule and state, trained or restored.

`train_one` trains a (loss, seed) into `workdir/<loss>_seed<seed>/` (Orbax checkpoints,
`run.json`, `train_info.json`), resuming from the latest intact checkpoint without replaying its
input, with a progress bar and TensorBoard summaries (`workdir/tensorboard/`); `restore_one`
restores a trained one for evaluation. `experiments.train_eval` calls them for every model.

On a preemption notice (SIGTERM/SIGINT, `isomax_jax.distributed.PreemptionNotice`) the step in
flight finishes, is saved, and `train_one` raises `isomax_jax.distributed.Preempted` naming it;
the same command resumes from it. A failed save raises `checkpointing.CheckpointSaveError`.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from experiments import inputs, records, validate
from experiments.tensorboard_log import Summaries
from isomax_jax import (
    checkpointing,
    distributed,
    models,
    parallel,
    registry,
    run_metadata,
    train,
    validation,
)
from isomax_jax.progress import Progress

# name -> number of classes of the in-distribution sets.
NUM_CLASSES = inputs.NUM_CLASSES
TRAIN_INFO = validate.TRAIN_INFO  # written when the training is finished


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite; the message names the step."""


def training_plan(config: Any, num_examples: int) -> dict[str, Any]:
    """Steps per epoch, total and warm-up steps, learning-rate milestones of `config`.

    An epoch is `num_examples // batch_size` steps, as in `isomax_jax.data.train_dataset`
    (every epoch a new permutation; the incomplete last batch is dropped).
    """
    steps_per_epoch = num_examples // config.batch_size
    if steps_per_epoch < 1:
        raise validate.ConfigError(
            f"config.batch_size={config.batch_size} exceeds the {num_examples} training examples "
            f"of {config.dataset}[{config.train_split}]"
        )
    if config.num_train_steps > 0:
        total = int(config.num_train_steps)
    else:
        total = max(1, round(config.num_epochs * steps_per_epoch))
    warmup = 0
    if config.schedule != "multistep":
        warmup = min(round(config.warmup_epochs * steps_per_epoch), total - 1)
    early = round(config.early_fraction * total) if config.early_image_size else 0
    return {
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total,
        "epochs": total / steps_per_epoch,
        "warmup_steps": warmup,
        "lr_milestones_steps": [round(f * total) for f in config.lr_boundaries],
        "early_steps": early,
        "early_image_size": config.early_image_size if early else None,
    }


@functools.partial(jax.jit, static_argnames="size")
def downscale(images: jax.Array, size: int) -> jax.Array:
    """``[b, H, W, C]`` images resized to ``[b, size, size, C]`` (bilinear, antialiased).

    The early steps of a progressive-resizing schedule (`config.early_image_size`) train on
    the augmented batches shrunk by this, on the devices they are sharded over; the network (all
    convolutions and a global average pool) takes any size.
    """
    b, _, _, c = images.shape
    return jax.image.resize(images, (b, size, size, c), method="linear", antialias=True)


def make_schedule(config: Any, plan: dict[str, Any]):
    """The learning-rate schedule of `config` in optimiser steps."""
    if config.schedule == "multistep":
        return train.multistep_schedule(
            steps_per_epoch=1,  # milestones are already in steps
            milestones=plan["lr_milestones_steps"],
            base_learning_rate=config.learning_rate,
            decay=config.lr_decay_factor,
        )
    return train.warmup_decay_schedule(
        total_steps=plan["total_steps"],
        warmup_steps=plan["warmup_steps"],
        peak_learning_rate=config.learning_rate,
        decay=config.schedule.removeprefix("warmup_"),
    )


def initial_state(
    config: Any,
    plan: dict[str, Any],
    *,
    loss: str,
    seed: int,
    init: bool = True,
    pretrained: bool = True,
):
    """The model and initial train state of one (loss, seed) (the model alone with
    `init=False`): freshly initialised, or with `config.pretrained` (a PyTorch state-dict file)
    imported — the whole model for a loss of `evaluate_as_imported`, else the backbone with a
    fresh head (fine-tuning). `pretrained=False`: never import (shapes are all that matter)."""
    model = models.get_model(
        config.model,
        num_classes=NUM_CLASSES[config.dataset],
        head=loss,
        dtype=getattr(jax.numpy, config.dtype),
    )
    if not init:
        return model
    size = inputs.image_size(config)
    variables = None
    path = inputs.option(config, "pretrained")
    if pretrained and path:
        from isomax_jax import torch_import

        variables = torch_import.load_torch_checkpoint(
            model,
            path,
            image_shape=(size, size, 3),
            backbone_only=loss not in inputs.option(config, "evaluate_as_imported"),
            key=jax.random.fold_in(jax.random.key(seed), 1),
        )
    tx = train.reference_optimizer(
        make_schedule(config, plan),
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov,
    )
    loss_config = train.LossConfig(
        loss, entropic_scale=config.entropic_scale, fpr=config.dismax_fpr and loss == "dismax"
    )
    state = train.create_train_state(
        model,
        key=jax.random.key(seed),
        tx=tx,
        loss=loss_config,
        input_shape=(1, size, size, 3),
        variables=variables,
    )
    return model, state


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


class _TrainingLog:
    """What the loop reports: the metrics of the steps since the last report, fetched only then
    (the device is never waited for at other steps), checked for divergence, shown on the
    progress bar and written to TensorBoard; and the loop's timings."""

    def __init__(self, loss: str, seed: int, workdir: str, *, start: int, total: int, schedule):
        self.name, self.schedule = records.run_name(loss, seed), schedule
        self.start, self.total = start, total
        self.pending: list[dict[str, jax.Array]] = []
        self.window_start, self.last = start, {}
        self.t_start, self.t_timed, self.compile_s = time.time(), None, None
        self.writer = None
        if jax.process_index() == 0:
            self.writer = Summaries(os.path.join(workdir, "tensorboard", self.name))
        self.bar = Progress(
            f"train {registry.HEADS[loss].title} seed {seed}",
            total,
            initial=start,
            enabled=jax.process_index() == 0,
        )

    def dispatched(self, metrics: dict[str, jax.Array]) -> None:
        """A step was dispatched: wait for the previous one only (the device always has work
        queued); the first step's wait is the compile time."""
        if self.pending:
            jax.block_until_ready(self.pending[-1])
        self.pending.append(metrics)
        if self.compile_s is None:
            jax.block_until_ready(metrics)
            self.compile_s = time.time() - self.t_start
            self.t_timed = time.time()

    def report(self, done: int, checkpointed: int | None) -> None:
        """Fetches the pending metrics, raises if a loss is not finite, shows their means."""
        fetched = jax.device_get(self.pending)
        for i, metrics in enumerate(fetched):
            if not math.isfinite(float(metrics["loss"])):
                bad = self.window_start + i
                raise TrainingDivergedError(
                    f"{self.name}: the training loss is {float(metrics['loss'])} at step "
                    f"{bad + 1} of {self.total} (after {bad - self.start} steps of this start)."
                    " Check the labels and the learning rate; checkpoints up to step "
                    f"{checkpointed} are intact."
                )
        self.last = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        lr = float(self.schedule(done - 1))
        dt = (time.time() - self.t_timed) / max(done - self.start - 1, 1)
        self.bar.update(1, loss=self.last["loss"], acc=self.last["accuracy"], lr=lr, s_step=dt)
        if self.writer is not None:
            for key, value in (*self.last.items(), ("learning_rate", lr), ("s_per_step", dt)):
                self.writer.scalar(f"train/{key}", value, done)
            self.writer.flush()
        self.pending, self.window_start = [], done

    def summary(self, batch_size: int) -> dict[str, Any]:
        """`train_info.json` of this start (call when the last step is ready)."""
        t_end, trained = time.time(), self.total - self.start
        return {
            "steps": self.total,
            "batch_size": batch_size,
            "resumed_from_step": self.start,
            "wall_time_s": t_end - self.t_start,
            "compile_s": self.compile_s,
            "seconds_per_step": (t_end - self.t_timed) / (trained - 1) if trained > 1 else None,
            "final_train_loss": self.last.get("loss"),
            "final_train_accuracy": self.last.get("accuracy"),
        }

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()  # never raises: the error that stopped the run stays the one shown


@contextlib.contextmanager
def _device_batches(
    config: Any, source: inputs.TrainSource, *, seed: int, start: int, total: int, mesh
):
    """The batches of steps `start` to `total`, prefetched to the mesh (the host stream is
    stopped when the block ends); the first batch's labels are checked eagerly (a bad label
    fails before any step)."""
    with source.batches(seed=seed, start=start, num_steps=total - start) as host:
        first = next(host)
        validation.validate_labels(first["label"], NUM_CLASSES[config.dataset])
        yield parallel.prefetch_to_mesh(itertools.chain([first], host), mesh)


def _host_step_fns(config, mesh):
    """(early, late) step functions on host batches prefetched to the mesh: the early steps of
    progressive resizing train on the batch downscaled on the devices."""
    step_fn = parallel.sharded_train_step(mesh)

    def early(state, batch):
        return step_fn(
            state, {**batch, "image": downscale(batch["image"], config.early_image_size)}
        )

    return early, step_fn


def _resized_train_step(state, batch, *, size: int):
    return train.train_step(state, {**batch, "image": downscale(batch["image"], size)})


def _device_step_fns(config, *, seed: int):
    """(early, late) jitted steps that draw their batch from device-resident data
    (`isomax_jax.device_data.train_step`: the stream follows the state's step)."""
    from isomax_jax import device_data

    def make(step_fn):
        fn = functools.partial(device_data.train_step, seed=seed, batch_size=config.batch_size,
                               step_fn=step_fn)  # fmt: skip
        return jax.jit(fn, donate_argnums=0)

    late = make(train.train_step)
    if not config.early_image_size:
        return late, late
    return make(functools.partial(_resized_train_step, size=config.early_image_size)), late


def _train_steps(config, plan, state, ckpt, log: _TrainingLog, device_batches, step_fns):
    """Steps `log.start` to the end: each step dispatched, its metrics reported at log steps
    and before every checkpoint (a diverged state is never saved), saved when `ckpt` says;
    after a preemption's save, `distributed.Preempted`."""
    total = plan["total_steps"]
    early, late = step_fns
    for step, batch in zip(range(log.start, total), device_batches, strict=True):
        step_fn = early if step < plan["early_steps"] else late
        state, metrics = step_fn(state, batch)
        log.dispatched(metrics)
        done = step + 1
        save = ckpt.due(done, final=done == total)
        if save or done % config.log_every_steps == 0 or done == total:
            log.report(done, checkpointed=ckpt.latest_step())
        else:
            log.bar.update(1)
        if save:
            ckpt.save(jax.device_get(state), force=True)  # host copy: fast save
        if ckpt.preempted_step is not None and done < total:
            ckpt.wait()  # written in full before the process ends
            raise distributed.Preempted(
                f"{log.name} saved at step {done} of {total} in {ckpt.directory / str(done)}; "
                "rerun the same command to resume from it",
                step=done,
            )
    return jax.block_until_ready(state)


def train_one(
    config: Any,
    workdir: str,
    *,
    loss: str,
    seed: int,
    run: int,
    mesh: Any,
    source: inputs.TrainSource,
    preemption: distributed.PreemptionNotice | None = None,
) -> records.TrainedRun:
    """Trains (or resumes, or restores if finished) one model on the training split `source`.

    Raises:
      isomax_jax.distributed.Preempted: `preemption` was signalled; the step is saved.
      isomax_jax.checkpointing.CheckpointSaveError: a checkpoint could not be written.
    """
    name = records.run_name(loss, seed)
    run_dir = os.path.join(workdir, name)
    plan = training_plan(config, source.num_examples)
    total = plan["total_steps"]
    model, state = initial_state(config, plan, loss=loss, seed=seed)
    run_metadata.write_run_metadata(
        run_dir, config=config, seed=seed, ignore_keys=validate.EVALUATION_ONLY_KEYS
    )
    ckpt = checkpointing.RunCheckpointer(
        run_dir, save_every_steps=config.checkpoint_every_steps, preemption=preemption
    )
    try:
        state = ckpt.restore_latest(state)
        start = int(state.step)
        state = parallel.replicate_state(state, mesh)
        if start >= total:  # finished: keep the recorded training summary, train nothing
            info = _read_json(os.path.join(run_dir, TRAIN_INFO)) or {"steps": start, **plan}
            return records.TrainedRun(loss, seed, run, state, model, info)
        schedule = make_schedule(config, plan)
        log = _TrainingLog(loss, seed, workdir, start=start, total=total, schedule=schedule)
        try:
            kind = inputs.input_kind(config, mesh)
            if kind == "device":  # the split on the devices, batches drawn in the step
                batches = itertools.repeat(source.device_data(mesh), total - start)
                step_fns = _device_step_fns(config, seed=seed)
                state = _train_steps(config, plan, state, ckpt, log, batches, step_fns)
            else:
                with _device_batches(
                    config, source, seed=seed, start=start, total=total, mesh=mesh
                ) as device_batches:
                    step_fns = _host_step_fns(config, mesh)
                    state = _train_steps(config, plan, state, ckpt, log, device_batches, step_fns)
            info = {**plan, **log.summary(config.batch_size), "input": kind}
        finally:
            log.close()
    finally:
        ckpt.close()  # the last save written in full (or its failure raised)
    if jax.process_index() == 0:
        run_metadata.write_json(os.path.join(run_dir, TRAIN_INFO), info)
    return records.TrainedRun(loss, seed, run, state, model, info)


def restore_one(config: Any, workdir: str, *, loss: str, seed: int, run: int, mesh: Any):
    """The :class:`~experiments.records.TrainedRun` of a trained (loss, seed), restored."""
    name = records.run_name(loss, seed)
    run_dir = os.path.join(workdir, name)
    info = _read_json(os.path.join(run_dir, TRAIN_INFO)) or {}
    plan = {k: info[k] for k in ("steps_per_epoch", "total_steps", "warmup_steps") if k in info}
    plan.setdefault("lr_milestones_steps", info.get("lr_milestones_steps", []))
    plan.setdefault("total_steps", 1)
    plan.setdefault("warmup_steps", 0)
    # Only shapes are needed to restore: the abstract state, restored straight into replicated
    # arrays on the mesh (no random initialisation).
    model = initial_state(config, plan, loss=loss, seed=seed, init=False)
    abstract = jax.eval_shape(
        lambda: initial_state(config, plan, loss=loss, seed=seed, pretrained=False)[1]
    )
    rep = parallel.replicated(mesh)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), abstract
    )
    ckpt = checkpointing.RunCheckpointer(run_dir, save_every_steps=config.checkpoint_every_steps)
    if ckpt.latest_step() is None:
        raise FileNotFoundError(
            f"no checkpoint in {run_dir}; train first (--mode=train_and_evaluate)"
        )
    state = ckpt.restore_latest(abstract)  # the newest intact checkpoint
    ckpt.close()
    step = int(state.step)
    if info.get("steps") not in (None, step):
        logging.warning("%s: restored step %d, training recorded %s", run_dir, step, info["steps"])
    return records.TrainedRun(loss, seed, run, state, model, info or {"steps": step})


def imported_one(config: Any, *, loss: str, seed: int, run: int, mesh: Any) -> records.TrainedRun:
    """A loss of `config.evaluate_as_imported`: the model of `config.pretrained` as it is (no
    training, nothing written; both modes import it again)."""
    path = inputs.option(config, "pretrained")
    plan = {"total_steps": 1, "warmup_steps": 0, "lr_milestones_steps": []}  # no steps taken
    model, state = initial_state(config, plan, loss=loss, seed=seed)
    info = {"steps": 0, "imported_from": os.path.abspath(path)}
    return records.TrainedRun(loss, seed, run, parallel.replicate_state(state, mesh), model, info)
