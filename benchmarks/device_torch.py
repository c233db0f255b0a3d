"""The PyTorch side of ``benchmarks/device_reproduce.py``: training images/s of the same model.

The papers' CIFAR ResNet-34 (3x3 stem, [3, 4, 6, 3] BasicBlocks with 1x1-conv + BN projection
shortcuts, last BN of each block zero-initialised, 512-d features, linear head: the SoftMax
model of :func:`isomax_jax.models.get_model`), trained on one fixed batch already on the device:
SGD (Nesterov 0.9, weight decay 5e-4), cross-entropy, ``channels_last``, bfloat16 autocast;
eager first, then ``torch.compile`` (if it compiles within the budget). Run as its own process:
``device_reproduce.py`` starts it before JAX takes the GPU and, through ``--signal-dir``, lets
it compile while JAX compiles but time its steps only while JAX waits (files ``eager_done``,
``compiled_ready`` written here; ``go`` / ``abort`` written by the caller). The JSON is
rewritten after each measurement, so a process killed at its budget still reports what it
measured.

    python benchmarks/device_torch.py --out torch.json                  # GPU
    python benchmarks/device_torch.py --smoke --out /tmp/torch.json     # CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import torch
import torch.nn.functional as F
from torch import nn

RESULTS: dict = {}


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of :class:`isomax_jax.models.resnet.CifarResNet` (projection
    shortcuts), with a linear head."""

    def __init__(self, stages, widths, stem_width=64, stem_stride=1, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem_width, 3, stem_stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        blocks, cin = [], stem_width
        for i, (count, width) in enumerate(zip(stages, widths, strict=True)):
            for j in range(count):
                blocks.append(BasicBlock(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


MODELS = {
    "resnet34": lambda: CifarResNet((3, 4, 6, 3), (64, 128, 256, 512)),
    "tiny": lambda: CifarResNet((1,), (8,), stem_width=8, stem_stride=2),  # --smoke
}


def _write(path: str | None) -> None:
    if path:
        with open(f"{path}.tmp", "w") as f:
            json.dump(RESULTS, f, indent=1)
        os.replace(f"{path}.tmp", path)


def _signal(directory: str | None, name: str) -> None:
    if directory:
        pathlib.Path(directory, name).touch()


def _wait(directory: str | None, timeout: float) -> bool:
    """Waits for ``go`` (True) or ``abort`` / the timeout (False) in ``directory``."""
    if not directory:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pathlib.Path(directory, "go").exists():
            return True
        if pathlib.Path(directory, "abort").exists():
            return False
        time.sleep(0.02)
    return False


def measure(
    model, optimizer, images, labels, *, device, dtype, min_seconds, max_steps, label, gate=None
):
    """Images/s of the training step (after warm-up), synchronising only at the ends.

    ``gate()``, if given, runs between the warm-up and the timing; False skips the timing."""

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    for _ in range(3):  # warm-up (and, compiled, the compilation)
        step()
    sync()
    warmup_s = time.perf_counter() - start
    if gate is not None and not gate():
        print(f"torch {label}: warmed up in {warmup_s:.1f}s, timing called off", flush=True)
        return {"warmup_seconds": warmup_s, "error": "timing called off (no time left)"}
    steps, start = 0, time.perf_counter()
    while steps < max_steps and (steps < 5 or time.perf_counter() - start < min_seconds):
        loss = step()
        steps += 1
        if steps % 10 == 0:
            sync()
    sync()
    seconds = time.perf_counter() - start
    result = {
        "images_per_s": steps * images.shape[0] / seconds,
        "step_ms": 1000 * seconds / steps,
        "steps": steps,
        "warmup_seconds": warmup_s,
        "last_loss": float(loss.detach()),
    }
    print(
        f"torch {label}: {result['images_per_s']:.0f} img/s ({result['step_ms']:.2f} ms/step; "
        f"warm-up {warmup_s:.1f}s)",
        flush=True,
    )
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--model", default="resnet34", choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--min-seconds", type=float, default=5.0)
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--backend", default="inductor", help="torch.compile's backend")
    p.add_argument(
        "--signal-dir",
        default=None,
        help="handshake with a caller: touches eager_done and compiled_ready, times "
        "the compiled model once the caller touches go (abort: not at all)",
    )
    p.add_argument("--wait", type=float, default=300.0, help="s to wait for go")
    p.add_argument("--smoke", action="store_true", help="tiny model, CPU, compile backend eager")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.batch, args.min_seconds, args.max_steps = "tiny", 8, 0.0, 5
        args.dtype = "float32"  # bfloat16 autocast is slow on CPU
        args.backend = "eager"  # dynamo without code generation: seconds on a CPU
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = getattr(torch, args.dtype)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    RESULTS.update(
        torch=torch.__version__,
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        model=args.model,
        batch=args.batch,
        dtype=args.dtype,
        channels_last=True,
        autocast=args.dtype != "float32",
    )
    _write(args.out)
    torch.manual_seed(0)
    model = MODELS[args.model]().to(device, memory_format=torch.channels_last)
    images = torch.randn(args.batch, 3, 32, 32, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (args.batch,), device=device)

    def optimizer_for(m):
        return torch.optim.SGD(
            m.parameters(),
            lr=0.1,
            momentum=0.9,
            nesterov=True,
            weight_decay=5e-4,
            fused=device.type == "cuda",
        )

    common = dict(
        device=device, dtype=dtype, min_seconds=args.min_seconds, max_steps=args.max_steps
    )
    RESULTS["eager"] = measure(model, optimizer_for(model), images, labels, label="eager", **common)
    _write(args.out)
    _signal(args.signal_dir, "eager_done")

    def gate():
        _signal(args.signal_dir, "compiled_ready")
        return _wait(args.signal_dir, args.wait)

    if not args.no_compile:
        try:
            start = time.perf_counter()
            compiled = torch.compile(model, backend=args.backend)
            RESULTS["compiled"] = measure(
                compiled,
                optimizer_for(model),
                images,
                labels,
                label="compiled",
                gate=gate,
                **common,
            )
            RESULTS["compiled"].update(
                backend=args.backend, total_seconds=time.perf_counter() - start
            )
        except Exception as error:  # noqa: BLE001 - torch.compile may not work there
            RESULTS["compiled"] = {"error": f"{type(error).__name__}: {str(error)[:500]}"}
            print(f"torch.compile FAILED: {RESULTS['compiled']['error']}", flush=True)
    best = max(
        (RESULTS[k] for k in ("eager", "compiled") if "images_per_s" in RESULTS.get(k, {})),
        key=lambda r: r["images_per_s"],
    )
    RESULTS["best_images_per_s"] = best["images_per_s"]
    _write(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
