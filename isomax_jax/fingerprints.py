"""Content fingerprints of a pytree of arrays: sha256 of each leaf's bytes, dtype and shape.

:func:`fingerprint` is saved with every checkpoint (:mod:`isomax_jax.checkpointing`) and
recomputed after a restore; :func:`mismatches` names every leaf that differs, so that damage
Orbax itself does not notice (bytes overwritten inside an array file) is caught.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

FINGERPRINT_FORMAT = "isomax_jax.checkpoint_fingerprint/1"


def host_array(x: Any) -> np.ndarray | None:
    """The bytes to hash: a C-contiguous host copy of ``x`` (a PRNG key as its key data), or
    ``None`` for an array sharded across processes."""
    if isinstance(x, jax.Array):
        # jax.dtypes.issubdtype is public (documented) but missing from jax.dtypes' __all__.
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # pyright: ignore[reportPrivateImportUsage]
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
        array = host_array(leaf)
        entry = {"dtype": None, "shape": None, "sha256": None}
        if array is not None:
            digest = hashlib.sha256(array.dtype.str.encode() + str(array.shape).encode())
            # ndarray implements the buffer protocol; numpy's stubs declare __buffer__ only for
            # Python >= 3.12.
            digest.update(memoryview(array.reshape(-1).view(np.uint8)))  # pyright: ignore[reportArgumentType]
            entry = {"dtype": array.dtype.name, "shape": list(array.shape)}
            entry["sha256"] = digest.hexdigest()
        leaves[jax.tree_util.keystr(key_path)] = entry
    return {"format": FINGERPRINT_FORMAT, "algorithm": "sha256", "leaves": leaves}


def mismatches(saved: Mapping[str, Any], restored: Mapping[str, Any]) -> list[str]:
    """Every leaf where two :func:`fingerprint` s differ, one line each (empty: they agree).

    Leaves present on one side only and leaves whose dtype, shape or content differ are named;
    leaves that could not be hashed (``sha256`` ``None``) are skipped.

    Example:
      >>> a = fingerprint({"w": np.zeros(2, np.float32)})
      >>> mismatches(a, fingerprint({"w": np.ones(2, np.float32)}))
      ["['w']: content differs from what was saved"]
    """
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
