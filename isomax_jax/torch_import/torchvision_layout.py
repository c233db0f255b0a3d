"""torchvision's layout: ``torchvision.models.resnet*`` and ``vit_b_16`` ``state_dict`` keys.

Used for the backbones that declare ``torch_layout = "torchvision"`` (the ``tv_*`` models of
:func:`isomax_jax.models.get_model`). The backbone's modules are at the top level, spelled as in
torchvision; the ``nn.Sequential`` containers' indices are Flax suffixes ``_<index>``:

* ``layer1.0.downsample.0.weight`` ↔ ``layer1_0/downsample_0/kernel``;
* ``encoder.layers.encoder_layer_0.mlp.3.bias`` ↔ ``encoder/layers/encoder_layer_0/mlp_3/bias``;
* ``...self_attention.in_proj_weight`` ``[3D, D]`` and ``in_proj_bias`` (``nn.MultiheadAttention``'s
  fused query/key/value projection) ↔ ``.../self_attention/in_proj/kernel`` ``[D, 3D]`` and
  ``bias``;
* ``class_token``, ``conv_proj.weight``, ``encoder.pos_embedding``, ``encoder.ln.weight`` ↔
  ``class_token``, ``conv_proj/kernel``, ``encoder/pos_embedding``, ``encoder/ln/scale``.

The head lives where torchvision's classifier does (the backbone's ``torch_head``): ``fc`` for
the ResNets, ``heads.head`` for the ViT. A SoftMax head is torchvision's ``nn.Linear``:
``fc.weight`` ``[C, D]`` and ``fc.bias`` (no temperature). An IsoMax-family head is what
``model.fc = robust_deep_learning.IsoMaxPlusLossFirstPart(D, C)`` (say) stores there:
``fc.prototypes``, ``fc.distance_scale``, ``fc.temperature``.
"""

from __future__ import annotations

import re

from isomax_jax.torch_import.layout import Layout

#: The nn.Sequential containers whose children torchvision names by index.
_SEQUENTIAL = re.compile(r"^(layer\d+|downsample|mlp)_(\d+)$")
#: nn.MultiheadAttention's fused input projection: parameters, not a submodule.
_FUSED = ("self_attention", "in_proj")


class TorchvisionLayout(Layout):
    """torchvision's keys, the head under ``head_prefix`` (module docstring)."""

    name = "torchvision"

    def __init__(self, head_prefix: str):
        self.head_prefix = head_prefix

    def module_names(self, modules: tuple[str, ...]) -> list[str]:
        parts: list[str] = []
        for name in modules:
            match = _SEQUENTIAL.match(name)
            parts.extend([match.group(1), match.group(2)] if match else [name])
        return parts

    def writes_temperature(self, head: str | None) -> bool:
        return head not in (None, "softmax")  # nn.Linear has none; the reference heads do

    def torch_key(
        self, collection: str, path: tuple[str, ...], ndim: int, head: str | None
    ) -> tuple[str, str]:
        if tuple(path[-3:-1]) == _FUSED and path[-1] in ("kernel", "bias"):
            key, kind = super().torch_key(collection, (*path[:-2], path[-1]), ndim, head)
            module, leaf = key.rsplit(".", 1)
            return f"{module}.in_proj_{'weight' if leaf == 'weight' else 'bias'}", kind
        return super().torch_key(collection, path, ndim, head)
