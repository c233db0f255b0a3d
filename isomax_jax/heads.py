"""Flax Linen heads: drop-in replacements for ``nn.Dense(num_classes)`` on a feature vector.

Each head owns its parameters and calls the pure functions of :mod:`isomax_jax.distances`.
Parameter names, shapes and initialisers follow the PyTorch reference (``robust_deep_learning``):

================  ======================================  ========================================
head              ``prototypes [C, D]``                   ``distance_scale [1]``
================  ======================================  ========================================
IsoMaxHead        zeros                                   --
IsoMaxPlusHead    N(0, 1)                                 1.0
DisMaxHead        N(0, 1)                                 1.0
SoftMaxHead       ``kernel [D, C]`` ``U(±sqrt(1/D))``     ``bias [C]`` zeros (the linear baseline)
================  ======================================  ========================================

The temperature is a module attribute (not a parameter): 1 in training, set after post-hoc
calibration (:func:`isomax_jax.calibrate_temperature`) with ``head.clone(temperature=t)``; a
temperature that is not a finite scalar > 0 is refused with a ``ValueError`` when the head is
applied (:func:`isomax_jax.validation.check_temperature`). ``num_classes`` must be a positive
int. The math of each head is in ``docs/isomax.md``; :data:`isomax_jax.registry.HEADS` names the
head class of each registry name.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from isomax_jax import distances, validation


class _Head(nn.Module):
    """Fields and checks shared by every head."""

    num_classes: int
    temperature: float = 1.0
    param_dtype: jnp.dtype = jnp.float32

    def __post_init__(self):
        validation.check_int("num_classes", self.num_classes)
        super().__post_init__()

    def _features(self, features: jax.typing.ArrayLike) -> jax.Array:
        features = validation.as_array("features", features)
        validation.check_rank("features", features, 2, "[batch, features]")
        return features

    def _param_of_width(self, name: str, features: jax.Array, shape, init) -> jax.Array:
        """The parameter ``name``, whose width must match the features' (checked on apply)."""
        if self.has_variable("params", name):
            existing = self.get_variable("params", name)
            if existing.shape != tuple(shape):
                width = existing.shape[-1] if name == "prototypes" else existing.shape[0]
                raise ValueError(
                    f"`features` must have shape [batch, {width}] (the head's `{name}` has shape "
                    f"{tuple(existing.shape)}); got {tuple(features.shape)}."
                )
        return self.param(name, init, shape, self.param_dtype)


class _PrototypeHead(_Head):
    """A head with ``prototypes [C, D]`` (and, for the normalised heads, ``distance_scale``)."""

    method: str = "exact"

    def _prototypes(self, features: jax.Array, init) -> jax.Array:
        shape = (self.num_classes, features.shape[-1])
        return self._param_of_width("prototypes", features, shape, init)


class IsoMaxHead(_PrototypeHead):
    """IsoMax head: ``logits = -||f - p_j||_2 / T``.

    Attributes:
      num_classes: number of classes ``C``.
      temperature: ``T``, not trained (1 unless calibrated).
      method: ``"exact"`` (reference form) or ``"matmul"``; see
        :func:`isomax_jax.distances.pairwise_distance`.
      param_dtype: dtype of the parameters.

    Example:
      >>> head = IsoMaxHead(num_classes=3)
      >>> variables = head.init(jax.random.key(0), jnp.ones((2, 4)))
      >>> jax.tree.map(jnp.shape, variables["params"])
      {'prototypes': (3, 4)}
      >>> head.apply(variables, jnp.ones((2, 4)))
      Array([[-2., -2., -2.],
             [-2., -2., -2.]], dtype=float32)
    """

    @nn.compact
    def __call__(self, features: jax.typing.ArrayLike) -> jax.Array:
        """Maps ``[batch, features]`` to ``[batch, num_classes]`` logits."""
        features = self._features(features)
        prototypes = self._prototypes(features, nn.initializers.zeros)
        return distances.isomax_logits(
            features, prototypes, temperature=self.temperature, method=self.method
        )


class _NormalizedHead(_PrototypeHead):
    """IsoMax+ and DisMax: normalised prototypes ``N(0, 1)`` and a learnable ``distance_scale``."""

    @nn.compact
    def __call__(self, features: jax.typing.ArrayLike) -> jax.Array:
        """Maps ``[batch, features]`` to ``[batch, num_classes]`` logits."""
        features = self._features(features)
        prototypes = self._prototypes(features, nn.initializers.normal(stddev=1.0))
        scale = self.param("distance_scale", nn.initializers.ones, (1,), self.param_dtype)
        return self._logits(
            features, prototypes, scale, temperature=self.temperature, method=self.method
        )


class IsoMaxPlusHead(_NormalizedHead):
    """IsoMax+ head: ``logits = -|s| ||f̂ - p̂_j||_2 / T`` on L2-normalised vectors.

    Attributes:
      num_classes: number of classes ``C``.
      temperature: ``T``, not trained (1 unless calibrated).
      method: ``"exact"`` (reference form) or ``"matmul"``.
      param_dtype: dtype of the parameters.

    Example:
      >>> head = IsoMaxPlusHead(num_classes=3)
      >>> variables = head.init(jax.random.key(0), jnp.ones((2, 4)))
      >>> jax.tree.map(jnp.shape, variables["params"])
      {'distance_scale': (1,), 'prototypes': (3, 4)}
      >>> head.apply(variables, jnp.ones((2, 4))).shape
      (2, 3)
    """

    _logits = staticmethod(distances.isomax_plus_logits)


class DisMaxHead(_NormalizedHead):
    """DisMax head: ``logits = -(d_j + mean_k d_k) / T``, ``d_j = |s| ||f̂ - p̂_j||_2 / sqrt(2)``.

    Attributes:
      num_classes: number of classes ``C``.
      temperature: ``T``, not trained (1 unless calibrated); the reference stores it as a
        non-trainable parameter, here it is module configuration.
      method: ``"exact"`` (reference form) or ``"matmul"``.
      param_dtype: dtype of the parameters.

    Example:
      >>> head = DisMaxHead(num_classes=3)
      >>> variables = head.init(jax.random.key(0), jnp.ones((2, 4)))
      >>> jax.tree.map(jnp.shape, variables["params"])
      {'distance_scale': (1,), 'prototypes': (3, 4)}
      >>> head.apply(variables, jnp.ones((2, 4))).shape
      (2, 3)
    """

    _logits = staticmethod(distances.dismax_logits)


def _uniform_fan_in(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """``U(-sqrt(1 / D), sqrt(1 / D))`` for a ``[D, C]`` kernel (the reference SoftMax head)."""
    bound = math.sqrt(1.0 / shape[0])
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)


class SoftMaxHead(_Head):
    """Linear head ``logits = (f @ kernel + bias) / T``, the reference ``SoftMaxLossFirstPart``.

    ``kernel`` is ``[D, C]`` (the transpose of the reference's ``weights`` ``[C, D]``), initialised
    ``U(±sqrt(1/D))``; ``bias`` ``[C]`` starts at 0.

    Attributes:
      num_classes: number of classes ``C``.
      temperature: ``T``, a finite scalar > 0, not trained (1 unless calibrated).
      param_dtype: dtype of the parameters.

    Example:
      >>> head = SoftMaxHead(num_classes=3)
      >>> variables = head.init(jax.random.key(0), jnp.ones((2, 4)))
      >>> jax.tree.map(jnp.shape, variables["params"])
      {'bias': (3,), 'kernel': (4, 3)}
      >>> head.apply(variables, jnp.ones((2, 4))).shape
      (2, 3)
    """

    @nn.compact
    def __call__(self, features: jax.typing.ArrayLike) -> jax.Array:
        """Maps ``[batch, features]`` to ``[batch, num_classes]`` logits."""
        temperature = validation.check_temperature(self.temperature)
        features = self._features(features)
        shape = (features.shape[-1], self.num_classes)
        kernel = self._param_of_width("kernel", features, shape, _uniform_fan_in)
        bias = self.param("bias", nn.initializers.zeros, (self.num_classes,), self.param_dtype)
        logits = features @ kernel + bias[None, :]
        return logits / jnp.asarray(temperature, logits.dtype)
