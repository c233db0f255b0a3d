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
  ``--smoke``, the part runs on ``isomax_jax.data.testing.mock_data`` (accuracy then means
  nothing).

The JSON written to ``--out`` (after every part) holds every printed figure. This file is the
command line and the parts' runner; the parts are ``device_throughput.py`` and
``device_cifar.py``, what they share ``device_common.py``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import threading
import time
import traceback

import jax
from device_cifar import OOD_SETS, part_cifar
from device_common import DTYPES, RESULTS, START, log, write_json
from device_throughput import part_throughput, peak_tflops

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_part(name: str, fn, args, budget_s: float) -> None:
    log(f"== {name} (budget {budget_s:.0f}s)")
    start = time.monotonic()
    entry = {"status": "running", "budget_s": budget_s}
    RESULTS["parts"][name] = entry
    # A part that overran leaves the next one less time: the run ends before the watchdog.
    deadline = min(start + budget_s, START + args.hard_limit - 15)
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
    RESULTS["total_seconds"] = time.monotonic() - START
    write_json(args.out)
    statuses = {k: v["status"] for k, v in RESULTS["parts"].items()}
    log(f"done in {RESULTS['total_seconds']:.0f}s: {statuses}; figures in {args.out}")
    ok = all(s == "ok" for s in statuses.values())
    sys.stdout.flush()
    os._exit(0 if ok or not args.strict else 1)  # no wait on leftover data/compile threads


if __name__ == "__main__":
    main()
