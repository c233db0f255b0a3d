"""Two processes x 4 CPU devices on loopback train like one process with 8 devices."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import train_worker

WORKER = pathlib.Path(train_worker.__file__)
ROOT = WORKER.parent.parent
STEPS = 3
TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: pathlib.Path, num_processes: int, devices_per_process: int):
    port = _free_port()
    procs = []
    for pid in range(num_processes):
        env = {
            **os.environ,
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
            "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "ISOMAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "ISOMAX_NUM_PROCESSES": str(num_processes),
            "ISOMAX_PROCESS_ID": str(pid),
        }
        cmd = [sys.executable, str(WORKER), "--out", str(out), "--steps", str(STEPS)]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    return procs


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
