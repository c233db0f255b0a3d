"""PyTorch ``state_dict`` -> Flax variables for :func:`isomax_jax.models.get_model` models.

Key names are those of the reference PyTorch models (``conv1.weight``,
``layer1.0.bn1.running_mean``, ``block1.layer.0.conv1.weight``, ``classifier.prototypes``, ...).
The Flax module tree mirrors them: the backbone lives under ``backbone`` (no torch prefix), the
head under ``classifier``, and a torch path component ``.<index>`` is the suffix ``_<index>`` of a
Flax module name (``layer1.0`` ↔ ``layer1_0``). Leaves map as:

=======================================  ======================================================
PyTorch                                  Flax
=======================================  ======================================================
conv ``weight`` ``[O, I, kh, kw]``       ``params/.../kernel`` ``[kh, kw, I, O]``
conv / linear ``bias``                   ``params/.../bias``
BN ``weight`` / ``bias``                 ``params/.../scale`` / ``bias``
BN ``running_mean`` / ``running_var``    ``batch_stats/.../mean`` / ``var``
BN ``num_batches_tracked``               dropped
``classifier.weights`` ``[C, D]``        ``params/classifier/kernel`` ``[D, C]`` (SoftMax head)
``classifier.prototypes``,               same names
``classifier.distance_scale``
``classifier.temperature``               checked against the model's head temperature
=======================================  ======================================================

Torch is imported only by :func:`load_torch_checkpoint` (and only to read the file, with
``weights_only=True``: a pickle that tries to run code is refused, never executed).

Nothing questionable is imported silently: an empty, truncated or corrupted file raises
``ValueError`` naming the file, and weights holding NaN or inf are refused (``ValueError`` listing
the keys) unless ``allow_non_finite=True`` is passed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_INDEXED = re.compile(r"^(.*)_(\d+)$")
_MAX_LISTED = 25


def _torch_module_path(flax_path: tuple[str, ...]) -> list[str]:
    parts: list[str] = []
    for name in flax_path:
        match = _INDEXED.match(name)
        parts.extend([match.group(1), match.group(2)] if match else [name])
    return parts


def _torch_name(collection: str, path: tuple[str, ...], ndim: int) -> tuple[str, str]:
    """``(torch key, kind)`` for a Flax leaf; kind says how to convert the array."""
    *modules, leaf = path
    if modules and modules[0] == "backbone":
        modules = modules[1:]
    if collection == "batch_stats":
        leaf, kind = {"mean": ("running_mean", "copy"), "var": ("running_var", "copy")}[leaf]
    elif leaf == "kernel" and ndim == 4:
        leaf, kind = "weight", "conv"
    elif leaf == "kernel" and ndim == 2:
        leaf, kind = "weights", "linear"
    elif leaf == "scale":
        leaf, kind = "weight", "copy"
    else:
        kind = "copy"  # bias, prototypes, distance_scale
    return ".".join([*_torch_module_path(tuple(modules)), leaf]), kind


def _torch_keys(variables: Mapping[str, Any]) -> dict[str, tuple[str, tuple[str, ...], str, Any]]:
    """torch key -> (collection, Flax path, kind, leaf) for every params/batch_stats leaf."""
    keys = {}
    for collection in ("params", "batch_stats"):
        leaves = jax.tree_util.tree_leaves_with_path(variables.get(collection, {}))
        for key_path, leaf in leaves:
            path = tuple(k.key for k in key_path)
            torch_key, kind = _torch_name(collection, path, len(np.shape(leaf)))
            if torch_key in keys:
                raise ValueError(f"two Flax variables map to the torch key {torch_key!r}")
            keys[torch_key] = (collection, path, kind, leaf)
    return keys


def _to_numpy(value: Any) -> np.ndarray:
    """A private copy: converted weights must not alias (and follow) the caller's tensors."""
    if hasattr(value, "detach"):  # a torch.Tensor; avoids importing torch here
        value = value.detach().cpu().numpy()
    return np.array(value, copy=True)


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
) -> dict[str, Any]:
    """Converts a reference PyTorch ``state_dict`` into ``{"params", "batch_stats"}`` for ``model``.

    Args:
      model: a model from :func:`isomax_jax.models.get_model` (any module whose tree mirrors
        the torch keys as described in the module docstring).
      state_dict: torch key -> tensor (or array). A ``module.`` prefix on every key (saved from
        ``nn.DataParallel``) is removed.
      image_shape: ``(height, width, channels)`` used to trace the model's variable shapes.
      allow_non_finite: import weights that hold NaN or inf (refused by default: such a model
        gives NaN scores, which only surface much later).

    Returns:
      Flax variables ``{"params": ..., "batch_stats": ...}`` with ``float32`` jax arrays (the
      dtypes ``model.init`` gives).

    Raises:
      ValueError: listing every missing, unexpected and mis-shaped key (torch shapes); listing
        every key with NaN/inf values (unless ``allow_non_finite``); or if the checkpoint's
        ``classifier.temperature`` differs from the model head's ``temperature``.

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
    state = {str(k): v for k, v in state_dict.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}

    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_shape)))
    expected = _torch_keys(abstract)
    bn_prefixes = {k.rsplit(".", 1)[0] for k, v in expected.items() if v[0] == "batch_stats"}

    ignored = {f"{p}.num_batches_tracked" for p in bn_prefixes} | {"classifier.temperature"}
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected and k not in ignored)
    misshaped = []
    for torch_key, (_, _, kind, leaf) in expected.items():
        if torch_key in state:
            want = _torch_shape(kind, leaf.shape)
            got = tuple(np.shape(_to_numpy(state[torch_key])))
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
        raise ValueError("state_dict does not match the model:\n  " + "\n  ".join(problems))

    head_temperature = _head_temperature(model)
    if "classifier.temperature" in state and head_temperature is not None:
        temperature = _to_numpy(state["classifier.temperature"]).reshape(-1)
        if temperature.size != 1 or not np.isclose(temperature[0], head_temperature, rtol=1e-6):
            raise ValueError(
                f"classifier.temperature is {temperature.tolist()} in the checkpoint but the "
                f"model's head has temperature {head_temperature}; build the model with "
                f"get_model(..., temperature={float(temperature[0])})."
            )

    arrays = {key: _to_numpy(state[key]) for key in expected}
    if not allow_non_finite:
        bad = [m for key, a in arrays.items() if (m := _non_finite(key, a)) is not None]
        if bad:
            raise ValueError(
                "state_dict holds non-finite weights (a diverged or corrupted checkpoint?); "
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


def load_torch_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    image_shape: tuple[int, int, int] = (32, 32, 3),
    allow_non_finite: bool = False,
) -> dict[str, Any]:
    """Loads a ``torch.save(model.state_dict(), path)`` file into Flax variables for ``model``.

    The file is read with ``torch.load(path, weights_only=True, map_location="cpu")``: only
    tensors and plain containers are unpickled; a file whose pickle would call arbitrary code is
    refused with ``ValueError`` and nothing in it runs. A checkpoint dict holding the weights
    under ``"state_dict"`` is accepted too.

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
        keys/shapes do not match; it holds NaN/inf weights (unless ``allow_non_finite``).
    """
    import pickle

    import torch

    name = os.fspath(path)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"no PyTorch checkpoint file at {name!r}")
    if os.path.getsize(name) == 0:
        raise ValueError(f"{name!r} is empty (0 bytes): not a PyTorch checkpoint")
    try:
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
    return convert_state_dict(
        model, state, image_shape=image_shape, allow_non_finite=allow_non_finite
    )


def to_torch_state_dict(model: nn.Module, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse of :func:`convert_state_dict`: Flax variables -> reference torch keys.

    Returns NumPy arrays (wrap with ``torch.from_numpy`` to ``load_state_dict`` them), with
    ``num_batches_tracked`` set to 0 and ``classifier.temperature`` from the model's head.

    Args:
      model: the model the variables belong to.
      variables: ``{"params", "batch_stats"}``.

    Returns:
      torch key -> array, in torch layouts (conv ``[O, I, kh, kw]``, SoftMax ``weights [C, D]``).
    """
    state: dict[str, np.ndarray] = {}
    for torch_key, (collection, _, kind, leaf) in _torch_keys(variables).items():
        array = np.asarray(leaf)
        if kind == "conv":
            array = array.transpose(3, 2, 0, 1)
        elif kind == "linear":
            array = array.T
        state[torch_key] = np.ascontiguousarray(array)
        if collection == "batch_stats" and torch_key.endswith(".running_var"):
            state[torch_key[: -len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
    temperature = _head_temperature(model)
    if temperature is not None:
        state["classifier.temperature"] = np.asarray([temperature], np.float32)
    return state
