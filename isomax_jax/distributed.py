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

Machines that misbehave (``docs/reliability.md``):

- **Dead peers.** JAX's coordination service watches every process's heartbeat. When a process
  dies, the others are stopped by JAX itself (exit status 134, SIGABRT) once its heartbeat is
  ``heartbeat_timeout_s`` late, with a log line naming it (``The following tasks are unhealthy
  (stopped sending heartbeats): 1``); a process that ends waits at most ``shutdown_timeout_s``
  for the others. Both are arguments of :func:`initialize` (or ``ISOMAX_HEARTBEAT_TIMEOUT_S`` /
  ``ISOMAX_SHUTDOWN_TIMEOUT_S``).
- **Preemption.** :class:`PreemptionNotice` turns SIGTERM and SIGINT into a request to stop at a
  step every process agrees on (JAX's preemption sync point), after saving it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence

import jax

ENV_COORDINATOR = "ISOMAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "ISOMAX_NUM_PROCESSES"
ENV_PROCESS_ID = "ISOMAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "ISOMAX_LOCAL_DEVICE_IDS"
ENV_HEARTBEAT_TIMEOUT = "ISOMAX_HEARTBEAT_TIMEOUT_S"
ENV_SHUTDOWN_TIMEOUT = "ISOMAX_SHUTDOWN_TIMEOUT_S"
#: JAX's own defaults: a dead process is noticed after 100 s; an ending one waits 300 s.
HEARTBEAT_TIMEOUT_S = 100
SHUTDOWN_TIMEOUT_S = 300
#: Exit status of a run that stopped on SIGTERM/SIGINT after saving its state: sysexits.h's
#: EX_TEMPFAIL ("temporary failure; the user is invited to retry"). Distinct from a crash (1), a
#: refused start (2) and a process killed before it could save (143 = 128 + SIGTERM).
PREEMPTED_EXIT_CODE = 75

log = logging.getLogger(__name__)


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
    heartbeat_timeout_s: int | None = None,
    shutdown_timeout_s: int | None = None,
) -> bool:
    """Initialises multi-process JAX when the job has several processes.

    Args:
      coordinator_address: ``host:port`` of process 0 (overrides ``ISOMAX_COORDINATOR_ADDRESS``).
      num_processes: total number of processes (overrides ``ISOMAX_NUM_PROCESSES``).
      process_id: this process's index in ``[0, num_processes)`` (overrides ``ISOMAX_PROCESS_ID``).
      local_device_ids: devices this process owns (overrides ``ISOMAX_LOCAL_DEVICE_IDS``).
      env: environment to read (default ``os.environ``).
      initialization_timeout: seconds to wait for all processes to connect.
      heartbeat_timeout_s: a process whose heartbeat is this late is taken for dead and JAX stops
        the others (default ``ISOMAX_HEARTBEAT_TIMEOUT_S``, else 100, JAX's default).
      shutdown_timeout_s: how long a process that ends waits for the others to end too (default
        ``ISOMAX_SHUTDOWN_TIMEOUT_S``, else 300, JAX's default).

    Returns:
      ``True`` when ``jax.distributed.initialize`` was called, ``False`` for a single process.

    Raises:
      ValueError: an incomplete explicit configuration (e.g. a coordinator without a process id),
        or a timeout that is not a positive number of seconds.

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

    timeouts = {
        "heartbeat_timeout_seconds": _seconds(
            "heartbeat_timeout_s", heartbeat_timeout_s, env, ENV_HEARTBEAT_TIMEOUT,
            HEARTBEAT_TIMEOUT_S,
        ),
        "shutdown_timeout_seconds": _seconds(
            "shutdown_timeout_s", shutdown_timeout_s, env, ENV_SHUTDOWN_TIMEOUT, SHUTDOWN_TIMEOUT_S
        ),
    }  # fmt: skip

    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError(
                "coordinator_address, num_processes and process_id must be given together "
                f"(arguments or {ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID}); got "
                f"coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
                f"process_id={process_id!r}"
            )
        # All three were given (checked just above); pyright cannot narrow through any().
        if not 0 <= process_id < num_processes:  # pyright: ignore[reportOperatorIssue]
            raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
        if num_processes == 1:
            return False
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
            initialization_timeout=initialization_timeout,
            # Only the int timeout keywords (pyright matches **dict[str, int] to every keyword).
            **timeouts,  # pyright: ignore[reportArgumentType]
        )
        return True
    if _cluster_detected(env):
        jax.distributed.initialize(initialization_timeout=initialization_timeout, **timeouts)  # pyright: ignore[reportArgumentType]  # as above
        return True
    return False


def _seconds(name: str, value: int | None, env: Mapping[str, str], var: str, default: int) -> int:
    """A timeout argument, else its environment variable, else the default; checked."""
    source = name
    if value is None and env.get(var):
        # The variable's text, converted to an int just below.
        value, source = env[var], var  # pyright: ignore[reportAssignmentType]
        try:
            value = int(value)  # pyright: ignore[reportArgumentType]
        except ValueError:
            raise ValueError(f"{var} must be a whole number of seconds, got {env[var]!r}") from None
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{source} must be a positive int (seconds), got {value!r}")
    return value


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


# --- Preemption ---------------------------------------------------------------------------------


class Preempted(BaseException):
    """A run stopped on a preemption notice (SIGTERM/SIGINT) after saving what it had finished.

    A ``BaseException``, like ``KeyboardInterrupt``: raised by a signal handler in the middle of
    library code (e.g. tfds's builder lookup, which turns any ``Exception`` into "dataset not
    found"), it must not be caught and converted by ``except Exception`` blocks.

    Exit with :data:`PREEMPTED_EXIT_CODE` and print the message: it names the step saved (or
    says that nothing was reported) and says that the same command resumes.

    Attributes:
      step: the step saved, or None when nothing needed saving (e.g. during an evaluation).
    """

    def __init__(self, message: str, *, step: int | None = None):
        super().__init__(message)
        self.step = step


def _jax_preemption_sync() -> bool:
    """Whether JAX's preemption sync point serves this process (its distributed runtime is up,
    with the preemption service on, as by default)."""
    # A flag with a context manager: read as an attribute (``config.read`` refuses it); the
    # attribute is set at runtime, so the type checker cannot see it.
    enabled = getattr(jax.config, "jax_enable_preemption_service", True)
    return jax.distributed.is_initialized() and bool(enabled)


class PreemptionNotice:
    """SIGTERM and SIGINT as a request to stop training at a step every process agrees on.

    Inside the ``with`` block a signal no longer kills the process: the training loop asks
    :meth:`reached` after every step (every process, every step: it may be a collective), saves
    the state at the first step where it is True, and stops with :class:`Preempted`.

    * **Several processes** (after :func:`initialize`): JAX's preemption sync, the mechanism
      Orbax's ``reached_preemption`` uses. JAX's runtime catches SIGTERM itself (SIGINT is
      forwarded to it as SIGTERM) and tells every process; each keeps training until the step
      after the largest step any of them had reached, and :meth:`reached` is True there, on all
      of them alike. JAX notices the signal within about a second.
    * **One process** (nothing to agree with, and JAX's sync needs the distributed runtime):
      :meth:`reached` is True from the first step that ends after the signal.

    A second SIGINT (Ctrl-C twice) raises ``KeyboardInterrupt`` at once. The handlers can only
    be installed from the main thread; elsewhere the block runs without them (a warning says so)
    and signals keep their usual effect.

    Example:
      >>> with PreemptionNotice() as notice:
      ...     notice.reached(1)  # asked after every step; True once a signal came
      False
    """

    def __init__(self):
        self.signal_name: str | None = None  # the first signal this process received
        self._previous: dict[int, object] = {}
        self._jax_sync = False

    def __enter__(self) -> PreemptionNotice:
        if threading.current_thread() is not threading.main_thread():
            log.warning("PreemptionNotice outside the main thread: signals keep their effect")
            return self
        self._jax_sync = _jax_preemption_sync()
        # With JAX's sync, JAX's runtime owns SIGTERM (a handler installed from C++): keep it.
        wanted = (signal.SIGINT,) if self._jax_sync else (signal.SIGTERM, signal.SIGINT)
        for signum in wanted:
            if signal.getsignal(signum) is signal.SIG_IGN:
                continue  # ignored on purpose (e.g. SIGINT of a background job): left so
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            # `previous` is what signal.signal returned for signum: a valid handler.
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)  # pyright: ignore[reportArgumentType]
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        del frame
        name = signal.Signals(signum).name
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now
        self.signal_name = self.signal_name or name
        print(
            f"{name} received: finishing the step in flight, saving a checkpoint and stopping "
            "(Ctrl-C again to stop at once, without saving)",
            file=sys.stderr,
            flush=True,
        )
        if self._jax_sync and signum != signal.SIGTERM:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's runtime listens for SIGTERM

    @property
    def received(self) -> bool:
        """Whether this process received a signal (other processes may have, too)."""
        return self.signal_name is not None

    def reached(self, step: int) -> bool:
        """Whether the run is to save ``step`` and stop (call after every step, on every
        process: with several processes it is JAX's preemption sync point, a collective)."""
        if self._jax_sync:
            from orbax.checkpoint import multihost

            return multihost.reached_preemption(int(step))
        return self.received
