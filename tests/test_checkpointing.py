"""Orbax run checkpoints: resume after SIGKILL, best-by-metric, run metadata."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_worker

from isomax_jax import checkpointing

TIMEOUT_S = 120


def _start_worker(*args):
    path = os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    cmd = [sys.executable, train_worker.__file__, *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc):
    try:
        stdout, _ = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode, stdout.decode(errors="replace")[-3000:]


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    workdir = tmp_path / "run"
    out = str(tmp_path / "resumed.npz")
    common = ["--steps", "5", "--workdir", str(workdir), "--save-every", "2", "--out", out]
    killed = _start_worker(*common, "--kill-after", "3")
    try:  # meanwhile, the uninterrupted run in this process
        reference = str(tmp_path / "uninterrupted.npz")
        train_worker.main(["--steps", "5", "--out", reference])
    finally:
        returncode, log = _finish(killed)
    assert returncode == -signal.SIGKILL, log
    ckpt = checkpointing.RunCheckpointer(workdir, save_every_steps=2)
    assert ckpt.latest_step() == 2  # step 3 ran but was not saved: the resume redoes it
    ckpt.close()
    assert not os.path.exists(out)

    returncode, log = _finish(_start_worker(*common))
    assert returncode == 0, log
    got, expected = np.load(out), np.load(reference)
    assert sorted(got.files) == sorted(expected.files)
    for name in expected.files:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, atol=1e-7, err_msg=name)

    ckpt = checkpointing.RunCheckpointer(workdir, save_every_steps=2)
    assert ckpt.latest_step() == 5  # saved at the end
    ckpt.close()
    meta = json.loads((workdir / "run.json").read_text())
    assert meta["seed"] == 0 and meta["config"]["steps"] == 5
    assert len(meta["starts"]) == 2
    start = meta["starts"][0]
    assert start["versions"]["jax"] == jax.__version__
    assert start["device_layout"]["device_count"] == 8


def _state_at(step, scale):
    state = train_worker.init_state()
    params = jax.tree.map(lambda x: x * scale, state.params)
    return state.replace(step=jnp.asarray(step, jnp.int32), params=params)


@pytest.mark.parametrize("mode, best_index", [("max", 1), ("min", 2)])
def test_best_by_metric_is_kept_and_restored(tmp_path, mode, best_index):
    accuracies = [0.3, 0.7, 0.1, 0.5]
    ckpt = checkpointing.RunCheckpointer(
        tmp_path, save_every_steps=10, best_metric="accuracy", best_mode=mode, async_save=False
    )
    for i, acc in enumerate(accuracies):
        ckpt.save_best(_state_at(i + 1, scale=i + 2.0), {"accuracy": acc, "loss": 1.0})
    ckpt.wait()
    assert ckpt.best_step() == best_index + 1
    assert sorted(os.listdir(tmp_path / "best")) == [str(best_index + 1)]
    restored = ckpt.restore_best(train_worker.init_state())
    expected = _state_at(best_index + 1, scale=best_index + 2.0)
    assert int(restored.step) == best_index + 1
    for x, y in zip(
        jax.tree.leaves(restored.params), jax.tree.leaves(expected.params), strict=True
    ):
        np.testing.assert_allclose(x, y, rtol=0, atol=0)
    ckpt.close()


def test_latest_saves_every_n_steps_and_at_the_end(tmp_path):
    ckpt = checkpointing.RunCheckpointer(tmp_path, save_every_steps=2, keep=2, async_save=False)
    saved = [ckpt.save(_state_at(step, 1.0)) for step in range(1, 6)]
    assert saved == [False, True, False, True, False]
    assert ckpt.save(_state_at(5, 1.0), force=True)
    assert ckpt.latest_step() == 5
    assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints")) == [4, 5]
    restored = ckpt.restore_latest(train_worker.init_state())
    assert int(restored.step) == 5
    ckpt.close()


def test_bad_use_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="save_every_steps must be positive, got 0"):
        checkpointing.RunCheckpointer(tmp_path, save_every_steps=0)
    with pytest.raises(ValueError, match="best_mode must be 'max' or 'min', got 'best'"):
        checkpointing.RunCheckpointer(tmp_path, save_every_steps=1, best_mode="best")
    ckpt = checkpointing.RunCheckpointer(tmp_path / "a", save_every_steps=1, best_metric="acc")
    with pytest.raises(ValueError, match=r"metrics must contain 'acc', got \['loss'\]"):
        ckpt.save_best(_state_at(1, 1.0), {"loss": 1.0})
    with pytest.raises(FileNotFoundError):
        ckpt.restore_best(train_worker.init_state())
    ckpt.close()
    plain = checkpointing.RunCheckpointer(tmp_path / "b", save_every_steps=1)
    with pytest.raises(ValueError, match="needs a RunCheckpointer built with best_metric"):
        plain.save_best(_state_at(1, 1.0), {"acc": 1.0})
    plain.close()
    checkpointing.write_run_metadata(tmp_path / "c", config={"lr": 0.1}, seed=0)
    with pytest.raises(ValueError, match="records a different config/seed"):
        checkpointing.write_run_metadata(tmp_path / "c", config={"lr": 0.2}, seed=0)
