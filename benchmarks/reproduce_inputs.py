"""The inputs of ``benchmarks/device_reproduce.py``: the pack's images, and PyTorch's process.

:func:`part_pack` reads every set of the pack into host memory (``--smoke`` writes a toy pack
first); :class:`TorchSide` runs ``device_torch.py`` in its own process, in step with the JAX
run through signal files (PyTorch times its steps only while JAX waits).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
from reproduce_report import RESULTS, log

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHILDREN: list[subprocess.Popen] = []  # stopped by the watchdog


def toy_pack(path: pathlib.Path, in_distribution: str) -> None:
    """A small pack for ``--smoke``: class-coloured noisy images, a grey set, a noise set."""
    from isomax_jax import pack

    # CIFAR-10's statistics (isomax_jax.data.NORMALIZATION; that package imports TensorFlow).
    stats = ((0.491, 0.482, 0.446), (0.247, 0.243, 0.261))
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (10, 1, 1, 3))

    def split(n):
        labels = rng.integers(0, 10, n)
        images = colours[labels] + rng.normal(0, 40, (n, 32, 32, 3))
        return np.clip(images, 0, 255).astype(np.uint8), labels

    grey = rng.integers(0, 256, (96, 32, 32, 1), dtype=np.uint8).repeat(3, axis=-1)
    sets = {
        in_distribution: {"train": split(512), "test": split(128)},
        "grey": {"test": (grey, None)},
        "gaussian_noise": {"test": pack.Generated("normal", (0.5, 1.0), seed=0, count=96)},
    }
    pack.write(path, sets, normalization={in_distribution: stats})


def part_pack(args) -> dict:
    """Reads every set of the pack into host memory (uint8)."""
    from isomax_jax import pack as pack_lib

    if args.pack:
        path = pathlib.Path(args.pack)
    elif args.smoke:
        path = pathlib.Path(tempfile.mkdtemp(prefix="repro_pack_")) / "toy"
        toy_pack(path, args.in_distribution)
    else:
        path = ROOT / "packs" / "cifar10"
    pack = pack_lib.Pack(path)
    sets = {(n, s): pack.load(n, s) for n in pack.names for s in pack.splits(n)}
    ood = [n for n in pack.names if n != args.in_distribution]
    splits = pack.manifest["sets"]
    RESULTS["pack"] = {
        "path": str(path),
        "mib": pack.size_bytes / 2**20,
        "ood_sets": ood,
        "pixels_as_written": all(pack.checked.values()),
        "sets": {
            f"{n}/{s}": {
                k: splits[n]["splits"][s][k] for k in ("count", "codec", "mae", "max_error")
            }
            for n, s in sets
        },
        "note": "every image of this run went through the pack (NumPy + Pillow decode)",
    }
    log(f"  pack {path}: {RESULTS['pack']['mib']:.1f} MiB, {len(sets)} splits, OOD sets {ood}")
    normalization = pack.normalization(args.in_distribution)
    return {"sets": sets, "ood": ood, "normalization": normalization}


class TorchSide:
    """``device_torch.py`` in its own process, in step with this one through signal files."""

    def __init__(self, args):
        self.dir = tempfile.mkdtemp(prefix="repro_torch_")
        self.json = pathlib.Path(self.dir) / "torch.json"
        self.deadline = time.monotonic() + args.torch_budget
        cmd = [
            sys.executable,
            str(ROOT / "benchmarks" / "device_torch.py"),
            "--out",
            str(self.json),
            "--batch",
            str(args.batch),
            "--dtype",
            args.dtype,
            "--signal-dir",
            self.dir,
            "--wait",
            str(args.torch_budget + 300),
        ]
        cmd += ["--smoke"] if args.smoke else ["--model", args.model]
        env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.smoke else None
        self.proc = subprocess.Popen(cmd, env=env)
        CHILDREN.append(self.proc)
        self.released = False

    def wait_for(self, name: str) -> bool:
        """Until ``name`` is signalled (True), or the process ends or its budget is spent."""
        path = pathlib.Path(self.dir) / name
        while not path.exists():
            if self.proc.poll() is not None or time.monotonic() > self.deadline:
                return path.exists()
            time.sleep(0.05)
        return True

    def release(self, timing_allowed: bool) -> dict:
        """Lets PyTorch time its compiled steps (or calls that off: a PyTorch still compiling is
        stopped at once, it must not share the GPU with JAX's training) and collects its
        figures."""
        if not self.released:
            self.released = True
            (pathlib.Path(self.dir) / ("go" if timing_allowed else "abort")).touch()
            wait = 60 if timing_allowed else 2
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                why = "its timing took over 60s" if timing_allowed else "not ready in time"
                log(f"  device_torch.py stopped ({why})")
        result = json.loads(self.json.read_text()) if self.json.exists() else {}
        RESULTS["torch"] = result
        return result
