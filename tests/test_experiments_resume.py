"""The experiment interrupted, then the same command again (generated data): SIGKILL or SIGTERM in
the middle of training resume to logits bit-identical to an uninterrupted run; SIGTERM during the
evaluation writes no report, and the rerun evaluates again."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 120, 10
PREEMPTED = 75  # isomax_jax.distributed.PREEMPTED_EXIT_CODE (not imported: JAX stays unloaded)
# The bound on the exit after SIGTERM (measured here: a few seconds; see the test).
EXIT_BOUND_S = 60
TIMEOUT_S = 600

# The experiment's entry point, with a line on stdout at every report of the training loop and
# when the evaluation starts: the tests signal at those points.
CHILD = """
import sys
from absl import app
from experiments import main
main.configure_xla(2)  # --cpu_devices=2, before importing isomax_jax starts JAX's backend
from experiments import evaluate, training
from isomax_jax.data import testing

report, evaluate_runs = training._TrainingLog.report, evaluate.evaluate_runs

def reported(self, done, checkpointed):
    report(self, done, checkpointed)
    print(f"REPORTED {done}", flush=True)

def evaluating(*args, **kwargs):
    print("EVALUATING", flush=True)
    return evaluate_runs(*args, **kwargs)

training._TrainingLog.report, evaluate.evaluate_runs = reported, evaluating
with testing.mock_data(num_examples=64):
    app.run(main.main, argv=sys.argv)
"""


def _command(workdir, *extra, checkpoint_every=EVERY):
    overrides = {
        "losses": "('isomax',)",
        "ood_datasets": "('gaussian_noise',)",
        "detectors": "('msp','entropic','min_distance')",
        "num_train_steps": STEPS,
        "batch_size": 16,
        "eval_batch_size": 32,
        "max_eval_examples": 32,
        "checkpoint_every_steps": checkpoint_every,
        "log_every_steps": 5,
        "warmup_epochs": 0.0,
        "bootstrap_samples": 0,
    }
    return [
        sys.executable, "-c", CHILD,
        "--config=experiments/configs/default.py", f"--workdir={workdir}", "--cpu_devices=2",
        *(f"--config.{k}={v}" for k, v in overrides.items()), *extra,
    ]  # fmt: skip


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the experiment sets its own host device count
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return env


def _run(command):
    return subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True)


def _start(command):
    return subprocess.Popen(
        command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _signal_when(proc, ready, signum):
    """Sends ``signum`` at the first output line for which ``ready(line)``; returns (returncode,
    seconds from the signal to the exit, output)."""
    lines, sent = [], None
    killer = threading.Timer(TIMEOUT_S, proc.kill)
    killer.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if sent is None and ready(line):
                proc.send_signal(signum)
                sent = time.monotonic()
        proc.wait()
    finally:
        killer.cancel()
    assert sent is not None, "".join(lines[-60:])
    return proc.returncode, time.monotonic() - sent, "".join(lines)


def _saved_steps(workdir):
    path = os.path.join(workdir, "isomax_seed0", "checkpoints")
    if not os.path.isdir(path):
        return []
    return sorted(int(d) for d in os.listdir(path) if d.isdigit())


def _assert_same_logits(a_dir, b_dir):
    a = np.load(a_dir / "logits" / "isomax_seed0.npz")
    b = np.load(b_dir / "logits" / "isomax_seed0.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("experiment") / "full"
    done = _run(_command(workdir))
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


@pytest.mark.slow
def test_sigkill_mid_training_then_rerun_equals_uninterrupted(tmp_path, uninterrupted):
    killed = tmp_path / "killed"
    child = _start(_command(killed))
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline and child.poll() is None:
        if any(EVERY <= s < STEPS for s in _saved_steps(killed)):
            break
        time.sleep(0.05)
    assert child.poll() is None, "the run ended before it could be killed mid-training"
    child.send_signal(signal.SIGKILL)
    child.communicate()
    at_kill = _saved_steps(killed)
    assert at_kill and max(at_kill) < STEPS, at_kill

    again = _run(_command(killed))
    assert again.returncode == 0, again.stderr[-3000:]
    assert max(_saved_steps(killed)) == STEPS
    _assert_same_logits(uninterrupted, killed)


@pytest.mark.slow
def test_sigterm_mid_training_saves_that_step_and_the_rerun_equals_uninterrupted(
    tmp_path, uninterrupted
):
    workdir = tmp_path / "preempted"
    # Periodic checkpoints off (every 10**6 > 120 steps): the preemption's save is the only one.
    command = _command(workdir, checkpoint_every=10**6)
    returncode, exit_s, log = _signal_when(
        _start(command), lambda line: line.strip() == "REPORTED 40", signal.SIGTERM
    )
    print(f"\nSIGTERM mid-training: exit {returncode} after {exit_s:.1f} s")
    assert returncode == PREEMPTED, log[-3000:]
    assert exit_s < EXIT_BOUND_S
    (saved,) = _saved_steps(workdir)
    assert 40 <= saved < STEPS
    last = log.strip().splitlines()[-1]
    assert last.startswith(f"preempted: isomax_seed0 saved at step {saved} of {STEPS} in "), last
    assert last.endswith("rerun the same command to resume from it"), last
    assert not (workdir / "results.json").exists()
    assert not (workdir / "isomax_seed0" / "train_info.json").exists()
    unfinished = _run(_command(workdir, "--mode=evaluate", checkpoint_every=10**6))
    assert unfinished.returncode == 2, unfinished.stderr[-3000:]
    assert "has not finished training" in unfinished.stderr

    again = _run(command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _saved_steps(workdir) == [saved, STEPS]
    _assert_same_logits(uninterrupted, workdir)


@pytest.mark.slow
def test_sigterm_during_evaluation_writes_no_report_and_the_rerun_evaluates(
    tmp_path, uninterrupted
):
    workdir = tmp_path / "evaluated"
    shutil.copytree(uninterrupted, workdir)
    for name in ("results.json", "results.md", "logits", "plots"):
        path = workdir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    command = _command(workdir, "--mode=evaluate")
    returncode, exit_s, log = _signal_when(
        _start(command), lambda line: line.strip() == "EVALUATING", signal.SIGTERM
    )
    print(f"\nSIGTERM during the evaluation: exit {returncode} after {exit_s:.1f} s")
    assert returncode == PREEMPTED, log[-3000:]
    assert exit_s < EXIT_BOUND_S
    assert "no report written" in log.strip().splitlines()[-1]
    assert not any((workdir / n).exists() for n in ("results.json", "results.md", "logits"))

    again = _run(command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (workdir / "results.json").exists()
    _assert_same_logits(uninterrupted, workdir)
