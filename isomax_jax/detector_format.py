"""The saved form of a deployed detector (:class:`isomax_jax.thresholds.OODDetector`).

Two forms, both free of pickle:

* **JSON fields** (a detector without fitted arrays, e.g. a logit score): ``{"format":
  "isomax_jax.OODDetector/2", "detector": name, "hyperparameters": {...}, "threshold", "tpr",
  "convention"}``. The first version's ``{"score", "threshold", "tpr", "convention"}`` (format
  ``.../1``, logit scores only) is still read. :func:`read_fields` checks them field by field.
* **One ``.npz`` file** (any detector): the fitted arrays under ``state/<key>`` (nested keys
  joined by ``/``) and the JSON fields under ``__meta__``, read back with
  ``allow_pickle=False`` (:func:`write`, :func:`read`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from isomax_jax import detectors

FORMAT = "isomax_jax.OODDetector/2"
FORMAT_V1 = "isomax_jax.OODDetector/1"  # logit scores only: {score, threshold, tpr, convention}
_META = "__meta__"


def read_fields(data: Any) -> tuple[detectors.Detector, dict[str, Any]]:
    """The detector and the other fields (``threshold``, ``tpr``, ``convention``) of JSON data.

    Raises:
      ValueError: ``data`` is not a mapping; a required field is missing; a field is unknown or
        of the wrong type; an unknown format, detector or hyperparameter.
    """
    if not isinstance(data, Mapping):
        raise ValueError(
            f"a detector must be a JSON object / mapping of its fields; got {type(data).__name__}."
        )
    data = dict(data)
    first_version = "score" in data and "detector" not in data
    fmt = data.pop("format", FORMAT_V1 if first_version else FORMAT)
    name_field = {FORMAT: "detector", FORMAT_V1: "score"}.get(fmt)
    if name_field is None:
        raise ValueError(f"unknown detector format {fmt!r}; expected {FORMAT!r}.")
    kinds = {name_field: str, "threshold": float, "tpr": float, "convention": str}
    if fmt == FORMAT:
        kinds["hyperparameters"] = dict
    unknown = set(data) - set(kinds)
    if unknown:
        raise ValueError(f"unknown detector fields {sorted(unknown)}; expected {sorted(kinds)}.")
    missing = [k for k in (name_field, "threshold") if k not in data]
    if missing:
        raise ValueError(f"detector field(s) {missing} missing; got fields {sorted(data)}.")
    for key, value in data.items():
        kind = kinds[key]
        ok = _is_json_number(value) if kind is float else isinstance(value, kind)
        if not ok:
            expected = {float: "a number", str: "a string", dict: "an object"}[kind]
            raise ValueError(
                f"detector field {key!r} must be {expected}; got {value!r} "
                f"({type(value).__name__})."
            )
    hyperparameters = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in data.pop("hyperparameters", {}).items()
    }
    name = data.pop(name_field)
    try:
        detector = detectors.get(name, **hyperparameters)
    except ValueError as err:
        raise ValueError(f"detector field {name_field!r}: {err}") from err
    return detector, data


def write(path: str | os.PathLike, meta: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    """Writes ``meta`` (JSON fields) and the ``state`` arrays to ``path`` (``.npz``) atomically."""
    path = os.fspath(path)
    arrays = {f"state/{k}": np.asarray(v) for k, v in flatten(state).items()}
    arrays[_META] = np.asarray(json.dumps(dict(meta), sort_keys=True))
    partial = path + ".partial"
    with open(partial, "wb") as f:
        np.savez(f, **arrays)  # pyright: ignore[reportArgumentType]  # numpy's stub matches **arrays to allow_pickle
    os.replace(partial, path)


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(meta, state)`` of a file :func:`write` wrote.

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: the file is not such a file (naming it).
    """
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            contents = {k: archive[k] for k in archive.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as err:
        raise ValueError(f"{path!r} is not a saved OODDetector: {err}") from err
    if _META not in contents:
        raise ValueError(f"{path!r} is not a saved OODDetector (no {_META} entry).")
    try:
        meta = json.loads(str(contents.pop(_META)))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path!r}: its {_META} entry is not JSON: {err}") from err
    state = unflatten({k[len("state/") :]: jnp.asarray(v) for k, v in contents.items()})
    return meta, state


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": x}}`` -> ``{"a/b": x}``."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten`."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def jsonable(values: Mapping[str, Any]) -> dict[str, Any]:
    """Hyperparameters as JSON values (tuples become lists; :func:`read_fields` turns them back)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def _is_json_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
