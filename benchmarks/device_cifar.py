"""The ``cifar`` part of ``benchmarks/device_check.py``: a short CIFAR-10 run of two heads.

A papers' backbone with a SoftMax head and with an IsoMax head, trained for the same time with
the library's train step (:func:`isomax_jax.train.train_step`, reference optimiser, lr 0.1
divided by 10 at 1/2, 2/3 and 5/6 of the time budget), then test accuracy and AUROC /
TNR@TPR95 of the standard scores against every OOD set available offline (built while the
models train). Without data, the run uses :func:`isomax_jax.data.testing.mock_data`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import pathlib
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from device_common import (
    DTYPES,
    build_model,
    jitted_train_step,
    log,
    set_learning_rate,
    sgd_with_learning_rate,
    train_state,
)

from isomax_jax import metrics, scores

SCORES = {"softmax": ("MPS", "ES"), "isomax": ("ES", "MDS")}
SCORE_FNS = {"MPS": scores.max_probability, "ES": scores.entropic, "MDS": scores.min_distance}
OOD_SETS = ("tiny_imagenet_resize", "tiny_imagenet_crop", "mnist", "omniglot", "textures")
OOD_SETS += ("gaussian_noise", "uniform_noise")


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


def _prepare(args, head: str, batch):
    """Model, initial state and compiled train step of one head (compiled on a thread)."""
    model = build_model(args.cifar_model, head, DTYPES[args.cifar_dtype])
    # RBG keys: the initialisers' distributions, but ~10x faster to compile than threefry on CPU.
    key = jax.random.key(0, impl="rbg")
    state = train_state(model, head, sgd_with_learning_rate(0.1), key=key)
    start = time.monotonic()
    compiled = jitted_train_step().lower(state, batch).compile()
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    forward = forward.lower(state.variables, jnp.zeros((args.eval_batch, 32, 32, 3))).compile()
    return model, [state], compiled, forward, time.monotonic() - start


def _train(head: str, prepared, batches, seconds: float, batch_size: int) -> dict:
    _, state, step, _, compile_s = prepared
    batch = next(batches)
    in_flight, seen, steps, start = [], [], 0, time.monotonic()
    lr = None
    while (elapsed := time.monotonic() - start) < seconds:
        now = 0.1 * 0.1 ** sum(elapsed / seconds >= m for m in (1 / 2, 2 / 3, 5 / 6))
        if now != lr:
            state[0], lr = set_learning_rate(state[0], now), now
        state[0], step_metrics = step(state[0], batch)
        in_flight.append(step_metrics["loss"])
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
    variables = state[0].variables
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
    from isomax_jax import data
    from isomax_jax.data import testing

    data_root = pathlib.Path(args.data_root)
    mock = args.smoke or args.mock_data or not (data_root / "tfds").is_dir()
    workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="device_check_"))
    data_dirs = [str(workdir / "tfds"), str(data_root / "tfds")]
    (workdir / "tfds").mkdir(parents=True, exist_ok=True)
    manual_dir = str(data_root / "raw")
    log(f"  data: {'MOCK (generated)' if mock else data_root}; work dir {workdir}")
    context = testing.mock_data(num_examples=args.mock_examples) if mock else (
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
                futures = {head: pool.submit(_prepare, args, head, first) for head in SCORES}
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
