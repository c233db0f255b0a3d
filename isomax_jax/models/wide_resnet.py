"""Wide ResNet 28-10 for CIFAR (Zagoruyko & Komodakis 2016), conv bias, no dropout.

NHWC images ``[batch, 32, 32, 3]`` -> features ``[batch, 640]``. Pre-activation blocks
(BN-ReLU-conv3×3, BN-ReLU-conv3×3 with the stride on the second conv) added to a shortcut taken
from the block input (1×1 conv with bias when the shape changes); all convolutions have a bias,
as in the reference's WRN (36,482,880 backbone parameters). Submodule names mirror the PyTorch
``state_dict`` keys with ``.<index>`` written as ``_<index>`` (``layer1.0.conv1`` ↔
``layer1_0/conv1``, ``layer1.0.shortcut.0`` ↔ ``layer1_0/shortcut_0``).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from isomax_jax.models import layers
from isomax_jax.models.layers import ModuleDef


class WideBasicBlock(nn.Module):
    """Pre-activation wide block; stride on ``conv2``; no ReLU after the sum.

    ``conv`` and ``norm`` are the factories bound by :class:`WideResNet` (see
    :class:`isomax_jax.models.resnet.BasicBlock`).
    """

    features: int
    conv: ModuleDef
    norm: ModuleDef
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out = nn.relu(self.norm(name="bn1")(x))
        out = self.conv(self.features, 3, use_bias=True, name="conv1")(out)
        out = nn.relu(self.norm(name="bn2")(out))
        out = self.conv(self.features, 3, stride=self.stride, use_bias=True, name="conv2")(out)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = self.conv(self.features, 1, stride=self.stride, use_bias=True, name="shortcut_0")(x)
        return out + x


class WideResNet(nn.Module):
    """WRN-depth-widen: 3×3 stem (16 channels), three stages of ``(depth - 4) // 6`` blocks.

    Attributes:
      depth: 28 for WRN-28-10.
      widen_factor: 10 for WRN-28-10; stage widths are ``16k, 32k, 64k``.
      bn_axis_name: ``pmap`` axis over which BatchNorm averages batch statistics, or None.
      dtype: compute dtype of convolutions and activations; parameters, BatchNorm statistics
        and the returned features are float32.
      conv: convolution factory (:func:`isomax_jax.models.layers.conv`).
      norm: normalisation module (:class:`isomax_jax.models.layers.BatchNorm`).

    The feature dimension is ``64 * widen_factor``.
    """

    depth: int = 28
    widen_factor: int = 10
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32
    conv: ModuleDef = layers.conv
    norm: ModuleDef = layers.BatchNorm

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        conv = functools.partial(self.conv, dtype=self.dtype)
        norm = functools.partial(
            self.norm, use_running_average=not train, axis_name=self.bn_axis_name, dtype=self.dtype
        )
        blocks = (self.depth - 4) // 6
        x = conv(16, 3, use_bias=True, name="conv1")(x)
        for i, width in enumerate((16, 32, 64)):
            for j in range(blocks):
                x = WideBasicBlock(
                    width * self.widen_factor,
                    conv=conv,
                    norm=norm,
                    stride=2 if (i > 0 and j == 0) else 1,
                    name=f"layer{i + 1}_{j}",
                )(x)
        x = nn.relu(norm(name="bn1")(x))
        return layers.global_average_pool(x)


def wrn28_10() -> WideResNet:
    """WRN-28-10 with conv bias and no dropout: 640-d features."""
    return WideResNet(depth=28, widen_factor=10)
