"""Two processes x 4 CPU devices on loopback: they train like one process with 8 devices, stop
together at one saved step when one of them gets SIGTERM, and stop (JAX's heartbeat) when the
other dies."""

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
import train_worker

WORKER = pathlib.Path(train_worker.__file__)
ROOT = WORKER.parent.parent
STEPS = 3
TIMEOUT_S = 150
PREEMPTED = 75  # isomax_jax.distributed.PREEMPTED_EXIT_CODE


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: pathlib.Path, num_processes: int, devices_per_process: int, *args: str, env=None):
    port = _free_port()
    procs = []
    for pid in range(num_processes):
        env_i = {
            **os.environ,
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
            "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "ISOMAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "ISOMAX_NUM_PROCESSES": str(num_processes),
            "ISOMAX_PROCESS_ID": str(pid),
            **(env or {}),
        }
        cmd = [sys.executable, str(WORKER), "--out", str(out), *(args or ("--steps", str(STEPS)))]
        procs.append(
            subprocess.Popen(cmd, env=env_i, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    return procs


class _Output:
    """Every line a process prints, read in a thread (a full pipe would block the process)."""

    def __init__(self, proc):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc):
        for line in proc.stdout:
            self.lines.append(line.decode(errors="replace"))

    def wait_for(self, text: str, timeout: float = TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while f"{text}\n" not in self.lines:
            assert time.monotonic() < deadline, "".join(self.lines[-40:])
            time.sleep(0.02)

    def text(self) -> str:
        self._thread.join(timeout=10)
        return "".join(self.lines)


def _reap(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


@pytest.mark.slow
def test_two_processes_equal_one_process_with_eight_devices(tmp_path):
    assert jax.device_count() == 8
    out = tmp_path / "multihost.npz"
    procs = _launch(out, num_processes=2, devices_per_process=4)
    try:
        # Meanwhile, the single-process reference on this process's 8 devices.
        ref_out = tmp_path / "single.npz"
        train_worker.main(["--out", str(ref_out), "--steps", str(STEPS)])
        logs = []
        for p in procs:
            stdout, _ = p.communicate(timeout=TIMEOUT_S)
            logs.append(stdout.decode(errors="replace")[-3000:])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log
    got, expected = np.load(out), np.load(ref_out)
    assert (int(got["__process_count"]), int(got["__device_count"])) == (2, 8)
    assert (int(expected["__process_count"]), int(expected["__device_count"])) == (1, 8)
    params = [k for k in expected.files if not k.startswith("__")]
    assert sorted(got.files) == sorted(expected.files)
    for name in params:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # The run did train: parameters moved away from their initial values.
    init = train_worker.flat_params(train_worker.init_state().params)
    assert any(not np.allclose(init[k], expected[k], rtol=1e-3) for k in params)


@pytest.mark.parametrize(
    "env, match",
    [
        ({"ISOMAX_COORDINATOR_ADDRESS": "127.0.0.1:1"}, "must be given together"),
        (
            {
                "ISOMAX_COORDINATOR_ADDRESS": "127.0.0.1:1",
                "ISOMAX_NUM_PROCESSES": "2",
                "ISOMAX_PROCESS_ID": "2",
            },
            r"process_id must be in \[0, 2\), got 2",
        ),
    ],
)
def test_incomplete_distributed_config_is_rejected(env, match):
    from isomax_jax import distributed

    with pytest.raises(ValueError, match=match):
        distributed.initialize(env=env)


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, False),
        ({"SLURM_NTASKS": "1"}, False),
        ({"SLURM_NTASKS": "4"}, True),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
        ({"TPU_WORKER_HOSTNAMES": "host0"}, False),
        ({"TPU_WORKER_HOSTNAMES": "host0,host1"}, True),
    ],
)
def test_cluster_launchers_are_detected(env, expected):
    from isomax_jax import distributed

    assert distributed._cluster_detected(env) is expected


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_saved_step_and_they_resume(tmp_path):
    workdir, out = tmp_path / "run", tmp_path / "resumed.npz"
    # Periodic checkpoints off: the preemption's save is the only one.
    common = ["--steps", "60", "--workdir", str(workdir), "--save-every", "1000"]
    procs = _launch(out, 2, 4, *common, "--step-delay", "0.1")
    try:
        outputs = [_Output(p) for p in procs]
        outputs[1].wait_for("step 10")
        procs[1].send_signal(signal.SIGTERM)
        sent = time.monotonic()
        returncodes = [p.wait(timeout=TIMEOUT_S) for p in procs]
        exit_s = time.monotonic() - sent
    finally:
        _reap(procs)
    logs = [o.text() for o in outputs]
    print(f"\nSIGTERM to process 1 of 2: both exited {returncodes} within {exit_s:.1f} s")
    assert returncodes == [PREEMPTED, PREEMPTED], logs
    assert exit_s < 60  # the bound (measured: a few seconds)
    steps = [int(re.search(r"^preempted at step (\d+)$", log, re.M).group(1)) for log in logs]
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[0] == steps[1] and saved == [steps[0]] and 10 <= steps[0] < 60, (steps, saved)

    procs = _launch(out, 2, 4, *common)
    try:
        for p in procs:
            stdout, _ = p.communicate(timeout=TIMEOUT_S)
            assert p.returncode == 0, stdout.decode(errors="replace")[-3000:]
    finally:
        _reap(procs)
    reference = tmp_path / "single.npz"
    train_worker.main(["--out", str(reference), "--steps", "60"])
    got, expected = np.load(out), np.load(reference)
    for name in (k for k in expected.files if not k.startswith("__")):
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


# A dead process is noticed after the heartbeat timeout; the bound adds a generous margin for a
# loaded 2-core machine (measured: about 1 s over the timeout).
HEARTBEAT_S = 5
DEAD_PEER_BOUND_S = HEARTBEAT_S + 45


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0], ids=["worker dies", "coordinator dies"])
def test_when_a_process_dies_the_other_exits_within_the_heartbeat_timeout(tmp_path, victim):
    timeouts = {"ISOMAX_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_S),
                "ISOMAX_SHUTDOWN_TIMEOUT_S": str(HEARTBEAT_S)}  # fmt: skip
    args = ["--steps", "100000", "--step-delay", "0.05", "--kill-after", "10"]
    procs = _launch(tmp_path / "x.npz", 2, 4, *args, "--kill-process", str(victim), env=timeouts)
    survivor = procs[1 - victim]
    try:
        outputs = [_Output(p) for p in procs]
        assert procs[victim].wait(timeout=TIMEOUT_S) == -signal.SIGKILL
        dead = time.monotonic()
        returncode = survivor.wait(timeout=TIMEOUT_S)
        exit_s = time.monotonic() - dead
    finally:
        _reap(procs)
    log = outputs[1 - victim].text()
    print(
        f"\nprocess {victim} killed: process {1 - victim} exited {returncode} after {exit_s:.1f} s"
    )
    assert returncode != 0, log[-3000:]
    assert exit_s < DEAD_PEER_BOUND_S, log[-3000:]
    if victim == 1:  # JAX names the task that stopped sending heartbeats
        named = r"Task 1 heartbeat timeout|stopped sending heartbeats\):\s*1\b"
    else:  # the coordinator (process 0) holds the service: the others lose it at once
        named = r"coordination service"
    assert re.search(named, log), log[-3000:]


def test_timeouts_are_checked():
    from isomax_jax import distributed

    base = {"ISOMAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "ISOMAX_NUM_PROCESSES": "1",
            "ISOMAX_PROCESS_ID": "0"}  # fmt: skip
    assert distributed.initialize(env={**base, "ISOMAX_HEARTBEAT_TIMEOUT_S": "7"}) is False
    with pytest.raises(ValueError, match="ISOMAX_HEARTBEAT_TIMEOUT_S must be a whole number"):
        distributed.initialize(env={**base, "ISOMAX_HEARTBEAT_TIMEOUT_S": "soon"})
    with pytest.raises(ValueError, match=r"shutdown_timeout_s must be a positive int .*got 0"):
        distributed.initialize(env=base, shutdown_timeout_s=0)
    with pytest.raises(ValueError, match=r"ISOMAX_SHUTDOWN_TIMEOUT_S must be a positive int"):
        distributed.initialize(env={**base, "ISOMAX_SHUTDOWN_TIMEOUT_S": "-3"})
