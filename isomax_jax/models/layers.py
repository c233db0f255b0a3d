"""Convolution and batch-norm factories shared by the CIFAR backbones.

They fix the conventions that make a converted PyTorch model give the same outputs:
explicit ``(1, 1)`` spatial padding for 3×3 convolutions (PyTorch ``padding=1``; Flax ``"SAME"``
pads asymmetrically at stride 2), Kaiming-normal fan-out initialisation, and batch norm with
PyTorch's ``momentum=0.1`` (Flax ``momentum=0.9``) and ``eps=1e-5``.
"""

from __future__ import annotations

import flax.linen as nn
import jax

#: Kaiming normal, fan-out, ReLU gain: ``N(0, 2 / (kh * kw * out_channels))``.
kaiming_fan_out = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(
    features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    use_bias: bool = False,
    name: str,
) -> nn.Conv:
    """A square convolution padded like PyTorch's ``padding=kernel_size // 2``.

    Must be called inside a ``@nn.compact`` method (the parent module is taken from context).
    """
    pad = kernel_size // 2
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        kernel_init=kaiming_fan_out,
        bias_init=jax.nn.initializers.zeros,
        name=name,
    )


def batch_norm(*, train: bool, zero_init: bool = False, name: str) -> nn.BatchNorm:
    """Batch norm over the channel axis, PyTorch defaults; scale 1 (0 if ``zero_init``), bias 0."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        scale_init=jax.nn.initializers.zeros if zero_init else jax.nn.initializers.ones,
        bias_init=jax.nn.initializers.zeros,
        name=name,
    )
