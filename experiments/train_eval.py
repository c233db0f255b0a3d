"""`run(config, workdir, mode=...)`: every side effect of an experiment lives here.

For each seed (`config.seed + run`, `run < config.runs`) and each loss in `config.losses`, a model
is trained with the same data order and schedule into `workdir/<loss>_seed<seed>/` (Orbax
checkpoints, `run.json`, `train_info.json`; an interrupted run resumes from its latest intact
checkpoint without replaying its input), with a progress bar and TensorBoard summaries
(`workdir/tensorboard/`). Then all models are evaluated together (`experiments.evaluate`) and the
report is written (`experiments.report`). With `mode="evaluate"` the final checkpoints are
restored instead of trained. The flow is one way: main -> train_eval -> evaluate / report.
"""

from __future__ import annotations

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

from experiments import evaluate, records, report, validate
from experiments.progress import Progress
from isomax_jax import checkpointing, data, distributed, models, parallel, train, validation

# name -> number of classes of the in-distribution sets.
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10}


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


def initial_state(config: Any, plan: dict[str, Any], *, loss: str, seed: int, init: bool = True):
    """The model and freshly initialised train state of one (loss, seed) (the model alone
    with `init=False`)."""
    model = models.get_model(
        config.model,
        num_classes=NUM_CLASSES[config.dataset],
        head=loss,
        dtype=getattr(jax.numpy, config.dtype),
    )
    if not init:
        return model
    tx = train.reference_optimizer(
        make_schedule(config, plan),
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov,
    )
    loss_config = train.LossConfig(
        loss, entropic_scale=config.entropic_scale, fpr=config.dismax_fpr and loss == "dismax"
    )
    state = train.create_train_state(model, key=jax.random.key(seed), tx=tx, loss=loss_config)
    return model, state


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _first_non_finite(fetched: list[dict[str, np.ndarray]], first_step: int) -> int | None:
    for i, metrics in enumerate(fetched):
        if not math.isfinite(float(metrics["loss"])):
            return first_step + i
    return None


def train_one(
    config: Any,
    workdir: str,
    *,
    loss: str,
    seed: int,
    run: int,
    mesh: Any,
    split: tuple[np.ndarray, np.ndarray],
) -> records.TrainedRun:
    """Trains (or resumes, or restores if finished) one model on the in-memory `split`."""
    name = records.run_name(loss, seed)
    run_dir = os.path.join(workdir, name)
    images, labels = split
    plan = training_plan(config, len(images))
    total = plan["total_steps"]
    model, state = initial_state(config, plan, loss=loss, seed=seed)
    checkpointing.write_run_metadata(
        run_dir, config=config, seed=seed, ignore_keys=validate.EVALUATION_ONLY_KEYS
    )
    ckpt = checkpointing.RunCheckpointer(run_dir, save_every_steps=config.checkpoint_every_steps)
    state = ckpt.restore_latest(state)
    start = int(state.step)
    state = parallel.replicate_state(state, mesh)
    if start >= total:  # finished: keep the recorded training summary, train nothing
        ckpt.close()
        info = _read_json(os.path.join(run_dir, "train_info.json")) or {"steps": start, **plan}
        return records.TrainedRun(loss, seed, run, state, model, info)

    step_fn = parallel.sharded_train_step(mesh)
    schedule = make_schedule(config, plan)
    writer = _summary_writer(workdir, name)
    batches = data.TrainBatches(
        images,
        labels,
        batch_size=config.batch_size,
        seed=seed,
        name=config.dataset,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        start_step=start,
        num_steps=total - start,
    )
    t_start = time.time()
    host = iter(batches)
    first = next(host)
    validation.validate_labels(first["label"], NUM_CLASSES[config.dataset])  # eager: fails here
    device_batches = parallel.prefetch_to_mesh(itertools.chain([first], host), mesh)
    compile_s = t_timed = None
    pending: list[dict[str, jax.Array]] = []
    window_start, last = start, {}
    bar = Progress(
        f"train {report.loss_title(loss)} seed {seed}",
        total,
        initial=start,
        enabled=jax.process_index() == 0,
    )
    with batches, bar:
        for step, batch in zip(range(start, total), device_batches, strict=True):
            if step < plan["early_steps"]:
                batch = {**batch, "image": downscale(batch["image"], config.early_image_size)}
            state, metrics = step_fn(state, batch)
            if pending:  # wait for the previous step only: the device always has work queued
                jax.block_until_ready(pending[-1])
            pending.append(metrics)
            if compile_s is None:
                jax.block_until_ready(metrics)
                compile_s = time.time() - t_start
                t_timed = time.time()
            done = step + 1
            fetch = done % config.log_every_steps == 0 or done == total
            save = done % config.checkpoint_every_steps == 0 or done == total
            if fetch or save:
                fetched = jax.device_get(pending)
                bad = _first_non_finite(fetched, window_start)
                if bad is not None:
                    raise TrainingDivergedError(
                        f"{name}: the training loss is {float(fetched[bad - window_start]['loss'])}"
                        f" at step {bad + 1} of {total} (after {bad - start} steps of this start)."
                        " Check the labels and the learning rate; checkpoints up to step "
                        f"{ckpt.latest_step()} are intact."
                    )
                last = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                lr = float(schedule(step))
                dt = (time.time() - t_timed) / max(done - start - 1, 1)
                bar.update(1, loss=last["loss"], acc=last["accuracy"], lr=lr, s_step=dt)
                if writer is not None:
                    for key, value in (*last.items(), ("learning_rate", lr), ("s_per_step", dt)):
                        writer.add_scalar(f"train/{key}", value, done)
                pending, window_start = [], done
            else:
                bar.update(1)
            if save:
                ckpt.save(jax.device_get(state), force=done == total)  # host copy: fast save
    jax.block_until_ready(state)
    t_end = time.time()
    ckpt.close()
    if writer is not None:
        writer.close()
    trained = total - start
    info = {
        **plan,
        "steps": total,
        "batch_size": config.batch_size,
        "resumed_from_step": start,
        "wall_time_s": t_end - t_start,
        "compile_s": compile_s,
        "seconds_per_step": (t_end - t_timed) / (trained - 1) if trained > 1 else None,
        "final_train_loss": last.get("loss"),
        "final_train_accuracy": last.get("accuracy"),
    }
    if jax.process_index() == 0:
        with open(os.path.join(run_dir, "train_info.json"), "w") as f:
            json.dump(info, f, indent=1)
    return records.TrainedRun(loss, seed, run, state, model, info)


def _summary_writer(workdir: str, name: str):
    if jax.process_index() != 0:
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(os.path.join(workdir, "tensorboard", name))


def restore_one(config: Any, workdir: str, *, loss: str, seed: int, run: int, mesh: Any):
    """The :class:`~experiments.records.TrainedRun` of a trained (loss, seed), restored."""
    name = records.run_name(loss, seed)
    run_dir = os.path.join(workdir, name)
    info = _read_json(os.path.join(run_dir, "train_info.json")) or {}
    plan = {k: info[k] for k in ("steps_per_epoch", "total_steps", "warmup_steps") if k in info}
    plan.setdefault("lr_milestones_steps", info.get("lr_milestones_steps", []))
    plan.setdefault("total_steps", 1)
    plan.setdefault("warmup_steps", 0)
    # Only shapes are needed to restore: the abstract state, restored straight into replicated
    # arrays on the mesh (no random initialisation).
    model = initial_state(config, plan, loss=loss, seed=seed, init=False)
    abstract = jax.eval_shape(lambda: initial_state(config, plan, loss=loss, seed=seed)[1])
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


def code_version() -> dict[str, Any]:
    """The git commit of the code that ran and whether the tree had uncommitted changes."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", root, *args], capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": "unknown (not a git checkout)", "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status)}


def run(config: Any, workdir: str, *, mode: str = "train_and_evaluate") -> dict[str, Any]:
    """Validates `config`, trains (or restores) every model, evaluates them, writes the report.

    Returns:
      The results document (also written to `workdir/results.json`).
    """
    start = time.time()
    validate.check(
        config,
        workdir,
        mode=mode,
        device_count=jax.device_count(),
        process_count=jax.process_count(),
    )
    os.makedirs(workdir, exist_ok=True)
    mesh = parallel.data_mesh()
    timings: dict[str, float] = {"validation_s": time.time() - start}
    with checkpointing.workdir_lock(workdir):
        trained = []
        if mode == "train_and_evaluate":
            t0 = time.time()
            split = data.load_train_split(
                config.dataset,
                split=config.train_split,
                data_dir=config.data_dir or None,
                download=config.download,
            )
            timings["data_load_s"] = time.time() - t0
            t0 = time.time()
            for run_index in range(config.runs):
                for loss in config.losses:
                    trained.append(
                        train_one(
                            config, workdir, loss=loss, seed=config.seed + run_index,
                            run=run_index, mesh=mesh, split=split,
                        )
                    )  # fmt: skip
            timings["training_s"] = time.time() - t0
            timings["compile_s"] = sum(t.train.get("compile_s") or 0.0 for t in trained)
        else:
            for run_index in range(config.runs):
                for loss in config.losses:
                    trained.append(
                        restore_one(
                            config, workdir, loss=loss, seed=config.seed + run_index,
                            run=run_index, mesh=mesh,
                        )
                    )  # fmt: skip
        t0 = time.time()
        evaluation = evaluate.evaluate_runs(config, trained, mesh=mesh, workdir=workdir)
        timings["evaluation_s"] = time.time() - t0
        t0 = time.time()
        results = report.build_results(
            config.to_dict(),
            evaluation.runs,
            devices=distributed.device_layout(),
            code=code_version(),
            versions=checkpointing.versions(),
            timings=timings,
            bootstrap=evaluation.bootstrap,
            detectors=evaluation.detector_info,
        )
        if jax.process_index() == 0:
            paths = report.write_report(results, evaluation.plot_scores, workdir)
            evaluation.save_logits(os.path.join(workdir, "logits"))
            report.write_summaries(results, workdir)
            results["timings"]["report_s"] = time.time() - t0
            results["wall_time_s"] = time.time() - start
            report.write_json(results, paths["json"])
            print(report.console_summary(results, paths), flush=True)
    return results
