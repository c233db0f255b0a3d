"""The ``throughput`` part of ``benchmarks/device_check.py``: images/s, TFLOP/s, memory, bf16.

Training and evaluation images/s of each model, dtype and batch (the library's train step,
:func:`isomax_jax.train.train_step`, on random weights); achieved TFLOP/s from the convolution and
matrix-product flops of the program (:func:`matmul_flops`) against the chip's peak
(:data:`PEAKS`); the compiled temporary memory of each train step; the bfloat16-vs-float32
difference of the first training loss and of the evaluation features.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from device_common import (
    DTYPES,
    build_model,
    jitted_train_step,
    log,
    sgd_with_learning_rate,
    train_state,
)

from isomax_jax import train

#: Dense peak TFLOP/s per device by ``device_kind`` substring (first match wins). GPUs:
#: "float32" is the TF32 tensor-core peak, which XLA uses for float32 convolutions and matrix
#: products at default precision; TPUs run float32 products as bfloat16 passes by default.
PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bfloat16": 989.4, "float32": 494.7}),
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}),
    ("H100", {"bfloat16": 989.4, "float32": 494.7}),
    ("A100", {"bfloat16": 312.0, "float32": 156.0}),
    ("L40S", {"bfloat16": 362.1, "float32": 183.0}),
    ("L4", {"bfloat16": 121.0, "float32": 60.0}),
    ("TPU v6", {"bfloat16": 918.0, "float32": 918.0}),
    ("TPU v5 lite", {"bfloat16": 197.0, "float32": 197.0}),
    ("TPU v5e", {"bfloat16": 197.0, "float32": 197.0}),
    ("TPU v5", {"bfloat16": 459.0, "float32": 459.0}),
    ("TPU v4", {"bfloat16": 275.0, "float32": 275.0}),
]


def peak_tflops(device_kind: str) -> dict[str, float] | None:
    for key, peak in PEAKS:
        if key.lower() in device_kind.lower():
            return peak
    return None


def random_variables(model, image_shape, seed=0):
    """Kaiming-scaled random weights from the abstract shapes (no init compile), on device."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(image_shape))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_out = int(np.prod(leaf.shape[:-2])) * leaf.shape[-1]
            value = rng.standard_normal(leaf.shape, np.float32) * np.sqrt(2.0 / fan_out)
        elif name in ("scale", "var"):
            value = np.ones(leaf.shape, np.float32)
        elif name == "prototypes":  # as after training: not all zero
            value = rng.standard_normal(leaf.shape, np.float32)
        else:  # biases, running means
            value = np.zeros(leaf.shape, np.float32)
        return jnp.asarray(value)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def timed(run, min_seconds: float, max_iters: int) -> tuple[float, int]:
    """Seconds per call of ``run`` after one warm-up call; syncs every 4 calls, not each."""
    jax.block_until_ready(run())
    iters, start = 0, time.perf_counter()
    while True:
        out = run()
        iters += 1
        if iters >= max_iters:
            break
        if iters % 4 == 0:
            jax.block_until_ready(out)
            if time.perf_counter() - start >= min_seconds:
                break
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iters, iters


def _lower_configuration(name: str, dtype_name: str, batch: int):
    """Lowered train step and evaluation forward of one configuration, and their inputs."""
    model = build_model(name, "isomax", DTYPES[dtype_name])
    variables = random_variables(model, (1, 32, 32, 3))
    state = train_state(model, "isomax", sgd_with_learning_rate(0.0), variables=variables)
    rng = np.random.default_rng(batch)
    images = jnp.asarray(rng.standard_normal((batch, 32, 32, 3), np.float32))
    labels = jnp.asarray(rng.integers(0, 10, batch, dtype=np.int32))
    batch_arrays = {"image": images, "label": labels}
    step = jitted_train_step()
    lowered_train = step.lower(state, batch_arrays)
    forward = jax.jit(lambda v, x: model.apply(v, x, return_features=True))
    lowered_eval = forward.lower(variables, images)
    flops = {
        "train": matmul_flops(jax.make_jaxpr(train.train_step)(state, batch_arrays).jaxpr),
        "eval": matmul_flops(jax.make_jaxpr(forward)(variables, images).jaxpr),
    }
    return lowered_train, lowered_eval, (variables, state, batch_arrays, flops)


def matmul_flops(jaxpr) -> float:
    """Flops of the convolutions and matrix products of a jaxpr (2 per multiply-add).

    Counted from the program itself, so the figure is the same on every backend: XLA's cost
    analysis of a compiled GPU program counts the cuDNN convolutions as 0 flops, and that of a
    lowered one is empty there (jax 0.11, H200). Elementwise work is left out: the peaks in
    :data:`PEAKS` are matrix-unit peaks. Sub-programs are followed (``jit``, ``custom_jvp`` and
    ``custom_vjp``, ``remat``; a ``scan`` body counts ``length`` times, the costliest branch of
    a ``cond`` once, a ``while`` body once).
    """
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            total += (
                2.0
                * math.prod(eqn.outvars[0].aval.shape)
                * math.prod(lhs.shape[d] for d in contract)
            )
        elif name == "conv_general_dilated":
            rhs, spec = eqn.invars[1].aval, eqn.params["dimension_numbers"].rhs_spec
            per_output = rhs.shape[spec[1]] * math.prod(rhs.shape[d] for d in spec[2:])
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output
        subs = []
        for value in eqn.params.values():
            values = value if isinstance(value, tuple | list) else (value,)
            subs.append([getattr(v, "jaxpr", v) for v in values if hasattr(v, "eqns")
                         or hasattr(getattr(v, "jaxpr", None), "eqns")])  # fmt: skip
        for group in subs:
            if not group:
                continue
            counts = [matmul_flops(sub) for sub in group]
            inner = max(counts) if name == "cond" else sum(counts)
            total += inner * (eqn.params.get("length", 1) if name == "scan" else 1)
    return total


def _measure(config, train_c, eval_c, inputs, args, peak) -> dict:
    variables, state, batch_arrays, flops = inputs
    outputs = {}

    def run_eval():
        outputs["eval"] = eval_c(variables, batch_arrays["image"])
        return outputs["eval"]

    t_eval, n_eval = timed(run_eval, args.min_seconds, args.max_iters)  # before the donation
    current = [state]
    first = {}

    def run_train():
        current[0], step_metrics = train_c(current[0], batch_arrays)
        first.setdefault("loss", step_metrics["loss"])
        return step_metrics["loss"]

    t_train, n_train = timed(run_train, args.min_seconds, args.max_iters)
    batch = config["batch"]
    row = {
        **config,
        "train_images_per_s": batch / t_train,
        "eval_images_per_s": batch / t_eval,
        "train_step_ms": 1e3 * t_train,
        "eval_step_ms": 1e3 * t_eval,
        "train_tflops": flops["train"] / t_train / 1e12,
        "eval_tflops": flops["eval"] / t_eval / 1e12,
        "train_gflop_per_image": flops["train"] / batch / 1e9,
        "train_temp_mib": train_c.memory_analysis().temp_size_in_bytes / 2**20,
        "first_loss": float(first["loss"]),
        "timed_steps": [n_train, n_eval],
        "_features": np.asarray(outputs["eval"][1], np.float64),
    }
    if peak is not None:
        row["train_peak_fraction"] = row["train_tflops"] / peak[config["dtype"]]
        row["eval_peak_fraction"] = row["eval_tflops"] / peak[config["dtype"]]
    return row


def part_throughput(args, deadline: float) -> dict:
    device_kind = jax.devices()[0].device_kind
    peak = peak_tflops(device_kind)
    rows, pending = [], {}
    threads = args.compile_threads
    if threads < 0:
        threads = 0 if jax.default_backend() == "gpu" else min(8, os.cpu_count() or 1)
    # XLA frees the GIL while compiling; with 0 threads each configuration compiles on its own.
    pool = concurrent.futures.ThreadPoolExecutor(max(threads, 1))

    def measure(future):
        config, inputs = pending.pop(future)
        label = f"{config['model']:<15} {config['dtype']:<9} b{config['batch']:<4}"
        try:
            train_c, eval_c = future.result()
            row = _measure(config, train_c, eval_c, inputs, args, peak)
            rows.append(row)
            frac = f" ({100 * row['train_peak_fraction']:.1f}% of peak)" if peak else ""
            log(
                f"  {label} train {row['train_images_per_s']:8.0f} img/s "
                f"{row['train_tflops']:7.2f} TFLOP/s{frac} | eval {row['eval_images_per_s']:8.0f}"
                f" img/s {row['eval_tflops']:7.2f} TFLOP/s | temp {row['train_temp_mib']:8.1f} MiB"
            )
        except Exception as error:  # noqa: BLE001 - fail soft, per configuration
            rows.append({**config, "error": f"{type(error).__name__}: {error}"})
            log(f"  {label} FAILED: {type(error).__name__}: {error}")

    # Lower each configuration in turn (batch 128 of every model first) while earlier ones
    # compile on threads; measure each as soon as it is compiled.
    for batch in args.batches:
        for name in args.models:
            for dtype_name in args.dtypes:
                config = {"model": name, "dtype": dtype_name, "batch": batch}
                if time.monotonic() > deadline:
                    rows.append({**config, "error": "skipped: part budget spent"})
                    continue
                try:
                    lowered_train, lowered_eval, inputs = _lower_configuration(
                        name, dtype_name, batch
                    )
                    future = pool.submit(lambda a, b: (a.compile(), b.compile()), lowered_train,
                                         lowered_eval)  # fmt: skip
                    pending[future] = (config, inputs)
                    if threads == 0:
                        concurrent.futures.wait([future], max(0.0, deadline - time.monotonic()))
                except Exception as error:  # noqa: BLE001
                    rows.append({**config, "error": f"{type(error).__name__}: {error}"})
                    log(f"  {name} {dtype_name} b{batch}: lowering failed: {error}")
                for future in [f for f in pending if f.done()]:
                    measure(future)
    try:
        remaining = max(0.0, deadline - time.monotonic())
        for future in concurrent.futures.as_completed(list(pending), timeout=remaining):
            measure(future)
    except TimeoutError:
        pass
    for config, _ in pending.values():
        rows.append({**config, "error": "skipped: not compiled within the part budget"})
        log(f"  {config['model']} {config['dtype']} b{config['batch']}: not compiled in time")
    pending.clear()
    pool.shutdown(wait=False, cancel_futures=True)
    return {"device_kind": device_kind, "peak_tflops": peak, "rows": rows,
            "mixed_precision": _compare_precisions(rows)}  # fmt: skip


def _compare_precisions(rows: list[dict]) -> list[dict]:
    """bfloat16 vs float32 on the same weights and batch: first loss, features, memory."""
    out = []
    by_key = {(r["model"], r["dtype"], r["batch"]): r for r in rows if "error" not in r}
    for (name, dtype, batch), row in sorted(by_key.items()):
        ref = by_key.get((name, "float32", batch))
        if dtype != "bfloat16" or ref is None:
            continue
        f32, bf16 = ref.pop("_features", None), row.pop("_features", None)
        item = {
            "model": name,
            "batch": batch,
            "loss_rel_diff": abs(row["first_loss"] - ref["first_loss"]) / abs(ref["first_loss"]),
            "temp_memory_ratio_f32_over_bf16": ref["train_temp_mib"] / row["train_temp_mib"],
            "train_speedup": row["train_images_per_s"] / ref["train_images_per_s"],
        }
        if f32 is not None and bf16 is not None:
            item["features_rel_diff"] = float(np.max(np.abs(bf16 - f32)) / np.max(np.abs(f32)))
        out.append(item)
        log(
            f"  bf16 vs f32 {name} b{batch}: loss diff {item['loss_rel_diff']:.2e}, features "
            f"{item.get('features_rel_diff', math.nan):.2e}, temp memory f32/bf16 "
            f"{item['temp_memory_ratio_f32_over_bf16']:.2f}x, train speed-up "
            f"{item['train_speedup']:.2f}x"
        )
    for row in rows:
        row.pop("_features", None)
    return out
