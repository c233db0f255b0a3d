"""Importing isomax_jax (and its core modules) must not import tensorflow or torch, nor start
XLA; its subpackages are attributes of the package."""

import subprocess
import sys

CORE = [
    "distances", "losses", "heads", "nnx", "scores", "calibration", "validation", "detectors",
    "registry", "metrics", "thresholds", "tables", "train", "parallel", "models",
    "checkpointing", "distributed", "torch_import", "detector_format", "run_metadata", "locking",
    "fingerprints", "evaluation", "progress", "ood_report", "sweeps",
]  # fmt: skip
HEAVY = (
    "heavy = sorted(m for m in ('tensorflow', 'torch', 'tensorflow_datasets')"
    " if m in sys.modules)\n"
    "print(','.join(heavy))\n"
)


def _printed(code: str) -> str:
    """What ``code`` prints, run in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return result.stdout.strip()


def test_import_does_not_pull_tensorflow_or_torch():
    modules = ", ".join(f"isomax_jax.{m}" for m in CORE)
    assert _printed(f"import sys, isomax_jax\nimport {modules}\n{HEAVY}") == ""


def test_subpackages_are_attributes_without_heavy_imports():
    """Issue 22.1: `isomax_jax.nnx.IsoMaxHead` (as the README writes it) raised AttributeError;
    also `isomax_jax.models` and `isomax_jax.torch_import`."""
    code = (
        "import sys, isomax_jax\n"
        "assert isomax_jax.nnx.IsoMaxHead.__name__ == 'IsoMaxHead'\n"
        "assert callable(isomax_jax.models.get_model)\n"
        "assert callable(isomax_jax.torch_import.load_torch_checkpoint)\n"
        "assert callable(isomax_jax.train.train_step) and 'nnx' in dir(isomax_jax)\n"
    )
    assert _printed(code + HEAVY) == ""


def test_import_does_not_start_xla():
    """XLA reads its flags once, and jax.distributed.initialize() must come before any backend:
    importing the library (and building its detectors' defaults) must not start one."""
    code = (
        "from jax._src import xla_bridge\n"
        "import isomax_jax, isomax_jax.models, isomax_jax.nnx, isomax_jax.train\n"
        "from isomax_jax import detectors\n"
        "[detectors.get(n) for n in detectors.NAMES]\n"
        "print(bool(xla_bridge._backends))\n"
    )
    assert _printed(code) == "False"
