"""Wide ResNet 28-10 for CIFAR (Zagoruyko & Komodakis 2016), conv bias, no dropout.

NHWC images ``[batch, 32, 32, 3]`` -> features ``[batch, 640]``. Pre-activation blocks
(BN-ReLU-conv3×3, BN-ReLU-conv3×3 with the stride on the second conv) added to a shortcut taken
from the block input (1×1 conv with bias when the shape changes); all convolutions have a bias,
as in the reference's WRN (36,482,880 backbone parameters). Submodule names mirror the PyTorch
``state_dict`` keys with ``.<index>`` written as ``_<index>`` (``layer1.0.conv1`` ↔
``layer1_0/conv1``, ``layer1.0.shortcut.0`` ↔ ``layer1_0/shortcut_0``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from isomax_jax.models.layers import batch_norm, conv


class WideBasicBlock(nn.Module):
    """Pre-activation wide block; stride on ``conv2``; no ReLU after the sum."""

    features: int
    stride: int = 1
    bn_axis_name: str | None = None  # pmap axis name for cross-device BatchNorm statistics

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        out = nn.relu(batch_norm(train=train, axis_name=self.bn_axis_name, name="bn1")(x))
        out = conv(self.features, 3, use_bias=True, name="conv1")(out)
        out = nn.relu(batch_norm(train=train, axis_name=self.bn_axis_name, name="bn2")(out))
        out = conv(self.features, 3, stride=self.stride, use_bias=True, name="conv2")(out)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = conv(self.features, 1, stride=self.stride, use_bias=True, name="shortcut_0")(x)
        return out + x


class WideResNet(nn.Module):
    """WRN-depth-widen: 3×3 stem (16 channels), three stages of ``(depth - 4) // 6`` blocks.

    Attributes:
      depth: 28 for WRN-28-10.
      widen_factor: 10 for WRN-28-10; stage widths are ``16k, 32k, 64k``.

    The feature dimension is ``64 * widen_factor``.
    """

    depth: int = 28
    widen_factor: int = 10
    bn_axis_name: str | None = None  # pmap axis name for cross-device BatchNorm statistics

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        blocks = (self.depth - 4) // 6
        x = conv(16, 3, use_bias=True, name="conv1")(x)
        for i, width in enumerate((16, 32, 64)):
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                x = WideBasicBlock(
                    width * self.widen_factor,
                    stride,
                    bn_axis_name=self.bn_axis_name,
                    name=f"layer{i + 1}_{j}",
                )(x, train=train)
        x = nn.relu(batch_norm(train=train, axis_name=self.bn_axis_name, name="bn1")(x))
        return jnp.mean(x, axis=(1, 2))


def wrn28_10() -> WideResNet:
    """WRN-28-10 with conv bias and no dropout: 640-d features."""
    return WideResNet(depth=28, widen_factor=10)
