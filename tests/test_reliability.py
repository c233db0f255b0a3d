"""Long runs on misbehaving machines: saves that fail (a full, read-only or vanished filesystem,
permissions) and slow leaks over many steps and saves.

The full and read-only filesystems are real: a tmpfs with a size cap, mounted for the test (root
only; skipped elsewhere). The other failures are injected at the write. Preemption is tested in
``test_preemption.py`` and ``test_experiments_resume.py``, dead peers in ``test_multihost.py``.
"""

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_worker

from isomax_jax import checkpointing, run_metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs (a small disk), unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-capped tmpfs needs root")
    mount = tmp_path / "small_fs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def _fill(folder) -> None:
    """Writes a file into ``folder`` until its filesystem is full."""
    fd = os.open(os.path.join(folder, "filler"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as e:
        assert e.errno == 28, e  # ENOSPC
    finally:
        os.close(fd)


@functools.cache
def _initial_state():
    return train_worker.init_state()  # about 2 s: built once


def _state(step):
    return _initial_state().replace(step=jnp.asarray(step, jnp.int32))


def _assert_message(error, step, path_pattern, os_error):
    message = str(error.value)
    assert f"the checkpoint of step {step} to " in message, message
    assert re.search(path_pattern, message), message
    assert os_error in message, message
    assert re.search(r"\d+(\.\d)? (B|KiB|MiB|GiB|TiB) free of ", message), message


def _restored_step(workdir):
    ckpt = checkpointing.RunCheckpointer(workdir, save_every_steps=1)
    try:
        return int(ckpt.restore_latest(_initial_state()).step), ckpt.latest_step()
    finally:
        ckpt.close()


NEXT_START = """
import json, os, sys, time
import train_worker
from isomax_jax import checkpointing
ckpt = checkpointing.RunCheckpointer(sys.argv[1], save_every_steps=1)
step = int(ckpt.restore_latest(train_worker.init_state()).step)
folder = os.path.join(sys.argv[1], "checkpoints")
deadline = time.monotonic() + 30  # Orbax removes partial steps in the background
while os.listdir(folder) != [str(step)] and time.monotonic() < deadline:
    time.sleep(0.1)
print(json.dumps([step, ckpt.latest_step(), sorted(os.listdir(folder))]))
ckpt.close()
"""


def _next_start(workdir):
    """(restored step, latest step, the folders of checkpoints/) as a new process sees them:
    the failed process's background writes are gone with it, as after a real failure."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, tests])}
    done = subprocess.run(
        [sys.executable, "-c", NEXT_START, str(workdir)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return tuple(json.loads(done.stdout.strip().splitlines()[-1]))


# --- full / read-only / vanished / not permitted ------------------------------------------------


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_a_full_disk_stops_the_save_and_the_previous_checkpoint_is_restored(
    small_fs, async_save, caplog
):
    workdir = small_fs / "run"
    ckpt = checkpointing.RunCheckpointer(
        workdir, save_every_steps=1, keep=1, async_save=async_save
    )  # keep=1: a save that deleted its predecessor before completing would lose everything
    assert ckpt.save(_state(1))
    ckpt.wait()
    _fill(small_fs)
    with pytest.raises(checkpointing.CheckpointSaveError) as error:
        ckpt.save(_state(2))
        ckpt.due(3)  # a background save's failure is raised at the next step...
        ckpt.wait()  # ... or here at the latest
    ckpt.close()  # reported once: closing does not raise it again
    _assert_message(error, 2, rf"{workdir}/checkpoints/2: ", "No space left on device")
    assert "untouched (steps [1])" in str(error.value)
    assert isinstance(error.value, OSError)  # a RunDirectoryWriteError

    os.remove(small_fs / "filler")
    # The partial step 2 is not a checkpoint, and the next start removes it.
    assert _next_start(workdir) == (1, 1, ["1"])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_read_only_filesystem_stops_the_save(small_fs):
    workdir = small_fs / "run"
    ckpt = checkpointing.RunCheckpointer(workdir, save_every_steps=1, keep=1)
    ckpt.save(_state(1))
    ckpt.wait()
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    try:
        with pytest.raises(checkpointing.CheckpointSaveError) as error:
            ckpt.save(_state(2))
            ckpt.wait()
        ckpt.close()
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
    _assert_message(error, 2, rf"{workdir}/checkpoints/2: ", "Read-only file system")
    assert _next_start(workdir) == (1, 1, ["1"])


def test_permission_denied_at_the_write_stops_the_save(tmp_path, monkeypatch):
    ckpt = checkpointing.RunCheckpointer(tmp_path, save_every_steps=1, async_save=False)
    ckpt.save(_state(1))
    denied = PermissionError(13, "Permission denied", str(tmp_path / "checkpoints" / "2"))

    def save(*args, **kwargs):
        raise denied

    monkeypatch.setattr(ckpt._manager, "save", save)
    with pytest.raises(checkpointing.CheckpointSaveError) as error:
        ckpt.save(_state(2))
    monkeypatch.undo()
    ckpt.close()
    _assert_message(error, 2, rf"{tmp_path}/checkpoints/2: PermissionError", "Permission denied")
    assert error.value.__cause__ is denied
    assert _restored_step(tmp_path) == (1, 1)


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_vanished_run_directory_is_not_created_again(tmp_path, how):
    workdir = tmp_path / "run"
    ckpt = checkpointing.RunCheckpointer(workdir, save_every_steps=1, async_save=False)
    ckpt.save(_state(1))
    shutil.rmtree(workdir)  # deleted, or its filesystem unmounted
    if how == "replaced":
        (workdir / "checkpoints").mkdir(parents=True)
    with pytest.raises(checkpointing.CheckpointSaveError) as error:
        ckpt.save(_state(2))
    state = "no longer exists" if how == "deleted" else "was replaced"
    assert f"{workdir / 'checkpoints'} {state} since this run started" in str(error.value)
    assert (how == "deleted") != (workdir / "checkpoints").exists()
    assert not (workdir / "checkpoints" / "2").exists()
    ckpt.close()


@pytest.mark.slow
def test_run_json_on_a_full_disk_is_kept_whole(small_fs):
    workdir = small_fs / "run"
    run_metadata.write_run_metadata(workdir, config={"lr": 0.1}, seed=0)
    before = (workdir / "run.json").read_text()
    _fill(small_fs)
    with pytest.raises(run_metadata.RunDirectoryWriteError) as error:
        run_metadata.write_run_metadata(workdir, config={"lr": 0.1}, seed=0)  # a second start
    message = str(error.value)
    assert f"could not write run.json to {workdir / 'run.json'}: " in message, message
    assert "No space left on device" in message and "free of" in message, message
    assert (workdir / "run.json").read_text() == before
    assert sorted(os.listdir(workdir)) == ["run.json"]  # no temporary file left


def test_write_json_leaves_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "info.json"
    run_metadata.write_json(path, {"a": 1})

    def fsync(fd):
        raise OSError(122, "Disk quota exceeded")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(run_metadata.RunDirectoryWriteError, match="Disk quota exceeded"):
        run_metadata.write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["info.json"]


# --- the experiment on a disk that fills up -----------------------------------------------------

CHILD = """
import sys
from absl import app
from experiments import main
main.configure_xla(1)
from isomax_jax.data import testing
with testing.mock_data(num_examples=64):
    app.run(main.main, argv=sys.argv)
"""


@pytest.mark.slow
def test_the_experiment_on_a_full_disk_exits_74_naming_the_path(small_fs):
    # The disk fills up after the first checkpoint (another job's files): the next save fails.
    workdir = small_fs / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    env.pop("XLA_FLAGS", None)
    overrides = {
        "losses": "('softmax',)", "ood_datasets": "('gaussian_noise',)",
        "detectors": "('msp',)", "num_train_steps": 400, "batch_size": 8,
        "eval_batch_size": 8, "max_eval_examples": 8, "checkpoint_every_steps": 2,
        "warmup_epochs": 0.0, "bootstrap_samples": 0,
    }  # fmt: skip
    command = [
        sys.executable, "-c", CHILD, "--config=experiments/configs/default.py",
        f"--workdir={workdir}", "--cpu_devices=1",
        *(f"--config.{k}={v}" for k, v in overrides.items()),
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    checkpoints = workdir / "softmax_seed0" / "checkpoints"
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and not (checkpoints / "2").is_dir():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        _fill(small_fs)
        _, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 74, stderr[-3000:]
    # Our message is the run's last word; Orbax's asyncio machinery may still print a traceback
    # while the interpreter shuts down after it ("Event loop is closed": seen once in CI).
    ours = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert ours, stderr[-3000:]
    last = ours[-1]
    assert last.startswith("error: could not write the checkpoint of step "), last
    assert f"{checkpoints}/" in last and "No space left on device" in last, last
    assert "free of" in last and "Checkpoints saved before it are untouched" in last, last
    assert not (workdir / "results.json").exists()


# --- slow leaks ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_no_memory_or_descriptor_growth_over_many_steps_and_saves(tmp_path):
    """600 tiny steps with a save every 5 (120 saves): host RSS grows < 5 % after the warm-up
    (the first 100 steps), the open descriptors not at all. ``benchmarks/bench_leaks.py`` runs
    the same loop for 2,000+ steps and prints the curve."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_leaks
    finally:
        sys.path.pop(0)
    samples = bench_leaks.run(tmp_path, steps=600, save_every=5, sample_every=50)
    warm = [s for s in samples if s["step"] >= 100]
    rss_growth = warm[-1]["rss_mib"] / warm[0]["rss_mib"] - 1
    print(f"\nRSS {warm[0]['rss_mib']:.1f} -> {warm[-1]['rss_mib']:.1f} MiB ({rss_growth:+.1%}); "
          f"descriptors {[s['fds'] for s in samples]}")  # fmt: skip
    assert rss_growth < 0.05, samples
    assert max(s["fds"] for s in warm) <= warm[0]["fds"], samples
    assert jax.device_count() == 8 and np.isfinite(samples[-1]["loss"])


def _events(folder):
    """(step, tag, value) of every scalar in the event files of ``folder``."""
    import glob
    import struct

    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(glob.glob(os.path.join(folder, "events*"))):
        data, i = open(path, "rb").read(), 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            if i + 12 + n + 4 > len(data):
                break  # a record cut short by the full disk (TensorBoard skips it too)
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
            i += 12 + n + 4
    return out


def test_summaries_on_a_full_disk_stop_quietly_instead_of_hanging(small_fs, caplog):
    # tensorboardX's SummaryWriter hangs here: its writer thread dies on ENOSPC and the next
    # add_scalar blocks on the full queue. The experiments' Summaries must return at once.
    from experiments.tensorboard_log import Summaries

    summaries = Summaries(str(small_fs / "tb"))
    summaries.scalar("train/loss", 1.5, 1)
    summaries.flush()
    assert _events(small_fs / "tb") == [(1, "train/loss", 1.5)]
    _fill(small_fs)
    start = time.monotonic()
    for step in range(2, 5000):
        summaries.scalar("train/loss", 0.5, step)
        summaries.flush()
    summaries.close()
    summaries.close()
    assert time.monotonic() - start < 60
    warnings = [r.getMessage() for r in caplog.records if "TensorBoard summaries" in r.getMessage()]
    assert len(warnings) == 1 and "No space left on device" in warnings[0], warnings
    assert _events(small_fs / "tb")[0] == (1, "train/loss", 1.5)
