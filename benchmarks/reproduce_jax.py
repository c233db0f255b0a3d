"""The JAX side of ``benchmarks/device_reproduce.py``: build, time, train and evaluate one head.

Training is the library's :func:`isomax_jax.train.train_step`, unchanged, on device-resident
data (:func:`isomax_jax.device_data.train_step`), with the learning rate of each step set from a
traced plan (so the number of epochs is chosen after the step is compiled); evaluation is
:func:`isomax_jax.evaluation.evaluate` with every detector that applies, both conventions.
"""

from __future__ import annotations

import functools
import json
import time

import jax
import jax.numpy as jnp
import optax
from device_common import DTYPES, build_model, set_learning_rate
from reproduce_report import log

from isomax_jax import device_data, evaluation, parallel, registry, train


def scheduled_step(state, data, plan, *, seed: int, batch_size: int):
    """:func:`isomax_jax.device_data.train_step` with the learning rate of ``state.step`` set
    first: linear warm-up to ``plan[0]`` over ``plan[1]`` steps, linear decay to 0 at
    ``plan[2]``."""
    peak, warmup, total = plan[0], plan[1], plan[2]
    step = state.step.astype(jnp.float32)
    decay = jnp.maximum(total - step, 0.0) / jnp.maximum(total - warmup, 1.0)
    rate = jnp.minimum(step / jnp.maximum(warmup, 1.0), decay)
    state = set_learning_rate(state, peak * rate)
    return device_data.train_step(state, data, seed=seed, batch_size=batch_size)


def plan_array(peak_lr: float, warmup_steps: float, total_steps: float) -> jax.Array:
    return jnp.asarray([peak_lr, warmup_steps, total_steps], jnp.float32)


def build_head(args, head: str, data, mesh) -> dict:
    """Model, initial (replicated) state and compiled step of one head; the step's flops."""
    model = build_model(args.model, head, DTYPES[args.dtype])
    tx = optax.inject_hyperparams(train.reference_optimizer)(
        learning_rate=0.0, weight_decay=args.weight_decay
    )
    state = train.create_train_state(
        model, key=jax.random.key(args.seed), tx=tx, loss=train.LossConfig(head)
    )
    if mesh is not None:
        state = parallel.replicate_state(state, mesh)
    plan = plan_array(args.peak_lr, 1, 2)
    step = functools.partial(scheduled_step, seed=args.seed, batch_size=args.batch)
    start = time.monotonic()
    compiled = jax.jit(step, donate_argnums=0).lower(state, data, plan).compile()
    seconds = time.monotonic() - start
    log(f"  {head}: step compiled in {seconds:.1f}s")
    return {
        "model": model,
        "state": state,
        "step": compiled,
        "compile_seconds": seconds,
        "flops": _flops(step, state, data, plan),
    }


def _flops(step, state, data, plan) -> float | None:
    try:
        from device_throughput import matmul_flops

        return float(matmul_flops(jax.make_jaxpr(step)(state, data, plan).jaxpr))
    except Exception as error:  # noqa: BLE001 - a figure of the report, not of the run
        log(f"  flop count failed: {error}")
        return None


def measure_epoch(args, built: dict, data) -> dict:
    """Seconds per step of the compiled step, on a copy of the initial state."""
    step, plan = built["step"], plan_array(args.peak_lr, 1, 2)
    probe = jax.tree.map(jnp.copy, built["state"])
    for _ in range(3):
        probe, _ = step(probe, data, plan)
    jax.block_until_ready(probe)
    steps, start, limit = 0, time.perf_counter(), 1.0 if args.smoke else 4.0
    while steps < 5 or (time.perf_counter() - start < limit and steps < 400):
        probe, _ = step(probe, data, plan)
        steps += 1
        if steps % 20 == 0:
            jax.block_until_ready(probe)
    jax.block_until_ready(probe)
    per_step = (time.perf_counter() - start) / steps
    spe = data.steps_per_epoch(args.batch)
    return {
        "step_seconds": per_step,
        "steps_timed": steps,
        "steps_per_epoch": spe,
        "epoch_seconds": per_step * spe,
        "images_per_s": args.batch / per_step,
    }


def profile(args, built: dict, data, directory: str) -> None:
    """A JAX profiler trace of 10 steps (on a copy of the state) into ``directory``."""
    step, plan = built["step"], plan_array(args.peak_lr, 1, 2)
    probe = jax.tree.map(jnp.copy, built["state"])
    probe, _ = step(probe, data, plan)
    jax.block_until_ready(probe)
    jax.profiler.start_trace(directory)
    try:
        for _ in range(10):
            probe, _ = step(probe, data, plan)
        jax.block_until_ready(probe)
    finally:
        jax.profiler.stop_trace()
    log(f"  trace of 10 steps in {directory}")


def train_head(args, built: dict, data, epochs: int, epoch_s: float) -> dict:
    """Trains ``epochs`` epochs; each epoch's mean loss is read one epoch late (no per-step
    synchronisation). Stops early, and says so, if far past the planned time."""
    spe = data.steps_per_epoch(args.batch)
    total = epochs * spe
    plan = plan_array(args.peak_lr, round(args.warmup * total), total)
    step, state = built["step"], built.pop("state")
    losses, pending, stopped = [], None, False
    start = time.monotonic()
    deadline = start + 1.5 * epochs * epoch_s + 10
    for epoch in range(epochs):
        running = jnp.zeros((), jnp.float32)
        for _ in range(spe):
            state, metrics = step(state, data, plan)
            running = running + metrics["loss"]
        if pending is not None:
            losses.append(float(pending) / spe)
        pending = running
        if time.monotonic() > deadline and epoch + 1 < epochs:
            stopped = True
            log(f"  stopped after {epoch + 1} of {epochs} epochs: far past the planned time")
            break
    losses.append(float(pending) / spe)
    jax.block_until_ready(state)
    seconds = time.monotonic() - start
    built["state"] = state
    steps = len(losses) * spe
    return {
        "epochs": len(losses),
        "steps": steps,
        "train_seconds": seconds,
        "images_per_s": steps * args.batch / seconds,
        "loss_by_epoch": losses,
        "stopped_early": stopped,
    }


def evaluate_head(args, head: str, built: dict, sets: dict, ood: list, normalization) -> dict:
    """Every detector that applies to ``head`` (its head's inputs passed), both conventions."""
    model, state = built["model"], built["state"]
    variables, params = state.variables, state.params["classifier"]

    def outputs_fn(images):
        logits, features = model.apply(variables, images, train=False, return_features=True)
        return {"logits": logits, "features": features}

    def head_fn(features):
        return model.classifier.apply({"params": params}, features)

    inputs = {"head_fn": head_fn}
    if "kernel" in params:  # a linear head: ViM and the weight-based detectors
        inputs.update(kernel=params["kernel"], bias=params["bias"])
    mean, std = normalization

    def batches(name, split, labels=True):
        images, y = sets[(name, split)]
        return device_data.eval_batches(
            images, y if labels else None, batch_size=args.eval_batch, mean=mean, std=std
        )

    ind = args.in_distribution
    start = time.monotonic()
    report = evaluation.evaluate(
        outputs_fn,
        fit_batches=batches(ind, "train"),
        id_batches=batches(ind, "test"),
        ood_batches={n: batches(n, "test", labels=False) for n in ood},
        head=head,
        conventions=("reference", "openood"),
        perturbation_max_examples=args.perturbation_max,
        progress=False,
        **inputs,
    )
    seconds = time.monotonic() - start
    log(
        f"  {head}: test accuracy {100 * report.accuracy:.2f} %, {len(report.detectors)} "
        f"detectors on {len(ood)} OOD sets in {seconds:.0f}s"
    )
    return {
        "accuracy": report.accuracy,
        "eval_seconds": seconds,
        "paper_scores": list(registry.HEADS[head].paper_scores),
        "report": json.loads(report.to_json()),
        "markdown": report.to_markdown(),
    }
