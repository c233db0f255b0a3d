"""A paper-scale CIFAR-10 run in one device call: SoftMax / IsoMax / IsoMax+, every detector.

    bash benchmarks/device_check.sh --reproduce --pack packs/cifar10 --out $OUT   # <= 9 min, GPU
    bash benchmarks/device_check.sh --reproduce --smoke --out /tmp/repro          # CPU, tested

One recipe for every head: the papers' ResNet-34 (``--model``) in bfloat16, batch 128, the
library's train step (:func:`isomax_jax.train.train_step`, unchanged) on device-resident data
(:mod:`isomax_jax.device_data`: the uint8 training split on the device; permutation, crop and
flip inside the jitted step), SGD-Nesterov 0.9, weight decay 5e-4, linear warm-up over 15 % of
the steps to lr 0.2, then linear decay to 0. The epoch time is measured first (on a copy of the
first head's state); every head then trains the same number of epochs: as many as fit in
``--minutes-per-model`` and in what ``--hard-limit`` leaves after the compilations and the
evaluations. Each model is evaluated by :func:`isomax_jax.evaluation.evaluate` with every
detector that applies to its head, both metric conventions, on the pack's OOD sets; a head's
evaluation runs on a worker thread while the next head compiles and trains.

The images come from a pack (:mod:`isomax_jax.pack`: NumPy + Pillow; a lent accelerator has no
TensorFlow and takes 64 MiB with the working tree); ``--smoke`` writes a toy pack when none is
given. ``device_torch.py`` measures the same architecture in PyTorch in its own process, started
first: eager while JAX waits, then ``torch.compile`` while JAX compiles, its compiled steps
timed while JAX waits again, right after JAX's own epoch is timed. Reported: images/s of both,
the ratio, TFLOP/s (flops counted from the JAX program) and fractions of the bf16 peak; with
``--profile-dir``, a JAX trace of 10 steps when JAX is the slower.

Every part fails soft (recorded, the next runs); ``results.json`` and ``results.md`` in
``--out`` are rewritten after each part; a watchdog writes them and exits (code 3) at
``--hard-limit`` seconds. The pack and PyTorch's process are in :mod:`reproduce_inputs`, the
JAX work in :mod:`reproduce_jax`, the figures and files in :mod:`reproduce_report`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import os
import pathlib
import subprocess
import sys
import threading
import time
import traceback

from reproduce_inputs import CHILDREN, TorchSide, part_pack
from reproduce_report import RESULTS, START, log, side_by_side, write_outputs

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="reproduce_out", help="folder of results.json / results.md")
    p.add_argument("--pack", default=None, help="the pack (default: packs/cifar10)")
    p.add_argument("--smoke", action="store_true", help="tiny everything on CPU, a toy pack")
    p.add_argument("--in-distribution", default="cifar10")
    p.add_argument("--heads", default="softmax,isomax,isomax_plus")
    p.add_argument("--model", default="resnet34")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--peak-lr", type=float, default=0.2)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--warmup", type=float, default=0.15, help="fraction of the steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes-per-model", type=float, default=2.5, help="training, at most")
    p.add_argument("--hard-limit", type=float, default=520.0, help="watchdog, whole run (s)")
    p.add_argument("--margin", type=float, default=25.0, help="seconds kept free at the end")
    p.add_argument("--eval-estimate", type=float, default=75.0, help="s per evaluation, planned")
    p.add_argument("--eval-batch", type=int, default=1000)
    p.add_argument("--perturbation-max", type=int, default=1000, help="ODIN & co: per set")
    p.add_argument(
        "--torch-budget",
        type=float,
        default=100.0,
        help="s until torch.compile is ready, from the start of device_torch.py; 0 skips PyTorch",
    )
    p.add_argument("--profile-dir", default=None, help="JAX trace of 10 steps if JAX < torch")
    p.add_argument("--commit", default=os.environ.get("ISOMAX_COMMIT"))
    if "--smoke" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(
            model="tiny",
            dtype="float32",
            batch=16,
            minutes_per_model=0.05,
            hard_limit=280.0,
            margin=5.0,
            eval_estimate=20.0,
            eval_batch=64,
            perturbation_max=16,
            torch_budget=90.0,
        )
    args = p.parse_args(argv)
    args.heads = [h for h in args.heads.split(",") if h]
    return args


def run_part(name: str, fn, *args):
    """Runs one part, fail-soft: the error is recorded and printed, None returned."""
    log(f"== {name}")
    entry = RESULTS["parts"].setdefault(name, {})
    start = time.monotonic()
    try:
        return fn(*args)
    except Exception as error:  # noqa: BLE001 - fail soft: record, print, continue
        entry["error"] = f"{type(error).__name__}: {str(error)[:800]}"
        traceback.print_exc()
        log(f"  {name} FAILED: {entry['error']}")
        return None
    finally:
        entry["seconds"] = time.monotonic() - start
        log(f"== {name}: {entry['seconds']:.1f}s")


def part_env(args) -> dict:
    import jax

    devices = jax.devices()
    RESULTS["env"] = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in devices],
        "device_kind": devices[0].device_kind,
    }
    log(
        f"  jax {jax.__version__} on {jax.default_backend()}: "
        f"{len(devices)} x {devices[0].device_kind}"
    )
    return RESULTS["env"]


def train_seconds_that_fit(args, heads: int, evals_pending: int, compile_s: float, eval_s: float):
    """Training seconds per head that the time left allows: ``heads`` still to train (all but
    this one still to compile), each evaluated on the worker thread while the next trains, the
    last one's evaluation at the end; ``evals_pending`` evaluations still queued or running.
    The evaluations form one chain: it must end in time too."""
    left = args.hard_limit - (time.monotonic() - START) - args.margin
    training_bound = (left - (heads - 1) * compile_s - eval_s) / heads
    evaluation_bound = left - (heads + evals_pending) * eval_s
    return min(training_bound, evaluation_bound)


def _first_head(args, built, data, torch: TorchSide | None, head: str) -> dict:
    """Times the epoch (PyTorch idle), lets PyTorch time its compiled steps, plans the epochs."""
    import reproduce_jax
    from device_throughput import peak_tflops

    compiled_ready = torch is not None and torch.wait_for("compiled_ready")
    timing = reproduce_jax.measure_epoch(args, built, data)
    torch_result = {} if torch is None else torch.release(compiled_ready)
    kind = RESULTS.get("env", {}).get("device_kind", "")
    side = side_by_side(
        timing,
        torch_result,
        flops=built["flops"],
        batch=args.batch,
        datasheet=(peak_tflops(kind) or {}).get("bfloat16"),
        head=head,
    )
    RESULTS["side_by_side"] = side
    best = torch_result.get("best_images_per_s", math.nan)
    log(
        f"  JAX {timing['images_per_s']:.0f} img/s, PyTorch best {best:.0f}: "
        f"{side.get('ratio', math.nan):.2f}x"
    )
    if args.profile_dir and side.get("ratio", math.inf) < 1:
        try:
            reproduce_jax.profile(args, built, data, args.profile_dir)
        except Exception as error:  # noqa: BLE001 - a diagnosis, not a result
            log(f"  profile failed: {error}")
    fit = train_seconds_that_fit(
        args, len(args.heads), 0, built["compile_seconds"], args.eval_estimate
    )
    seconds = min(60 * args.minutes_per_model, fit)
    epochs = max(1, int(seconds // timing["epoch_seconds"]))
    RESULTS["plan"] = {
        "model": args.model,
        "dtype": args.dtype,
        "batch": args.batch,
        "epochs": epochs,
        "epoch_seconds": timing["epoch_seconds"],
        "train_seconds_per_head": seconds,
        "weight_decay": args.weight_decay,
        "peak_lr": args.peak_lr,
        "warmup": args.warmup,
        "measurement": timing,
        "eval_estimate": args.eval_estimate,
    }
    log(f"  epoch {timing['epoch_seconds']:.2f}s: {epochs} epochs per head ({seconds:.0f}s)")
    return RESULTS["plan"]


def part_jax(args, ctx: dict, out: pathlib.Path, torch: TorchSide | None) -> None:
    import jax
    import reproduce_jax

    from isomax_jax import device_data, parallel

    images, labels = ctx["sets"][(args.in_distribution, "train")]
    mean, std = ctx["normalization"]
    mesh = parallel.data_mesh(jax.local_devices()) if jax.local_device_count() > 1 else None
    data = device_data.put(images, labels, mean=mean, std=std, mesh=mesh)
    evaluations = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="evaluate")
    # On one device a head's evaluation overlaps the next head's training. With several, two
    # programs with collectives launched from two threads can deadlock (XLA:CPU did here,
    # reduce-scatter rendezvous): evaluate in line.
    overlap = jax.device_count() == 1
    pending: list[concurrent.futures.Future] = []
    plan, compile_s, eval_s = None, None, [args.eval_estimate]

    def evaluate(head, built, entry):
        try:
            entry.update(
                reproduce_jax.evaluate_head(
                    args, head, built, ctx["sets"], ctx["ood"], ctx["normalization"]
                )
            )
            eval_s[0] = entry["eval_seconds"]
        except Exception as error:  # noqa: BLE001 - fail soft: the other heads still count
            entry["error"] = f"evaluation: {type(error).__name__}: {str(error)[:800]}"
            traceback.print_exc()
            log(f"  {head} evaluation FAILED: {entry['error']}")
        write_outputs(out)

    try:
        for k, head in enumerate(args.heads):
            entry = RESULTS["heads"].setdefault(head, {})
            try:
                built = reproduce_jax.build_head(args, head, data, mesh)
                entry["compile_seconds"] = built["compile_seconds"]
                compile_s = built["compile_seconds"] if compile_s is None else compile_s
                if plan is None:
                    plan = _first_head(args, built, data, torch, head)
                    write_outputs(out)
                waiting = sum(not f.done() for f in pending)
                fit = train_seconds_that_fit(
                    args, len(args.heads) - k, waiting, compile_s, eval_s[0]
                )
                epochs = min(plan["epochs"], int(fit // plan["epoch_seconds"]))
                if epochs < 1:
                    raise RuntimeError(f"no time left for one epoch ({fit:.0f}s)")
                if epochs < plan["epochs"]:
                    entry["epochs_reduced_from"] = plan["epochs"]
                    log(f"  {head}: {epochs} epochs instead of {plan['epochs']} (time)")
                entry.update(
                    reproduce_jax.train_head(args, built, data, epochs, plan["epoch_seconds"])
                )
                losses = entry["loss_by_epoch"]
                log(
                    f"  {head}: {entry['epochs']} epochs in {entry['train_seconds']:.0f}s "
                    f"({entry['images_per_s']:.0f} img/s), loss {losses[0]:.3f} -> "
                    f"{losses[-1]:.3f}"
                )
                write_outputs(out)
                if overlap:
                    pending.append(evaluations.submit(evaluate, head, built, entry))
                else:
                    evaluate(head, built, entry)
            except Exception as error:  # noqa: BLE001 - fail soft: the next head still runs
                entry["error"] = f"{type(error).__name__}: {str(error)[:800]}"
                traceback.print_exc()
                log(f"  {head} FAILED: {entry['error']}")
                write_outputs(out)
    finally:
        if torch is not None:
            torch.release(False)  # no-op once released; else PyTorch's timing is called off
        evaluations.shutdown(wait=True)


def _commit(args) -> str | None:
    if args.commit:
        return args.commit
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return result.stdout.strip()
    except Exception:  # noqa: BLE001 - the device machine's copy may have no .git
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    out = pathlib.Path(args.out)
    # The GPU is shared with device_torch.py's process: JAX takes 60 %, not its default 75 %.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
    RESULTS.update(
        smoke=args.smoke,
        commit=_commit(args),
        argv=sys.argv[1:] if argv is None else list(argv),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )

    def watchdog():
        log(f"WATCHDOG: {args.hard_limit:.0f}s exceeded; writing {out} and exiting")
        RESULTS["watchdog_fired"] = True
        RESULTS["total_seconds"] = time.monotonic() - START
        for child in CHILDREN:
            child.kill()
        write_outputs(out)
        os._exit(3)

    timer = threading.Timer(args.hard_limit, watchdog)
    timer.daemon = True
    timer.start()
    write_outputs(out)
    torch = None
    if args.torch_budget > 0:  # eager PyTorch first, before JAX takes the GPU's memory
        torch = run_part("torch (start)", TorchSide, args)
    ctx = run_part("pack", part_pack, args)
    if torch is not None and not torch.wait_for("eager_done"):
        log("  PyTorch's eager timing did not finish within its budget")
    write_outputs(out)
    run_part("env", part_env, args)
    if ctx is not None:
        run_part("jax", part_jax, args, ctx, out, torch)
    if torch is not None:
        torch.release(False)
        if "eager" not in RESULTS.get("torch", {}):
            RESULTS["parts"]["torch (start)"]["error"] = "PyTorch measured nothing (see the log)"
    timer.cancel()
    RESULTS["total_seconds"] = time.monotonic() - START
    write_outputs(out)
    log(f"done in {RESULTS['total_seconds']:.0f}s: {out / 'results.json'}, {out / 'results.md'}")
    sys.stdout.flush()
    os._exit(0)  # no wait on leftover threads


if __name__ == "__main__":
    main()
