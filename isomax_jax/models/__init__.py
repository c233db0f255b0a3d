"""Backbones with a choice of head: the IsoMax papers' CIFAR models and torchvision's.

The CIFAR backbones (``densenet_bc100``, ``resnet34``, ``resnet110``, ``wrn28_10``,
``small_resnet``) are the reference code's; the ``tv_*`` backbones are torchvision's ImageNet
architectures (:mod:`isomax_jax.models.torchvision_resnet`, :mod:`isomax_jax.models.vit`), whose
``state_dict`` files :func:`isomax_jax.torch_import.load_torch_checkpoint` loads.

Example (shapes only, with ``jax.eval_shape``; ``model.init`` / ``model.apply`` give values):
  >>> import jax, jax.numpy as jnp
  >>> from isomax_jax.models import get_model
  >>> model = get_model("densenet_bc100", num_classes=10, head="isomax")
  >>> images = jnp.zeros((4, 32, 32, 3))
  >>> variables = jax.eval_shape(model.init, jax.random.key(0), images)
  >>> variables["params"]["classifier"]["prototypes"].shape
  (10, 342)
  >>> jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images).shape
  (4, 10)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from isomax_jax import registry, validation
from isomax_jax.heads import SoftMaxHead
from isomax_jax.models import densenet, resnet, torchvision_resnet, vit, wide_resnet
from isomax_jax.models.classifier import Classifier

#: name -> (backbone factory, feature dimension). A backbone maps ``(images, train=)`` to
#: float32 features ``[batch, D]`` and has the fields ``bn_axis_name`` and ``dtype``, which
#: :func:`get_model` sets with ``clone``.
BACKBONES: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "densenet_bc100": (densenet.densenet_bc100, 342),
    "resnet34": (resnet.resnet34, 512),
    "resnet110": (resnet.resnet110, 64),
    "small_resnet": (resnet.small_resnet, 128),
    "wrn28_10": (wide_resnet.wrn28_10, 640),
    "tv_resnet18": (torchvision_resnet.tv_resnet18, 512),
    "tv_resnet34": (torchvision_resnet.tv_resnet34, 512),
    "tv_resnet50": (torchvision_resnet.tv_resnet50, 2048),
    "tv_resnet101": (torchvision_resnet.tv_resnet101, 2048),
    "tv_resnet152": (torchvision_resnet.tv_resnet152, 2048),
    "tv_vit_b_16": (vit.tv_vit_b_16, 768),
}

HEADS: tuple[str, ...] = registry.HEAD_NAMES  # titles and pairings: isomax_jax.registry.HEADS


def make_head(head: str, *, num_classes: int, temperature: float = 1.0) -> nn.Module:
    """The head called ``head`` (one of :data:`HEADS`), named ``classifier``: the registry's
    Linen module (:meth:`isomax_jax.registry.HeadSpec.linen`)."""
    spec = registry.head(head)
    return spec.linen(num_classes, temperature=temperature, name="classifier")


def get_model(
    name: str,
    *,
    num_classes: int,
    head: str,
    temperature: float = 1.0,
    bn_axis_name: str | None = None,
    dtype: Any = jnp.float32,
) -> Classifier:
    """A backbone with a head: ``apply(variables, images, train=..., return_features=False)``.

    Args:
      name: a CIFAR backbone (32×32 images): ``densenet_bc100`` (342-d features),
        ``resnet34`` (512-d), ``resnet110`` (64-d), ``wrn28_10`` (640-d), ``small_resnet``
        (128-d, fast CPU model); or a torchvision ImageNet architecture (224×224 images):
        ``tv_resnet18``, ``tv_resnet34`` (512-d), ``tv_resnet50``, ``tv_resnet101``,
        ``tv_resnet152`` (2048-d), ``tv_vit_b_16`` (768-d, 224×224 only).
      num_classes: number of classes ``C``.
      head: ``softmax`` (linear), ``isomax``, ``isomax_plus`` or ``dismax``.
      temperature: the head's (untrained) temperature; 1 except after calibration.
      bn_axis_name: for the ``jax.pmap`` path only: the pmap axis name over which BatchNorm
        averages its batch statistics, so that a pmapped step equals the global-batch step
        (:func:`isomax_jax.parallel.pmap_train_step` uses ``"batch"``). Leave None with
        ``jax.jit`` + sharding, where statistics are global already.
      dtype: compute dtype of the backbone's convolutions and activations: ``jnp.float32``
        (default) or ``jnp.bfloat16`` for mixed precision. Parameters and BatchNorm statistics
        stay float32 in every case; the features are cast to float32 before the head, so
        logits, loss and scores are float32 (see ``docs/accelerators.md``).

    Returns:
      A :class:`Classifier`; its variables are ``{"params", "batch_stats"}`` with the backbone
      under ``backbone`` and the head under ``classifier``.

    Raises:
      ValueError: for an unknown name or head, or ``num_classes < 1``.
      TypeError: if ``dtype`` is not a floating-point dtype.
    """
    if name not in BACKBONES:
        raise ValueError(f"`name` must be one of {sorted(BACKBONES)}; got {name!r}.")
    registry.head(head)
    validation.check_int("num_classes", num_classes)
    try:
        dtype = jnp.dtype(dtype)
    except TypeError as error:
        raise TypeError(f"`dtype` must be a floating-point dtype; got {dtype!r}.") from error
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"`dtype` must be a floating-point dtype; got {dtype}.")
    factory, _ = BACKBONES[name]
    return Classifier(
        backbone=factory().clone(bn_axis_name=bn_axis_name, dtype=dtype),
        classifier=make_head(head, num_classes=num_classes, temperature=temperature),
    )


def feature_dim(name: str) -> int:
    """The feature dimension ``D`` of backbone ``name``."""
    if name not in BACKBONES:
        raise ValueError(f"`name` must be one of {sorted(BACKBONES)}; got {name!r}.")
    return BACKBONES[name][1]


__all__ = [
    "BACKBONES",
    "HEADS",
    "Classifier",
    "SoftMaxHead",
    "feature_dim",
    "get_model",
    "make_head",
]
