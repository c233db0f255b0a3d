"""Post-hoc temperature calibration: minimise the 15-bin expected calibration error (ECE).

The reference (``robust_deep_learning.calibrate_temperature``) minimises the ECE of held-out
logits over ``T in [0.001, 100]`` with L-BFGS-B and finite-difference gradients starting from
``T = 1``. The ECE is piecewise constant in ``T`` almost everywhere, so gradient steps often stall
at the start; here the search is a deterministic grid in ``log T`` over the same interval followed
by a finer grid around the best point, which reaches an ECE at least as low in practice (see
``tests/parity/test_parity_core.py``). Everything is pure JAX and runs under ``jit``.

**Input checks.** Shapes and dtypes are checked always (``ValueError``/``TypeError`` naming the
argument). With concrete inputs the values are checked too, so no meaningless number comes back:
NaN/inf logits, labels outside ``[0, num_classes)``, a temperature that is not a finite number
``> 0``, ``num_bins < 1``, ``bounds`` that are not finite with ``0 < low < high`` and
``num_candidates < 2`` raise ``ValueError`` naming the argument. Under ``jit`` the value checks
on traced arrays cannot raise: the ECE and the temperature are NaN instead.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from isomax_jax import validation


def _check(logits, labels, num_bins):
    """Static checks always; value checks when concrete. Returns (logits, labels)."""
    logits, labels = validation.check_logits_labels(logits, labels)
    if logits.shape[0] == 0:
        raise ValueError("`logits` must hold at least one example; got shape (0, ...).")
    if isinstance(num_bins, bool) or not isinstance(num_bins, int | np.integer):
        raise TypeError(f"`num_bins` must be a Python int (it is static); got {num_bins!r}.")
    if num_bins < 1:
        raise ValueError(f"`num_bins` must be at least 1; got {num_bins}.")
    if validation.is_concrete(logits):
        validation.check_finite("logits", logits)
    if validation.is_concrete(labels):
        validation.validate_labels(labels, logits.shape[1])
    return logits, labels


def _valid(logits, labels):
    """True when every logit is finite and every label in range (the traced-input guard)."""
    in_range = jnp.all((labels >= 0) & (labels < logits.shape[1]))
    return in_range & jnp.all(jnp.isfinite(logits))


def _ece(logits: jax.Array, labels: jax.Array, temperature: jax.Array, num_bins: int):
    probs = jax.nn.softmax(logits / temperature, axis=1)
    confidence = jnp.max(probs, axis=1)
    correct = (jnp.argmax(probs, axis=1) == labels).astype(confidence.dtype)
    edges = jnp.linspace(0.0, 1.0, num_bins + 1, dtype=confidence.dtype)
    in_bin = (confidence[None, :] > edges[:-1, None]) & (confidence[None, :] <= edges[1:, None])
    # sum_b (n_b / n) |mean conf_b - mean acc_b| = sum_b |sum_{i in b} (conf_i - acc_i)| / n.
    gap = jnp.sum(jnp.where(in_bin, (confidence - correct)[None, :], 0), axis=1)
    return jnp.sum(jnp.abs(gap)) / logits.shape[0]


def expected_calibration_error(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    temperature: jax.typing.ArrayLike = 1.0,
    num_bins: int = 15,
) -> jax.Array:
    """Expected calibration error of ``softmax(logits / temperature)`` with equal-width bins.

    Bins are ``(k / num_bins, (k + 1) / num_bins]`` over the max probability, as in the
    reference's ``ECELoss`` (from Jonathan-Pearce/calibration_library).

    Args:
      logits: ``[batch, num_classes]`` held-out logits.
      labels: ``[batch]`` integer labels.
      temperature: scalar ``T``, finite and ``> 0``.
      num_bins: number of bins (15 in the papers), a Python int ``>= 1``.

    Returns:
      Scalar ECE in ``[0, 1]``, float32 or wider; NaN under ``jit`` for invalid traced values
      (see the module doc).

    Raises:
      ValueError, TypeError: bad shapes/dtypes; with concrete inputs also NaN/inf logits,
        out-of-range labels, a temperature that is not finite and ``> 0``, ``num_bins < 1``.

    Example:
      >>> logits = jnp.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
      >>> expected_calibration_error(logits, jnp.array([0, 1, 1]))
      Array(0.21413036, dtype=float32)
    """
    temperature = validation.check_temperature(temperature)
    logits, labels = _check(logits, labels, num_bins)
    temperature = jnp.asarray(temperature, logits.dtype)
    ece = _ece(logits, labels, temperature, num_bins)
    if validation.is_concrete(logits, labels, temperature):
        return ece
    # A traced bad temperature is NaN here (check_temperature): the binning would hide it.
    return jnp.where(_valid(logits, labels) & ~jnp.isnan(temperature), ece, jnp.nan)


def calibrate_temperature(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    num_bins: int = 15,
    bounds: tuple[float, float] = (1e-3, 100.0),
    num_candidates: int = 256,
) -> jax.Array:
    """Temperature ``T`` in ``bounds`` that minimises the ECE of ``softmax(logits / T)``.

    Evaluates the ECE on ``num_candidates`` temperatures spaced evenly in ``log T`` over
    ``bounds``, then twice more (two refinement passes) on as many between the neighbours of the
    best one; returns the best (the smallest ``T`` among ties). Apply it with ``logits / T`` or
    ``head.clone(temperature=float(T))``.

    Args:
      logits: ``[batch, num_classes]`` held-out (validation) logits at temperature 1.
      labels: ``[batch]`` integer labels.
      num_bins: ECE bins (15 in the papers), a Python int ``>= 1``.
      bounds: ``(low, high)`` search interval, finite with ``0 < low < high`` (the reference's
        default).
      num_candidates: grid size of each of the three passes (the coarse grid and its two
        refinements), a Python int ``>= 2``.

    Returns:
      Scalar temperature, float32 or wider; NaN under ``jit`` when the traced logits hold
      NaN/inf or a label is out of range.

    Raises:
      ValueError, TypeError: bad shapes/dtypes or arguments; with concrete inputs also NaN/inf
        logits and out-of-range labels (the search would otherwise return a meaningless bound).

    Example:
      >>> logits = 5.0 * jax.random.normal(jax.random.key(0), (256, 10))
      >>> labels = jax.random.randint(jax.random.key(1), (256,), 0, 10)
      >>> t = calibrate_temperature(logits, labels, num_candidates=64)
      >>> bool(expected_calibration_error(logits, labels, temperature=t)
      ...      < expected_calibration_error(logits, labels))
      True
    """
    logits, labels = _check(logits, labels, num_bins)
    low, high = _check_bounds(bounds)
    if isinstance(num_candidates, bool) or not isinstance(num_candidates, int | np.integer):
        raise TypeError(f"`num_candidates` must be a Python int; got {num_candidates!r}.")
    if num_candidates < 2:
        raise ValueError(f"`num_candidates` must be at least 2; got {num_candidates}.")
    return _calibrate(logits, labels, int(num_bins), low, high, int(num_candidates))


def _check_bounds(bounds) -> tuple[float, float]:
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError) as e:
        raise ValueError(f"`bounds` must be a pair of numbers (low, high); got {bounds!r}.") from e
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low < high):
        raise ValueError(f"`bounds` must be finite with 0 < low < high; got {bounds!r}.")
    return low, high


# Refinement passes after the coarse grid: with 256 candidates the third pass resolves log T to
# ~1e-6, below where the ECE of float32 logits changes.
_REFINEMENTS = 2


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _calibrate(logits, labels, num_bins, low, high, num_candidates):
    dtype = logits.dtype

    def search(log_low, log_high):
        log_t = jnp.linspace(log_low, log_high, num_candidates, dtype=dtype)
        eces = jax.lax.map(lambda lt: _ece(logits, labels, jnp.exp(lt), num_bins), log_t)
        best = jnp.argmin(eces)
        return log_t, best, eces[best]

    log_t, best, best_ece = search(
        jnp.log(jnp.asarray(low, dtype)), jnp.log(jnp.asarray(high, dtype))
    )
    chosen = log_t[best]
    for _ in range(_REFINEMENTS):  # each pass zooms into the best candidate's two neighbours
        fine_low = log_t[jnp.maximum(best - 1, 0)]
        fine_high = log_t[jnp.minimum(best + 1, num_candidates - 1)]
        log_t, best, fine_ece = search(fine_low, fine_high)
        better = fine_ece <= best_ece
        chosen = jnp.where(better, log_t[best], chosen)
        best_ece = jnp.minimum(fine_ece, best_ece)
    return jnp.where(_valid(logits, labels), jnp.clip(jnp.exp(chosen), low, high), jnp.nan)
