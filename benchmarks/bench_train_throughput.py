"""Training throughput (images/s) on this CPU: the JAX train step vs the PyTorch twin.

By default JAX runs the way the experiments do (``experiments/main.py``): the global batch is
split over one host device per CPU (``--xla_force_host_platform_device_count``, the
``isomax_jax.parallel`` jit + sharding path, state donated), because XLA:CPU runs each
convolution on one core. ``--jax-variants`` adds XLA:CPU flag variants and ``1device`` (the
whole batch on one device, for comparison).

Each measurement runs in its own subprocess (XLA flags are read once per process), pinned to the
same CPUs as the others and with the same thread count, and the JAX and PyTorch measurements
alternate in rounds so that load from other processes hits both alike. Reported: median step
time over the timed steps (after one warm-up/compile step), images/s, the JAX/PyTorch ratio of
each round, and the spread over rounds (the noise).

The step is the default experiment's training step: forward in train mode (BatchNorm batch
statistics), IsoMax loss (entropic scale 10), backward, SGD Nesterov momentum 0.9 with weight
decay on all parameters and the warm-up schedule, batch 128. JAX: ``isomax_jax.train.train_step``
under ``jax.jit`` (state donated), NHWC. PyTorch: ``tests/parity/torch_models.py`` +
``robust_deep_learning.IsoMaxLossSecondPart`` + ``torch.optim.SGD``, NCHW (or channels-last),
``torch.set_num_threads(threads)``.

Both frameworks are timed at each of ``--image-sizes`` (default 32 and 24 px): the default
experiment trains its first 2/3 of the steps on images downscaled to 24 px (progressive resizing,
``experiments/configs/default.py``) and the rest at 32 px, so the last summary line gives the
images/s of that whole recipe for JAX and for PyTorch running the same recipe, and their ratio.

Defaults: every CPU of the machine per run (pass ``--threads 1`` to compare one core each; with
other jobs on the machine OpenMP spin-waits make multi-threaded PyTorch erratic), small_resnet,
3 rounds x 6 steps (about 2 minutes on this 2-core machine); ``--models small_resnet,resnet34``
adds ResNet-34 (1 round x 2 steps, about 6 more minutes).

Usage::

    python benchmarks/bench_train_throughput.py
    python benchmarks/bench_train_throughput.py --models small_resnet --rounds 3 \\
        --jax-variants default,onednn,no_xnnpack,eigen_single --torch-variants nchw,channels_last
    python benchmarks/bench_train_throughput.py --conv   # one 3x3 conv layer, fwd+bwd, layouts
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: XLA:CPU configurations tried (flags from this jaxlib's DebugOptions). Every variant except
#: "1device" splits the batch over one host device per thread, as the experiments do.
JAX_VARIANTS = {
    "default": "",
    "1device": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
    "xnn_graph": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "eigen_single": "--xla_cpu_multi_thread_eigen=false",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "onednn+xnn_graph": "--xla_cpu_use_onednn=true "
    "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
}
TORCH_VARIANTS = ("nchw", "channels_last")
DEFAULT_STEPS = {"small_resnet": 6, "resnet34": 2}
#: ResNet-34 at batch 128 takes ~20-30 s per step on one (shared) core of this machine.
DEFAULT_ROUNDS = {"small_resnet": 3, "resnet34": 1}


def _pin(threads: int) -> None:
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cpus)


def _jax_child(model_name: str, batch: int, steps: int, size: int = 32) -> dict:
    import jax
    import numpy as np

    from isomax_jax import models, parallel, train

    model = models.get_model(model_name, num_classes=10, head="isomax")
    schedule = train.warmup_decay_schedule(
        total_steps=10_000, warmup_steps=1_000, peak_learning_rate=0.2
    )
    state = train.create_train_state(
        model,
        key=jax.random.key(0),
        tx=train.reference_optimizer(schedule, weight_decay=5e-4),
        loss=train.LossConfig("isomax"),
    )
    mesh = parallel.data_mesh()
    rng = np.random.default_rng(0)
    host = {
        "image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
        "label": rng.integers(0, 10, batch).astype(np.int32),
    }
    data = parallel.shard_batch(host, mesh)
    state = parallel.replicate_state(state, mesh)
    step = parallel.sharded_train_step(mesh)
    t0 = time.perf_counter()
    state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return {"first_step_s": first, "times": times, "devices": len(jax.devices())}


def _torch_child(
    model_name: str, batch: int, steps: int, variant: str, threads: int, size: int = 32
) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    torch.Tensor.cuda = lambda self, *a, **k: self  # the reference loss calls .cuda()
    import robust_deep_learning as rdl

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from parity import torch_models

    torch.manual_seed(0)
    model = torch_models.build(model_name, num_classes=10, head="isomax").train()
    criterion = rdl.IsoMaxLossSecondPart(model.classifier)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.normal(size=(batch, 3, size, size)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 10, batch)).long()
    if variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = criterion(model(images), labels)
        loss.backward()
        opt.step()
        return loss.item()

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"first_step_s": first, "times": times}


def _conv_child(framework: str, batch: int, steps: int, threads: int) -> dict:
    """One 3x3 conv, 64->64 channels at 32x32: forward, forward + d/dinput, forward + d/dweight.

    Per layout and dtype; this separates the three convolutions of a training step.
    """
    import numpy as np

    results = {}
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, 32, 32, 64)).astype(np.float32)
    w = (rng.normal(size=(3, 3, 64, 64)) * 0.05).astype(np.float32)

    def timed(fn):
        fn()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    if framework == "jax":
        import jax
        import jax.numpy as jnp

        for layout, dims, xt, wt in [
            ("NHWC", ("NHWC", "HWIO", "NHWC"), x, w),
            ("NCHW", ("NCHW", "OIHW", "NCHW"), x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1)),
        ]:
            for dtype in ("float32", "bfloat16"):

                def loss(xx, ww, dims=dims):
                    y = jax.lax.conv_general_dilated(
                        xx, ww, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dims
                    )
                    return jnp.sum(y.astype(jnp.float32) ** 2)

                xa, wa = jnp.asarray(xt, dtype), jnp.asarray(wt, dtype)
                for part, fn in [
                    ("fwd", jax.jit(loss)),
                    ("fwd+dx", jax.jit(jax.grad(loss, argnums=0))),
                    ("fwd+dw", jax.jit(jax.grad(loss, argnums=1))),
                ]:
                    results[f"{layout}/{dtype}/{part}"] = timed(
                        lambda f=fn, a=xa, b=wa: jax.block_until_ready(f(a, b))
                    )
    else:
        import torch

        torch.set_num_threads(threads)
        for layout in ("NCHW", "channels_last"):
            for dtype in ("float32", "bfloat16"):
                tdtype = getattr(torch, dtype)
                xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(tdtype)
                wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).to(tdtype)
                if layout == "channels_last":
                    xt = xt.contiguous(memory_format=torch.channels_last)
                    wt = wt.contiguous(memory_format=torch.channels_last)

                def run(grad_x, grad_w, xt=xt, wt=wt):
                    a = xt.detach().requires_grad_(grad_x)
                    b = wt.detach().requires_grad_(grad_w)
                    with torch.set_grad_enabled(grad_x or grad_w):
                        loss = (torch.nn.functional.conv2d(a, b, padding=1).float() ** 2).sum()
                        if grad_x or grad_w:
                            loss.backward()

                for part, gx, gw in [("fwd", False, False), ("fwd+dx", True, False),
                                     ("fwd+dw", False, True)]:  # fmt: skip
                    results[f"{layout}/{dtype}/{part}"] = timed(lambda gx=gx, gw=gw: run(gx, gw))
    return {"times_s": results}


def _child(args) -> None:
    _pin(args.threads)
    if args.child == "conv-jax":
        out = _conv_child("jax", args.batch, args.steps, args.threads)
    elif args.child == "conv-torch":
        out = _conv_child("torch", args.batch, args.steps, args.threads)
    elif args.child == "jax":
        out = _jax_child(args.model, args.batch, args.steps, args.image_size)
    else:
        out = _torch_child(
            args.model, args.batch, args.steps, args.variant, args.threads, args.image_size
        )
    print("RESULT " + json.dumps(out), flush=True)


def _run(kind, *, model="", variant="", batch, steps, threads, timeout, size=32) -> dict | None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    env["JAX_PLATFORMS"] = "cpu"
    devices = 1 if variant == "1device" else threads
    if kind == "jax":
        env["XLA_FLAGS"] = (
            f"--xla_force_host_platform_device_count={devices} " + JAX_VARIANTS.get(variant, "")
        ).strip()
    else:
        env["XLA_FLAGS"] = ""
    env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--model", model]
    cmd += ["--variant", variant, "--batch", str(batch), "--steps", str(steps)]
    cmd += ["--threads", str(threads), "--image-size", str(size)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  {kind} {model} {variant}: timed out after {timeout} s", flush=True)
        return None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    print(f"  {kind} {model} {variant} failed:\n{proc.stderr[-2000:]}", flush=True)
    return None


def _spread(values):
    if len(values) < 2:
        return "n/a"
    med = statistics.median(values)
    return f"±{100 * (max(values) - min(values)) / 2 / med:.0f}%"


def _images_per_s(kind, args, model, variant, steps, size, r) -> float | None:
    """Median images/s of one child process (printed), or None if it failed."""
    res = _run(kind, model=model, variant=variant, batch=args.batch, steps=steps,
               threads=args.threads, timeout=args.timeout, size=size)  # fmt: skip
    if not res:
        return None
    v = args.batch / statistics.median(res["times"])
    first = "first step" if kind == "torch" else "compile+first step"
    print(f"  round {r} {size}px {kind}/{variant}: {v:7.1f} img/s "
          f"({first} {res['first_step_s']:.1f} s)", flush=True)  # fmt: skip
    return v


def _bench_models(args) -> None:
    sizes = [int(x) for x in args.image_sizes.split(",")]
    for model in args.models.split(","):
        steps = args.steps or DEFAULT_STEPS.get(model, 3)
        rounds = args.rounds or DEFAULT_ROUNDS.get(model, 1)
        ips = {}  # (framework, variant, size) -> [images/s per round]
        ratios = {}  # (jax variant, size) -> [ratio to torch's first variant per round]
        print(f"\n== {model}, batch {args.batch}, {args.threads} thread(s), {steps} timed steps, "
              f"images {' and '.join(f'{x}x{x}' for x in sizes)}")  # fmt: skip
        for r in range(rounds):
            for size in sizes:
                torch_ref = None
                for tv in args.torch_variants.split(","):
                    v = _images_per_s("torch", args, model, tv, steps, size, r)
                    if v:
                        ips.setdefault(("torch", tv, size), []).append(v)
                        torch_ref = v if torch_ref is None else torch_ref
                for jv in args.jax_variants.split(","):
                    v = _images_per_s("jax", args, model, jv, steps, size, r)
                    if v:
                        ips.setdefault(("jax", jv, size), []).append(v)
                        if torch_ref:
                            ratios.setdefault((jv, size), []).append(v / torch_ref)
        print(f"-- {model} summary (median over {rounds} round(s); spread = half range)")
        print(f"   {'config':<28}{'img/s':>9}{'spread':>9}{'JAX/torch':>11}")
        for (fw, var, size), vals in ips.items():
            ratio = ""
            if fw == "jax" and (var, size) in ratios:
                ratio = f"{statistics.median(ratios[(var, size)]):.2f}x"
            print(f"   {f'{fw}/{var} {size}px':<28}{statistics.median(vals):9.1f}"
                  f"{_spread(vals):>9}{ratio:>11}")  # fmt: skip
        if len(sizes) == 2 and 0 < args.early_fraction < 1:
            _recipe_summary(args, ips, sizes)


def _recipe_summary(args, ips, sizes) -> None:
    """Images/s over a whole progressive-resizing run, both frameworks on the same recipe."""
    full, early = max(sizes), min(sizes)
    f = args.early_fraction
    print(f"   recipe: {f:.0%} of the steps at {early}px, the rest at {full}px "
          "(the default experiment's), per round")  # fmt: skip
    torch_var = args.torch_variants.split(",")[0]
    t_full, t_early = ips.get(("torch", torch_var, full)), ips.get(("torch", torch_var, early))
    for jv in args.jax_variants.split(","):
        j_full, j_early = ips.get(("jax", jv, full)), ips.get(("jax", jv, early))
        if not (t_full and t_early and j_full and j_early):
            continue
        rates = []
        for tf, te, jf, je in zip(t_full, t_early, j_full, j_early, strict=False):
            torch_rate = 1 / (f / te + (1 - f) / tf)
            jax_rate = 1 / (f / je + (1 - f) / jf)
            rates.append((jax_rate, torch_rate, jax_rate / torch_rate))
        med = statistics.median(r[2] for r in rates)
        print(
            f"   jax/{jv} {statistics.median(r[0] for r in rates):.1f} img/s vs "
            f"torch/{torch_var} {statistics.median(r[1] for r in rates):.1f}: {med:.2f}x"
        )


def _bench_conv(args) -> None:
    steps = args.steps or 5
    print(f"\n== one 3x3 conv 64->64, 32x32, batch {args.batch}, fwd / fwd+dx / fwd+dw, "
          f"{args.threads} thread(s), median of {steps}")  # fmt: skip
    for r in range(args.rounds or 1):
        for kind in ("conv-torch", "conv-jax"):
            res = _run(kind, batch=args.batch, steps=steps, threads=args.threads,
                       timeout=args.timeout)  # fmt: skip
            if res:
                for k, t in res["times_s"].items():
                    print(f"  round {r} {kind[5:]:<6} {k:<28} {1e3 * t:8.1f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="small_resnet")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=0, help="timed steps (0: per-model default)")
    parser.add_argument("--rounds", type=int, default=0, help="0: per-model default")
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="CPUs per run: PyTorch threads, JAX host devices (default: every CPU)",
    )
    parser.add_argument("--jax-variants", default="default,1device")
    parser.add_argument(
        "--image-sizes", default="32,24",
        help="image sizes timed (both frameworks); the default experiment trains its first "
        "--early-fraction of the steps at 24 px (progressive resizing), the rest at 32",
    )  # fmt: skip
    parser.add_argument("--early-fraction", type=float, default=2.0 / 3.0)
    parser.add_argument("--image-size", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--torch-variants", default="nchw")
    parser.add_argument("--conv", action="store_true", help="single-conv layout/dtype benchmark")
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    print(f"CPUs available: {len(os.sched_getaffinity(0))}, load average {os.getloadavg()}")
    if args.conv:
        _bench_conv(args)
    else:
        _bench_models(args)


if __name__ == "__main__":
    main()
