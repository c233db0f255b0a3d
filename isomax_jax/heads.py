"""Flax Linen heads: drop-in replacements for ``nn.Dense(num_classes)`` on a feature vector.

Each head owns its parameters and calls the pure functions of :mod:`isomax_jax.distances`.
Parameter names, shapes and initialisers follow the PyTorch reference (``robust_deep_learning``):

================  ======================  ===================================
head              ``prototypes [C, D]``   ``distance_scale [1]``
================  ======================  ===================================
IsoMaxHead        zeros                   --
IsoMaxPlusHead    N(0, 1)                 1.0
DisMaxHead        N(0, 1)                 1.0
================  ======================  ===================================

The temperature is a module attribute (not a parameter): 1 in training, set after post-hoc
calibration (:func:`isomax_jax.calibrate_temperature`) with ``head.clone(temperature=t)``; a
temperature that is not a finite scalar > 0 is refused with a ``ValueError`` when the head is
applied. The math of each head is in ``docs/isomax.md``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from isomax_jax import distances, validation


def _prototypes(module: nn.Module, features: jax.Array, init) -> jax.Array:
    validation.check_rank("features", features, 2, "[batch, features]")
    shape = (module.num_classes, features.shape[-1])
    if module.has_variable("params", "prototypes"):
        prototypes = module.get_variable("params", "prototypes")
        if prototypes.shape != shape:
            raise ValueError(
                f"`features` has shape {tuple(features.shape)} but the head's `prototypes` has "
                f"shape {tuple(prototypes.shape)} (expected [num_classes, {features.shape[-1]}])."
            )
    return module.param("prototypes", init, shape, module.param_dtype)


class IsoMaxHead(nn.Module):
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

    num_classes: int
    temperature: float = 1.0
    method: str = "exact"
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.typing.ArrayLike) -> jax.Array:
        """Maps ``[batch, features]`` to ``[batch, num_classes]`` logits."""
        features = jnp.asarray(features)
        prototypes = _prototypes(self, features, nn.initializers.zeros)
        return distances.isomax_logits(
            features, prototypes, temperature=self.temperature, method=self.method
        )


class IsoMaxPlusHead(nn.Module):
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

    num_classes: int
    temperature: float = 1.0
    method: str = "exact"
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.typing.ArrayLike) -> jax.Array:
        """Maps ``[batch, features]`` to ``[batch, num_classes]`` logits."""
        features = jnp.asarray(features)
        prototypes = _prototypes(self, features, nn.initializers.normal(stddev=1.0))
        scale = self.param("distance_scale", nn.initializers.ones, (1,), self.param_dtype)
        return distances.isomax_plus_logits(
            features, prototypes, scale, temperature=self.temperature, method=self.method
        )


class DisMaxHead(nn.Module):
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

    num_classes: int
    temperature: float = 1.0
    method: str = "exact"
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.typing.ArrayLike) -> jax.Array:
        """Maps ``[batch, features]`` to ``[batch, num_classes]`` logits."""
        features = jnp.asarray(features)
        prototypes = _prototypes(self, features, nn.initializers.normal(stddev=1.0))
        scale = self.param("distance_scale", nn.initializers.ones, (1,), self.param_dtype)
        return distances.dismax_logits(
            features, prototypes, scale, temperature=self.temperature, method=self.method
        )
