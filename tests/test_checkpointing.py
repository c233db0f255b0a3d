"""Run checkpoints: resume after SIGKILL, fingerprints and fallback, workdir lock, metadata."""

import functools
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import train_worker

from isomax_jax import checkpointing, fingerprints, locking, run_metadata

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


@pytest.mark.slow
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


@functools.cache
def _initial_state():
    return train_worker.init_state()  # about 2 s: built once


def _state_at(step, scale):
    state = _initial_state()
    params = jax.tree.map(lambda x: x * scale, state.params)
    return state.replace(step=jnp.asarray(step, jnp.int32), params=params)


def test_latest_saves_every_n_steps_and_at_the_end(tmp_path):
    ckpt = checkpointing.RunCheckpointer(tmp_path, save_every_steps=2, keep=2, async_save=False)
    due = [ckpt.due(step) for step in range(1, 6)]
    saved = [ckpt.save(_state_at(step, 1.0)) for step in range(1, 6)]
    assert saved == due == [False, True, False, True, False]
    assert ckpt.due(5, final=True) and not ckpt.due(4, final=True)  # 4 is saved already
    assert ckpt.save(_state_at(5, 1.0), force=True)
    assert ckpt.latest_step() == 5
    assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints")) == [4, 5]
    restored = ckpt.restore_latest(_initial_state())
    assert int(restored.step) == 5
    ckpt.close()


def test_bad_use_is_rejected(tmp_path):
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="save_every_steps must be a positive int"):
            checkpointing.RunCheckpointer(tmp_path, save_every_steps=bad)
    with pytest.raises(ValueError, match="keep must be a positive int, got 0"):
        checkpointing.RunCheckpointer(tmp_path, save_every_steps=1, keep=0)


def test_run_metadata_mismatch_names_every_key(tmp_path):
    config = {"lr": 0.1, "model": {"depth": 8, "width": 16}, "ood": ["mnist"]}
    run_metadata.write_run_metadata(tmp_path, config=config, seed=0)
    changed = {"lr": 0.2, "model": {"depth": 8, "width": 32}, "ood": ["mnist", "svhn"], "new": 1}
    with pytest.raises(ValueError) as info:
        run_metadata.write_run_metadata(tmp_path, config=changed, seed=3)
    message = str(info.value)
    for line in (
        "5 setting(s) differ (recorded -> now)",
        "config.lr: 0.1 -> 0.2",
        "config.model.width: 16 -> 32",
        "config.new: '<absent>' -> 1",
        "config.ood: ['mnist'] -> ['mnist', 'svhn']",
        "seed: 0 -> 3",
        "Use a fresh workdir for a different run, or rerun with the recorded config and seed",
    ):
        assert line in message, line
    assert "depth" not in message
    meta = run_metadata.write_run_metadata(tmp_path, config=config, seed=0)  # same run: fine
    assert len(meta["starts"]) == 2


def test_run_metadata_ignore_keys_may_change_and_are_recorded(tmp_path):
    config = {"lr": 0.1, "ood": ["mnist"], "data_dir": "/a"}
    run_metadata.write_run_metadata(tmp_path, config=config, seed=0, ignore_keys=("ood",))
    changed = {"lr": 0.1, "ood": ["mnist", "svhn"], "data_dir": "/b"}
    with pytest.raises(ValueError, match="config.data_dir: '/a' -> '/b'") as info:
        run_metadata.write_run_metadata(tmp_path, config=changed, seed=0, ignore_keys=("ood",))
    assert "config.ood" not in str(info.value)
    meta = run_metadata.write_run_metadata(
        tmp_path, config=changed, seed=0, ignore_keys=("ood", "data_dir")
    )
    assert meta["config"] == config  # the recorded (first) config stays
    assert meta["starts"][-1]["config_changes"] == {"data_dir": "/b", "ood": ["mnist", "svhn"]}


def test_versions_is_one_record():
    got = run_metadata.versions()
    assert got["jax"] == jax.__version__ and got["python"].count(".") == 2
    assert set(got) == {"python", "isomax_jax", "jax", "jaxlib", "flax", "optax",
                        "orbax-checkpoint", "numpy"}  # fmt: skip
    assert all(isinstance(v, str) and v for v in got.values())


# --------------------------------------------------------------------------------------------
# Fingerprints: a damaged latest checkpoint is reported and the previous one restored
# --------------------------------------------------------------------------------------------


def _big_state(step, scale=1.0):
    """A train state with one 512x512 array, large enough to corrupt silently."""
    state = _state_at(step, scale)
    big = np.random.default_rng(0).normal(size=(512, 512)).astype(np.float32) * scale
    return state.replace(params={**state.params, "big": {"w": jnp.asarray(big)}})


def _saved_run(tmp_path, steps=(2, 4)):
    ckpt = checkpointing.RunCheckpointer(tmp_path, save_every_steps=2, async_save=False)
    for step in steps:
        assert ckpt.save(_big_state(step, scale=float(step)))
    ckpt.close()
    return tmp_path / "checkpoints"


def _largest_file(folder):
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(step_dir):
    path = _largest_file(step_dir / "state")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zero_length(step_dir):
    for path in step_dir.rglob("*"):
        if path.is_file():
            path.write_bytes(b"")


def _random_bytes(step_dir):
    path = _largest_file(step_dir / "state")
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 4096] = np.random.default_rng(1).bytes(4096)
    path.write_bytes(bytes(raw))


# damage -> the reason our own checks give, or None where Orbax's restore fails first (its
# message is Orbax's: only that the step is reported as not intact, with a reason, is ours).
DAMAGE = {
    "truncated": (_truncate, None),
    "zero_length": (_zero_length, None),
    "no_METADATA": (lambda d: (d / "state" / "_METADATA").unlink(), None),
    "random_4k": (_random_bytes, r"fingerprint mismatch: \['params'\]\['big'\]\['w'\]: content"),
    "no_fingerprint": (lambda d: shutil.rmtree(d / "fingerprint"), "fingerprint item .* missing"),
}  # fmt: skip


def test_random_bytes_restore_silently_without_the_fingerprint(tmp_path):
    """The probe of the issue: Orbax alone restores the damaged arrays without an error."""
    checkpoints = _saved_run(tmp_path)
    _random_bytes(checkpoints / "4")
    items = {
        k: getattr(_big_state(4), k) for k in ("step", "params", "batch_stats", "opt_state", "rng")
    }
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, items)
    manager = ocp.CheckpointManager(checkpoints)
    try:
        restored = manager.restore(
            4, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
    finally:
        manager.close()
    got = np.asarray(restored["state"]["params"]["big"]["w"])
    assert not np.array_equal(got, np.asarray(_big_state(4, 4.0).params["big"]["w"]))


# Orbax leaves its other read coroutines unawaited when one read fails: harmless, but reported.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_is_reported_and_the_previous_restored(tmp_path, caplog, damage):
    checkpoints = _saved_run(tmp_path)
    corrupt, reason = DAMAGE[damage]
    corrupt(checkpoints / "4")
    ckpt = checkpointing.RunCheckpointer(tmp_path, save_every_steps=2, async_save=False)
    with caplog.at_level(logging.WARNING, logger="isomax_jax.checkpointing"):
        restored = ckpt.restore_latest(_big_state(0))
    warnings = [r.getMessage() for r in caplog.records if r.name == "isomax_jax.checkpointing"]
    pattern = rf"checkpoint at step 4 in .* is not intact \(\w+: .*{reason or ''}"
    assert re.search(pattern, warnings[0]), warnings[0]
    assert "resuming from step 2" in warnings[1]
    assert int(restored.step) == 2
    expected = _big_state(2, 2.0)
    for x, y in zip(
        jax.tree.leaves(restored.params), jax.tree.leaves(expected.params), strict=True
    ):
        np.testing.assert_array_equal(x, y)
    # The damaged checkpoint is kept aside, and the resumed run can save step 4 again.
    (moved,) = os.listdir(tmp_path / "corrupted_checkpoints")
    assert moved.startswith("4.") and sorted(os.listdir(checkpoints)) == ["2"]
    assert ckpt.save(_big_state(4, 5.0)) and ckpt.latest_step() == 4
    assert int(ckpt.restore_latest(_big_state(0)).step) == 4
    ckpt.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    checkpoints = _saved_run(tmp_path)
    _random_bytes(checkpoints / "4")
    _zero_length(checkpoints / "2")
    ckpt = checkpointing.RunCheckpointer(tmp_path, save_every_steps=2)
    with pytest.raises(checkpointing.CheckpointCorruptedError) as info:
        ckpt.restore_latest(_big_state(0))
    message = str(info.value)
    assert "none of the 2 checkpoint(s)" in message and str(checkpoints) in message
    assert "step 4: ValueError: fingerprint mismatch" in message
    assert re.search(r"step 2: \w+: ", message)  # the reason, whatever Orbax's words
    assert "Refusing to start from scratch" in message
    assert sorted(os.listdir(checkpoints)) == ["2", "4"]  # nothing moved: nothing to resume from
    ckpt.close()


def test_abstract_state_with_shardings_is_restored_and_verified(tmp_path):
    """The evaluate-only restore: ShapeDtypeStruct leaves carrying a replicated sharding."""
    from isomax_jax import parallel

    _saved_run(tmp_path)
    mesh = parallel.data_mesh()
    rep = parallel.replicated(mesh)
    abstract = jax.eval_shape(lambda: _big_state(0))
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), abstract
    )
    ckpt = checkpointing.RunCheckpointer(tmp_path, save_every_steps=2)
    restored = ckpt.restore_latest(abstract)
    ckpt.close()
    assert int(restored.step) == 4 and restored.params["big"]["w"].sharding == rep
    np.testing.assert_array_equal(
        restored.params["big"]["w"], _big_state(4, 4.0).params["big"]["w"]
    )


def test_checkpoint_from_before_fingerprints_is_restored_with_a_warning(tmp_path, caplog):
    state = _state_at(3, 2.0)
    items = {k: getattr(state, k) for k in ("step", "params", "batch_stats", "opt_state", "rng")}
    old = ocp.CheckpointManager(tmp_path / "checkpoints")  # the layout written before: one item
    old.save(3, args=ocp.args.StandardSave(items))
    old.close()
    ckpt = checkpointing.RunCheckpointer(tmp_path, save_every_steps=2)
    with caplog.at_level(logging.WARNING, logger="isomax_jax.checkpointing"):
        restored = ckpt.restore_latest(_initial_state())
    ckpt.close()
    assert int(restored.step) == 3
    assert "before checkpoints carried fingerprints" in caplog.text
    for x, y in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(x, y)


def test_fingerprint_sees_content_dtype_and_shape():
    base = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.int32(3)}
    same = fingerprints.fingerprint({"a": jnp.asarray(base["a"]), "b": jnp.int32(3)})
    assert fingerprints.fingerprint(base) == same
    for other in (
        {**base, "a": base["a"].copy().reshape(3, 2)},
        {**base, "a": base["a"].astype(np.float64)},
        {**base, "b": np.int32(4)},
    ):
        assert fingerprints.fingerprint(other) != same


# --------------------------------------------------------------------------------------------
# Workdir lock
# --------------------------------------------------------------------------------------------

_HOLDER = """
import sys
from isomax_jax import locking
with locking.workdir_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def _lock_holder(path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout.readline().decode().strip() == "locked"
    return proc


@pytest.mark.slow
def test_second_process_on_a_workdir_fails_at_once(tmp_path):
    holder = _lock_holder(tmp_path / "run")
    try:
        with pytest.raises(locking.WorkdirLockedError) as info:
            with locking.workdir_lock(tmp_path / "run"):
                pytest.fail("the lock was granted twice")
        message = str(info.value)
        assert str(tmp_path / "run") in message
        assert f"PID {holder.pid} on host {platform.node()}" in message
        assert "use another workdir" in message
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock
        holder.wait(timeout=30)
    with locking.workdir_lock(tmp_path / "run") as locked:  # free again
        assert locked == tmp_path / "run"
        with locking.workdir_lock(tmp_path / "run"):  # nested in one process: allowed
            pass
        proc = subprocess.run(
            [sys.executable, "-c", _HOLDER, str(tmp_path / "run")],
            env={**os.environ, "PYTHONPATH": os.getcwd()},
            capture_output=True,
            input=b"",
            timeout=TIMEOUT_S,
        )
        assert proc.returncode != 0
        assert f"PID {os.getpid()} on host" in proc.stderr.decode()


def test_only_process_zero_takes_the_lock(tmp_path, monkeypatch):
    with locking.workdir_lock(tmp_path):
        monkeypatch.setattr(jax, "process_index", lambda: 1)
        with locking.workdir_lock(tmp_path) as path:  # another process of the same run
            assert path == tmp_path
