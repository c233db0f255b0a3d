"""The IsoMax papers' layout: the reference PyTorch models of ``robust_deep_learning``.

Keys as in the reference code (``conv1.weight``, ``layer1.0.bn1.running_mean``,
``block1.layer.0.conv1.weight``, ``classifier.prototypes``, ...): the backbone's modules at the
top level, the head as ``classifier``. A Flax module name ``<name>_<index>`` is the torch path
``<name>.<index>`` (``layer1_0`` ↔ ``layer1.0``, ``shortcut_0`` ↔ ``shortcut.0``). The reference
SoftMax head stores its kernel as ``classifier.weights`` ``[C, D]``; every reference head stores
``classifier.temperature``. Any Linen model whose tree mirrors its torch twin this way uses this
layout too (a custom ``nn.Dense`` is ``<name>.weight``).
"""

from __future__ import annotations

import re

from isomax_jax.torch_import.layout import Layout

_INDEXED = re.compile(r"^(.*)_(\d+)$")


class PaperLayout(Layout):
    """The reference code's keys (module docstring)."""

    name = "papers"

    def module_names(self, modules: tuple[str, ...]) -> list[str]:
        parts: list[str] = []
        for name in modules:
            match = _INDEXED.match(name)
            parts.extend([match.group(1), match.group(2)] if match else [name])
        return parts

    def head_kernel(self, head: str | None) -> str:
        return "weights" if head == "softmax" else "weight"  # SoftMaxLossFirstPart.weights

    def writes_temperature(self, head: str | None) -> bool:
        return True  # every reference head has one; a head without `temperature` writes none


PAPERS = PaperLayout()
