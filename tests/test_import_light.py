"""Importing isomax_jax (and its core modules) must not import tensorflow or torch."""

import subprocess
import sys

CORE = [
    "distances", "losses", "heads", "nnx", "scores", "calibration", "validation", "detectors",
    "registry", "metrics", "thresholds", "tables", "train", "parallel", "models",
    "checkpointing", "distributed", "torch_import",
]  # fmt: skip


def test_import_does_not_pull_tensorflow_or_torch():
    modules = ", ".join(f"isomax_jax.{m}" for m in CORE)
    code = (
        "import sys, isomax_jax\n"
        f"import {modules}\n"
        "heavy = sorted(m for m in ('tensorflow', 'torch', 'tensorflow_datasets') "
        "if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "", f"heavy modules imported: {result.stdout.strip()}"
