"""Convolution and batch-norm factories shared by the CIFAR backbones.

They fix the conventions that make a converted PyTorch model give the same outputs:
explicit ``(1, 1)`` spatial padding for 3×3 convolutions (PyTorch ``padding=1``; Flax ``"SAME"``
pads asymmetrically at stride 2), Kaiming-normal fan-out initialisation, and batch norm with
PyTorch's ``momentum=0.1`` (Flax ``momentum=0.9``), ``eps=1e-5`` and running-variance update
(:class:`BatchNorm`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

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


class BatchNorm(nn.Module):
    """Batch norm over the last (channel) axis with PyTorch's ``BatchNorm2d`` semantics.

    Same variable names and shapes as ``flax.linen.BatchNorm`` (params ``scale``, ``bias``;
    batch stats ``mean``, ``var``), so checkpoints and converters see no difference. Two things
    differ from Flax's module, both to match PyTorch exactly:

    * the running variance is updated with the *unbiased* batch variance (``n / (n - 1)``), as
      ``torch.nn.BatchNorm2d`` does, while the batch is normalised with the biased one;
    * the batch variance is computed in two passes (``mean((x - mean)^2)``), in float32 at least.

    Under ``jax.jit`` with a batch-sharded input the statistics are those of the global batch.
    Under ``jax.pmap``, pass ``axis_name`` so they are averaged over devices (the per-device
    batches must have equal sizes).

    Attributes:
      use_running_average: normalise with the running statistics (evaluation) instead of the
        batch's (training, which also updates them).
      momentum: Flax convention: ``running = momentum * running + (1 - momentum) * batch``;
        0.9 is PyTorch's ``momentum=0.1``.
      epsilon: added to the variance.
      axis_name: ``pmap`` axis over which batch statistics are averaged, or None.
      scale_init: initialiser of ``scale`` (ones; zeros for zero-initialised last BNs).

    Example:
      >>> bn = BatchNorm(use_running_average=False)
      >>> x = jnp.arange(8.0).reshape(2, 2, 2, 1)
      >>> y, updates = bn.apply(bn.init(jax.random.key(0), x), x, mutable=["batch_stats"])
      >>> float(updates["batch_stats"]["var"][0])  # 0.9 * 1 + 0.1 * var(x, ddof=1)
      1.5
    """

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    axis_name: str | None = None
    scale_init: Callable = jax.nn.initializers.ones
    bias_init: Callable = jax.nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.typing.ArrayLike) -> jax.Array:
        x = jnp.asarray(x)
        channels = x.shape[-1]
        shape = (1,) * (x.ndim - 1) + (channels,)  # explicit broadcasting over the channel axis
        stats_dtype = jnp.promote_types(x.dtype, jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        scale = self.param("scale", self.scale_init, (channels,), jnp.float32)
        bias = self.param("bias", self.bias_init, (channels,), jnp.float32)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            xs = x.astype(stats_dtype)
            count = math.prod(x.shape[:-1])
            mean = xs.mean(axes)
            if self.axis_name is not None:
                mean = jax.lax.pmean(mean, self.axis_name)
            var = jnp.square(xs - mean.reshape(shape)).mean(axes)
            if self.axis_name is not None:
                var = jax.lax.pmean(var, self.axis_name)
                count = count * jax.lax.psum(1, self.axis_name)
            if not self.is_initializing():
                unbiased = var * (count / max(count - 1, 1))
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * mean.astype(jnp.float32)
                ra_var.value = m * ra_var.value + (1 - m) * unbiased.astype(jnp.float32)
        inv = jax.lax.rsqrt(var.astype(stats_dtype) + self.epsilon) * scale
        y = (x.astype(stats_dtype) - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)
        return y.astype(x.dtype)


def batch_norm(
    *, train: bool, zero_init: bool = False, axis_name: str | None = None, name: str
) -> BatchNorm:
    """Batch norm over the channel axis, PyTorch semantics; scale 1 (0 if ``zero_init``), bias 0."""
    return BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        axis_name=axis_name,
        scale_init=jax.nn.initializers.zeros if zero_init else jax.nn.initializers.ones,
        bias_init=jax.nn.initializers.zeros,
        name=name,
    )
