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

Each function is also a detector of :mod:`isomax_jax.detectors` under the same name, except
``max_probability``, which is the detector ``msp`` (``detectors.get("max_probability")`` works
too); reports title it "MPS", the IsoMax papers' name.

The reference computes the entropic score as ``sum(p * log(p))``, which is NaN once a
probability underflows to 0; here it comes from log-softmax (with ``0 log 0 = 0``) and is finite.

**Infinite and NaN logits** (see ``docs/isomax.md``). Softmax is taken in the extended reals:
when a row's largest logit is ``+inf`` the classes at ``+inf`` share the probability equally and
the others get 0; a row of ``-inf`` only (every class infinitely far) is uniform, like any row of
equal logits. So, for logits without NaN:

* ``max_probability`` is always finite, in ``[1 / C, 1]``; ``entropic`` always finite, in
  ``[-log C, 0]`` (``entropic([[-inf, 0.0]])`` is ``0``: all the mass is on one class).
* ``min_distance``, ``mmls``, ``mmles`` and ``energy`` are unbounded and return the value of
  their formula in the extended reals: finite whenever it is (e.g. ``min_distance([[-inf, 0.]])``
  is ``0``), ``-inf`` when a mean or a maximum is ``-inf`` (``mmls``/``mmles`` of a row with a
  ``-inf`` logit: the mean logit is ``-inf``), ``+inf`` when it is ``+inf``, and NaN only for
  ``mmls``/``mmles`` of a row holding both ``+inf`` and ``-inf`` (the mean is undefined).

A NaN logit makes the score of its row NaN (no value can be read into it);
:func:`isomax_jax.metrics.ood_metrics` then refuses those scores eagerly.

**One class.** ``max_probability``, ``entropic`` and ``mmles`` are constant on ``[B, 1]`` logits
(``p = 1``): they raise ``ValueError`` instead of scoring every input the same.
``min_distance``, ``mmls`` and ``energy`` are defined for one class.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from isomax_jax import validation


def _logits(logits: jax.typing.ArrayLike, *, min_classes: int = 1, score: str = "") -> jax.Array:
    logits = validation.as_array("logits", logits)
    validation.check_rank("logits", logits, 2, "[batch, num_classes]")
    validation.check_floating("logits", logits)
    if logits.shape[1] < min_classes:
        why = " (softmax over one class is always 1)" if min_classes == 2 else ""
        raise ValueError(
            f"`logits` must have at least {min_classes} class(es) for {score}{why}; got shape "
            f"{logits.shape}."
        )
    return logits.astype(validation.compute_dtype(logits.dtype))


def _shifted(logits: jax.Array) -> jax.Array:
    """``logits - max`` per row, in the extended reals.

    A finite maximum gives exactly ``jax.nn.log_softmax``'s shift. An infinite one (``+inf``, or
    ``-inf`` for a row of ``-inf`` only) would give ``inf - inf = NaN``: the logits equal to it
    get 0 and the others ``-inf``, so the infinite logits share the probability equally. NaN
    logits stay NaN (their row's maximum is NaN).
    """
    row_max = jnp.max(logits, axis=1, keepdims=True)
    tied = jnp.where(logits == row_max, 0.0, -jnp.inf).astype(logits.dtype)
    return jnp.where(
        jnp.isfinite(row_max) | jnp.isnan(row_max), logits - lax.stop_gradient(row_max), tied
    )


def _softmax(logits: jax.Array) -> jax.Array:
    unnormalized = jnp.exp(_shifted(logits))
    return unnormalized / jnp.sum(unnormalized, axis=1, keepdims=True)


def _negative_entropy(logits: jax.Array) -> jax.Array:
    shifted = _shifted(logits)
    log_probs = shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=1, keepdims=True))
    zero = log_probs == -jnp.inf  # p = 0: the term is 0 log 0 = 0 (and its gradient 0)
    safe = jnp.where(zero, 0.0, log_probs)
    return jnp.sum(jnp.where(zero, 0.0, jnp.exp(safe) * safe), axis=1)


def max_probability(logits: jax.typing.ArrayLike) -> jax.Array:
    """Maximum softmax probability (MPS), ``[batch, num_classes]`` -> ``[batch]``.

    Needs ``num_classes >= 2``; in ``[1 / C, 1]`` for logits without NaN (see the module doc).

    Example:
      >>> max_probability(jnp.array([[0.0, 0.0], [10.0, 0.0]]))
      Array([0.5      , 0.9999546], dtype=float32)
    """
    logits = _logits(logits, min_classes=2, score="max_probability")
    return jnp.max(_softmax(logits), axis=1)


def entropic(logits: jax.typing.ArrayLike) -> jax.Array:
    """Entropic score (ES): negative entropy ``sum_j p_j log p_j``, ``[B, C]`` -> ``[B]``.

    Needs ``num_classes >= 2``; in ``[-log C, 0]`` for logits without NaN (see the module doc).

    Example:
      >>> entropic(jnp.array([[0.0, 0.0], [1e4, 0.0], [-jnp.inf, 0.0]]))
      Array([-0.6931472, -0.       ,  0.       ], dtype=float32)
    """
    return _negative_entropy(_logits(logits, min_classes=2, score="entropic"))


def min_distance(logits: jax.typing.ArrayLike) -> jax.Array:
    """Minimum distance score (MDS): the maximum logit, ``[B, C]`` -> ``[B]``.

    For IsoMax-family heads the logits are negative distances, so this is minus the distance
    to the nearest prototype.

    Example:
      >>> min_distance(jnp.array([[-1.0, -3.0], [-2.0, -0.5]]))
      Array([-1. , -0.5], dtype=float32)
    """
    return jnp.max(_logits(logits, score="min_distance"), axis=1)


def mmls(logits: jax.typing.ArrayLike) -> jax.Array:
    """Max-mean logit score (MMLS): ``max_j logits_j + mean_j logits_j``, ``[B, C]`` -> ``[B]``.

    Example:
      >>> mmls(jnp.array([[-1.0, -3.0]]))
      Array([-3.], dtype=float32)
    """
    logits = _logits(logits, score="mmls")
    return jnp.max(logits, axis=1) + jnp.mean(logits, axis=1)


def mmles(logits: jax.typing.ArrayLike) -> jax.Array:
    """Max-mean logit entropy score (MMLES), DisMax's default, ``[B, C]`` -> ``[B]``.

    ``max_j logits_j + mean_j logits_j + sum_j p_j log p_j``; needs ``num_classes >= 2``.

    Example:
      >>> mmles(jnp.array([[0.0, 0.0]]))
      Array([-0.6931472], dtype=float32)
    """
    logits = _logits(logits, min_classes=2, score="mmles")
    return jnp.max(logits, axis=1) + jnp.mean(logits, axis=1) + _negative_entropy(logits)


def energy(logits: jax.typing.ArrayLike, *, temperature: jax.typing.ArrayLike = 1.0) -> jax.Array:
    """Negative free energy ``T logsumexp(logits / T)``, ``[B, C]`` -> ``[B]``.

    Not in the IsoMax papers; a common baseline (Liu et al., "Energy-based Out-of-distribution
    Detection", NeurIPS 2020).

    Args:
      logits: ``[batch, num_classes]``.
      temperature: ``T``, a finite scalar ``> 0``. A concrete bad value raises ``ValueError``;
        a traced one (under ``jit``) gives NaN scores instead.

    Example:
      >>> energy(jnp.array([[0.0, 0.0]]))
      Array([0.6931472], dtype=float32)
    """
    temperature = validation.check_temperature(temperature)
    logits = _logits(logits, score="energy")
    temperature = jnp.asarray(temperature, logits.dtype)
    return temperature * jax.nn.logsumexp(logits / temperature, axis=1)
