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
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import statistics
import sys
import time

DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "tfds"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA))
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--model", default="small_resnet")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
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


if __name__ == "__main__":
    sys.exit(main())
