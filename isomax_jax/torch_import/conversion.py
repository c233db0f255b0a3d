"""The conversion itself: matching a ``state_dict`` to a model's variables, in either layout.

:func:`convert` checks every key, shape, dtype and value and builds the Flax variables;
:func:`export` is its inverse. Which layout a model uses follows from the model: its backbone's
``torch_layout`` (:func:`layout_of`). The public functions are in
:mod:`isomax_jax.torch_import`.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from isomax_jax import heads
from isomax_jax.torch_import.layout import HEAD_MODULE, Layout, to_flax, to_torch, torch_shape
from isomax_jax.torch_import.paper_layout import PAPERS
from isomax_jax.torch_import.torchvision_layout import TorchvisionLayout

_MAX_LISTED = 25
_RECORD = "isomax_jax"  # state_dict._metadata[""][_RECORD] = {"head": name}
_HEAD_TYPES = {
    "softmax": heads.SoftMaxHead,
    "isomax": heads.IsoMaxHead,
    "isomax_plus": heads.IsoMaxPlusHead,
    "dismax": heads.DisMaxHead,
}


def layout_of(model: nn.Module) -> Layout:
    """The key layout of ``model``: its backbone's (or its own) ``torch_layout``, else papers'."""
    owner = getattr(model, "backbone", model)
    name = getattr(owner, "torch_layout", PAPERS.name)
    if name == "torchvision":
        return TorchvisionLayout(owner.torch_head)
    if name != PAPERS.name:
        raise ValueError(f"{type(owner).__name__} declares an unknown torch_layout {name!r}.")
    return PAPERS


def head_name(model: nn.Module) -> str | None:
    """``softmax``, ``isomax``, ``isomax_plus`` or ``dismax`` for a known ``model.classifier``."""
    head = getattr(model, HEAD_MODULE, None)
    return next((n for n, t in _HEAD_TYPES.items() if isinstance(head, t)), None)


def head_temperature(model: nn.Module) -> float | None:
    temperature = getattr(getattr(model, HEAD_MODULE, None), "temperature", None)
    return None if temperature is None else float(temperature)


def _recorded_head(state_dict: Mapping[str, Any], source: str) -> str | None:
    """The head recorded by :func:`export`, or None (a file saved by PyTorch)."""
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


def torch_keys(
    model: nn.Module, variables: Mapping[str, Any], layout: Layout
) -> dict[str, tuple[str, tuple[str, ...], str, Any]]:
    """torch key -> (collection, Flax path, kind, leaf) for every params/batch_stats leaf."""
    head = head_name(model)
    keys = {}
    for collection in ("params", "batch_stats"):
        leaves = jax.tree_util.tree_leaves_with_path(variables.get(collection, {}))
        for key_path, leaf in leaves:
            path = tuple(k.key for k in key_path)
            torch_key, kind = layout.torch_key(collection, path, len(np.shape(leaf)), head)
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


def default_image_shape(model: nn.Module) -> tuple[int, int, int]:
    """The ViT's ``image_size`` (its position embeddings depend on it), else 32×32."""
    size = getattr(getattr(model, "backbone", model), "image_size", 32)
    return (size, size, 3)


def _check_recorded_head(model: nn.Module, recorded: str | None, source: str) -> None:
    """The head recorded in the file, if any, must be the model's."""
    model_head = head_name(model)
    if recorded is not None and recorded != model_head:
        has = f"the {model_head!r} head" if model_head else "no isomax_jax head"
        raise ValueError(
            f"{source} was written by isomax_jax for a model with the {recorded!r} head, but "
            f"this model has {has} ({type(getattr(model, HEAD_MODULE, None)).__name__} as its "
            f"classifier); build it with get_model(..., head={recorded!r})."
        )


def _check_temperature(model: nn.Module, state: Mapping[str, Any], source: str, layout) -> None:
    """A stored head temperature must be the model head's."""
    key, temperature = layout.temperature_key, head_temperature(model)
    if key in state and temperature is not None:
        stored = _to_numpy(state[key], key, source).reshape(-1)
        if stored.size != 1 or not np.isclose(stored[0], temperature, rtol=1e-6):
            raise ValueError(
                f"{key} is {stored.tolist()} in {source} but the model's head has temperature "
                f"{temperature}; build the model with get_model(..., temperature="
                f"{float(stored[0])})."
            )


def _fresh_head(model: nn.Module, abstract, images, key: jax.Array) -> dict[str, Any]:
    """The head's variables as ``model.init(key, images)`` gives them, computing only the head."""
    features = jax.eval_shape(
        lambda v, x: model.apply(v, x, method=lambda m, x: m.backbone(x)), abstract, images
    )
    zeros = jnp.zeros(features.shape, jnp.promote_types(features.dtype, jnp.float32))
    return jax.jit(lambda k: model.init(k, zeros, method=lambda m, f: m.classifier(f)))(key)


def convert(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    source: str,
    *,
    image_shape: tuple[int, ...] | None,
    allow_non_finite: bool,
    backbone_only: bool = False,
    key: jax.Array | None = None,
) -> dict[str, chex.ArrayTree]:
    """``convert_state_dict``, naming ``source`` (the state_dict or the file) in errors."""
    layout = layout_of(model)
    if backbone_only and not (hasattr(model, "backbone") and hasattr(model, HEAD_MODULE)):
        raise ValueError(
            "backbone_only=True needs a model with a `backbone` and a `classifier` (one from "
            f"isomax_jax.models.get_model); got {type(model).__name__}."
        )
    if backbone_only and key is None:
        raise ValueError("backbone_only=True needs `key`, the PRNG key that initialises the head.")
    recorded = _recorded_head(state_dict, source)
    if not backbone_only:
        _check_recorded_head(model, recorded, source)
    state = {str(k): v for k, v in state_dict.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}

    if image_shape is None:
        image_shape = default_image_shape(model)
    images = jnp.zeros((1, *image_shape))
    abstract = jax.eval_shape(model.init, jax.random.key(0), images)
    expected = torch_keys(model, abstract, layout)
    bn_prefixes = {k.rsplit(".", 1)[0] for k, v in expected.items() if v[0] == "batch_stats"}
    ignored = {f"{p}.num_batches_tracked" for p in bn_prefixes} | {layout.temperature_key}
    if backbone_only:
        expected = {k: v for k, v in expected.items() if v[1][:1] != (HEAD_MODULE,)}
        head = f"{layout.head_prefix}."
        ignored |= {k for k in state if k.startswith(head)}

    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected and k not in ignored)
    misshaped = []
    for torch_key, (_, _, kind, leaf) in expected.items():
        if torch_key in state:
            want = torch_shape(kind, leaf.shape)
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
    if not backbone_only:
        _check_temperature(model, state, source, layout)

    arrays = {k: _to_numpy(state[k], k, source) for k in expected}
    if not allow_non_finite:
        bad = [m for k, a in arrays.items() if (m := _non_finite(k, a)) is not None]
        if bad:
            raise ValueError(
                f"{source} holds non-finite weights (a diverged or corrupted checkpoint?); "
                + _listing("keys with NaN/inf", bad)
                + "; pass allow_non_finite=True to import them anyway."
            )
    variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
    for torch_key, (collection, path, kind, leaf) in expected.items():
        node = variables[collection]
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = jnp.asarray(to_flax(kind, arrays[torch_key]), dtype=leaf.dtype)
    if backbone_only:
        # backbone_only without a key was refused above.
        for collection, tree in _fresh_head(model, abstract, images, key).items():  # pyright: ignore[reportArgumentType]
            variables.setdefault(collection, {})[HEAD_MODULE] = tree[HEAD_MODULE]
    return variables


def export(model: nn.Module, variables: Mapping[str, chex.ArrayTree]) -> dict[str, np.ndarray]:
    """``to_torch_state_dict``: Flax variables -> torch keys of the model's layout."""
    layout, head = layout_of(model), head_name(model)
    state: dict[str, np.ndarray] = collections.OrderedDict()
    for torch_key, (collection, _, kind, leaf) in torch_keys(model, variables, layout).items():
        state[torch_key] = np.array(to_torch(kind, np.asarray(leaf)), order="C", copy=True)
        if collection == "batch_stats" and torch_key.endswith(".running_var"):
            state[torch_key[: -len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
    temperature = head_temperature(model)
    if temperature is not None and layout.writes_temperature(head):
        state[layout.temperature_key] = np.asarray([temperature], np.float32)
    if head is not None:
        state._metadata = {"": {_RECORD: {"head": head}}}  # type: ignore[attr-defined]
    return state
