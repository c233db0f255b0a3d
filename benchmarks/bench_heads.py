"""Benchmark: IsoMax-family heads vs an ``nn.Dense`` head, measured side by side in one run.

(a) The head alone at B=256, C=1000, D=2048 (ImageNet-size), float32: forward+backward time and
    forward-only (inference) time as ratios to ``nn.Dense(C)``, and the compiled temporary
    memory of forward+backward. Targets for the default ``method="exact"``: <= 1.3x Dense
    forward+backward, <= 1.1x forward. Two inputs: random features (no cancellation anywhere)
    and "trained-like" features next to their class prototype (each row has a pair in the
    cancellation zone, so the exact recomputation runs on every row).
(b) A whole ResNet-34 evaluation forward (CIFAR-size images) with an IsoMax head vs the same
    with ``nn.Dense``, C=1000 (target: ratio <= 1.02).
(c) Train-step time of a small ResNet (``get_model("small_resnet", ...)``) with each head vs the
    same backbone with ``nn.Dense``.

Timings interleave the variants round by round and report the median, so load from other
processes affects all variants alike. Run:

    python benchmarks/bench_heads.py [--rounds 15] [--steps 5] [--batch 64] [--eval-batch 128]
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
    "dense": lambda c, **kw: nn.Dense(c, **kw),
    "isomax": heads.IsoMaxHead,
    "isomax_plus": heads.IsoMaxPlusHead,
    "dismax": heads.DisMaxHead,
}


def _time_once(fn, rounds_out: list[float]) -> None:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    rounds_out.append(time.perf_counter() - start)


def _interleaved_medians(runners: dict, rounds: int) -> dict[str, float]:
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            _time_once(run, times[name])
    return {name: statistics.median(t) for name, t in times.items()}


def bench_head(rounds: int, b: int = 256, c: int = 1000, d: int = 2048) -> dict:
    print(f"(a) head alone, B={b}, C={c}, D={d}, float32, {jax.devices()[0].device_kind}")
    labels = jax.random.randint(jax.random.key(1), (b,), 0, c)
    variants = {"dense": (HEADS["dense"], {})}
    for name in ("isomax", "isomax_plus", "dismax"):
        variants[name] = (HEADS[name], {})
        variants[name + "[matmul]"] = (HEADS[name], {"method": "matmul"})
    results = {}
    for regime in ("random", "trained-like"):
        runners, memory = {}, {}
        for name, (factory, kwargs) in variants.items():
            head = factory(c, **kwargs)
            params = head.init(jax.random.key(2), jnp.zeros((1, d)))["params"]
            if name != "dense":  # N(0, 1) prototypes (IsoMax starts at zero; trained ones do not)
                params = {**params, "prototypes": jax.random.normal(jax.random.key(3), (c, d))}
            features = jax.random.normal(jax.random.key(0), (b, d))
            if regime == "trained-like" and name != "dense":
                features = params["prototypes"][labels] + 0.3 * features

            def loss_fn(params, features, head=head):
                logits = head.apply({"params": params}, features)
                return jnp.mean(losses.isomax_loss(logits, labels))

            grad = jax.jit(jax.grad(loss_fn, argnums=(0, 1))).lower(params, features).compile()
            forward = jax.jit(head.apply).lower({"params": params}, features).compile()
            memory[name] = grad.memory_analysis().temp_size_in_bytes
            runners[name + " fwd+bwd"] = lambda g=grad, p=params, f=features: g(p, f)
            runners[name + " fwd"] = lambda fw=forward, p=params, f=features: fw({"params": p}, f)
            jax.block_until_ready((runners[name + " fwd+bwd"](), runners[name + " fwd"]()))
        medians = _interleaved_medians(runners, rounds)
        print(
            f"  {regime} features: materialised [B,C,D] float32 would be "
            f"{b * c * d * 4 / 2**20:.0f} MiB"
        )
        print(
            f"  {'head':<20} {'fwd+bwd ms':>10} {'ratio':>6} {'fwd ms':>8} {'ratio':>6}"
            f" {'temp MiB':>9} {'extra MiB':>10} {'extra/16BC':>10}"
        )
        for name in variants:
            both, fwd = medians[name + " fwd+bwd"], medians[name + " fwd"]
            ratio_both = both / medians["dense fwd+bwd"]
            ratio_fwd = fwd / medians["dense fwd"]
            extra = (memory[name] - memory["dense"]) / 2**20
            units = (memory[name] - memory["dense"]) / (16 * b * c * 4)  # 16 B C float32s
            print(
                f"  {name:<20} {1e3 * both:10.2f} {ratio_both:6.2f} {1e3 * fwd:8.2f}"
                f" {ratio_fwd:6.2f} {memory[name] / 2**20:9.2f} {extra:10.2f} {units:10.2f}"
            )
            results[f"{regime}/{name}"] = {
                "fwd_bwd_ms": 1e3 * both, "fwd_bwd_ratio": ratio_both,
                "fwd_ms": 1e3 * fwd, "fwd_ratio": ratio_fwd, "temp_mib": memory[name] / 2**20,
            }  # fmt: skip
    print("  targets (exact): fwd+bwd <= 1.3, fwd <= 1.1; extra temporaries < 16 B C floats")
    return results


def bench_whole_model(rounds: int, batch: int, num_classes: int = 1000) -> float:
    print(f"(b) resnet34 evaluation forward, batch {batch}, 32x32, C={num_classes}")
    images = jax.random.normal(jax.random.key(0), (batch, 32, 32, 3))
    backbone = get_model("resnet34", num_classes=num_classes, head="isomax").backbone
    runners = {}
    for name in ("dense", "isomax"):
        model = Classifier(backbone, HEADS[name](num_classes, name="classifier"))
        variables = jax.jit(model.init)(jax.random.key(1), images[:1])
        if name == "isomax":  # trained prototypes are not all zero
            prototypes = jax.random.normal(jax.random.key(2), (num_classes, 512))
            variables["params"]["classifier"]["prototypes"] = prototypes
        apply = jax.jit(lambda v, x, model=model: model.apply(v, x, train=False))
        jax.block_until_ready(apply(variables, images))
        runners[name] = lambda apply=apply, v=variables: apply(v, images)
    medians = _interleaved_medians(runners, rounds)
    ratio = medians["isomax"] / medians["dense"]
    for name, t in medians.items():
        print(f"  {name:<8} {1e3 * t:9.1f} ms  ({batch / t:7.1f} images/s)")
    print(f"  ratio isomax / dense = {ratio:.3f} (target <= 1.02)")
    return ratio


def bench_train_step(rounds: int, steps: int, batch: int) -> None:
    print(f"(c) small_resnet train step, batch {batch}, CIFAR-size inputs")
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
    medians = _interleaved_medians(runners, rounds)
    base = medians["dense"] / steps
    print(f"  {'head':<12} {'ms/step':>9} {'ratio vs Dense':>15}")
    for name in runners:
        per_step = medians[name] / steps
        print(f"  {name:<12} {1e3 * per_step:9.1f} {per_step / base:15.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--eval-batch", type=int, default=128)
    parser.add_argument("--only", choices=["head", "model", "train"], default=None)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s)")
    if args.only in (None, "head"):
        bench_head(args.rounds)
    if args.only in (None, "model"):
        bench_whole_model(max(3, args.rounds // 3), args.eval_batch)
    if args.only in (None, "train"):
        bench_train_step(max(3, args.rounds // 3), args.steps, args.batch)


if __name__ == "__main__":
    main()
