"""What a run directory records about its run: ``run.json`` (config, seed, versions, layout).

:func:`write_run_metadata` writes ``workdir/run.json`` when a run starts and refuses to mix two
runs in one directory, naming every setting that differs; :func:`config_differences` is that one
comparison, also used by the experiments to check a config before anything trains;
:func:`versions` is the one record of package versions (``run.json`` and the experiment report).
In a multi-host run only process 0 writes the file. See ``docs/reliability.md``.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import importlib.metadata
import json
import pathlib
import platform
from collections.abc import Collection, Mapping
from typing import Any

import jax

from isomax_jax import distributed

RUN_METADATA = "run.json"

_VERSIONED = ("isomax_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")
_ABSENT = "<absent>"


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
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
        tmp.replace(path)
    return meta
