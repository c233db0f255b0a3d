"""PyTorch ``state_dict`` <-> Flax variables for :func:`isomax_jax.models.get_model` models.

Two key layouts, chosen by the model (its backbone's ``torch_layout``), never by a flag:

* the IsoMax papers' reference models (:mod:`~isomax_jax.torch_import.paper_layout`) for the
  CIFAR backbones and any Linen model whose tree mirrors its torch twin: ``conv1.weight``,
  ``layer1.0.bn1.running_mean``, ``block1.layer.0.conv1.weight``, the head as ``classifier.*``
  (the SoftMax head's kernel as ``classifier.weights``);
* torchvision's (:mod:`~isomax_jax.torch_import.torchvision_layout`) for the ``tv_*`` backbones:
  ``torch.save(torchvision.models.resnet50().state_dict(), path)`` files, with the classifier
  ``fc.*`` (``heads.head.*`` for ``vit_b_16``) as the SoftMax head; an IsoMax-family head sits
  there too (``fc.prototypes``, ...).

In both, the backbone lives under ``backbone`` in Flax (no torch prefix) and the head under
``classifier``; leaves map as described in :mod:`~isomax_jax.torch_import.layout` (conv kernels
``[kh, kw, I, O]`` ↔ ``[O, I, kh, kw]``, linear kernels transposed, BatchNorm/LayerNorm ``scale``
↔ ``weight``, running statistics ↔ ``batch_stats``, ``num_batches_tracked`` dropped and written
as 0). A stored head ``temperature`` is checked against the model head's.

**Backbone only.** ``backbone_only=True`` loads a file's backbone into a model with any head
(e.g. torchvision's ImageNet weights under an IsoMax+ head, for fine-tuning): the file's head
keys are ignored and the head is initialised fresh, from ``key``, as ``model.init(key, images)``
would; a missing, unexpected or mis-shaped backbone key is still an error.

**Which head a file holds.** Every reference head (``robust_deep_learning`` 0.5.0) stores
``classifier.temperature``; besides it, SoftMax stores ``weights`` and ``bias``, IsoMax
``prototypes``, and IsoMax+ and DisMax both ``prototypes`` and ``distance_scale`` with the same
shapes. So a file saved by PyTorch tells SoftMax and IsoMax from the others by its keys, but not
IsoMax+ from DisMax: it loads into either, and naming the head is up to the caller. What this
library writes (:func:`to_torch_state_dict`, :func:`save_torch_checkpoint`) records the head,
``state_dict._metadata[""]["isomax_jax"] == {"head": name}``, in the metadata that PyTorch's own
``state_dict()`` carries: ``torch.save`` keeps it, the reference model's ``load_state_dict``
ignores it, and loading it into a model with another head raises ``ValueError``. (Copying the
mapping into a plain ``dict`` drops the record.)

**Files.** Torch is imported only to read and write files (:mod:`~isomax_jax.torch_import.files`).
Files are read with ``weights_only=True`` (torch >= 2.5), admitting tensors, plain containers and
NumPy arrays of bool, integer and float16/32/64 dtypes, so ``torch.save(to_torch_state_dict(...))``
reads back as well as :func:`save_torch_checkpoint`'s tensors; a pickle that would run code is
refused, never run.

Nothing questionable is imported silently: an empty, truncated or corrupted file raises
``ValueError`` naming the file; a weight that is not a real floating-point array, ``TypeError``
naming the key and the file; weights holding NaN or inf, ``ValueError`` listing the keys (unless
``allow_non_finite=True``). bfloat16 and float16 weights widen exactly to float32.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp  # noqa: F401  (doctests)
import numpy as np

from isomax_jax.torch_import import conversion, files

__all__ = [
    "convert_state_dict",
    "load_torch_checkpoint",
    "save_torch_checkpoint",
    "to_torch_state_dict",
]


def convert_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    *,
    image_shape: tuple[int, ...] | None = None,
    allow_non_finite: bool = False,
    backbone_only: bool = False,
    key: jax.Array | None = None,
) -> dict[str, chex.ArrayTree]:
    """Converts a PyTorch ``state_dict`` into ``{"params", "batch_stats"}`` for ``model``.

    Args:
      model: a model from :func:`isomax_jax.models.get_model` (any module whose tree mirrors
        the torch keys as described in the module docstring); its backbone decides the layout.
      state_dict: torch key -> tensor (or array) of a real floating dtype; bfloat16 and float16
        are widened exactly. A ``module.`` prefix on every key (saved from ``nn.DataParallel``)
        is removed.
      image_shape: ``(height, width, channels)`` used to trace the model's variable shapes (the
        input shape without the batch axis, e.g. ``(features,)`` for a head alone). Default: the
        ViT's ``image_size`` (224×224) for ``tv_vit_b_16``, else ``(32, 32, 3)`` (the ResNets'
        variables do not depend on it).
      allow_non_finite: import weights that hold NaN or inf (refused by default: such a model
        gives NaN scores, which only surface much later).
      backbone_only: load only the backbone; the state_dict's head keys (``classifier.*``,
        ``fc.*``, ``heads.head.*``) are ignored, and the model's head is initialised from
        ``key`` as ``model.init(key, images)`` initialises it (module docstring).
      key: the PRNG key that initialises the head; required with ``backbone_only``.

    Returns:
      Flax variables ``{"params": ..., "batch_stats": ...}`` with jax arrays of the dtypes
      ``model.init`` gives (``float32``).

    Raises:
      ValueError: listing every missing, unexpected and mis-shaped key (torch shapes); listing
        every key with NaN/inf values (unless ``allow_non_finite``); if the checkpoint's head
        temperature differs from the model head's ``temperature``; if the ``state_dict``
        records (module docstring) another head than the model's (not checked with
        ``backbone_only``); if ``backbone_only`` comes without ``key``.
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
    return conversion.convert(
        model,
        state_dict,
        "the state_dict",
        image_shape=image_shape,
        allow_non_finite=allow_non_finite,
        backbone_only=backbone_only,
        key=key,
    )


def load_torch_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    image_shape: tuple[int, ...] | None = None,
    allow_non_finite: bool = False,
    backbone_only: bool = False,
    key: jax.Array | None = None,
) -> dict[str, chex.ArrayTree]:
    """Loads a ``torch.save(model.state_dict(), path)`` file into Flax variables for ``model``.

    The file is read with ``torch.load(path, weights_only=True, map_location="cpu")`` with NumPy
    arrays of numeric dtypes also admitted (so ``torch.save(to_torch_state_dict(...), path)``
    loads): only tensors, arrays and plain containers are unpickled; a file whose pickle would
    call arbitrary code is refused with ``ValueError`` and nothing in it runs. A checkpoint dict
    holding the weights under ``"state_dict"`` is accepted too. A head recorded in the file by
    this library must be the model's head.

    Example (torchvision's ImageNet ResNet-50 weights, a file saved by
    ``torch.save(torchvision.models.resnet50(weights="IMAGENET1K_V2").state_dict(), path)``)::

      model = get_model("tv_resnet50", num_classes=1000, head="softmax")
      variables = load_torch_checkpoint(model, path)  # fc.* -> the SoftMax head
      model = get_model("tv_resnet50", num_classes=100, head="isomax_plus")
      variables = load_torch_checkpoint(  # fine-tuning: the backbone, a fresh IsoMax+ head
          model, path, backbone_only=True, key=jax.random.key(0))

    Args:
      model: see :func:`convert_state_dict`.
      path: the ``.pth`` file.
      image_shape: see :func:`convert_state_dict`.
      allow_non_finite: see :func:`convert_state_dict`.
      backbone_only: see :func:`convert_state_dict`.
      key: see :func:`convert_state_dict`.

    Returns:
      Flax variables ``{"params", "batch_stats"}``.

    Raises:
      FileNotFoundError: ``path`` is not a file.
      ValueError: the file is empty, truncated, corrupted or not a plain weights file; its
        keys/shapes do not match; it holds NaN/inf weights (unless ``allow_non_finite``); it
        records another head than the model's. Each message names the file.
      TypeError: a weight is not a real floating-point array (naming the key and the file).
    """
    state = files.read_state_dict(path)
    return conversion.convert(
        model,
        state,
        f"the checkpoint {os.fspath(path)!r}",
        image_shape=image_shape,
        allow_non_finite=allow_non_finite,
        backbone_only=backbone_only,
        key=key,
    )


def to_torch_state_dict(
    model: nn.Module, variables: Mapping[str, chex.ArrayTree]
) -> dict[str, np.ndarray]:
    """The inverse of :func:`convert_state_dict`: Flax variables -> torch keys.

    Returns an ``OrderedDict`` (as ``torch_model.state_dict()`` does) of writable, C-contiguous
    NumPy arrays that are private copies (``torch.from_numpy`` takes them without a warning and
    ``torch_model.load_state_dict`` takes the tensors), with ``num_batches_tracked`` set to 0 and
    the head's temperature where the layout stores one (every reference head; in torchvision's
    layout, not the SoftMax head, an ``nn.Linear``). The model's head, when it is one of the
    four, is recorded in the mapping's ``_metadata`` (module docstring); ``torch.save`` keeps
    it, and :func:`load_torch_checkpoint` reads such a file. For a file of torch tensors, use
    :func:`save_torch_checkpoint`.

    Args:
      model: the model the variables belong to.
      variables: ``{"params", "batch_stats"}``.

    Returns:
      torch key -> array, in torch layouts (conv ``[O, I, kh, kw]``, ``nn.Linear``
      ``weight [O, I]``, reference SoftMax head ``classifier.weights [C, D]``, torchvision's
      ``fc.weight [C, D]``).
    """
    return conversion.export(model, variables)


def save_torch_checkpoint(
    model: nn.Module, variables: Mapping[str, Any], path: str | os.PathLike
) -> None:
    """Writes ``variables`` as a PyTorch ``state_dict`` file of torch tensors, with the head.

    ``torch_model.load_state_dict(torch.load(path))`` loads it into the reference model (or the
    torchvision model, for the ``tv_*`` backbones), and :func:`load_torch_checkpoint` back into
    ``model`` (refusing a model with another head). The arrays are those of
    :func:`to_torch_state_dict` (bfloat16 ones stay bfloat16). The file is written next to
    ``path`` and renamed into place, so a crash never leaves half a file there.

    Args:
      model: the model the variables belong to.
      variables: ``{"params", "batch_stats"}``.
      path: the ``.pth`` file to write (replaced if it exists).
    """
    files.write_state_dict(to_torch_state_dict(model, variables), path)
