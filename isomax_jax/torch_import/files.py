"""Reading and writing PyTorch ``state_dict`` files (torch is imported only here, when called).

Files are read with ``torch.load(path, weights_only=True, map_location="cpu")`` (torch >= 2.5),
admitting tensors, plain containers and NumPy arrays of bool, integer and float16/32/64 dtypes,
so ``torch.save(to_torch_state_dict(...))`` reads back as well as tensors; a pickle that would run
code is refused, never run. An empty, truncated or corrupted file is a ``ValueError`` naming it.
Files are written next to their path and renamed into place.
"""

from __future__ import annotations

import collections
import os
import pickle
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np


def _numpy_safe_globals() -> list[Any]:
    """What ``torch.load(weights_only=True)`` needs for NumPy arrays of plain numeric dtypes.

    Safe: ``_reconstruct`` only builds ``ndarray`` (the one array type allowed), and an array's
    elements are unpickled by the same restricted unpickler. Object arrays can be built but are
    refused by the conversion's dtype check, and no other class is admitted.
    """
    reconstruct = np.zeros(()).__reduce__()[0]  # numpy.(_)core.multiarray._reconstruct
    numeric = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
    dtypes = [type(np.dtype(t)) for t in (*numeric, "float16", "float32", "float64")]
    return [
        np.ndarray,
        np.dtype,
        *dtypes,
        (reconstruct, "numpy.core.multiarray._reconstruct"),  # files written with NumPy 1.x
        (reconstruct, "numpy._core.multiarray._reconstruct"),  # NumPy 2.x
    ]


def read_state_dict(path: str | os.PathLike) -> Mapping[str, Any]:
    """The ``state_dict`` mapping in a ``torch.save`` file (or under its ``"state_dict"`` key).

    Raises:
      FileNotFoundError: ``path`` is not a file.
      ValueError: the file is empty, truncated, corrupted, not a plain weights file, or holds
        something else than a mapping; the message names the file.
    """
    import torch

    name = os.fspath(path)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"no PyTorch checkpoint file at {name!r}")
    if os.path.getsize(name) == 0:
        raise ValueError(f"{name!r} is empty (0 bytes): not a PyTorch checkpoint")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            state = torch.load(name, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refusing to load {name!r}: it is not a plain weights file "
            f"(torch.load with weights_only=True rejected it: {err})"
        ) from err
    except PermissionError:
        raise
    except Exception as err:  # torch reports damage as RuntimeError, EOFError, OSError, KeyError...
        raise ValueError(
            f"cannot read {name!r} as a PyTorch checkpoint: the file is truncated or corrupted "
            f"({type(err).__name__}: {err})"
        ) from err
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{name!r} holds a {type(state).__name__}, not a state_dict mapping.")
    return state


def write_state_dict(state: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Writes NumPy arrays as torch tensors (bfloat16 stays bfloat16), keeping ``_metadata``.

    The file is written next to ``path`` and renamed into place, so a crash never leaves half a
    file there.
    """
    import torch

    tensors = collections.OrderedDict()
    for key, array in state.items():
        if array.dtype == jnp.bfloat16:  # no NumPy dtype in torch: same bits, viewed
            tensors[key] = torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
        else:
            tensors[key] = torch.from_numpy(array)
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        tensors._metadata = metadata  # type: ignore[attr-defined]
    name = os.fspath(path)
    partial = f"{name}.partial-{os.getpid()}"
    try:
        torch.save(tensors, partial)
        os.replace(partial, name)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
