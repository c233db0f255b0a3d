"""Multi-host initialisation: call :func:`initialize` first thing in every process.

``jax.distributed.initialize`` must run before any other JAX call. :func:`initialize` calls it when
the job is launched as several processes and does nothing in a single-process run, so the same
entry point serves a laptop, a GPU box and a TPU pod slice:

- explicit arguments, or the environment variables ``ISOMAX_COORDINATOR_ADDRESS`` (``host:port``
  of process 0), ``ISOMAX_NUM_PROCESSES``, ``ISOMAX_PROCESS_ID`` and optionally
  ``ISOMAX_LOCAL_DEVICE_IDS`` (comma-separated), e.g. for a hand-launched CPU or GPU job;
- otherwise, under a cluster launcher JAX detects by itself (Slurm with more than one task,
  Open MPI, a multi-host Cloud TPU), ``jax.distributed.initialize()`` without arguments.

After initialisation, ``jax.devices()`` lists the devices of all processes and
``jax.local_devices()`` this process's; each process then feeds only its own shard of every batch
(:func:`isomax_jax.parallel.shard_batch`) and of the data set (``jax.process_index()`` /
``jax.process_count()``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import jax

ENV_COORDINATOR = "ISOMAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "ISOMAX_NUM_PROCESSES"
ENV_PROCESS_ID = "ISOMAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "ISOMAX_LOCAL_DEVICE_IDS"


def _cluster_detected(env: Mapping[str, str]) -> bool:
    """Whether a launcher that ``jax.distributed.initialize()`` auto-detects started > 1 task."""
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    # Multi-host Cloud TPU slices list several worker hostnames.
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    env: Mapping[str, str] | None = None,
    initialization_timeout: int = 300,
) -> bool:
    """Initialises multi-process JAX when the job has several processes.

    Args:
      coordinator_address: ``host:port`` of process 0 (overrides ``ISOMAX_COORDINATOR_ADDRESS``).
      num_processes: total number of processes (overrides ``ISOMAX_NUM_PROCESSES``).
      process_id: this process's index in ``[0, num_processes)`` (overrides ``ISOMAX_PROCESS_ID``).
      local_device_ids: devices this process owns (overrides ``ISOMAX_LOCAL_DEVICE_IDS``).
      env: environment to read (default ``os.environ``).
      initialization_timeout: seconds to wait for all processes to connect.

    Returns:
      ``True`` when ``jax.distributed.initialize`` was called, ``False`` for a single process.

    Raises:
      ValueError: an incomplete explicit configuration (e.g. a coordinator without a process id).

    Example:
      >>> initialize(env={})  # a single process: nothing to do
      False
    """
    env = os.environ if env is None else env
    coordinator_address = coordinator_address or env.get(ENV_COORDINATOR) or None
    if num_processes is None and env.get(ENV_NUM_PROCESSES):
        num_processes = int(env[ENV_NUM_PROCESSES])
    if process_id is None and env.get(ENV_PROCESS_ID):
        process_id = int(env[ENV_PROCESS_ID])
    if local_device_ids is None and env.get(ENV_LOCAL_DEVICE_IDS):
        local_device_ids = [int(i) for i in env[ENV_LOCAL_DEVICE_IDS].split(",")]

    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError(
                "coordinator_address, num_processes and process_id must be given together "
                f"(arguments or {ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID}); got "
                f"coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
                f"process_id={process_id!r}"
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
        if num_processes == 1:
            return False
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
            initialization_timeout=initialization_timeout,
        )
        return True
    if _cluster_detected(env):
        jax.distributed.initialize(initialization_timeout=initialization_timeout)
        return True
    return False


def device_layout() -> dict[str, object]:
    """A JSON-friendly description of the processes and devices of this run.

    Example:
      >>> layout = device_layout()
      >>> layout["process_count"], layout["device_count"] >= layout["local_device_count"]
      (1, True)
    """
    devices = jax.devices()
    return {
        "backend": jax.default_backend(),
        "process_count": jax.process_count(),
        "process_index": jax.process_index(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "device_kinds": sorted({d.device_kind for d in devices}),
        "devices": [
            {"id": d.id, "process_index": d.process_index, "kind": d.device_kind} for d in devices
        ],
    }
