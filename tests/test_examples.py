"""The scripts in examples/ run as a user runs them: ``python examples/<script>.py``.

With the offline CIFAR-10/MNIST tfds data (``shared_tfds_dir``) each runs with its defaults on
the real images and must learn (accuracy and OOD AUROC well above chance); without it, each runs
on the generated stand-in with small settings. Each script runs in a fresh process on one CPU
device (not the suite's 8 fake ones), as on a user's machine; its wall time is printed (the
examples are sized to finish in under 3 minutes on a 2-core CPU).
"""

import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TINY = ["--num_train", "1024", "--num_test", "256"]


def run_example(script: str, *args: str, data_dir: pathlib.Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "TFDS_DATA_DIR")}
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, str(EXAMPLES / script), *args]
    if data_dir is not None:
        command += ["--data_dir", str(data_dir)]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    seconds = time.perf_counter() - start
    print(f"{script} {' '.join(args)}: {seconds:.1f} s\n{result.stdout}")
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def percent(pattern: str, text: str) -> float:
    match = re.search(pattern + r" ([0-9.]+) %", text)
    assert match, f"{pattern!r} not in the output:\n{text}"
    return float(match.group(1)) / 100


@pytest.mark.parametrize("script", ["train_linen.py", "train_nnx.py"])
def test_training_examples_on_generated_data(script):
    out = run_example(script, *TINY)
    assert "data: generated" in out
    assert percent("test accuracy", out) > 0.5  # 10 separable patterns
    assert 0.0 <= percent("AUROC", out) <= 1.0


def test_evaluate_and_deploy_on_generated_data():
    out = run_example("evaluate_and_deploy.py", *TINY)  # trains the Linen model first
    assert "data: generated" in out and "saved and reloaded OODDetector" in out
    assert 0.85 <= percent("test images accepted", out) <= 1.0


@pytest.fixture(scope="module")
def linen_params(shared_tfds_dir, tmp_path_factory):
    """train_linen.py with its defaults on CIFAR-10, its variables saved; returns (path, out)."""
    path = tmp_path_factory.mktemp("linen") / "params.msgpack"
    out = run_example("train_linen.py", "--save", str(path), data_dir=shared_tfds_dir)
    return path, out


@pytest.mark.slow
def test_train_linen_on_cifar10(linen_params):
    _, out = linen_params
    assert "data: cifar10 train 10000" in out and "OOD mnist" in out
    assert percent("test accuracy", out) > 0.35
    assert percent("AUROC", out) > 0.6


@pytest.mark.slow
def test_train_nnx_on_cifar10(shared_tfds_dir):
    out = run_example("train_nnx.py", data_dir=shared_tfds_dir)
    assert "data: cifar10 train 10000" in out
    assert percent("test accuracy", out) > 0.35
    assert percent("AUROC", out) > 0.6


@pytest.mark.slow
def test_evaluate_and_deploy_on_cifar10(linen_params, shared_tfds_dir):
    path, _ = linen_params
    out = run_example("evaluate_and_deploy.py", "--params", str(path), data_dir=shared_tfds_dir)
    assert "Mahalanobis" in out and "| mnist |" in out
    assert 0.9 <= percent("test images accepted", out) <= 1.0  # the 95 % TPR threshold
    assert percent("mnist rejected", out) > 0.5
