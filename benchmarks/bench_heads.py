"""Benchmark: IsoMax-family heads vs an ``nn.Dense`` head, measured side by side in one run.

(a) Train-step time of a small ResNet (``get_model("small_resnet", ...)``) with each head vs the
    same backbone with ``nn.Dense`` (target: ratio <= 1.05).
(b) The head alone at B=256, C=1000, D=2048 (ImageNet-size): compiled temporary memory of
    forward+backward (target: at most 16*B*C*4 bytes more than Dense) and its time
    (target: <= 2x Dense).

Timings interleave the variants round by round and report the median, so load from other
processes affects all variants alike. Run:

    python benchmarks/bench_heads.py [--rounds 5] [--steps 5] [--batch 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from isomax_jax import heads, losses
from isomax_jax.models import get_model
from isomax_jax.models.classifier import Classifier

HEADS = {
    "dense": lambda c, **kw: nn.Dense(c),
    "isomax": heads.IsoMaxHead,
    "isomax_plus": heads.IsoMaxPlusHead,
    "dismax": heads.DisMaxHead,
}


def _median_time(fn, rounds_out: list[float]) -> None:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    rounds_out.append(time.perf_counter() - start)


def bench_train_step(rounds: int, steps: int, batch: int) -> None:
    print(f"(a) small_resnet train step, batch {batch}, CIFAR-size inputs, {jax.devices()[0]}")
    images = jax.random.normal(jax.random.key(0), (batch, 32, 32, 3))
    labels = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
    backbone = get_model("small_resnet", num_classes=10, head="isomax").backbone
    tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
    runners = {}
    for name, factory in HEADS.items():
        model = Classifier(backbone=backbone.clone(), classifier=factory(10, name="classifier"))
        variables = model.init(jax.random.key(2), images[:2], train=False)
        params, batch_stats = variables["params"], variables["batch_stats"]
        opt_state = tx.init(params)
        scale = 1.0 if name == "dense" else 10.0

        def step(params, batch_stats, opt_state, model=model, scale=scale):
            def loss_fn(params):
                logits, updates = model.apply(
                    {"params": params, "batch_stats": batch_stats},
                    images,
                    train=True,
                    mutable=["batch_stats"],
                )
                loss = jnp.mean(losses.isomax_loss(logits, labels, entropic_scale=scale))
                return loss, updates["batch_stats"]

            (_, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), batch_stats, opt_state

        step = jax.jit(step, donate_argnums=(0, 1, 2))
        state = [params, batch_stats, opt_state]
        state[:] = step(*state)  # compile + warm up
        jax.block_until_ready(state)

        def run(step=step, state=state):
            for _ in range(steps):
                state[:] = step(*state)
            return state

        runners[name] = run
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            _median_time(run, times[name])
    base = statistics.median(times["dense"]) / steps
    print(f"  {'head':<12} {'ms/step':>9} {'ratio vs Dense':>15}")
    for name in runners:
        per_step = statistics.median(times[name]) / steps
        print(f"  {name:<12} {1e3 * per_step:9.1f} {per_step / base:15.3f}")


def bench_head(rounds: int, b: int = 256, c: int = 1000, d: int = 2048) -> None:
    print(f"(b) head alone, forward+backward, B={b}, C={c}, D={d}, float32")
    features = jax.random.normal(jax.random.key(0), (b, d))
    labels = jax.random.randint(jax.random.key(1), (b,), 0, c)
    variants = {"dense": (HEADS["dense"], {})}
    for name in ("isomax", "isomax_plus", "dismax"):
        variants[name] = (HEADS[name], {})
        variants[name + "[matmul]"] = (HEADS[name], {"method": "matmul"})
    runners, memory = {}, {}
    for name, (factory, kwargs) in variants.items():
        head = factory(c, **kwargs)
        params = head.init(jax.random.key(2), features[:1])["params"]

        def loss_fn(params, features, head=head):
            logits = head.apply({"params": params}, features)
            return jnp.mean(losses.isomax_loss(logits, labels))

        grad = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))
        compiled = grad.lower(params, features).compile()
        memory[name] = compiled.memory_analysis().temp_size_in_bytes
        jax.block_until_ready(compiled(params, features))
        runners[name] = lambda compiled=compiled, params=params: compiled(params, features)
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            _median_time(run, times[name])
    budget = 16 * b * c * 4
    base_t = statistics.median(times["dense"])
    print(f"  materialised [B,C,D] float32 would be {b * c * d * 4 / 2**20:.0f} MiB")
    print(
        f"  {'head':<20} {'temp MiB':>9} {'extra vs Dense MiB':>19} {'<= 16BC4?':>10}"
        f" {'ms':>8} {'ratio':>6}"
    )
    for name in runners:
        extra = memory[name] - memory["dense"]
        t = statistics.median(times[name])
        print(
            f"  {name:<20} {memory[name] / 2**20:9.2f} {extra / 2**20:19.2f}"
            f" {str(extra <= budget):>10} {1e3 * t:8.1f} {t / base_t:6.2f}"
        )
    print(f"  budget 16*B*C*4 = {budget / 2**20:.2f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--skip-train-step", action="store_true")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s)")
    bench_head(args.rounds)
    if not args.skip_train_step:
        bench_train_step(args.rounds, args.steps, args.batch)


if __name__ == "__main__":
    main()
