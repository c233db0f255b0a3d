"""Out-of-distribution scores: ``[batch, num_classes]`` logits -> ``[batch]`` scores.

Higher means more in-distribution. All scores use ``softmax(logits)`` with **no** entropic scale
and are computed in float32 or wider (bfloat16 logits give float32 scores, which matters for the
OOD metrics: saturated bfloat16 probabilities create ties). Pass the logits of a calibrated head
(temperature already applied) to get calibrated scores.

=================  ========================================  ==============================
function           formula                                   used with (reference name)
=================  ========================================  ==============================
max_probability    ``max_j p_j``                             SoftMax (MPS)
entropic           ``sum_j p_j log p_j`` (negative entropy)  SoftMax, IsoMax (ES)
min_distance       ``max_j logits_j`` (= -min distance)      IsoMax+ (MDS)
mmls               ``max logit + mean logit``                DisMax (MMLS)
mmles              ``mmls + sum_j p_j log p_j``              DisMax, default (MMLES)
energy             ``T logsumexp(logits / T)``               baseline (Liu et al., 2020)
=================  ========================================  ==============================

The reference computes the entropic score as ``sum(p * log(p))``, which is NaN once a
probability underflows to 0; here it comes from log-softmax and is always finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from isomax_jax import validation


def _logits(logits: jax.typing.ArrayLike) -> jax.Array:
    logits = jnp.asarray(logits)
    validation.check_rank("logits", logits, 2, "[batch, num_classes]")
    validation.check_floating("logits", logits)
    return logits.astype(validation.compute_dtype(logits.dtype))


def _negative_entropy(logits: jax.Array) -> jax.Array:
    log_probs = jax.nn.log_softmax(logits, axis=1)
    return jnp.sum(jnp.exp(log_probs) * log_probs, axis=1)


def max_probability(logits: jax.typing.ArrayLike) -> jax.Array:
    """Maximum softmax probability (MPS), ``[batch, num_classes]`` -> ``[batch]``.

    Example:
      >>> max_probability(jnp.array([[0.0, 0.0], [10.0, 0.0]]))
      Array([0.5      , 0.9999546], dtype=float32)
    """
    return jnp.max(jax.nn.softmax(_logits(logits), axis=1), axis=1)


def entropic(logits: jax.typing.ArrayLike) -> jax.Array:
    """Entropic score (ES): negative entropy ``sum_j p_j log p_j``, ``[B, C]`` -> ``[B]``.

    Example:
      >>> entropic(jnp.array([[0.0, 0.0], [1e4, 0.0]]))
      Array([-0.6931472, -0.       ], dtype=float32)
    """
    return _negative_entropy(_logits(logits))


def min_distance(logits: jax.typing.ArrayLike) -> jax.Array:
    """Minimum distance score (MDS): the maximum logit, ``[B, C]`` -> ``[B]``.

    For IsoMax-family heads the logits are negative distances, so this is minus the distance
    to the nearest prototype.

    Example:
      >>> min_distance(jnp.array([[-1.0, -3.0], [-2.0, -0.5]]))
      Array([-1. , -0.5], dtype=float32)
    """
    return jnp.max(_logits(logits), axis=1)


def mmls(logits: jax.typing.ArrayLike) -> jax.Array:
    """Max-mean logit score (MMLS): ``max_j logits_j + mean_j logits_j``, ``[B, C]`` -> ``[B]``.

    Example:
      >>> mmls(jnp.array([[-1.0, -3.0]]))
      Array([-3.], dtype=float32)
    """
    logits = _logits(logits)
    return jnp.max(logits, axis=1) + jnp.mean(logits, axis=1)


def mmles(logits: jax.typing.ArrayLike) -> jax.Array:
    """Max-mean logit entropy score (MMLES), DisMax's default, ``[B, C]`` -> ``[B]``.

    ``max_j logits_j + mean_j logits_j + sum_j p_j log p_j``.

    Example:
      >>> mmles(jnp.array([[0.0, 0.0]]))
      Array([-0.6931472], dtype=float32)
    """
    logits = _logits(logits)
    return jnp.max(logits, axis=1) + jnp.mean(logits, axis=1) + _negative_entropy(logits)


def energy(logits: jax.typing.ArrayLike, *, temperature: float = 1.0) -> jax.Array:
    """Negative free energy ``T logsumexp(logits / T)``, ``[B, C]`` -> ``[B]``.

    Not in the IsoMax papers; a common baseline (Liu et al., "Energy-based Out-of-distribution
    Detection", NeurIPS 2020).

    Example:
      >>> energy(jnp.array([[0.0, 0.0]]))
      Array([0.6931472], dtype=float32)
    """
    logits = _logits(logits)
    return temperature * jax.nn.logsumexp(logits / temperature, axis=1)
