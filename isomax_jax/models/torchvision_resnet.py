"""torchvision's ImageNet ResNets (V1.5): ResNet-18/34 (basic blocks), ResNet-50/101/152.

The architecture of ``torchvision.models.resnet{18,34,50,101,152}``: a 7×7 stride-2 stem
(padding 3) with BatchNorm and ReLU, a 3×3 stride-2 max-pool (padding 1), four stages of blocks
(64, 128, 256, 512 channels; ×4 at the output of a bottleneck block), global average pooling.
"V1.5": a bottleneck block strides in its 3×3 convolution (``conv2``), not in the first 1×1. The
shortcut of a block that changes the shape is a strided 1×1 convolution plus BatchNorm
(``downsample``).

Every convolution is padded explicitly like torchvision's (``padding=kernel_size // 2``); Flax's
``"SAME"`` pads stride-2 layers on the bottom/right only, which shifts the sampling grid by one
pixel and silently changes the outputs of imported weights. The max-pool pads with ``-inf``, as
PyTorch's does.

NHWC images ``[batch, height, width, 3]`` (224×224 for ImageNet; any size of at least 32 works)
-> features ``[batch, 512]`` (ResNet-18/34) or ``[batch, 2048]`` (ResNet-50/101/152): the pooled
features that torchvision's ``fc`` receives. Submodule names mirror torchvision's ``state_dict``
keys, with a ``nn.Sequential`` index written ``_<index>`` (``layer1.0.downsample.0`` ↔
``layer1_0/downsample_0``); :mod:`isomax_jax.torch_import` maps them (``torch_layout``).
Initialisation is torchvision's: Kaiming-normal fan-out convolutions, BatchNorm scale 1 and
bias 0.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from isomax_jax.models import layers
from isomax_jax.models.layers import ModuleDef


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers (stride in the first), ReLU after the sum with the shortcut.

    Attributes:
      features: output channels.
      conv: convolution factory (:func:`isomax_jax.models.layers.conv` with the dtype bound).
      norm: normalisation factory (a :class:`isomax_jax.models.layers.BatchNorm` partial).
      stride: stride of ``conv1`` and of the ``downsample`` shortcut.
    """

    features: int
    conv: ModuleDef
    norm: ModuleDef
    stride: int = 1

    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.conv(self.features, 3, stride=self.stride, name="conv1")(x)
        out = nn.relu(self.norm(name="bn1")(out))
        out = self.conv(self.features, 3, name="conv2")(out)
        out = self.norm(name="bn2")(out)
        return nn.relu(out + _shortcut(self, x, self.features))


class Bottleneck(nn.Module):
    """1×1 conv (``features``), 3×3 conv (``features``, strided), 1×1 conv (``4 * features``),
    each followed by BatchNorm; ReLU after the first two and after the sum with the shortcut.

    Attributes: as :class:`BasicBlock`; the block outputs ``4 * features`` channels.
    """

    features: int
    conv: ModuleDef
    norm: ModuleDef
    stride: int = 1

    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.conv(self.features, 1, name="conv1")(x)
        out = nn.relu(self.norm(name="bn1")(out))
        out = self.conv(self.features, 3, stride=self.stride, name="conv2")(out)
        out = nn.relu(self.norm(name="bn2")(out))
        out = self.conv(self.features * self.expansion, 1, name="conv3")(out)
        out = self.norm(name="bn3")(out)
        return nn.relu(out + _shortcut(self, x, self.features * self.expansion))


def _shortcut(block: nn.Module, x: jax.Array, features: int) -> jax.Array:
    """The identity, or ``downsample`` (strided 1×1 conv + BN) when the shape changes."""
    if block.stride == 1 and x.shape[-1] == features:
        return x
    x = block.conv(features, 1, stride=block.stride, name="downsample_0")(x)
    return block.norm(name="downsample_1")(x)


class TorchvisionResNet(nn.Module):
    """torchvision's ResNet without its ``fc``: stem, max-pool, four stages, average pooling.

    Attributes:
      stage_sizes: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
      block: :class:`BasicBlock` (ResNet-18/34) or :class:`Bottleneck` (ResNet-50/101/152).
      bn_axis_name: ``pmap`` axis over which BatchNorm averages batch statistics (None under
        ``jax.jit``, where they are global already).
      dtype: compute dtype of convolutions and activations (float32 or bfloat16); parameters and
        BatchNorm statistics are float32, the returned features float32.
      conv: convolution factory (:func:`isomax_jax.models.layers.conv`).
      norm: normalisation module (:class:`isomax_jax.models.layers.BatchNorm`, PyTorch's
        momentum 0.1 and eps 1e-5).

    The feature dimension is ``512 * block.expansion``.

    Example (shapes only; ``init`` / ``apply`` give values):
      >>> backbone = tv_resnet18()
      >>> images = jnp.zeros((2, 224, 224, 3))
      >>> variables = jax.eval_shape(backbone.init, jax.random.key(0), images)
      >>> variables["params"]["layer2_0"]["downsample_0"]["kernel"].shape
      (1, 1, 64, 128)
      >>> jax.eval_shape(backbone.apply, variables, images).shape
      (2, 512)
    """

    stage_sizes: Sequence[int]
    block: type[nn.Module] = BasicBlock
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32
    conv: ModuleDef = layers.conv
    norm: ModuleDef = layers.BatchNorm

    #: The key layout of the ``state_dict`` (:mod:`isomax_jax.torch_import`) and the module
    #: that holds the classifier there (``fc.weight``, ``fc.bias``).
    torch_layout: ClassVar[str] = "torchvision"
    torch_head: ClassVar[str] = "fc"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        conv = functools.partial(self.conv, dtype=self.dtype)
        norm = functools.partial(
            self.norm, use_running_average=not train, axis_name=self.bn_axis_name, dtype=self.dtype
        )
        x = conv(64, 7, stride=2, name="conv1")(x)
        x = nn.relu(norm(name="bn1")(x))
        # Explicit (low, high) padding pairs work at runtime; Flax annotates padding as str.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # pyright: ignore[reportArgumentType]
        for i, blocks in enumerate(self.stage_sizes):
            for j in range(blocks):
                x = self.block(
                    64 * 2**i,
                    conv=conv,
                    norm=norm,
                    stride=2 if (i > 0 and j == 0) else 1,
                    name=f"layer{i + 1}_{j}",
                )(x)
        return layers.global_average_pool(x)


def tv_resnet18() -> TorchvisionResNet:
    """torchvision's ResNet-18: basic blocks [2, 2, 2, 2], 512-d features."""
    return TorchvisionResNet(stage_sizes=(2, 2, 2, 2), block=BasicBlock)


def tv_resnet34() -> TorchvisionResNet:
    """torchvision's ResNet-34: basic blocks [3, 4, 6, 3], 512-d features."""
    return TorchvisionResNet(stage_sizes=(3, 4, 6, 3), block=BasicBlock)


def tv_resnet50() -> TorchvisionResNet:
    """torchvision's ResNet-50 (V1.5): bottleneck blocks [3, 4, 6, 3], 2048-d features."""
    return TorchvisionResNet(stage_sizes=(3, 4, 6, 3), block=Bottleneck)


def tv_resnet101() -> TorchvisionResNet:
    """torchvision's ResNet-101 (V1.5): bottleneck blocks [3, 4, 23, 3], 2048-d features."""
    return TorchvisionResNet(stage_sizes=(3, 4, 23, 3), block=Bottleneck)


def tv_resnet152() -> TorchvisionResNet:
    """torchvision's ResNet-152 (V1.5): bottleneck blocks [3, 8, 36, 3], 2048-d features."""
    return TorchvisionResNet(stage_sizes=(3, 8, 36, 3), block=Bottleneck)
