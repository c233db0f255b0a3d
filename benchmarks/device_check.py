"""One command for a lent accelerator: throughput, TFLOP/s, mixed precision, a short CIFAR-10 run.

    bash benchmarks/device_check.sh --out device_check.json   # <= 8 min on one GPU / TPU host
    python benchmarks/device_check.py --smoke --out /tmp/dc.json   # same code paths, CPU, < 1 min

Parts (each fails soft: the error is printed and recorded, the next part runs; each has a time
budget; a watchdog writes the JSON and exits if the whole run overruns ``--hard-limit``):

* ``env``: JAX version, devices, ``device_kind`` and the chip's peak TFLOP/s (:data:`PEAKS`).
* ``throughput``: training and evaluation images/s of resnet34, wrn28_10 and densenet_bc100
  (IsoMax head) in float32 and bfloat16 at batch 128 and 512; achieved TFLOP/s from the
  convolution and matrix-product flops of the program (:func:`matmul_flops`) / measured time
  against the peak; the compiled temporary
  memory of each train step (the bfloat16 / float32 ratio for resnet34 at batch 128 is the
  mixed-precision memory figure); the bfloat16-vs-float32 difference of the first training
  loss and of the evaluation features on the same weights and batch.
* ``cifar``: CIFAR-10 training of a papers' backbone (``--cifar-model``, default resnet34 in
  bfloat16) with a SoftMax head and with an IsoMax head, ``--train-minutes`` in total (half
  each), reference optimiser (SGD Nesterov 0.9, weight decay 1e-4, lr 0.1 divided by 10 at
  1/2, 2/3 and 5/6 of the time budget); then test accuracy and AUROC / TNR@TPR95 (reference
  convention) of the standard scores (SoftMax: MPS, ES; IsoMax: ES, MDS) against every OOD set
  available offline. Data: ``--data-root`` (default ``$ISOMAX_SHARED_DATA`` or
  ``../shared/data``): ``tfds/`` prepared sets and ``raw/`` archives, OOD sets are built into
  the work directory (while the models train). Without that folder, and always with
  ``--smoke``, the part runs on ``tfds.testing.mock_data`` (accuracy then means nothing).

The JSON written to ``--out`` (after every part) holds every printed figure.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import math
import os
import pathlib
import sys
import tempfile
import threading
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax

from isomax_jax import losses, metrics, scores, train
from isomax_jax.models import get_model, make_head
from isomax_jax.models.classifier import Classifier
from isomax_jax.models.resnet import CifarResNet

ROOT = pathlib.Path(__file__).resolve().parents[1]

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
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SCORES = {"softmax": ("MPS", "ES"), "isomax": ("ES", "MDS")}
SCORE_FNS = {"MPS": scores.max_probability, "ES": scores.entropic, "MDS": scores.min_distance}
OOD_SETS = ("tiny_imagenet_resize", "tiny_imagenet_crop", "mnist", "omniglot", "textures")
OOD_SETS += ("gaussian_noise", "uniform_noise")

RESULTS: dict = {"parts": {}}
_LOCK = threading.Lock()
_START = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - _START:6.1f}s] {message}", flush=True)


def write_json(path) -> None:
    if path is None:
        return
    with _LOCK:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)
        os.replace(tmp, path)


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


def build_model(name: str, head: str, dtype):
    """``get_model(name, ...)``, or for ``name="tiny"`` (``--smoke``) a 1-block ResNet."""
    if name != "tiny":
        return get_model(name, num_classes=10, head=head, dtype=dtype)
    backbone = CifarResNet(stage_sizes=(1,), widths=(8,), stem_width=8, stem_stride=2,
                           shortcut="zero_pad", dtype=dtype)  # fmt: skip
    return Classifier(backbone, make_head(head, num_classes=10))


def per_example_loss(head: str, logits, labels):
    if head == "softmax":
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return losses.isomax_loss(logits, labels)


def make_train_step(model, head: str, tx):
    """``step(params, stats, opt_state, images, labels, lr) -> (..., loss)``; lr scales updates."""

    def step(params, batch_stats, opt_state, images, labels, lr):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.mean(per_example_loss(head, logits, labels)), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: lr * u, updates)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    return step


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


def _lower_configuration(name: str, dtype_name: str, batch: int, tx):
    """Lowered train step and evaluation forward of one configuration, and their inputs."""
    model = build_model(name, "isomax", DTYPES[dtype_name])
    variables = random_variables(model, (1, 32, 32, 3))
    opt_state = tx.init(variables["params"])
    rng = np.random.default_rng(batch)
    images = jnp.asarray(rng.standard_normal((batch, 32, 32, 3), np.float32))
    labels = jnp.asarray(rng.integers(0, 10, batch, dtype=np.int32))
    step = jax.jit(make_train_step(model, "isomax", tx), donate_argnums=(0, 1, 2))
    state = (variables["params"], variables["batch_stats"], opt_state)
    lowered_train = step.lower(*state, images, labels, 0.0)
    forward = jax.jit(lambda v, x: model.apply(v, x, return_features=True))
    lowered_eval = forward.lower(variables, images)
    flops = {
        "train": matmul_flops(jax.make_jaxpr(step)(*state, images, labels, 0.0).jaxpr),
        "eval": matmul_flops(jax.make_jaxpr(forward)(variables, images).jaxpr),
    }
    return lowered_train, lowered_eval, (variables, opt_state, images, labels, flops)


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
    variables, opt_state, images, labels, flops = inputs
    outputs = {}

    def run_eval():
        outputs["eval"] = eval_c(variables, images)
        return outputs["eval"]

    t_eval, n_eval = timed(run_eval, args.min_seconds, args.max_iters)  # before the donation
    state = [variables["params"], variables["batch_stats"], opt_state]
    first = {}

    def run_train():
        out = train_c(*state, images, labels, 0.0)
        state[:] = out[:3]
        first.setdefault("loss", out[3])
        return out[3]

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
    tx = train.reference_optimizer(1.0)
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
                        name, dtype_name, batch, tx
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


def _load_eval_sets(args, data_dirs, manual_dir, store: dict) -> None:
    """Reads the CIFAR-10 test set and every available OOD set into host memory (thread)."""
    from isomax_jax import data

    for name in ("cifar10", *args.ood_sets):
        try:
            data.check_available(name, data_dir=data_dirs, manual_dir=manual_dir)
            images, labels, count = [], [], 0
            for batch in data.eval_dataset(
                name,
                in_distribution="cifar10",
                batch_size=args.eval_batch,
                data_dir=data_dirs,
                manual_dir=manual_dir,
                num_devices=1,
            ):
                keep = batch["mask"]
                images.append(batch["image"][keep])
                labels.append(batch["label"][keep])
                count += int(keep.sum())
                if count >= args.eval_examples:
                    break
            store[name] = (np.concatenate(images), np.concatenate(labels))
            log(f"  eval set {name}: {store[name][0].shape[0]} examples ready")
        except Exception as error:  # noqa: BLE001 - a missing OOD set is skipped, not fatal
            store[name] = error
            log(f"  eval set {name}: skipped ({type(error).__name__}: {str(error)[:120]})")


def _prepare(args, head: str, images, labels):
    """Model, initial state and compiled train step of one head (compiled on a thread)."""
    model = build_model(args.cifar_model, head, DTYPES[args.cifar_dtype])
    tx = train.reference_optimizer(1.0)  # SGD-Nesterov + wd 1e-4; the lr is applied in the step
    # RBG keys: the initialisers' distributions, but ~10x faster to compile than threefry on CPU.
    key = jax.random.key(0, impl="rbg")
    variables = jax.jit(model.init)(key, jnp.zeros((1, 32, 32, 3)))
    state = [variables["params"], variables["batch_stats"], tx.init(variables["params"])]
    step = jax.jit(make_train_step(model, head, tx), donate_argnums=(0, 1, 2))
    start = time.monotonic()
    compiled = step.lower(*state, images, labels, 0.1).compile()
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    forward = forward.lower(variables, jnp.zeros((args.eval_batch, 32, 32, 3))).compile()
    return model, state, compiled, forward, time.monotonic() - start


def _train(head: str, prepared, batches, seconds: float, batch_size: int) -> dict:
    _, state, step, _, compile_s = prepared
    batch = next(batches)
    in_flight, seen, steps, start = [], [], 0, time.monotonic()
    while (elapsed := time.monotonic() - start) < seconds:
        lr = 0.1 * 0.1 ** sum(elapsed / seconds >= m for m in (1 / 2, 2 / 3, 5 / 6))
        out = step(*state, batch["image"], batch["label"], lr)
        state[:] = out[:3]
        in_flight.append(out[3])
        steps += 1
        if len(in_flight) > 8:  # at most 8 steps ahead of the device, no per-step sync
            seen.append(float(in_flight.pop(0)))
        batch = next(batches)
    seen += [float(x) for x in in_flight]
    jax.block_until_ready(state)
    train_s = time.monotonic() - start
    stats = {
        "steps": steps,
        "train_seconds": train_s,
        "compile_seconds": compile_s,
        "images_per_s": steps * batch_size / train_s,
        "first_loss": seen[0],
        "last_loss": float(np.mean(seen[-10:])),
    }
    log(
        f"  {head}: {steps} steps in {train_s:.0f}s ({stats['images_per_s']:.0f} img/s; "
        f"compiled in {compile_s:.0f}s), loss {stats['first_loss']:.3f} -> {stats['last_loss']:.3f}"
    )
    return stats


def _evaluate(prepared, head: str, eval_sets: dict, eval_batch: int) -> dict:
    _, state, _, forward, _ = prepared
    variables = {"params": state[0], "batch_stats": state[1]}
    names = SCORES[head]

    def score_all(images):
        out = {name: [] for name in names}
        logits_all = []
        for i in range(0, images.shape[0], eval_batch):
            chunk = images[i : i + eval_batch]
            padded = np.zeros((eval_batch, *chunk.shape[1:]), np.float32)  # one compiled shape
            padded[: len(chunk)] = chunk
            logits = forward(variables, padded)[: len(chunk)]
            logits_all.append(np.asarray(logits))
            for name in names:
                out[name].append(np.asarray(SCORE_FNS[name](logits)))
        return {k: np.concatenate(v) for k, v in out.items()}, np.concatenate(logits_all)

    images, labels = eval_sets["cifar10"]
    in_scores, logits = score_all(images)
    result = {"accuracy": float(np.mean(np.argmax(logits, axis=1) == labels)), "ood": {}}
    for ood, value in eval_sets.items():
        if ood == "cifar10" or isinstance(value, Exception):
            continue
        out_scores, _ = score_all(value[0])
        result["ood"][ood] = {}
        for name in names:
            m = metrics.ood_metrics(in_scores[name], out_scores[name], convention="reference")
            result["ood"][ood][name] = {k: float(m[k]) for k in ("auroc", "tnr_at_tpr")}
    return result


def part_cifar(args, deadline: float) -> dict:
    import tensorflow_datasets as tfds

    from isomax_jax import data

    data_root = pathlib.Path(args.data_root)
    mock = args.smoke or args.mock_data or not (data_root / "tfds").is_dir()
    workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="device_check_"))
    data_dirs = [str(workdir / "tfds"), str(data_root / "tfds")]
    (workdir / "tfds").mkdir(parents=True, exist_ok=True)
    manual_dir = str(data_root / "raw")
    log(f"  data: {'MOCK (tfds.testing.mock_data)' if mock else data_root}; work dir {workdir}")
    context = tfds.testing.mock_data(num_examples=args.mock_examples) if mock else (
        contextlib.nullcontext())  # fmt: skip
    result = {"data": "mock" if mock else str(data_root), "model": args.cifar_model,
              "dtype": args.cifar_dtype, "batch": args.cifar_batch}  # fmt: skip
    reserve = 10.0 if args.smoke else 45.0  # evaluation time kept out of the training budget
    with context:
        eval_sets: dict = {}
        loader = threading.Thread(
            target=_load_eval_sets, args=(args, data_dirs, manual_dir, eval_sets), daemon=True
        )
        if mock:  # tfds's mock_data does not reach other threads
            loader.run()
        else:
            loader.start()  # OOD sets are built and read while the models compile and train
        batches = data.train_dataset(
            "cifar10",
            batch_size=args.cifar_batch,
            seed=0,
            data_dir=data_dirs,
            num_devices=1,
            put=jax.device_put,
        )
        try:
            first = next(batches)
            log("  first training batch ready; compiling both heads")
            with concurrent.futures.ThreadPoolExecutor(2) as pool:  # both heads compile at once
                futures = {
                    head: pool.submit(_prepare, args, head, first["image"], first["label"])
                    for head in SCORES
                }
                prepared = {head: f.result() for head, f in futures.items()}
            # The same training time for both heads, within the part's budget.
            seconds = min(30 * args.train_minutes, (deadline - time.monotonic() - reserve) / 2)
            result["train_seconds_per_head"] = seconds
            log(f"  training each head for {seconds:.0f}s (batch {args.cifar_batch})")
            for head in SCORES:
                try:
                    result[f"train_{head}"] = _train(
                        head, prepared[head], batches, max(seconds, 1.0), args.cifar_batch
                    )
                except Exception as error:  # noqa: BLE001 - the other head still trains
                    result[f"train_{head}"] = {"error": f"{type(error).__name__}: {error}"}
                    prepared.pop(head)
                    log(f"  {head} training FAILED: {error}")
        finally:
            batches.close()
        if loader.is_alive():
            loader.join(timeout=max(1.0, deadline - time.monotonic() - 10))
        if "cifar10" not in eval_sets or isinstance(eval_sets["cifar10"], Exception):
            raise RuntimeError(f"CIFAR-10 test set not available: {eval_sets.get('cifar10')}")
        result["eval_sets_skipped"] = {k: str(v) for k, v in eval_sets.items()
                                       if isinstance(v, Exception)}  # fmt: skip
        ready = dict(eval_sets)  # a snapshot: a set still loading is left out
        for head in prepared:
            result[f"eval_{head}"] = _evaluate(prepared[head], head, ready, args.eval_batch)
    _print_cifar_table(result)
    return result


def _print_cifar_table(result: dict) -> None:
    empty = {"accuracy": math.nan, "ood": {}}
    sm, iso = result.get("eval_softmax", empty), result.get("eval_isomax", empty)
    log(
        f"  test accuracy: SoftMax {100 * sm['accuracy']:.2f}%, IsoMax {100 * iso['accuracy']:.2f}%"
    )
    log(f"  {'OOD set':<22} " + " ".join(f"{h + '+' + s:>16}" for h in SCORES for s in SCORES[h]))
    log(f"  {'(AUROC / TNR@TPR95 %)':<22}")
    for ood in sorted(set(sm["ood"]) | set(iso["ood"])):
        cells = []
        for head, ev in (("softmax", sm), ("isomax", iso)):
            for s in SCORES[head]:
                m = ev["ood"].get(ood, {}).get(s)
                cells.append(
                    f"{100 * m['auroc']:6.2f} / {100 * m['tnr_at_tpr']:6.2f}" if m else "-"
                )
        log(f"  {ood:<22} " + " ".join(f"{c:>16}" for c in cells))


def run_part(name: str, fn, args, budget_s: float) -> None:
    log(f"== {name} (budget {budget_s:.0f}s)")
    start = time.monotonic()
    entry = {"status": "running", "budget_s": budget_s}
    RESULTS["parts"][name] = entry
    # A part that overran leaves the next one less time: the run ends before the watchdog.
    deadline = min(start + budget_s, _START + args.hard_limit - 15)
    try:
        entry["results"] = fn(args, deadline)
        failed = [r for r in entry["results"].get("rows", []) if "error" in r]
        entry["status"] = "partial" if failed else "ok"
    except Exception as error:  # noqa: BLE001 - fail soft: record, print, continue
        entry["status"] = "error"
        entry["error"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()
        log(f"  {name} FAILED: {entry['error']}")
    entry["seconds"] = time.monotonic() - start
    log(f"== {name}: {entry['status']} in {entry['seconds']:.1f}s")
    write_json(args.out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="device_check.json", help="JSON of every figure")
    p.add_argument("--smoke", action="store_true", help="tiny everything, CPU, mock data")
    p.add_argument("--only", default="throughput,cifar", help="comma-separated parts")
    p.add_argument("--models", default="resnet34,wrn28_10,densenet_bc100")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batches", default="128,512")
    p.add_argument("--min-seconds", type=float, default=1.0, help="timing per configuration")
    p.add_argument("--max-iters", type=int, default=50)
    p.add_argument(
        "--compile-threads", type=int, default=-1,
        help="threads compiling ahead of the measurements; 0 compiles each configuration just "
        "before measuring it; -1 (default): 0 on GPUs, whose autotuning runs kernels on the "
        "device being timed (and serialises concurrent compiles: on an H200, 8 threads "
        "finished 2 of 12 configurations in 150 s), else min(8, CPUs)",
    )  # fmt: skip
    p.add_argument("--throughput-budget", type=float, default=130.0)
    p.add_argument("--cifar-budget", type=float, default=320.0)
    p.add_argument("--hard-limit", type=float, default=475.0, help="watchdog, whole run (s)")
    default_root = os.environ.get("ISOMAX_SHARED_DATA", str(ROOT.parent / "shared" / "data"))
    p.add_argument("--data-root", default=default_root)
    p.add_argument("--workdir", default=None, help="where OOD sets are built (default: tmp)")
    p.add_argument("--mock-data", action="store_true")
    p.add_argument("--mock-examples", type=int, default=64)
    p.add_argument("--cifar-model", default="resnet34")
    p.add_argument("--cifar-dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--cifar-batch", type=int, default=128)
    p.add_argument("--train-minutes", type=float, default=4.0, help="both models together")
    p.add_argument("--eval-batch", type=int, default=500)
    p.add_argument("--eval-examples", type=int, default=10_000, help="cap per evaluation set")
    p.add_argument("--ood-sets", default=",".join(OOD_SETS))
    p.add_argument("--strict", action="store_true", help="exit 1 if any part is not ok")
    if "--smoke" in (sys.argv[1:] if argv is None else argv):
        # The same code paths, sized for a CPU in well under a minute; explicit flags still win.
        p.set_defaults(
            models="tiny", batches="8", min_seconds=0.0, max_iters=2, cifar_model="tiny",
            cifar_batch=16, train_minutes=0.05, eval_batch=32, eval_examples=64,
            ood_sets="mnist,gaussian_noise", throughput_budget=60.0, cifar_budget=60.0,
            hard_limit=110.0,
        )  # fmt: skip
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.ood_sets = tuple(s for s in args.ood_sets.split(",") if s)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    def watchdog():
        log(f"WATCHDOG: {args.hard_limit:.0f}s exceeded; writing {args.out} and exiting")
        RESULTS["watchdog_fired"] = True
        write_json(args.out)
        os._exit(3)

    timer = threading.Timer(args.hard_limit, watchdog)
    timer.daemon = True
    timer.start()
    devices = jax.devices()
    kind = devices[0].device_kind
    RESULTS["env"] = {"jax": jax.__version__, "backend": jax.default_backend(),
                      "devices": [str(d) for d in devices], "device_kind": kind,
                      "peak_tflops": peak_tflops(kind), "smoke": args.smoke,
                      "argv": sys.argv[1:]}  # fmt: skip
    log(f"jax {jax.__version__} on {jax.default_backend()}: {len(devices)} x {kind}; "
        f"peak {peak_tflops(kind) or 'unknown'} TFLOP/s")  # fmt: skip
    if jax.default_backend() == "cpu" and not args.smoke:
        log("WARNING: no accelerator found (is jax[cuda12] / jax[tpu] installed?); running on CPU")
    write_json(args.out)
    parts = {"throughput": (part_throughput, args.throughput_budget),
             "cifar": (part_cifar, args.cifar_budget)}  # fmt: skip
    for name in args.only.split(","):
        if name in parts:
            run_part(name, parts[name][0], args, parts[name][1])
        else:
            log(f"unknown part {name!r}; known: {sorted(parts)}")
    timer.cancel()
    RESULTS["total_seconds"] = time.monotonic() - _START
    write_json(args.out)
    statuses = {k: v["status"] for k, v in RESULTS["parts"].items()}
    log(f"done in {RESULTS['total_seconds']:.0f}s: {statuses}; figures in {args.out}")
    ok = all(s == "ok" for s in statuses.values())
    sys.stdout.flush()
    os._exit(0 if ok or not args.strict else 1)  # no wait on leftover data/compile threads


if __name__ == "__main__":
    main()
