"""Checkpoints you can trust: Orbax checkpoints with content fingerprints, run metadata, a lock.

A run directory looks like::

    workdir/run.json                         config, seed, versions, device layout (per start)
    workdir/.lock                            held while a process works in the directory
    workdir/checkpoints/<step>/state         the TrainState arrays (Orbax ``StandardSave``)
    workdir/checkpoints/<step>/fingerprint   sha256 of every array (JSON), saved with them
    workdir/corrupted_checkpoints/<step>     checkpoints found damaged, moved aside (never deleted)

What is guaranteed (see ``docs/reliability.md``):

* **Fingerprints.** :meth:`RunCheckpointer.save` hashes every array (bytes, dtype and shape)
  and writes the digests as a second item of the same Orbax step, committed atomically with the
  arrays. :meth:`RunCheckpointer.restore_latest` recomputes them on the restored arrays: a
  truncated or zero-length file, a deleted ``_METADATA``, a missing item or a few bytes
  overwritten inside an array file (which Orbax itself restores without a word) are all caught.
* **Fallback, never a silent fresh start.** A damaged checkpoint is reported with
  ``logging.warning`` (step and reason), moved to ``corrupted_checkpoints/`` so the resumed run
  can save that step again, and the newest intact one is restored. If checkpoints exist but none
  is intact, :class:`CheckpointCorruptedError` is raised.
* **One process per run directory.** :func:`workdir_lock` holds an exclusive, non-blocking
  ``flock`` on ``workdir/.lock``; a second process fails at once, naming the directory and the
  holder's PID and host. In a multi-host run only process 0 takes it (see :func:`workdir_lock`).
* **Run metadata.** :func:`write_run_metadata` refuses to mix two runs in one directory and
  names every setting that differs.

Every process of a multi-host run calls the same :class:`RunCheckpointer` methods (Orbax
coordinates the writes); only process 0 writes ``run.json`` and moves damaged checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import pathlib
import platform
import threading
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from isomax_jax import distributed

RUN_METADATA = "run.json"
LOCK_FILE = ".lock"
CHECKPOINTS = "checkpoints"
CORRUPTED = "corrupted_checkpoints"
FINGERPRINT_FORMAT = "isomax_jax.checkpoint_fingerprint/1"

_STATE_FIELDS = ("step", "params", "batch_stats", "opt_state", "rng")
_VERSIONED = ("isomax_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")

log = logging.getLogger(__name__)


class CheckpointCorruptedError(RuntimeError):
    """Checkpoints exist in a run directory but none of them is intact."""


class WorkdirLockedError(RuntimeError):
    """Another process holds the run directory's lock."""


# --------------------------------------------------------------------------------------------
# Versions and run metadata
# --------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    """Versions of Python and of the packages a run depends on (distribution names as keys).

    The one record of versions in the package: ``run.json`` and the experiment report use it.

    Example:
      >>> sorted(versions())[:3]
      ['flax', 'isomax_jax', 'jax']
    """
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            module = name.replace("-", ".")
            try:  # a source checkout that is not installed
                out[name] = str(importlib.import_module(module).__version__)
            except (ImportError, AttributeError):
                out[name] = "not installed"
    return out


def _config_to_dict(config: Any) -> Any:
    if config is None:
        return None
    if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
        return config.to_dict()
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"config must be a ConfigDict, dataclass or mapping, got {type(config)}")


_ABSENT = "<absent>"


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out = {}
        for key in sorted(value, key=str):
            out.update(_flat(value[key], f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def config_differences(
    recorded: Mapping[str, Any] | None, config: Any, *, ignore_keys: Collection[str] = ()
) -> list[tuple[str, Any, Any]]:
    """``(key, recorded, current)`` for every setting where ``config`` differs from a recorded one.

    ``config`` is normalised as :func:`write_run_metadata` stores it (JSON types; other values as
    their ``str``); nested mappings are compared leaf by leaf under dotted keys; top-level
    ``ignore_keys`` are left out; a side without the key reads ``"<absent>"``. Sorted by key.

    Example:
      >>> config_differences({"lr": 0.1, "opt": {"m": 0.9}}, {"lr": 0.2, "opt": {"m": 0.9}})
      [('lr', 0.1, 0.2)]
    """
    ignored = set(ignore_keys)

    def leaves(values: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in values.items():
            if key not in ignored:
                out.update(_flat(value, str(key)))
        return out

    old = leaves(dict(recorded or {}))
    new = leaves(json.loads(json.dumps(_config_to_dict(config), default=str)))
    return [
        (key, old.get(key, _ABSENT), new.get(key, _ABSENT))
        for key in sorted(set(old) | set(new))
        if old.get(key, _ABSENT) != new.get(key, _ABSENT)
    ]


def write_run_metadata(
    workdir: str | pathlib.Path,
    *,
    config: Any,
    seed: int,
    ignore_keys: Collection[str] = (),
) -> dict[str, Any]:
    """Records config, seed, versions and device layout in ``workdir/run.json``.

    A resumed run appends a new entry to ``starts`` (versions and layout may change between
    starts). A ``config`` or ``seed`` different from the recorded one raises ``ValueError``
    naming every differing key with both values.

    Args:
      workdir: the run directory (created if needed).
      config: ``ml_collections.ConfigDict``, dataclass or mapping (stored as JSON; values that are
        not JSON types are stored as their ``str``).
      seed: the run's seed.
      ignore_keys: top-level config keys that may differ from the recorded ones (settings that
        do not change what is trained, e.g. evaluation options or data locations); a start that
        changes them records the new values in its ``starts`` entry under ``config_changes``.

    Returns:
      The metadata dict (as written by process 0).

    Example:
      >>> import tempfile
      >>> meta = write_run_metadata(tempfile.mkdtemp(), config={"lr": 0.1}, seed=0)
      >>> meta["config"], meta["seed"], len(meta["starts"])
      ({'lr': 0.1}, 0, 1)
    """
    workdir = pathlib.Path(workdir)
    path = workdir / RUN_METADATA
    config_dict = json.loads(json.dumps(_config_to_dict(config), default=str))
    start = {
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "versions": versions(),
        "device_layout": distributed.device_layout(),
        "host": platform.node(),
    }
    if path.exists():
        meta = json.loads(path.read_text())
        recorded_config = dict(meta.get("config") or {})
        ignored = set(ignore_keys)
        changes = {
            k: config_dict.get(k)
            for k in sorted(ignored & (set(recorded_config) | set(config_dict)))
            if recorded_config.get(k) != config_dict.get(k)
        }
        if changes:
            start["config_changes"] = changes
        differences = config_differences(recorded_config, config_dict, ignore_keys=ignored)
        diff = [f"config.{key}: {old!r} -> {new!r}" for key, old, new in differences]
        if meta.get("seed", _ABSENT) != seed:
            diff.append(f"seed: {meta.get('seed', _ABSENT)!r} -> {seed!r}")
        if diff:
            raise ValueError(
                f"{path} records a different run; {len(diff)} setting(s) differ (recorded -> "
                "now):\n  " + "\n  ".join(diff) + "\nUse a fresh workdir for a different run, "
                f"or rerun with the recorded config and seed (in {path}) to resume this one."
            )
        meta["starts"].append(start)
    else:
        meta = {"config": config_dict, "seed": seed, "starts": [start]}
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
        tmp.replace(path)
    return meta


# --------------------------------------------------------------------------------------------
# Workdir lock
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------


def _host_array(x: Any) -> np.ndarray | None:
    """The bytes to hash: a host copy, or None for an array sharded across processes."""
    if isinstance(x, jax.Array):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if not x.is_fully_addressable:
            if not x.is_fully_replicated:
                return None
            x = x.addressable_data(0)
    array = np.asarray(x)
    return array if array.flags.c_contiguous else array.copy(order="C")


def fingerprint(items: Any) -> dict[str, Any]:
    """sha256 of every leaf of a pytree of arrays: ``{"leaves": {path: {dtype, shape, sha256}}}``.

    Arrays sharded across processes (not fully replicated) cannot be hashed on one host; their
    ``sha256`` is ``None`` and they are not verified.
    """
    leaves = {}
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(items):
        array = _host_array(leaf)
        entry = {"dtype": None, "shape": None, "sha256": None}
        if array is not None:
            digest = hashlib.sha256(array.dtype.str.encode() + str(array.shape).encode())
            digest.update(memoryview(array.reshape(-1).view(np.uint8)))
            entry = {"dtype": array.dtype.name, "shape": list(array.shape)}
            entry["sha256"] = digest.hexdigest()
        leaves[jax.tree_util.keystr(key_path)] = entry
    return {"format": FINGERPRINT_FORMAT, "algorithm": "sha256", "leaves": leaves}


def _mismatches(saved: Mapping[str, Any], restored: Mapping[str, Any]) -> list[str]:
    if not isinstance(saved, Mapping) or saved.get("format") != FINGERPRINT_FORMAT:
        return [f"fingerprint has an unknown format ({str(saved)[:80]})"]
    want, got = saved["leaves"], restored["leaves"]
    problems = [f"{k}: not in the checkpoint" for k in sorted(set(got) - set(want))]
    problems += [f"{k}: not restored" for k in sorted(set(want) - set(got))]
    for key in sorted(set(want) & set(got)):
        a, b = want[key], got[key]
        if a["sha256"] is None or b["sha256"] is None:
            continue
        if (a["dtype"], a["shape"]) != (b["dtype"], b["shape"]):
            problems.append(f"{key}: saved {a['dtype']}{a['shape']}, got {b['dtype']}{b['shape']}")
        elif a["sha256"] != b["sha256"]:
            problems.append(f"{key}: content differs from what was saved")
    return problems


# --------------------------------------------------------------------------------------------
# Checkpointer
# --------------------------------------------------------------------------------------------


def _state_items(state: Any) -> dict[str, Any]:
    return {name: getattr(state, name) for name in _STATE_FIELDS}


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


class RunCheckpointer:
    """Orbax checkpoints of a :class:`isomax_jax.train.TrainState`, fingerprinted and verified.

    Saving every N steps and keeping the last K are Orbax's own ``CheckpointManager`` options
    (``save_decision_policy`` with ``FixedIntervalPolicy``, rather than ``save_interval_steps``,
    which adds an unrequested save at the first step of a fresh run; ``max_to_keep``). See the
    module docstring for what :meth:`save` and :meth:`restore_latest` guarantee. Wrap the run
    in :func:`workdir_lock` so that no second process uses the same directory.

    Args:
      workdir: the run directory; checkpoints go to ``workdir/checkpoints``.
      save_every_steps: :meth:`save` writes at steps that are multiples of this (and with
        ``force=True``, e.g. at the end of training).
      keep: how many checkpoints to keep (the oldest are deleted by Orbax).
      async_save: write in a background thread (call :meth:`close` or :meth:`wait` at the end).

    Example:
      >>> import tempfile
      >>> ckpt = RunCheckpointer(tempfile.mkdtemp(), save_every_steps=10)
      >>> ckpt.latest_step() is None
      True
      >>> ckpt.close()
    """

    def __init__(
        self,
        workdir: str | pathlib.Path,
        *,
        save_every_steps: int,
        keep: int = 2,
        async_save: bool = True,
    ):
        for name, value in (("save_every_steps", save_every_steps), ("keep", keep)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.workdir = pathlib.Path(workdir).absolute()
        self.directory = self.workdir / CHECKPOINTS
        self.save_every_steps = save_every_steps
        policy = checkpoint_managers.AnySavePolicy(
            [
                checkpoint_managers.FixedIntervalPolicy(save_every_steps),
                checkpoint_managers.PreemptionCheckpointingPolicy(),
            ]
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                save_decision_policy=policy,
                enable_async_checkpointing=async_save,
            ),
        )

    def latest_step(self) -> int | None:
        """Step of the newest checkpoint on disk, or ``None``.

        Its integrity is checked only by :meth:`restore_latest`, which may fall back to an older
        step: read the restored ``state.step`` for the step actually restored.
        """
        return self._manager.latest_step()

    def save(self, state: Any, *, force: bool = False) -> bool:
        """Saves ``state`` at ``int(state.step)`` if it is a multiple of N (or ``force``).

        The arrays may live on devices or be host copies (``jax.device_get(state)``). Their
        fingerprint is computed here, before the (possibly asynchronous) write.

        Returns:
          Whether a checkpoint was started (never for a step that is already saved).
        """
        step = int(state.step)
        if step in self._manager.all_steps():
            return False
        if not force and not self._manager.should_save(step):
            return False
        items = _state_items(state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(items),
            fingerprint=ocp.args.JsonSave({**fingerprint(items), "step": step}),
        )
        return self._manager.save(step, args=args, force=True)

    def _restore_verified(self, step: int, state: Any) -> Any:
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_items(state))
        step_dir = self.directory / str(step)
        if (step_dir / "default").is_dir() and not (step_dir / "state").exists():
            items = ocp.StandardCheckpointer().restore(step_dir / "default", target)
            log.warning(
                "checkpoint %s was written before checkpoints carried fingerprints: restored "
                "without verification",
                step_dir,
            )
            return state.replace(**items)
        if not (step_dir / "fingerprint").is_dir():
            raise FileNotFoundError(f"its fingerprint item {step_dir / 'fingerprint'} is missing")
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), fingerprint=ocp.args.JsonRestore()
            ),
        )
        items, saved = restored["state"], restored["fingerprint"]
        problems = _mismatches(saved, fingerprint(items))
        if not problems and int(np.asarray(_host_array(items["step"]))) != step:
            problems = [f"it holds step {int(np.asarray(_host_array(items['step'])))}"]
        if problems:
            shown = "; ".join(problems[:5])
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ValueError(f"fingerprint mismatch: {shown}{more}")
        return state.replace(**items)

    def _steps_on_disk(self) -> list[int]:
        """Orbax's steps and any other integer-named folder (a checkpoint Orbax cannot list)."""
        steps = set(self._manager.all_steps())
        if self.directory.is_dir():
            steps |= {int(p.name) for p in self.directory.iterdir() if p.name.isdigit()}
        return sorted(steps, reverse=True)

    def _set_aside(self, steps: list[int]) -> None:
        """Moves damaged checkpoints to ``corrupted_checkpoints/`` so their steps can be saved
        again (process 0; the others wait)."""
        if jax.process_index() == 0:
            target = self.workdir / CORRUPTED
            for step in steps:
                stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
                try:
                    target.mkdir(exist_ok=True)
                    (self.directory / str(step)).rename(target / f"{step}.{stamp}")
                except OSError as e:
                    log.warning("could not move damaged checkpoint %d aside: %s", step, e)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("isomax_jax.checkpointing.set_aside")
        self._manager.reload()

    def restore_latest(self, state: Any) -> Any:
        """``state`` with the arrays of the newest intact checkpoint (``state`` itself if none).

        ``state`` supplies the structure, the static fields (model, optimiser, loss) and the
        shardings of the restored arrays; it may be abstract (``jax.ShapeDtypeStruct`` leaves with
        shardings), e.g. for an evaluation that restores without initialising. Each candidate,
        newest first, is restored and its fingerprint verified; a damaged one is reported with
        ``logging.warning`` and moved aside (see the module doc).

        Raises:
          CheckpointCorruptedError: checkpoints exist but none is intact (the run must not
            silently start again from scratch).
        """
        steps = self._steps_on_disk()
        failures: list[tuple[int, str]] = []
        for step in steps:
            try:
                restored = self._restore_verified(step, state)
            except Exception as e:  # any damage: reported, then the previous checkpoint
                failures.append((step, _reason(e)))
                log.warning(
                    "checkpoint at step %d in %s is not intact (%s); trying the one before it",
                    step, self.directory, failures[-1][1],
                )  # fmt: skip
                continue
            if failures:
                log.warning(
                    "resuming from step %d, the newest intact checkpoint in %s; damaged ones "
                    "(steps %s) are moved to %s",
                    step, self.directory, [s for s, _ in failures], self.workdir / CORRUPTED,
                )  # fmt: skip
                self._set_aside([s for s, _ in failures])
            return restored
        if failures:
            listed = "\n  ".join(f"step {s}: {r}" for s, r in failures)
            raise CheckpointCorruptedError(
                f"none of the {len(failures)} checkpoint(s) in {self.directory} is intact:\n  "
                f"{listed}\nRefusing to start from scratch over them. Restore them from a backup, "
                f"or move {self.directory} away to train again from step 0."
            )
        return state

    def wait(self) -> None:
        """Blocks until background saves are written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.close()
