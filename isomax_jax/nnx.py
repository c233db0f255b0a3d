"""Flax NNX heads: the same three heads as :mod:`isomax_jax.heads`, for NNX users.

Same parameter names, shapes and initialisers as the Linen heads and the PyTorch reference
(``prototypes`` ``[C, D]``: zeros for IsoMax, N(0, 1) otherwise; ``distance_scale`` ``[1]``
initialised to 1.0), and the same pure functions of :mod:`isomax_jax.distances` underneath; a
temperature that is not a finite scalar > 0 is refused at construction and at every call.
NNX needs the feature dimension at construction. The temperature is a plain attribute, not an
``nnx.Param``, so ``nnx.state(head, nnx.Param)`` holds exactly the trainable parameters.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
from flax import nnx

from isomax_jax import distances, validation


class _Head(nnx.Module):
    """Constructor checks shared by the three heads; subclasses set ``_init_params``."""

    _needs_rngs = True

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        *,
        temperature: float = 1.0,
        method: str = "exact",
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        validation.check_int("num_features", num_features)
        validation.check_int("num_classes", num_classes)
        validation.check_temperature(temperature)
        name = type(self).__name__
        if self._needs_rngs and not isinstance(rngs, nnx.Rngs):
            raise TypeError(
                f"{name} needs `rngs`, an nnx.Rngs with a 'params' stream to draw its prototypes, "
                f"e.g. {name}({num_features}, {num_classes}, rngs=nnx.Rngs(0)); got {rngs!r}."
            )
        self.temperature = temperature
        self.method = method
        # Every concrete head defines _init_params (this base class is never instantiated).
        self._init_params(num_features, num_classes, param_dtype, rngs)  # pyright: ignore[reportAttributeAccessIssue]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # NNX's metaclass hides the constructor behind (*args, **kwargs): show the real one.
        parameters = list(inspect.signature(_Head.__init__).parameters.values())[1:]
        cls.__signature__ = inspect.Signature(parameters)


class IsoMaxHead(_Head):
    """IsoMax head: ``logits = -||f - p_j||_2 / T``; prototypes start at zero.

    Args:
      num_features: feature dimension ``D``.
      num_classes: number of classes ``C``.
      temperature: ``T``, not trained (1 unless calibrated).
      method: ``"exact"`` (reference form) or ``"matmul"``.
      param_dtype: dtype of the parameters.
      rngs: unused (the prototypes start at zero); accepted for a uniform constructor.

    Example:
      >>> head = IsoMaxHead(4, 3, rngs=nnx.Rngs(0))
      >>> head.prototypes.shape
      (3, 4)
      >>> head(jnp.ones((2, 4)))
      Array([[-2., -2., -2.],
             [-2., -2., -2.]], dtype=float32)
    """

    _needs_rngs = False

    def _init_params(self, num_features, num_classes, param_dtype, rngs):
        self.prototypes = nnx.Param(jnp.zeros((num_classes, num_features), param_dtype))

    def __call__(self, features: jax.typing.ArrayLike) -> jax.Array:
        """Maps ``[batch, features]`` to ``[batch, num_classes]`` logits."""
        return distances.isomax_logits(
            features, self.prototypes[...], temperature=self.temperature, method=self.method
        )


class _NormalizedHead(_Head):
    _logits = None

    def _init_params(self, num_features, num_classes, param_dtype, rngs):
        init = nnx.initializers.normal(stddev=1.0)
        self.prototypes = nnx.Param(init(rngs.params(), (num_classes, num_features), param_dtype))
        self.distance_scale = nnx.Param(jnp.ones((1,), param_dtype))

    def __call__(self, features: jax.typing.ArrayLike) -> jax.Array:
        """Maps ``[batch, features]`` to ``[batch, num_classes]`` logits."""
        # IsoMax+ and DisMax set _logits to their pure function (None only on this base).
        return type(self)._logits(  # pyright: ignore[reportOptionalCall]
            features,
            self.prototypes[...],
            self.distance_scale[...],
            temperature=self.temperature,
            method=self.method,
        )


class IsoMaxPlusHead(_NormalizedHead):
    """IsoMax+ head: ``logits = -|s| ||f̂ - p̂_j||_2 / T``; ``P ~ N(0, 1)``, ``s = 1``.

    Args:
      num_features: feature dimension ``D``.
      num_classes: number of classes ``C``.
      temperature: ``T``, not trained.
      method: ``"exact"`` (reference form) or ``"matmul"``.
      param_dtype: dtype of the parameters.
      rngs: ``nnx.Rngs`` with a ``params`` stream for the prototypes.

    Example:
      >>> head = IsoMaxPlusHead(4, 3, rngs=nnx.Rngs(0))
      >>> head.prototypes.shape, head.distance_scale.shape
      ((3, 4), (1,))
      >>> head(jnp.ones((2, 4))).shape
      (2, 3)
    """

    _logits = staticmethod(distances.isomax_plus_logits)


class DisMaxHead(_NormalizedHead):
    """DisMax head: ``logits = -(d_j + mean_k d_k) / T``; ``P ~ N(0, 1)``, ``s = 1``.

    Args:
      num_features: feature dimension ``D``.
      num_classes: number of classes ``C``.
      temperature: ``T``, not trained (the reference stores it as a frozen parameter).
      method: ``"exact"`` (reference form) or ``"matmul"``.
      param_dtype: dtype of the parameters.
      rngs: ``nnx.Rngs`` with a ``params`` stream for the prototypes.

    Example:
      >>> head = DisMaxHead(4, 3, rngs=nnx.Rngs(0))
      >>> sorted(nnx.state(head, nnx.Param).keys())
      ['distance_scale', 'prototypes']
      >>> head(jnp.ones((2, 4))).shape
      (2, 3)
    """

    _logits = staticmethod(distances.dismax_logits)
