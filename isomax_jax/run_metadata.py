"""What a run directory records about its run: ``run.json`` (config, seed, versions, layout).

:func:`write_run_metadata` writes ``workdir/run.json`` when a run starts and refuses to mix two
runs in one directory, naming every setting that differs; :func:`config_differences` is that one
comparison, also used by the experiments to check a config before anything trains;
:func:`versions` is the one record of package versions (``run.json`` and the experiment report).
In a multi-host run only process 0 writes the file. Files of a run directory are written whole
or not at all (:func:`write_json`), and a failed write is a :class:`RunDirectoryWriteError` that
names the path, the error and the free space (:func:`write_failure`). See
``docs/reliability.md``.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import shutil
from collections.abc import Collection, Mapping
from typing import Any

import jax

from isomax_jax import distributed

RUN_METADATA = "run.json"

_VERSIONED = ("isomax_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")
_ABSENT = "<absent>"


class RunDirectoryWriteError(OSError):
    """A file of a run directory (a checkpoint, ``run.json``, ...) could not be written: no
    space, a quota, permissions, a read-only or vanished directory. The message names the path,
    the error and the free space; nothing half-written is left to be read as complete."""


def _size(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def free_space(path: str | os.PathLike) -> str:
    """``"<free> free of <total> on the filesystem of <dir>"`` for the nearest existing folder of
    ``path`` (or why it is unknown).

    Example:
      >>> "free of" in free_space(".")
      True
    """
    folder = pathlib.Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        usage = shutil.disk_usage(folder)
    except OSError as e:
        return f"free space unknown ({e})"
    return f"{_size(usage.free)} free of {_size(usage.total)} on the filesystem of {folder}"


def _error_text(error: BaseException, limit: int = 600) -> str:
    """``Type: message`` on one line, led by the OS error when one is named (tensorstore's
    ``[os_error_code='28']``) and without tensorstore's spec; a long message keeps its start and
    its end."""
    text = re.sub(r"\s*\[tensorstore_spec='.*?'\]", "", " ".join(str(error).split()))
    if len(text) > limit:
        text = f"{text[: limit // 3]} [...] {text[-(2 * limit) // 3 :]}"
    text = f"{type(error).__name__}: {text}"
    code = re.search(r"os_error_code='(\d+)'", str(error))
    if code and not isinstance(error, OSError):  # an OSError says "[Errno 28] ..." itself
        text = f"{os.strerror(int(code.group(1)))} ({text})"
    return text


def write_failure(what: str, path: str | os.PathLike, error: BaseException) -> str:
    """The message of a failed write: what, where, the error and the free space.

    Example:
      >>> print(write_failure("run.json", "/r/run.json", OSError(28, "No space left")))
      could not write run.json to /r/run.json: OSError: [Errno 28] No space left (... free of ...)
    """
    return f"could not write {what} to {path}: {_error_text(error)} ({free_space(path)})"


def write_json(path: str | os.PathLike, value: Any, *, what: str | None = None) -> None:
    """Writes ``value`` as JSON to ``path`` whole or not at all (a temporary file in the same
    folder, flushed to disk, then renamed over ``path``).

    Raises:
      RunDirectoryWriteError: the write failed (no space, permissions, ...); ``path`` is left as
        it was and the temporary file is removed.
    """
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(value, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RunDirectoryWriteError(write_failure(what or path.name, path, e)) from e


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


def _as_json(config: Any) -> Any:
    """``config`` as ``run.json`` stores it: JSON types, other values as their ``str``."""
    return json.loads(json.dumps(_config_to_dict(config), default=str))


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out = {}
        for key in sorted(value, key=str):
            out.update(_flat(value[key], f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _leaf_differences(
    recorded: Mapping[str, Any] | None, config: Mapping[str, Any] | None
) -> list[tuple[str, str, Any, Any]]:
    """``(top-level key, dotted key, recorded, current)`` of every differing leaf, sorted by the
    dotted key; a side without the key reads ``"<absent>"``."""
    old, new, top = {}, {}, {}
    for side, values in ((old, recorded or {}), (new, config or {})):
        for key, value in values.items():
            leaves = _flat(value, str(key))
            side.update(leaves)
            top.update(dict.fromkeys(leaves, key))
    return [
        (top[key], key, old.get(key, _ABSENT), new.get(key, _ABSENT))
        for key in sorted(set(old) | set(new))
        if old.get(key, _ABSENT) != new.get(key, _ABSENT)
    ]


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
    return [
        (key, old, new)
        for top, key, old, new in _leaf_differences(recorded, _as_json(config))
        if top not in ignored
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
    config_dict = _as_json(config)
    start = {
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "versions": versions(),
        "device_layout": distributed.device_layout(),
        "host": platform.node(),
    }
    if path.exists():
        meta = json.loads(path.read_text())
        ignored = set(ignore_keys)
        differences = _leaf_differences(meta.get("config"), config_dict)
        changed = sorted({top for top, _, _, _ in differences if top in ignored})
        if changed:
            start["config_changes"] = {key: config_dict.get(key) for key in changed}
        diff = [
            f"config.{key}: {old!r} -> {new!r}"
            for top, key, old, new in differences
            if top not in ignored
        ]
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
        try:
            workdir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirectoryWriteError(write_failure("the run directory", workdir, e)) from e
        write_json(path, meta)
    return meta
