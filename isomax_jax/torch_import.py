"""PyTorch ``state_dict`` <-> Flax variables for :func:`isomax_jax.models.get_model` models.

Key names are those of the reference PyTorch models (``conv1.weight``,
``layer1.0.bn1.running_mean``, ``block1.layer.0.conv1.weight``, ``classifier.prototypes``, ...).
The Flax module tree mirrors them: the backbone lives under ``backbone`` (no torch prefix), the
head under ``classifier``, and a torch path component ``.<index>`` is the suffix ``_<index>`` of a
Flax module name (``layer1.0`` ↔ ``layer1_0``). Leaves map as:

=====================================  ========================================================
PyTorch                                Flax
=====================================  ========================================================
conv ``weight`` ``[O, I, kh, kw]``     ``params/.../kernel`` ``[kh, kw, I, O]``
``nn.Linear`` ``weight`` ``[O, I]``    ``params/.../kernel`` ``[I, O]`` (``nn.Dense``)
``classifier.weights`` ``[C, D]``      ``params/classifier/kernel`` ``[D, C]`` of the SoftMax
                                       head (``SoftMaxHead`` as the model's ``classifier``)
conv / linear ``bias``                 ``params/.../bias``
BN ``weight`` / ``bias``               ``params/.../scale`` / ``bias``
BN ``running_mean`` / ``running_var``  ``batch_stats/.../mean`` / ``var``
BN ``num_batches_tracked``             dropped (written as 0)
``classifier.prototypes``,             same names
``classifier.distance_scale``
``classifier.temperature``             checked against the head's ``temperature``
=====================================  ========================================================

Which head a file holds. Every reference head (``robust_deep_learning`` 0.5.0) stores
``classifier.temperature``; besides it, SoftMax stores ``weights`` and ``bias``, IsoMax
``prototypes``, and IsoMax+ and DisMax both ``prototypes`` and ``distance_scale`` with the same
shapes. So a file saved by PyTorch tells SoftMax and IsoMax from the others by its keys, but not
IsoMax+ from DisMax: it loads into either, and naming the head is up to the caller. What this
library writes (:func:`to_torch_state_dict`, :func:`save_torch_checkpoint`) records the head,
``state_dict._metadata[""]["isomax_jax"] == {"head": name}``, in the metadata that PyTorch's own
``state_dict()`` carries: ``torch.save`` keeps it, the reference model's ``load_state_dict``
ignores it, and loading it into a model with another head raises ``ValueError``. (Copying the
mapping into a plain ``dict`` drops the record.)

Torch is imported only to read and write files. Files are read with ``weights_only=True``
(torch >= 2.5), admitting tensors, plain containers and NumPy arrays of bool, integer and
float16/32/64 dtypes, so ``torch.save(to_torch_state_dict(...))`` reads back as well as
:func:`save_torch_checkpoint`'s tensors; a pickle that would run code is refused, never run.

Nothing questionable is imported silently: an empty, truncated or corrupted file raises
``ValueError`` naming the file; a weight that is not a real floating-point array, ``TypeError``
naming the key and the file; weights holding NaN or inf, ``ValueError`` listing the keys (unless
``allow_non_finite=True``). bfloat16 and float16 weights widen exactly to float32.
"""

from __future__ import annotations

import collections
import os
import re
from collections.abc import Mapping
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from isomax_jax import heads
from isomax_jax.models.classifier import SoftMaxHead

_INDEXED = re.compile(r"^(.*)_(\d+)$")
_MAX_LISTED = 25
_RECORD = "isomax_jax"  # state_dict._metadata[""][_RECORD] = {"head": name}
_HEAD_TYPES = {
    "softmax": SoftMaxHead,
    "isomax": heads.IsoMaxHead,
    "isomax_plus": heads.IsoMaxPlusHead,
    "dismax": heads.DisMaxHead,
}


def _torch_module_path(flax_path: tuple[str, ...]) -> list[str]:
    parts: list[str] = []
    for name in flax_path:
        match = _INDEXED.match(name)
        parts.extend([match.group(1), match.group(2)] if match else [name])
    return parts


def _torch_name(
    collection: str, path: tuple[str, ...], ndim: int, softmax_head: bool
) -> tuple[str, str]:
    """``(torch key, kind)`` for a Flax leaf; kind says how to convert the array."""
    *modules, leaf = path
    if modules and modules[0] == "backbone":
        modules = modules[1:]
    if collection == "batch_stats":
        leaf, kind = {"mean": ("running_mean", "copy"), "var": ("running_var", "copy")}[leaf]
    elif leaf == "kernel" and ndim == 4:
        leaf, kind = "weight", "conv"
    elif leaf == "kernel" and ndim == 2:  # the reference SoftMax head says `weights`
        leaf = "weights" if softmax_head and path == ("classifier", "kernel") else "weight"
        kind = "linear"
    elif leaf == "scale":
        leaf, kind = "weight", "copy"
    else:
        kind = "copy"  # bias, prototypes, distance_scale
    return ".".join([*_torch_module_path(tuple(modules)), leaf]), kind


def _torch_keys(
    model: nn.Module, variables: Mapping[str, Any]
) -> dict[str, tuple[str, tuple[str, ...], str, Any]]:
    """torch key -> (collection, Flax path, kind, leaf) for every params/batch_stats leaf."""
    softmax_head = _head_name(model) == "softmax"
    keys = {}
    for collection in ("params", "batch_stats"):
        leaves = jax.tree_util.tree_leaves_with_path(variables.get(collection, {}))
        for key_path, leaf in leaves:
            path = tuple(k.key for k in key_path)
            torch_key, kind = _torch_name(collection, path, len(np.shape(leaf)), softmax_head)
            if torch_key in keys:
                raise ValueError(f"two Flax variables map to the torch key {torch_key!r}")
            keys[torch_key] = (collection, path, kind, leaf)
    return keys


def _to_numpy(value: Any, key: str, source: str) -> np.ndarray:
    """A private real floating-point copy, at least float32 (narrower floats widen exactly).

    A copy: converted weights must not alias (and follow) the caller's tensors.
    """
    try:
        if hasattr(value, "detach"):  # a torch.Tensor; avoids importing torch here
            tensor = value.detach().cpu()
            if tensor.is_floating_point() and tensor.dtype.itemsize < 4:
                tensor = tensor.float()  # bfloat16 (no NumPy dtype), float16, float8: exact
            value = tensor.numpy()
        array = np.array(value, copy=True)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"cannot convert {key!r} in {source} to an array ({type(err).__name__}: {err})"
        ) from err
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(
            f"{key!r} in {source} has dtype {array.dtype}; expected a real floating-point array."
        )
    return array.astype(np.float32) if array.dtype.itemsize < 4 else array


def _torch_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "conv":
        kh, kw, cin, cout = shape
        return (cout, cin, kh, kw)
    if kind == "linear":
        return (shape[1], shape[0])
    return shape


def _from_torch(kind: str, array: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return array.transpose(2, 3, 1, 0)
    if kind == "linear":
        return array.T
    return array


def _head_name(model: nn.Module) -> str | None:
    """``softmax``, ``isomax``, ``isomax_plus`` or ``dismax`` for a known ``model.classifier``."""
    head = getattr(model, "classifier", None)
    return next((n for n, t in _HEAD_TYPES.items() if isinstance(head, t)), None)


def _recorded_head(state_dict: Mapping[str, Any], source: str) -> str | None:
    """The head recorded by :func:`to_torch_state_dict`, or None (a reference file)."""
    metadata = getattr(state_dict, "_metadata", None)
    root = metadata.get("") if isinstance(metadata, Mapping) else None
    record = root.get(_RECORD) if isinstance(root, Mapping) else None
    if record is None:
        return None
    head = record.get("head") if isinstance(record, Mapping) else None
    if head not in _HEAD_TYPES:
        raise ValueError(
            f"{source} carries an isomax_jax record {record!r} that names no known head "
            f"(expected {{'head': one of {list(_HEAD_TYPES)}}})."
        )
    return head


def _head_temperature(model: nn.Module) -> float | None:
    head = getattr(model, "classifier", None)
    temperature = getattr(head, "temperature", None)
    return None if temperature is None else float(temperature)


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f" ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"{title} ({len(items)}): {', '.join(shown)}{more}"


def _non_finite(name: str, array: np.ndarray) -> str | None:
    """``"name (k NaN, m inf of n)"`` if a floating array holds non-finite values, else None."""
    if not np.issubdtype(array.dtype, np.floating):
        return None
    nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
    return f"{name} ({nan} NaN, {inf} inf of {array.size})" if nan or inf else None


def convert_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    *,
    image_shape: tuple[int, int, int] = (32, 32, 3),
    allow_non_finite: bool = False,
) -> dict[str, chex.ArrayTree]:
    """Converts a reference PyTorch ``state_dict`` into ``{"params", "batch_stats"}`` for ``model``.

    Args:
      model: a model from :func:`isomax_jax.models.get_model` (any module whose tree mirrors
        the torch keys as described in the module docstring).
      state_dict: torch key -> tensor (or array) of a real floating dtype; bfloat16 and float16
        are widened exactly. A ``module.`` prefix on every key (saved from ``nn.DataParallel``)
        is removed.
      image_shape: ``(height, width, channels)`` used to trace the model's variable shapes (the
        input shape without the batch axis, e.g. ``(features,)`` for a head alone).
      allow_non_finite: import weights that hold NaN or inf (refused by default: such a model
        gives NaN scores, which only surface much later).

    Returns:
      Flax variables ``{"params": ..., "batch_stats": ...}`` with jax arrays of the dtypes
      ``model.init`` gives (``float32``).

    Raises:
      ValueError: listing every missing, unexpected and mis-shaped key (torch shapes); listing
        every key with NaN/inf values (unless ``allow_non_finite``); if the checkpoint's
        ``classifier.temperature`` differs from the model head's ``temperature``; or if the
        ``state_dict`` records (module docstring) another head than the model's.
      TypeError: naming the key of a value that is not a real floating-point array.

    Example:
      >>> from isomax_jax.models import get_model
      >>> model = get_model("small_resnet", num_classes=10, head="isomax_plus")
      >>> shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
      >>> variables = jax.tree.map(jnp.ones_like, shapes)  # stands in for trained variables
      >>> state_dict = to_torch_state_dict(model, variables)  # or torch_model.state_dict()
      >>> state_dict["layer2.0.conv1.weight"].shape
      (64, 32, 3, 3)
      >>> restored = convert_state_dict(model, state_dict)
      >>> restored["params"]["backbone"]["layer2_0"]["conv1"]["kernel"].shape
      (3, 3, 32, 64)
    """
    return _convert(model, state_dict, "the state_dict", image_shape, allow_non_finite)


def _convert(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    source: str,
    image_shape: tuple[int, ...],
    allow_non_finite: bool,
) -> dict[str, chex.ArrayTree]:
    """:func:`convert_state_dict`, naming ``source`` (the state_dict or the file) in errors."""
    recorded, model_head = _recorded_head(state_dict, source), _head_name(model)
    if recorded is not None and recorded != model_head:
        has = f"the {model_head!r} head" if model_head else "no isomax_jax head"
        raise ValueError(
            f"{source} was written by isomax_jax for a model with the {recorded!r} head, but "
            f"this model has {has} ({type(getattr(model, 'classifier', None)).__name__} as its "
            f"classifier); build it with get_model(..., head={recorded!r})."
        )
    state = {str(k): v for k, v in state_dict.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}

    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_shape)))
    expected = _torch_keys(model, abstract)
    bn_prefixes = {k.rsplit(".", 1)[0] for k, v in expected.items() if v[0] == "batch_stats"}

    ignored = {f"{p}.num_batches_tracked" for p in bn_prefixes} | {"classifier.temperature"}
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected and k not in ignored)
    misshaped = []
    for torch_key, (_, _, kind, leaf) in expected.items():
        if torch_key in state:
            want = _torch_shape(kind, leaf.shape)
            got = tuple(np.shape(state[torch_key]))  # a torch.Size is a tuple
            if got != want:
                misshaped.append(f"{torch_key}: checkpoint {got}, model expects {want}")
    if missing or unexpected or misshaped:
        problems = [
            _listing(title, items)
            for title, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("mis-shaped keys", misshaped),
            )
            if items
        ]
        raise ValueError(f"{source} does not match the model:\n  " + "\n  ".join(problems))

    head_temperature = _head_temperature(model)
    if "classifier.temperature" in state and head_temperature is not None:
        temperature = _to_numpy(
            state["classifier.temperature"], "classifier.temperature", source
        ).reshape(-1)
        if temperature.size != 1 or not np.isclose(temperature[0], head_temperature, rtol=1e-6):
            raise ValueError(
                f"classifier.temperature is {temperature.tolist()} in {source} but the "
                f"model's head has temperature {head_temperature}; build the model with "
                f"get_model(..., temperature={float(temperature[0])})."
            )

    arrays = {key: _to_numpy(state[key], key, source) for key in expected}
    if not allow_non_finite:
        bad = [m for key, a in arrays.items() if (m := _non_finite(key, a)) is not None]
        if bad:
            raise ValueError(
                f"{source} holds non-finite weights (a diverged or corrupted checkpoint?); "
                + _listing("keys with NaN/inf", bad)
                + "; pass allow_non_finite=True to import them anyway."
            )
    variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
    for torch_key, (collection, path, kind, leaf) in expected.items():
        array = _from_torch(kind, arrays[torch_key])
        node = variables[collection]
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = jnp.asarray(array, dtype=leaf.dtype)
    return variables


def _numpy_safe_globals() -> list[Any]:
    """What ``torch.load(weights_only=True)`` needs for NumPy arrays of plain numeric dtypes.

    Safe: ``_reconstruct`` only builds ``ndarray`` (the one array type allowed), and an array's
    elements are unpickled by the same restricted unpickler. Object arrays can be built but are
    refused by :func:`_to_numpy`'s dtype check, and no other class is admitted.
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


def load_torch_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    image_shape: tuple[int, int, int] = (32, 32, 3),
    allow_non_finite: bool = False,
) -> dict[str, chex.ArrayTree]:
    """Loads a ``torch.save(model.state_dict(), path)`` file into Flax variables for ``model``.

    The file is read with ``torch.load(path, weights_only=True, map_location="cpu")`` with NumPy
    arrays of numeric dtypes also admitted (so ``torch.save(to_torch_state_dict(...), path)``
    loads): only tensors, arrays and plain containers are unpickled; a file whose pickle would
    call arbitrary code is refused with ``ValueError`` and nothing in it runs. A checkpoint dict
    holding the weights under ``"state_dict"`` is accepted too. A head recorded in the file by
    this library must be the model's head.

    Args:
      model: see :func:`convert_state_dict`.
      path: the ``.pth`` file.
      image_shape: see :func:`convert_state_dict`.
      allow_non_finite: see :func:`convert_state_dict`.

    Returns:
      Flax variables ``{"params", "batch_stats"}``.

    Raises:
      FileNotFoundError: ``path`` is not a file.
      ValueError: the file is empty, truncated, corrupted or not a plain weights file; its
        keys/shapes do not match; it holds NaN/inf weights (unless ``allow_non_finite``); it
        records another head than the model's. Each message names the file.
      TypeError: a weight is not a real floating-point array (naming the key and the file).
    """
    import pickle

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
    return _convert(model, state, f"the checkpoint {name!r}", image_shape, allow_non_finite)


def to_torch_state_dict(
    model: nn.Module, variables: Mapping[str, chex.ArrayTree]
) -> dict[str, np.ndarray]:
    """The inverse of :func:`convert_state_dict`: Flax variables -> reference torch keys.

    Returns an ``OrderedDict`` (as ``torch_model.state_dict()`` does) of writable, C-contiguous
    NumPy arrays that are private copies (``torch.from_numpy`` takes them without a warning and
    ``torch_model.load_state_dict`` takes the tensors), with ``num_batches_tracked`` set to 0 and
    ``classifier.temperature`` from the model's head. The model's head, when it is one of the
    four, is recorded in the mapping's ``_metadata`` (module docstring); ``torch.save`` keeps
    it, and :func:`load_torch_checkpoint` reads such a file. For a file of torch tensors, use
    :func:`save_torch_checkpoint`.

    Args:
      model: the model the variables belong to.
      variables: ``{"params", "batch_stats"}``.

    Returns:
      torch key -> array, in torch layouts (conv ``[O, I, kh, kw]``, ``nn.Linear``
      ``weight [O, I]``, reference SoftMax head ``classifier.weights [C, D]``).
    """
    state: dict[str, np.ndarray] = collections.OrderedDict()
    for torch_key, (collection, _, kind, leaf) in _torch_keys(model, variables).items():
        array = np.asarray(leaf)
        if kind == "conv":
            array = array.transpose(3, 2, 0, 1)
        elif kind == "linear":
            array = array.T
        state[torch_key] = np.array(array, order="C", copy=True)
        if collection == "batch_stats" and torch_key.endswith(".running_var"):
            state[torch_key[: -len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
    temperature = _head_temperature(model)
    if temperature is not None:
        state["classifier.temperature"] = np.asarray([temperature], np.float32)
    head = _head_name(model)
    if head is not None:
        state._metadata = {"": {_RECORD: {"head": head}}}  # type: ignore[attr-defined]
    return state


def save_torch_checkpoint(
    model: nn.Module, variables: Mapping[str, Any], path: str | os.PathLike
) -> None:
    """Writes ``variables`` as a PyTorch ``state_dict`` file of torch tensors, with the head.

    ``torch_model.load_state_dict(torch.load(path))`` loads it into the reference model, and
    :func:`load_torch_checkpoint` back into ``model`` (refusing a model with another head). The
    arrays are those of :func:`to_torch_state_dict` (bfloat16 ones stay bfloat16). The file is
    written next to ``path`` and renamed into place, so a crash never leaves half a file there.

    Args:
      model: the model the variables belong to.
      variables: ``{"params", "batch_stats"}``.
      path: the ``.pth`` file to write (replaced if it exists).
    """
    import torch

    state = to_torch_state_dict(model, variables)
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
