"""DenseNet-BC-100 for CIFAR (Huang et al. 2017): k=12, bottleneck layers, compression 0.5.

The main model of the IsoMax papers. NHWC images ``[batch, 32, 32, 3]`` -> features
``[batch, 342]``. Submodule names mirror the PyTorch reference's ``state_dict`` keys with
``.<index>`` written as ``_<index>`` (``block1.layer.0.conv1`` ↔ ``block1/layer_0/conv1``).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from isomax_jax.models import layers
from isomax_jax.models.layers import ModuleDef


class BottleneckLayer(nn.Module):
    """BN-ReLU-conv1×1 (``4k`` channels), BN-ReLU-conv3×3 (``k``), concatenated to the input.

    ``conv`` and ``norm`` are the factories bound by :class:`DenseNetBC` (see
    :class:`isomax_jax.models.resnet.BasicBlock`).
    """

    growth_rate: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out = nn.relu(self.norm(name="bn1")(x))
        out = self.conv(4 * self.growth_rate, 1, name="conv1")(out)
        out = nn.relu(self.norm(name="bn2")(out))
        out = self.conv(self.growth_rate, 3, name="conv2")(out)
        return jnp.concatenate([x, out], axis=-1)


class DenseBlock(nn.Module):
    """``num_layers`` bottleneck layers (named ``layer_<i>``)."""

    num_layers: int
    growth_rate: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = BottleneckLayer(
                self.growth_rate, conv=self.conv, norm=self.norm, name=f"layer_{i}"
            )(x)
        return x


class Transition(nn.Module):
    """BN-ReLU-conv1×1 to ``features`` channels, then 2×2 average pooling."""

    features: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(self.norm(name="bn1")(x))
        x = self.conv(self.features, 1, name="conv1")(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNetBC(nn.Module):
    """DenseNet-BC for 32×32 images: 3×3 stem, three dense blocks, two transitions.

    Attributes:
      depth: total depth; each block has ``(depth - 4) // 6`` bottleneck layers.
      growth_rate: ``k``, channels added per layer; the stem has ``2k`` channels.
      compression: channel reduction of the transitions (``floor(c * compression)``).
      bn_axis_name: ``pmap`` axis over which BatchNorm averages batch statistics, or None.
      dtype: compute dtype of convolutions and activations; parameters, BatchNorm statistics
        and the returned features are float32.
      conv: convolution factory (:func:`isomax_jax.models.layers.conv`).
      norm: normalisation module (:class:`isomax_jax.models.layers.BatchNorm`).

    The feature dimension for depth 100, k=12 is 342.
    """

    depth: int = 100
    growth_rate: int = 12
    compression: float = 0.5
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
        num_layers = (self.depth - 4) // 6
        channels = 2 * self.growth_rate
        x = conv(channels, 3, name="conv1")(x)
        for i in range(3):
            x = DenseBlock(
                num_layers, self.growth_rate, conv=conv, norm=norm, name=f"block{i + 1}"
            )(x)
            channels += num_layers * self.growth_rate
            if i < 2:
                channels = int(channels * self.compression)
                x = Transition(channels, conv=conv, norm=norm, name=f"trans{i + 1}")(x)
        x = nn.relu(norm(name="bn1")(x))
        return layers.global_average_pool(x)


def densenet_bc100() -> DenseNetBC:
    """DenseNet-BC-100, k=12, compression 0.5, no dropout: 342-d features."""
    return DenseNetBC(depth=100, growth_rate=12, compression=0.5)
