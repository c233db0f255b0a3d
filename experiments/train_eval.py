"""`train_and_evaluate(config, workdir)`: every side effect of an experiment lives here.

For each seed (`config.seed + run`, `run < config.runs`) and each loss in `config.losses`, a model
is trained with the same data order and schedule into `workdir/<loss>_seed<seed>/` (Orbax
checkpoints, `run.json`, `train_info.json`; an interrupted run resumes from its latest
checkpoint), with progress lines and TensorBoard summaries (`workdir/tensorboard/`). Then all
models are evaluated together and the report is written (`experiments.evaluate`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import evaluate

# name -> (number of classes, number of training examples)
DATASETS = {"cifar10": (10, 50_000), "cifar100": (100, 50_000), "svhn": (10, 73_257)}


def training_plan(config: Any) -> dict[str, Any]:
    """Steps per epoch, total steps and the learning-rate milestones (in steps) of `config`.

    An epoch is `ceil(num_examples / batch_size)` steps, as the reference's PyTorch loader (the
    tfds stream repeats before batching, so no example is dropped at epoch ends). Milestones are
    `config.lr_boundaries` (fractions) of the total, e.g. 150/200/250 of 300 epochs.
    """
    _, num_examples = DATASETS[config.dataset]
    if config.train_split != "train":
        from isomax_jax import data

        num_examples = data.num_examples(
            config.dataset, split=config.train_split, data_dir=config.data_dir or None
        )
    steps_per_epoch = math.ceil(num_examples / config.batch_size)
    if config.num_train_steps > 0:
        total = int(config.num_train_steps)
    else:
        total = max(1, round(config.num_epochs * steps_per_epoch))
    milestones = [round(f * total) for f in config.lr_boundaries]
    return {
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total,
        "epochs": total / steps_per_epoch,
        "lr_milestones_steps": milestones,
    }


def initial_state(config: Any, *, loss: str, seed: int):
    """The freshly initialised train state of one (loss, seed) and its learning-rate schedule."""
    from isomax_jax import models, train

    num_classes, _ = DATASETS[config.dataset]
    model = models.get_model(config.model, num_classes=num_classes, head=loss)
    plan = training_plan(config)
    schedule = train.multistep_schedule(
        steps_per_epoch=1,  # milestones are already in steps
        milestones=plan["lr_milestones_steps"],
        base_learning_rate=config.learning_rate,
        decay=config.lr_decay_factor,
    )
    tx = train.reference_optimizer(
        schedule,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov,
    )
    loss_config = train.LossConfig(
        loss,
        entropic_scale=config.entropic_scale,
        fpr=bool(config.dismax_fpr) and loss == "dismax",
    )
    # create_train_state's own init runs op by op (tens of seconds on CPU); a jitted init with
    # the same key split gives the same variables in one compilation.
    key = jax.random.key(seed)
    init_key, _ = jax.random.split(key)
    init = jax.jit(functools.partial(model.init, train=False))
    variables = init(init_key, jnp.zeros((1, 32, 32, 3), jnp.float32))
    state = train.create_train_state(model, key=key, tx=tx, loss=loss_config, variables=variables)
    return state, schedule, plan


def _run_dir(workdir: str, loss: str, seed: int) -> str:
    return os.path.join(workdir, f"{loss}_seed{seed}")


def _train_batches(config: Any, seed: int):
    """Host-local training batches, endless (each process reads its own shard)."""
    from isomax_jax import data

    return iter(
        data.train_dataset(
            config.dataset,
            batch_size=config.batch_size,  # global; each process gets batch_size // processes
            seed=seed,
            data_dir=config.data_dir or None,
            split=config.train_split,
            download=config.download,
        )
    )


def train_one(config: Any, workdir: str, *, loss: str, seed: int, run: int, mesh: Any) -> dict:
    """Trains (or resumes, or skips if finished) one model; returns its evaluation entry."""
    from tensorboardX import SummaryWriter

    from isomax_jax import checkpointing, parallel

    run_dir = _run_dir(workdir, loss, seed)
    state, schedule, plan = initial_state(config, loss=loss, seed=seed)
    checkpointing.write_run_metadata(run_dir, config=config, seed=seed)
    ckpt = checkpointing.RunCheckpointer(run_dir, save_every_steps=config.checkpoint_every_steps)
    state = ckpt.restore_latest(state)
    start_step, total = int(state.step), plan["total_steps"]
    state = parallel.replicate_state(state, mesh)
    step_fn = parallel.sharded_train_step(mesh)
    writer = None
    if jax.process_index() == 0:
        writer = SummaryWriter(os.path.join(workdir, "tensorboard", f"{loss}_seed{seed}"))
    name = f"[{loss} seed {seed}]"
    logging.info(
        "%s training %d steps (%.2f epochs of %d steps, batch %d), lr milestones %s, from step %d",
        name, total, plan["epochs"], plan["steps_per_epoch"], config.batch_size,
        plan["lr_milestones_steps"], start_step,
    )  # fmt: skip
    if start_step < total:  # (a finished run only restores its final checkpoint)
        batches = _train_batches(config, seed)
        for _ in range(start_step):  # same data order after a resume
            next(batches)
    t_start = time.time()
    compile_s, t_timed, n_timed, t_log, n_log, pending, last = None, None, 0, None, 0, [], {}
    for step in range(start_step, total):
        batch = next(batches)
        batch = {"image": np.asarray(batch["image"], np.float32), "label": batch["label"]}
        state, metrics = step_fn(state, parallel.shard_batch(batch, mesh))
        pending.append(metrics)
        if compile_s is None:  # the first step compiles: time the others
            jax.block_until_ready(metrics)
            compile_s = time.time() - t_start
            t_timed = t_log = time.time()
        else:
            n_timed, n_log = n_timed + 1, n_log + 1
        done = step + 1
        if done % config.checkpoint_every_steps == 0:
            ckpt.save(jax.device_get(state))  # host copy: Orbax's first device save is slow
        if done % config.log_every_steps == 0 or done == total:
            fetched = jax.device_get(pending)
            last = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
            dt = (time.time() - t_log) / max(n_log, 1)
            lr = float(schedule(step))
            eta = (total - done) * dt / 60
            logging.info(
                "%s step %d/%d (epoch %.2f) loss %.4f acc %.3f lr %.4g %.3f s/step ETA %.1f min",
                name, done, total, done / plan["steps_per_epoch"], last["loss"],
                last["accuracy"], lr, dt, eta,
            )  # fmt: skip
            if writer is not None:
                writer.add_scalar("train/loss", last["loss"], done)
                writer.add_scalar("train/accuracy", last["accuracy"], done)
                writer.add_scalar("train/learning_rate", lr, done)
                writer.add_scalar("train/seconds_per_step", dt, done)
            pending, t_log, n_log = [], time.time(), 0
    jax.block_until_ready(state)
    t_end = time.time()
    if start_step < total:
        ckpt.save(jax.device_get(state), force=True)
    ckpt.close()
    if writer is not None:
        writer.close()
    trained_steps = total - start_step
    info = {
        "steps": total,
        "epochs": plan["epochs"],
        "steps_per_epoch": plan["steps_per_epoch"],
        "batch_size": config.batch_size,
        "lr_milestones_steps": plan["lr_milestones_steps"],
        "resumed_from_step": start_step,
        "wall_time_s": time.time() - t_start,
        "compile_s": compile_s,
        "seconds_per_step": (t_end - t_timed) / n_timed if n_timed else None,
        "final_train_loss": last.get("loss"),
        "final_train_accuracy": last.get("accuracy"),
    }
    if trained_steps == 0:  # a finished run: keep the recorded training summary
        info = _read_train_info(run_dir) or info
    elif jax.process_index() == 0:
        with open(os.path.join(run_dir, "train_info.json"), "w") as f:
            json.dump(info, f, indent=1)
    return {
        "loss": loss,
        "seed": seed,
        "run": run,
        "apply_fn": state.apply_fn,
        "variables": state.variables,
        "train": info,
    }


def _read_train_info(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, "train_info.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def restore_trained(config: Any, workdir: str, *, loss: str, seed: int, run: int) -> dict:
    """The evaluation entry of a trained (loss, seed) restored from its latest checkpoint."""
    from isomax_jax import checkpointing, parallel

    run_dir = _run_dir(workdir, loss, seed)
    mesh = parallel.data_mesh()
    # Only shapes are needed to restore (no slow random initialisation): the abstract state,
    # restored straight into replicated arrays on the mesh.
    plan = training_plan(config)
    abstract = jax.eval_shape(lambda: initial_state(config, loss=loss, seed=seed)[0])
    rep = parallel.replicated(mesh)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), abstract
    )
    ckpt = checkpointing.RunCheckpointer(run_dir, save_every_steps=config.checkpoint_every_steps)
    step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(
            f"no checkpoint in {run_dir}; train first (--mode=train_and_evaluate)"
        )
    if step != plan["total_steps"]:
        logging.warning("%s: checkpoint at step %d of %d", run_dir, step, plan["total_steps"])
    state = ckpt.restore_latest(abstract)
    ckpt.close()
    info = _read_train_info(run_dir) or {"steps": step, "epochs": step / plan["steps_per_epoch"]}
    return {
        "loss": loss,
        "seed": seed,
        "run": run,
        "apply_fn": state.apply_fn,
        "variables": state.variables,
        "train": info,
        "mesh": mesh,
    }


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
    """Trains every (seed, loss) of `config`, then evaluates them and writes the report.

    Returns:
      The results document (also written to `workdir/results.json`).
    """
    from isomax_jax import parallel

    start = time.time()
    os.makedirs(workdir, exist_ok=True)
    mesh = parallel.data_mesh()
    trained = []
    for run in range(config.runs):
        seed = config.seed + run
        for loss in config.losses:
            trained.append(train_one(config, workdir, loss=loss, seed=seed, run=run, mesh=mesh))
    logging.info("training done in %.1f min; evaluating", (time.time() - start) / 60)
    return evaluate.evaluate_models(config, trained, workdir, mesh=mesh, wall_start=start)
