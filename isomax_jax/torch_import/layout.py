"""What a key layout is: how a Flax variable's path is spelled as a PyTorch ``state_dict`` key.

A :class:`Layout` maps ``(collection, path)`` of a Flax leaf to ``(torch key, kind)``, where the
kind says how the array changes between the frameworks (:func:`to_flax`, :func:`to_torch`).
Leaves map the same way in every layout:

=====================================  ========================================================
PyTorch                                Flax
=====================================  ========================================================
conv ``weight`` ``[O, I, kh, kw]``     ``params/.../kernel`` ``[kh, kw, I, O]`` (kind ``conv``)
``nn.Linear`` ``weight`` ``[O, I]``    ``params/.../kernel`` ``[I, O]`` (kind ``linear``)
conv / linear ``bias``                 ``params/.../bias``
BN / LayerNorm ``weight`` / ``bias``   ``params/.../scale`` / ``bias``
BN ``running_mean`` / ``running_var``  ``batch_stats/.../mean`` / ``var``
anything else                          the same name (``prototypes``, ``class_token``, ...)
=====================================  ========================================================

The layouts differ in how module names are spelled, where the head lives and whether a head
stores its temperature: :mod:`isomax_jax.torch_import.paper_layout` (the IsoMax reference code)
and :mod:`isomax_jax.torch_import.torchvision_layout`.
"""

from __future__ import annotations

import numpy as np

#: The Flax module that holds the head (``Classifier.classifier``).
HEAD_MODULE = "classifier"


class Layout:
    """A key layout (subclasses say how module names are spelled).

    Attributes:
      name: ``"papers"`` or ``"torchvision"`` (what the backbone's ``torch_layout`` says).
      head_prefix: the torch module of the head: its keys are ``<head_prefix>.<leaf>``.
    """

    name: str = ""
    head_prefix: str = HEAD_MODULE

    def module_names(self, modules: tuple[str, ...]) -> list[str]:
        """The torch spelling of a path of Flax module names (below ``backbone``)."""
        raise NotImplementedError

    def head_kernel(self, head: str | None) -> str:
        """The torch name of the head's linear ``kernel`` (``head``: the registry name)."""
        return "weight"

    def writes_temperature(self, head: str | None) -> bool:
        """Whether a head of this kind stores ``<head_prefix>.temperature`` in this layout."""
        raise NotImplementedError

    @property
    def temperature_key(self) -> str:
        return f"{self.head_prefix}.temperature"

    def torch_key(
        self, collection: str, path: tuple[str, ...], ndim: int, head: str | None
    ) -> tuple[str, str]:
        """``(torch key, kind)`` of the leaf ``collection/path`` with ``ndim`` dimensions."""
        *modules, leaf = path
        in_head = modules[:1] == [HEAD_MODULE]
        if modules[:1] in (["backbone"], [HEAD_MODULE]):
            modules = modules[1:]
        if collection == "batch_stats":
            leaf, kind = {"mean": ("running_mean", "copy"), "var": ("running_var", "copy")}[leaf]
        elif leaf == "kernel" and ndim == 4:
            leaf, kind = "weight", "conv"
        elif leaf == "kernel" and ndim == 2:
            leaf = self.head_kernel(head) if in_head and not modules else "weight"
            kind = "linear"
        elif leaf == "scale":
            leaf, kind = "weight", "copy"
        else:
            kind = "copy"  # bias, prototypes, distance_scale, class_token, pos_embedding
        prefix = [self.head_prefix] if in_head else []
        return ".".join([*prefix, *self.module_names(tuple(modules)), leaf]), kind


def torch_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape of a Flax leaf of shape ``shape``."""
    if kind == "conv":
        kh, kw, cin, cout = shape
        return (cout, cin, kh, kw)
    if kind == "linear":
        return (shape[1], shape[0])
    return shape


def to_flax(kind: str, array: np.ndarray) -> np.ndarray:
    """A torch array in the Flax layout."""
    if kind == "conv":
        return array.transpose(2, 3, 1, 0)
    if kind == "linear":
        return array.T
    return array


def to_torch(kind: str, array: np.ndarray) -> np.ndarray:
    """A Flax array in the torch layout."""
    if kind == "conv":
        return array.transpose(3, 2, 0, 1)
    if kind == "linear":
        return array.T
    return array
