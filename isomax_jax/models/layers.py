"""Convolution factory and batch norm shared by the CIFAR backbones.

They fix the conventions that make a converted PyTorch model give the same outputs:
explicit ``(1, 1)`` spatial padding for 3×3 convolutions (PyTorch ``padding=1``; Flax ``"SAME"``
pads asymmetrically at stride 2), Kaiming-normal fan-out initialisation, and batch norm with
PyTorch's ``momentum=0.1`` (Flax ``momentum=0.9``), ``eps=1e-5`` and running-variance update
(:class:`BatchNorm`).

The backbones receive both as ``conv`` / ``norm`` partials, as in Flax's ImageNet example:
``norm = functools.partial(BatchNorm, use_running_average=not train, axis_name=...,
dtype=...)`` and ``conv = functools.partial(conv, dtype=...)``, so the compute dtype and the
``pmap`` axis are set once, in the backbone, not threaded through every block.

Mixed precision: with ``dtype=jnp.bfloat16`` a convolution casts its input and its float32
kernel to bfloat16 and returns bfloat16; :class:`BatchNorm` computes its statistics and the
normalisation in float32 (running statistics and parameters are float32) and returns ``dtype``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

#: A module factory (a class or a ``functools.partial`` of one), as in Flax's ImageNet example.
ModuleDef = Any

#: Kaiming normal, fan-out, ReLU gain: ``N(0, 2 / (kh * kw * out_channels))``.
kaiming_fan_out = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(
    features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    use_bias: bool = False,
    dtype: Any = jnp.float32,
    name: str,
) -> nn.Conv:
    """A square convolution padded like PyTorch's ``padding=kernel_size // 2``.

    Args:
      features: output channels.
      kernel_size: height and width of the kernel.
      stride: spatial stride.
      use_bias: add a bias (initialised to 0).
      dtype: compute dtype (inputs and kernel are cast to it); parameters stay float32.
      name: submodule name (mirrors the PyTorch ``state_dict`` key).

    Must be called inside a ``@nn.compact`` method (the parent module is taken from context).
    """
    pad = kernel_size // 2
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
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

    Statistics, parameters and the normalisation itself are float32 (or wider) whatever the
    input dtype; the output has dtype ``dtype`` (the input's if None), so a bfloat16 network
    keeps bfloat16 activations with float32 batch statistics.

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
      bias_init: initialiser of ``bias`` (zeros).
      dtype: output dtype; None keeps the input's.

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
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.typing.ArrayLike) -> jax.Array:
        x = jnp.asarray(x)
        channels = x.shape[-1]
        out_dtype = x.dtype if self.dtype is None else self.dtype
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        scale = self.param("scale", self.scale_init, (channels,), jnp.float32)
        bias = self.param("bias", self.bias_init, (channels,), jnp.float32)
        if self.use_running_average:
            return _normalize(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon, out_dtype)

        def forward(x, scale, bias):
            mean, var = _batch_statistics(x, self.axis_name)
            mean = checkpoint_name(mean, "batch_norm_mean")
            var = checkpoint_name(var, "batch_norm_var")
            return _normalize(x, mean, var, scale, bias, self.epsilon, out_dtype), mean, var

        if jnp.finfo(x.dtype).bits < 32:
            # Low precision: store only the (bfloat16) input and the statistics for the backward
            # pass and recompute the float32 intermediates there. Plain autodiff would keep
            # ``x - mean`` in float32, as large as the activation itself in float32.
            forward = jax.checkpoint(forward, policy=_SAVE_STATISTICS)
        y, mean, var = forward(x, scale, bias)
        if not self.is_initializing():
            count = math.prod(x.shape[:-1])
            if self.axis_name is not None:
                count = count * jax.lax.psum(1, self.axis_name)
            unbiased = var * (count / max(count - 1, 1))
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1 - m) * mean.astype(jnp.float32)
            ra_var.value = m * ra_var.value + (1 - m) * unbiased.astype(jnp.float32)
        return y


_SAVE_STATISTICS = jax.checkpoint_policies.save_only_these_names(
    "batch_norm_mean", "batch_norm_var"
)


def _batch_statistics(x: jax.Array, axis_name: str | None) -> tuple[jax.Array, jax.Array]:
    """Mean and biased variance over all but the last axis, two passes, float32 at least."""
    shape = (1,) * (x.ndim - 1) + (x.shape[-1],)  # explicit broadcasting over the channel axis
    axes = tuple(range(x.ndim - 1))
    xs = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = xs.mean(axes)
    if axis_name is not None:
        mean = jax.lax.pmean(mean, axis_name)
    var = jnp.square(xs - mean.reshape(shape)).mean(axes)
    if axis_name is not None:
        var = jax.lax.pmean(var, axis_name)
    return mean, var


def _normalize(x, mean, var, scale, bias, epsilon, out_dtype) -> jax.Array:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` in float32 at least, cast to out_dtype."""
    shape = (1,) * (x.ndim - 1) + (x.shape[-1],)
    stats_dtype = jnp.promote_types(x.dtype, jnp.float32)
    inv = jax.lax.rsqrt(var.astype(stats_dtype) + epsilon) * scale
    y = (x.astype(stats_dtype) - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)
    return y.astype(out_dtype)


def global_average_pool(x: jax.Array) -> jax.Array:
    """Mean over the spatial axes, ``[batch, H, W, C] -> [batch, C]``, in float32 at least.

    The backbones' features leave the (possibly bfloat16) network here, cast to float32, so the
    head, the loss and the scores are always computed in float32.
    """
    return jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=(1, 2))
