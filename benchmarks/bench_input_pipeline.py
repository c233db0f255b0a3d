"""Input pipeline vs training step: is the CPU ever waiting for data?

Measures, in one run and on this machine:

1. the CIFAR-10 training pipeline (``isomax_jax.data.train_dataset``: cached decode, full shuffle,
   crop 32 / pad 4 + flip, normalisation, batching, prefetch) in images/s, steady state (after the
   first batch, which fills the cache and the shuffle buffer);
2. the consumption rate of a plain jitted SGD step (momentum 0.9, IsoMax loss) of the default CPU
   model ``get_model("small_resnet", num_classes=10, head="isomax")`` in images/s.

The pipeline must be at least 3x faster than the step so that input is never the bottleneck.

Run:  python benchmarks/bench_input_pipeline.py [--data_dir ../shared/data/tfds] [--batch_size 128]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "tfds"


def pipeline_rate(data_dir: str, batch_size: int, num_batches: int) -> tuple[float, float]:
    from isomax_jax import data

    ds = data.train_dataset(
        "cifar10", batch_size=batch_size, seed=0, data_dir=data_dir, num_devices=1
    )
    it = iter(ds)
    start = time.perf_counter()
    next(it)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(num_batches):
        batch = next(it)
    elapsed = time.perf_counter() - start
    assert batch["image"].shape == (batch_size, 32, 32, 3)
    return num_batches * batch_size / elapsed, first


def step_rate(batch_size: int, num_steps: int) -> float:
    from isomax_jax.losses import isomax_loss
    from isomax_jax.models import get_model

    model = get_model("small_resnet", num_classes=10, head="isomax")
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(batch_size, 32, 32, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, size=(batch_size,)), jnp.int32)
    variables = model.init(jax.random.key(0), images[:1])
    params, batch_stats = variables["params"], variables["batch_stats"]
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, batch_stats, opt_state, images, labels):
        def loss_fn(p):
            logits, updates = model.apply(
                {"params": p, "batch_stats": batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            return isomax_loss(logits, labels).mean(), updates["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    state = train_step(params, batch_stats, opt_state, images, labels)  # compile
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(num_steps):
        state = train_step(*state[:3], images, labels)
    jax.block_until_ready(state)
    return num_steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA))
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--num_batches", type=int, default=200)
    parser.add_argument("--num_steps", type=int, default=10)
    args = parser.parse_args()

    pipe, first = pipeline_rate(args.data_dir, args.batch_size, args.num_batches)
    step = step_rate(args.batch_size, args.num_steps)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, {jax.devices()}")
    print(f"batch size {args.batch_size}")
    print(
        f"input pipeline (CIFAR-10, crop+flip, normalise): {pipe:10.0f} images/s  "
        f"(first batch {first:.1f} s: decode + cache + fill shuffle buffer)"
    )
    print(f"train step (small_resnet + IsoMax, jitted SGD):  {step:10.0f} images/s")
    ratio = pipe / step
    print(
        f"ratio pipeline / step: {ratio:.1f}x  (target >= 3x): {'PASS' if ratio >= 3 else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
