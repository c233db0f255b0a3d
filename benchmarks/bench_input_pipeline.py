"""Does the training loop ever wait for its input? Side by side on 8 fake CPU devices.

Runs, interleaved round by round in one process, the experiments' training loop
(``experiments/train_eval.py``) in two ways:

1. **pipeline**: the real input: ``isomax_jax.data.train_dataset`` (the CIFAR-10 split held in
   memory, crop + flip + normalisation on a background thread) through
   ``isomax_jax.parallel.prefetch_to_mesh`` (batches on the devices two steps ahead), the jitted
   sharded step, and the loop's one-step-behind wait on the previous step's metrics;
2. **resident**: the same step and loop on one batch that already sits on the devices.

If input never stalls, the two step times are equal within the noise (the spread over rounds
is printed). It also prints the pipeline's own rate (host batches/s without any step) to show
the margin. Data: the offline CIFAR-10 (``--data_dir``), or generated images
(``isomax_jax.data.testing.mock_data``) when it is absent.

Run:  python benchmarks/bench_input_pipeline.py [--devices 8] [--rounds 5] [--steps 20]

**224-px mode** (``--imagenet``): how many host CPU cores does ImageNet training need per chip?
It packs real JPEGs of the offline data (``--raw_dir``: DTD textures and TinyImageNet test) into
the ILSVRC tar layout, has tfds's ``imagenet2012`` builder prepare them in a temporary folder,
and runs ``isomax_jax.data.imagenet_train_dataset`` (decode-and-random-crop 224, flip,
normalise; encoded images cached in memory, so no disk I/O is timed) on a private ``tf.data``
thread pool of ``--threads`` threads. Two image sets: the JPEGs as they are (DTD 128 px shorter
side, TinyImageNet 64x64: far smaller than ImageNet's) and ImageNet-sized JPEGs of real pixels:
mosaics of 3x4 DTD crops, 384x512 px, quality 95, ~75 KB (ImageNet-1K train averages ~400x350
px, ~110 KB). It prints images/s (wall) and images per CPU-second of the process (the figure that
holds on a busy machine), and the cores a host needs per chip, ``chip images/s / images per
CPU-second`` on the ImageNet-sized set, for the
chip training speeds of ``--chip_rates``. ResNet-50 at 224 px has not been measured on an H200 or
a TPU v4 in this repository: the defaults are assumptions, a range per chip, stated with their
sources in ``CHIP_RATES`` below; pass measured figures when there are some.

Run:  python benchmarks/bench_input_pipeline.py --imagenet [--threads 1,2] [--seconds 20]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tfds"
DEFAULT_RAW = ROOT.parent / "shared" / "data" / "raw"

#: Assumed ResNet-50 (224 px) training speeds, images/s per chip. Not measured here.
#: * H200: 3,000 (a JAX/Flax bf16 step without hand tuning, about what an H100 gives; the H200
#:   is an H100 die with more, faster memory), 5,000, 7,500 (NVIDIA's MLPerf-tuned ResNet-50,
#:   about 7,000+ images/s per H100 in MLPerf Training v3.x, DALI input);
#: * TPU v4: 2,000 (the Flax example's README: TPU v3-8, batch 1024 x 125,100 steps in 4.4 h,
#:   about 8,100 images/s over 4 chips = 2,000 per v3 chip, evaluation included), 3,000, 4,400
#:   (2.2x a v3 chip, the v4/v3 per-chip ratio Google reports for its MLPerf models).
CHIP_RATES = "H200:3000,5000,7500;TPU v4:2000,3000,4400"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA))
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--model", default="small_resnet")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--imagenet", action="store_true", help="the 224-px mode (see above)")
    parser.add_argument("--raw_dir", default=str(DEFAULT_RAW))
    parser.add_argument("--images", type=int, default=96, help="distinct JPEGs per image set")
    parser.add_argument("--threads", default="1,2", help="tf.data thread pool sizes to time")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per run")
    parser.add_argument("--chip_rates", default=CHIP_RATES)
    args = parser.parse_args()
    if args.imagenet:
        return imagenet_main(args)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import jax

    from isomax_jax import data, models, parallel, train
    from isomax_jax.data import testing

    mocked = not pathlib.Path(args.data_dir).is_dir()
    context = testing.mock_data(num_examples=2048) if mocked else contextlib.nullcontext()
    data_dir = None if mocked else args.data_dir
    model = models.get_model(args.model, num_classes=10, head="isomax")
    mesh = parallel.data_mesh()
    step_fn = parallel.sharded_train_step(mesh)
    state = train.create_train_state(
        model,
        key=jax.random.key(0),
        tx=train.reference_optimizer(0.05),
        loss=train.LossConfig("isomax"),
    )
    state = parallel.replicate_state(state, mesh)

    def loop(state, batches, n):
        """The experiments' loop: dispatch, then wait only for the previous step."""
        pending = None
        start = time.perf_counter()
        for _, batch in zip(range(n), batches, strict=False):
            state, metrics = step_fn(state, batch)
            if pending is not None:
                jax.block_until_ready(pending)
            pending = metrics
        jax.block_until_ready(pending)
        return state, (time.perf_counter() - start) / n

    with context:
        stream = data.train_dataset(
            "cifar10", batch_size=args.batch_size, seed=0, data_dir=data_dir, num_devices=1
        )
        host_rate = _host_rate(stream, 50, args.batch_size)
        device_batches = parallel.prefetch_to_mesh(stream, mesh)
        resident = next(device_batches)
        state, _ = loop(state, iter([resident]), 1)  # compile
        times = {"pipeline": [], "resident": []}
        for _ in range(args.rounds):
            state, t = loop(state, device_batches, args.steps)
            times["pipeline"].append(t)
            state, t = loop(state, iter([resident] * args.steps), args.steps)
            times["resident"].append(t)
        stream.close()

    print(f"{len(jax.devices())} devices on {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(
        f"{args.model}, global batch {args.batch_size}, {args.rounds} rounds x {args.steps} steps"
    )
    print(
        f"host pipeline alone: {host_rate:9.0f} images/s" + (" (generated data)" if mocked else "")
    )
    for name, values in times.items():
        med = statistics.median(values)
        spread = (max(values) - min(values)) / 2 / med
        print(f"step time, {name:>8} input: {1e3 * med:7.1f} ms/step (±{100 * spread:.0f} %)")
    ratios = [p / r for p, r in zip(times["pipeline"], times["resident"], strict=True)]
    print(
        f"pipeline / resident per round: {', '.join(f'{r:.3f}' for r in ratios)}; "
        f"median {statistics.median(ratios):.3f} (1.0 = no stall)"
    )


def _host_rate(stream, n: int, batch_size: int) -> float:
    next(stream)
    start = time.perf_counter()
    for _ in range(n):
        next(stream)
    return n * batch_size / (time.perf_counter() - start)


def imagenet_main(args) -> None:
    """The 224-px mode: train-pipeline images/s per core on real JPEGs, cores per chip."""
    import resource
    import tempfile

    import numpy as np

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(ROOT / "tests"))
    import imagenet_fixtures as fx

    from isomax_jax.data import imagenet, imagenet_sources

    raw = pathlib.Path(args.raw_dir)
    per_set = args.images
    dtd = [d for _, d in fx.zip_images(raw / fx.DTD_ZIP, suffix=".jpg", count=per_set)]
    tiny = [d for _, d in fx.zip_images(raw / fx.TINY_ZIP, suffix=".JPEG", count=per_set // 2)]
    mosaics = [fx.mosaic_jpeg(np.roll(np.array(dtd, object), -k)[:12]) for k in range(per_set)]
    sets = {
        "as stored (DTD 128 px + TinyImageNet 64 px)": dtd[: per_set // 2] + tiny,
        "ImageNet-sized (384x512 mosaics of DTD crops)": mosaics,
    }
    threads = [int(t) for t in args.threads.split(",")]
    runs = [(t, False) for t in threads] + [(threads[0], True)]  # + PIL-like antialiasing
    rates: dict[str, dict[tuple[int, bool], tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_imagenet_") as tmp:
        for title, images in sets.items():
            root = pathlib.Path(tmp) / str(len(rates))
            wnids = ("n01440764", "n01443537", "n01484850", "n01491361")
            train = {w: images[i :: len(wnids)] for i, w in enumerate(wnids)}
            fx.pack_ilsvrc(root / "manual", train, images[:2])  # tfds needs the val tar
            with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
                imagenet_sources.imagenet_num_examples(
                    "imagenet2012", split="train", data_dir=root / "data",
                    manual_dir=root / "manual",
                )  # fmt: skip
            size = statistics.mean(len(d) for d in images) / 1e3
            rates[f"{title}, {size:.0f} KB/image"] = {
                (t, aa): _imagenet_rate(imagenet, root / "data", t, aa, args.seconds, resource)
                for t, aa in runs
            }

    print(f"{os.cpu_count()} CPUs ({_cpu_name()}), load {os.getloadavg()[0]:.1f} at the end")
    print("imagenet_train_dataset: random-resized crop 224 + flip + normalise, batch 32")
    for title, by_threads in rates.items():
        print(f"  {title}:")
        for (t, aa), (wall, per_cpu) in by_threads.items():
            print(
                f"    {t} thread(s){', antialias=True' if aa else '':16}: {wall:5.0f} images/s "
                f"wall, {per_cpu:5.0f} images per CPU-second"
            )
    imagenet_sized = list(rates.values())[-1]
    per_core = min(per_cpu for (_, aa), (_, per_cpu) in imagenet_sized.items() if not aa)
    print(
        f"cores per chip at {per_core:.0f} images per CPU-second (ImageNet-sized, default "
        "pipeline, the lowest of the thread counts):"
    )
    for chip in args.chip_rates.split(";"):
        name, values = chip.split(":")
        needs = ", ".join(
            f"{int(v):,} img/s -> {int(v) / per_core:4.1f} cores" for v in values.split(",")
        )
        print(f"  {name:>7}: {needs}")


def _imagenet_rate(imagenet, data_dir, threads, antialias, seconds, resource):
    """(images/s wall, images per CPU-second of this process) of the train pipeline."""
    batch = 32
    stream = imagenet.imagenet_train_dataset(
        batch_size=batch, seed=0, data_dir=data_dir, num_devices=1, threads=threads,
        antialias=antialias, shuffle_buffer=64, cache=True, prefetch=1,
    )  # fmt: skip
    it = iter(stream)
    for _ in range(4):  # fills the cache (one epoch) and warms the graph
        next(it)

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    start, cpu0, n = time.perf_counter(), cpu(), 0
    while time.perf_counter() - start < seconds:
        next(it)
        n += batch
    wall, used = time.perf_counter() - start, cpu() - cpu0
    return n / wall, n / used


def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
