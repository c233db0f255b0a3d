"""SIGKILL in the middle of training, rerun the same command: the experiment's own loop resumes
from its latest checkpoint and ends bit-identical to an uninterrupted run (generated data)."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 120, 10

CHILD = """
import sys
from absl import app
from experiments import main
main.configure_xla(2)  # --cpu_devices=2, before importing isomax_jax starts JAX's backend
from isomax_jax.data import testing
with testing.mock_data(num_examples=64):
    app.run(main.main, argv=sys.argv)
"""


def _command(workdir):
    overrides = {
        "losses": "('isomax',)",
        "ood_datasets": "('gaussian_noise',)",
        "detectors": "('msp','entropic','min_distance')",
        "num_train_steps": STEPS,
        "batch_size": 16,
        "eval_batch_size": 32,
        "max_eval_examples": 32,
        "checkpoint_every_steps": EVERY,
        "log_every_steps": EVERY,
        "warmup_epochs": 0.0,
        "bootstrap_samples": 0,
    }
    return [
        sys.executable, "-c", CHILD,
        "--config=experiments/configs/default.py", f"--workdir={workdir}", "--cpu_devices=2",
        *(f"--config.{k}={v}" for k, v in overrides.items()),
    ]  # fmt: skip


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the experiment sets its own host device count
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return env


def _saved_steps(workdir):
    path = os.path.join(workdir, "isomax_seed0", "checkpoints")
    if not os.path.isdir(path):
        return []
    return sorted(int(d) for d in os.listdir(path) if d.isdigit())


@pytest.mark.slow
def test_sigkill_mid_training_then_rerun_equals_uninterrupted(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    done = subprocess.run(_command(full), cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    child = subprocess.Popen(
        _command(killed), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.time() + 600
    while time.time() < deadline and child.poll() is None:
        if any(EVERY <= s < STEPS for s in _saved_steps(killed)):
            break
        time.sleep(0.05)
    assert child.poll() is None, "the run ended before it could be killed mid-training"
    child.send_signal(signal.SIGKILL)
    child.wait()
    at_kill = _saved_steps(killed)
    assert at_kill and max(at_kill) < STEPS, at_kill

    again = subprocess.run(_command(killed), cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert max(_saved_steps(killed)) == STEPS
    a = np.load(full / "logits" / "isomax_seed0.npz")
    b = np.load(killed / "logits" / "isomax_seed0.npz")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
