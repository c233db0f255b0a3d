"""One process per run directory: an exclusive, non-blocking ``flock`` on ``workdir/.lock``.

:func:`workdir_lock` holds the lock for a ``with`` block; a second process that asks for it
fails at once with :class:`WorkdirLockedError`, naming the directory and the holder's PID and
host. The kernel releases the lock when its holder exits, even on SIGKILL. In a multi-host run
only process 0 takes it. See ``docs/reliability.md``.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import platform
import threading
from collections.abc import Iterator

import jax

LOCK_FILE = ".lock"


class WorkdirLockedError(RuntimeError):
    """Another process holds the run directory's lock."""


_HELD: set[str] = set()  # directories whose lock this process holds
_HELD_GUARD = threading.Lock()


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown"
    return f"PID {info.get('pid')} on host {info.get('host')}, since {info.get('since')}"


@contextlib.contextmanager
def workdir_lock(path: str | pathlib.Path) -> Iterator[pathlib.Path]:
    """Holds an exclusive lock on a run directory for the duration of the ``with`` block.

    The lock is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``path/.lock``, which records the holder's
    PID, host and start time. A second process that asks for it fails at once with
    :class:`WorkdirLockedError` naming the directory and the holder. The kernel releases the lock
    when the holder exits, even on SIGKILL, so a stale ``.lock`` file never blocks a new run.
    Nested ``workdir_lock`` of one directory in one process are allowed.

    Multi-host runs: only ``jax.process_index() == 0`` takes the lock (call this after
    :func:`isomax_jax.distributed.initialize`); the other processes of the run share the
    directory by design. A second multi-host run on the same directory fails in its process 0.
    On network filesystems ``flock`` needs lock support (NFSv4 emulates it with ``fcntl`` locks).

    Args:
      path: the run directory (created if needed).

    Yields:
      The directory as an absolute path.

    Raises:
      WorkdirLockedError: another process holds the lock.
      OSError: the lock file cannot be created (e.g. a read-only directory).

    Example:
      >>> import tempfile
      >>> with workdir_lock(tempfile.mkdtemp()) as run_dir:
      ...     pass  # train, checkpoint, write the report
    """
    path = pathlib.Path(path).absolute()
    key = os.path.realpath(path)
    with _HELD_GUARD:
        held = key in _HELD
    if held or jax.process_index() != 0:
        yield path
        return
    path.mkdir(parents=True, exist_ok=True)
    lock_path = path / LOCK_FILE
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OSError(f"cannot create {lock_path}: the run directory must be writable ({e})") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise WorkdirLockedError(
            f"{path} is in use by another process ({holder}). Wait for it to finish, stop it, or "
            "use another workdir; two processes in one run directory would share (and "
            "overwrite) its checkpoints and logs."
        ) from None
    try:
        since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        info = json.dumps({"pid": os.getpid(), "host": platform.node(), "since": since})
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        with _HELD_GUARD:
            _HELD.add(key)
        yield path
    finally:
        with _HELD_GUARD:
            _HELD.discard(key)
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
