"""Distances and logit maps of the IsoMax family.

Notation: features ``f`` ``[batch, features]``, prototypes ``P`` ``[num_classes, features]``.
All functions are pure, work under ``jit``/``vmap``/``grad`` and compute in float32 or wider
(bfloat16/float16 inputs give float32 logits).

Numerics, matched to the PyTorch reference (``robust_deep_learning`` 0.5.0; the math of the
losses and heads is in ``docs/isomax.md``, the numerics below in ``docs/accelerators.md``):

* ``pairwise_distance(..., method="exact")`` (the default) is as accurate as the reference's
  subtract-square-reduce (``torch.cdist(..., compute_mode="donot_use_mm_for_euclid_dist")``) at
  the cost of one matrix product. Every pair is first computed in the matrix-product form
  ``s_ij = ||f_i||^2 + ||p_j||^2 - 2 f_i.p_j`` (``Precision.HIGHEST``). With ``u`` the unit
  roundoff of the compute dtype and ``gamma_n = n u / (1 - n u)``, the dot-product error bound
  gives ``|fl(s) - d^2| <= gamma_{D+2} (||f||^2 + ||p||^2 + 2 |f|.|p|) <= gamma_{D+2} S`` with
  ``S = (||f|| + ||p||)^2``, while subtract-square-reduce (a sum of squares) has
  ``|fl(s) - d^2| <= gamma_{D+2} d^2``. The matrix product is thus bad exactly where
  ``d^2 << S``: there ``|sqrt(fl(s)) - d|`` is only bounded by ``sqrt(gamma S)`` (at ``d = 0``,
  about ``1e-3 (||f|| + ||p||) / 2`` in float32 for D=512, against 0). Rule: an entry is kept
  iff ``fl(s) >= tau fl(S)``, ``tau = (1/K + gamma)(1 + 2 gamma)``, ``gamma = gamma_{D+3}``,
  ``K =`` :data:`CANCELLATION_LIMIT` ``= 8`` (the factor ``1 + 2 gamma`` covers the rounding of
  ``fl(S)`` and of the product). A kept entry then has ``d^2 >= fl(s) - gamma S >= S / K``, so
  ``|fl(s) - d^2| <= K gamma d^2`` and ``|fl(d) - d| <= (K gamma + u) d``: at most ``K`` times
  the exact form's bound. Every other entry is recomputed by subtract-square-reduce: in each row
  the :data:`EXACT_PER_ROW` ``= 2`` entries with the largest ``tau fl(S) - fl(s)`` (the most
  cancellation; the nearest prototypes when the norms are alike) always, and the whole matrix
  (a ``lax.cond``, about 3x slower) in the rare batch where a row has more rejected entries
  (a feature within the cancellation zone of 3+ near-duplicate prototypes). The derivative (a
  ``custom_jvp``) expands ``<f_i - p_j, df_i - dp_j> / d_ij`` into matrix products, except for
  the recomputed pairs of each row, which use the exact differences ``f_i - p_j`` (the
  expansion's relative error grows like ``sqrt(S) / d``); it is 0 at ``d = 0``, as in torch.
  Cost (``benchmarks/bench_heads.py``, 2-core CPU, B=256, C=1000, D=2048): about 1.0x an
  ``nn.Dense`` head forward and 1.2x forward+backward; temporary memory O(B C + B D + C D),
  never the 2 GiB ``[B, C, D]`` difference.
* ``method="matmul"`` is the matrix-product form alone (clamped at 0): the fastest, but with
  the ``sqrt(gamma S)`` error near ``d = 0``.
* ``l2_normalize`` is ``x / max(||x||, 1e-12)`` (torch ``F.normalize``): an all-zero row gives
  zeros and finite gradients.
* The distance scale enters through ``|s|`` with derivative ``sign(s)`` (0 at 0, as in torch).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from isomax_jax import validation

_METHODS = ("exact", "matmul")


@jax.custom_jvp
def safe_sqrt(x: jax.typing.ArrayLike) -> jax.Array:
    """Square root whose derivative is 0 (not inf) at 0.

    Example:
      >>> float(jax.grad(safe_sqrt)(0.0)), float(jax.grad(safe_sqrt)(4.0))
      (0.0, 0.25)
    """
    return jnp.sqrt(x)


@safe_sqrt.defjvp
def _safe_sqrt_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    y = jnp.sqrt(x)
    positive = y > 0
    return y, jnp.where(positive, t / (2 * jnp.where(positive, y, 1)), 0)


def safe_abs(x: jax.typing.ArrayLike) -> jax.Array:
    """``|x|`` with derivative ``sign(x)``, i.e. 0 at 0 like ``torch.abs`` (``jnp.abs`` gives 1).

    Example:
      >>> float(jax.grad(safe_abs)(0.0)), float(jax.grad(safe_abs)(-2.0))
      (0.0, -1.0)
    """
    return jnp.sign(x) * x


def l2_normalize(x: jax.typing.ArrayLike, *, eps: float = 1e-12) -> jax.Array:
    """Normalises each row: ``x / max(||x||_2, eps)`` (torch ``F.normalize(x, dim=1)``).

    Args:
      x: ``[n, d]`` floating array.
      eps: lower bound of the norm; an all-zero row stays zero with finite gradients.

    Returns:
      ``[n, d]`` array of unit (or zero) rows.

    Example:
      >>> l2_normalize(jnp.array([[3.0, 4.0], [0.0, 0.0]]))
      Array([[0.6, 0.8],
             [0. , 0. ]], dtype=float32)
    """
    x = validation.as_array("x", x)
    norm = safe_sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


#: ``K``: an entry of the matrix-product form is kept only where its worst-case error bound is
#: at most ``K`` times the bound of the subtract-square-reduce form at the same entry.
CANCELLATION_LIMIT = 8.0
#: ``k``: entries of each row always recomputed by subtract-square-reduce (the ``k`` entries
#: with the largest cancellation ratio, i.e. the nearest prototypes when norms are alike).
EXACT_PER_ROW = 2

_HIGHEST = jax.lax.Precision.HIGHEST


def _gamma(n: int, dtype) -> float:
    """``gamma_n = n u / (1 - n u)``, ``u`` the unit roundoff of ``dtype`` (inf if ``n u >= 1``)."""
    u = float(jnp.finfo(dtype).eps) / 2
    return n * u / (1 - n * u) if n * u < 1 else math.inf


def _squared_distance_reduce(features: jax.Array, prototypes: jax.Array) -> jax.Array:
    # One fused subtract-square-reduce: XLA does not materialise the [B, C, D] operand.
    diff = features[:, None, :] - prototypes[None, :, :]
    return jnp.sum(jnp.square(diff), axis=-1)


def _squared_distance_at(
    features: jax.Array, prototypes: jax.Array, index: jax.Array, norm: jax.Array | None = None
):
    """Subtract-square-reduce for the pairs ``(i, index[i, m])``: ``[batch, k]`` (``norm``: the
    prototypes' rows divided by it, as :func:`l2_normalize` would)."""
    diff = features[:, None, :] - _prototype_rows(prototypes, index, norm)
    return jnp.sum(jnp.square(diff), axis=-1)


def _prototype_rows(prototypes: jax.Array, index: jax.Array, norm: jax.Array | None):
    rows = _rows(prototypes, index)
    return rows if norm is None else rows / _rows(norm, index)[..., None]


def _rows(x: jax.Array, index: jax.Array) -> jax.Array:
    """``x[index]`` for indices known to be in bounds (from ``top_k``): no bounds handling."""
    return x.at[index].get(mode="promise_in_bounds")


def _unit_norm(prototypes: jax.Array) -> jax.Array:
    """``max(||p_j||, 1e-12)``, ``[C]``: the divisor :func:`l2_normalize` uses, so that the rows
    ``p_j / norm_j`` formed here are bit for bit the rows it would materialise."""
    return jnp.maximum(safe_sqrt(jnp.sum(jnp.square(prototypes), axis=1)), 1e-12)


def _squared_distance(
    features: jax.Array, prototypes: jax.Array, unit: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Squared distances ``[B, C]`` (the exact rule of the module docstring) and the ``[B, k]``
    indices recomputed by subtract-square-reduce in every row.

    ``unit=True``: the distances to the L2-normalised prototypes ``p_j / max(||p_j||, 1e-12)``,
    without materialising them (a ``[C, D]`` array): the matrix product runs on the raw
    prototypes and is divided by the norms, and the recomputed rows are normalised as they are
    gathered. The extra roundings (one division per product, two per squared norm) are covered
    by ``gamma_{D+5}`` in place of ``gamma_{D+3}``.
    """
    batch, dim = features.shape
    k = min(EXACT_PER_ROW, prototypes.shape[0])
    norm = _unit_norm(prototypes) if unit else None
    gamma = _gamma(dim + (5 if unit else 3), features.dtype)
    # Accept where d~^2 >= (||f|| + ||p||)^2 * (1/K + gamma) * (1 + 2 gamma).
    threshold = (1 / CANCELLATION_LIMIT + gamma) * (1 + 2 * gamma)

    def full():  # subtract-square-reduce of every pair (fused: no [B, C, D] array)
        if norm is None:
            return _squared_distance_reduce(features, prototypes)
        # ||f - p / n||^2 = ||f n - p||^2 / n^2: the same accuracy (each difference rounded
        # once), and nothing of size [C, D] to materialise before the fused reduction.
        diff = features[:, None, :] * norm[None, :, None] - prototypes[None, :, :]
        return jnp.sum(jnp.square(diff), axis=-1) / jnp.square(norm)[None, :]

    if not threshold < 1:  # the bound is void in this dtype at this D: no matrix product
        squared = full()
        return squared, jax.lax.top_k(-squared, k)[1]
    f2 = jnp.sum(jnp.square(features), axis=1, keepdims=True)
    p2 = jnp.sum(jnp.square(prototypes), axis=1)[None, :]
    cross = jnp.matmul(features, prototypes.T, precision=_HIGHEST)
    if norm is not None:
        p2 = p2 / jnp.square(norm)[None, :]
        cross = cross / norm[None, :]
    squared = f2 + p2 - 2 * cross
    # > 0 where the matrix-product value is not accepted; the k largest per row are recomputed.
    excess = threshold * jnp.square(jnp.sqrt(f2) + jnp.sqrt(p2)) - squared
    _, index = jax.lax.top_k(excess, k)
    rows = jnp.arange(batch)[:, None]
    exact = _squared_distance_at(features, prototypes, index, norm)
    squared = squared.at[rows, index].set(exact, unique_indices=True)  # top_k: distinct
    # A row with more than k rejected entries (k + 1 prototypes within the cancellation zone of
    # one feature): recompute everything, rarely, so that every returned entry is exact.
    overflow = jnp.any(jnp.sum(excess > 0, axis=1) > k)
    squared = jax.lax.cond(overflow, full, lambda: squared)
    return squared, index


@jax.custom_jvp
def _exact_distance(features: jax.Array, prototypes: jax.Array) -> jax.Array:
    squared, _ = _squared_distance(features, prototypes)
    return jnp.sqrt(jnp.maximum(squared, 0))


def _exact_distance_jvp(primals, tangents):
    features, prototypes = primals
    d_features, d_prototypes = tangents
    squared, index = _squared_distance(features, prototypes)
    distance = jnp.sqrt(jnp.maximum(squared, 0))
    positive = distance > 0
    inverse = jnp.where(positive, 1 / jnp.where(positive, distance, 1), 0)
    # d(d_ij) = <f_i - p_j, df_i - dp_j> / d_ij. Expanded into matrix products for all pairs;
    # for the k pairs of each row recomputed in the forward pass (where the expansion would
    # cancel most) it is computed from the exact differences f_i - p_j, a [B, k, D] array.
    difference = features[:, None, :] - _rows(prototypes, index)
    expanded = jnp.zeros_like(distance)
    exact = jnp.zeros(index.shape, distance.dtype)
    if not isinstance(d_features, SymbolicZero):
        expanded = expanded + jnp.sum(features * d_features, axis=-1, keepdims=True)
        expanded = expanded - jnp.matmul(d_features, prototypes.T, precision=_HIGHEST)
        exact = exact + jnp.sum(difference * d_features[:, None, :], axis=-1)
    if not isinstance(d_prototypes, SymbolicZero):
        expanded = expanded - jnp.matmul(features, d_prototypes.T, precision=_HIGHEST)
        expanded = expanded + jnp.sum(prototypes * d_prototypes, axis=-1)[None, :]
        exact = exact - jnp.sum(difference * _rows(d_prototypes, index), axis=-1)
    rows = jnp.arange(features.shape[0])[:, None]
    return distance, expanded.at[rows, index].set(exact, unique_indices=True) * inverse


_exact_distance.defjvp(_exact_distance_jvp, symbolic_zeros=True)


@jax.custom_jvp
def _exact_unit_distance(features: jax.Array, prototypes: jax.Array) -> jax.Array:
    """``_exact_distance(features, l2_normalize(prototypes))`` without the ``[C, D]`` array of
    normalised prototypes (in the forward or the derivative): ``features`` are normalised by the
    caller (``[B, D]``, small), the prototypes here."""
    squared, _ = _squared_distance(features, prototypes, unit=True)
    return jnp.sqrt(jnp.maximum(squared, 0))


def _exact_unit_distance_jvp(primals, tangents):
    features, prototypes = primals
    d_features, d_prototypes = tangents
    squared, index = _squared_distance(features, prototypes, unit=True)
    distance = jnp.sqrt(jnp.maximum(squared, 0))
    positive = distance > 0
    inverse = jnp.where(positive, 1 / jnp.where(positive, distance, 1), 0)
    norm = _unit_norm(prototypes)
    unit_rows = _prototype_rows(prototypes, index, norm)  # the normalised rows p^_j, [B, k, D]
    difference = features[:, None, :] - unit_rows
    expanded = jnp.zeros_like(distance)
    exact = jnp.zeros(index.shape, distance.dtype)
    if not isinstance(d_features, SymbolicZero):
        expanded = expanded + jnp.sum(features * d_features, axis=-1, keepdims=True)
        expanded = (
            expanded - jnp.matmul(d_features, prototypes.T, precision=_HIGHEST) / norm[None, :]
        )
        exact = exact + jnp.sum(difference * d_features[:, None, :], axis=-1)
    if not isinstance(d_prototypes, SymbolicZero):
        # dp^_j = (dp_j - p^_j a_j) / n_j with a_j = p^_j . dp_j (0 where the norm is clamped,
        # the derivative of l2_normalize there being dp_j / 1e-12), n_j = max(||p_j||, 1e-12).
        p_dp = jnp.sum(prototypes * d_prototypes, axis=1)
        clamped = safe_sqrt(jnp.sum(jnp.square(prototypes), axis=1)) <= 1e-12
        a = jnp.where(clamped, 0, p_dp / norm)
        f2 = jnp.sum(jnp.square(features), axis=1, keepdims=True)
        p2 = (jnp.sum(jnp.square(prototypes), axis=1) / jnp.square(norm))[None, :]
        cosine = (f2 + p2 - squared) / 2  # <f_i, p^_j> (first order: any accurate value)
        f_dp = jnp.matmul(features, d_prototypes.T, precision=_HIGHEST) / norm[None, :]
        expanded = expanded - f_dp + cosine * (a / norm)[None, :]
        expanded = expanded + ((p_dp / norm - p2[0] * a) / norm)[None, :]
        d_rows = (_rows(d_prototypes, index) - unit_rows * _rows(a, index)[..., None]) / _rows(
            norm, index
        )[..., None]
        exact = exact - jnp.sum(difference * d_rows, axis=-1)
    rows = jnp.arange(features.shape[0])[:, None]
    return distance, expanded.at[rows, index].set(exact, unique_indices=True) * inverse


_exact_unit_distance.defjvp(_exact_unit_distance_jvp, symbolic_zeros=True)


def _matmul_unit_distance(features: jax.Array, prototypes: jax.Array) -> jax.Array:
    """``_matmul_distance(features, l2_normalize(prototypes))`` without the normalised copy."""
    norm = _unit_norm(prototypes)
    squared = (
        jnp.sum(jnp.square(features), axis=-1, keepdims=True)
        + (jnp.sum(jnp.square(prototypes), axis=-1) / jnp.square(norm))[None, :]
        - 2 * jnp.matmul(features, prototypes.T, precision=_HIGHEST) / norm[None, :]
    )
    return safe_sqrt(jnp.maximum(squared, 0))


def _matmul_distance(features: jax.Array, prototypes: jax.Array) -> jax.Array:
    squared = (
        jnp.sum(jnp.square(features), axis=-1, keepdims=True)
        + jnp.sum(jnp.square(prototypes), axis=-1)[None, :]
        - 2 * jnp.matmul(features, prototypes.T, precision=_HIGHEST)
    )
    return safe_sqrt(jnp.maximum(squared, 0))


def _check_pair(features, prototypes) -> jnp.dtype:
    validation.check_rank("features", features, 2, "[batch, features]")
    validation.check_rank("prototypes", prototypes, 2, "[num_classes, features]")
    validation.check_floating("features", features)
    validation.check_floating("prototypes", prototypes)
    if features.shape[1] != prototypes.shape[1]:
        raise ValueError(
            "`features` and `prototypes` must have the same feature dimension: `features` has "
            f"shape {tuple(features.shape)} ([batch, features]) and `prototypes` has shape "
            f"{tuple(prototypes.shape)} (expected [num_classes, {features.shape[1]}])."
        )
    return validation.compute_dtype(features.dtype, prototypes.dtype)


def pairwise_distance(
    features: jax.typing.ArrayLike, prototypes: jax.typing.ArrayLike, *, method: str = "exact"
) -> jax.Array:
    """Euclidean distances ``d_ij = ||f_i - p_j||_2`` between features and prototypes.

    Args:
      features: ``[batch, features]`` floating array.
      prototypes: ``[num_classes, features]`` floating array.
      method: ``"exact"`` (default): as accurate as the reference's subtract-square-reduce
        (``torch.cdist(..., compute_mode="donot_use_mm_for_euclid_dist")``): the
        matrix-product form where its written error bound is within ``K = 8`` times the
        exact form's, subtract-square-reduce elsewhere (module docstring). ``"matmul"``: the
        matrix-product form ``||f||^2 + ||p||^2 - 2 f.p`` alone (clamped at 0), which loses
        precision when ``d`` is small relative to the norms. Measured in float32 on unit
        vectors (D=512 and 2048): absolute error of ``d`` at most ~1.7e-7 on random pairs
        (``d`` near 1.4, the same as the exact method) but up to ~1e-3 at ``d = 0`` (exact
        method: 0); see ``tests/test_distances.py``. Neither materialises
        ``[batch, num_classes, features]``.

    Returns:
      ``[batch, num_classes]`` distances, float32 or wider; the derivative is 0 where ``d = 0``.

    Example:
      >>> f = jnp.array([[0.0, 0.0], [3.0, 4.0]])
      >>> p = jnp.array([[0.0, 0.0], [3.0, 0.0]])
      >>> pairwise_distance(f, p)
      Array([[0., 3.],
             [5., 4.]], dtype=float32)
    """
    features = validation.as_array("features", features)
    prototypes = validation.as_array("prototypes", prototypes)
    dtype = _check_pair(features, prototypes)
    if method not in _METHODS:
        raise ValueError(f"`method` must be one of {_METHODS}; got {method!r}.")
    features = features.astype(dtype)
    prototypes = prototypes.astype(dtype)
    if method == "exact":
        return _exact_distance(features, prototypes)
    return _matmul_distance(features, prototypes)


def _check_scale(distance_scale, dtype) -> jax.Array:
    distance_scale = validation.as_array("distance_scale", distance_scale)
    validation.check_floating("distance_scale", distance_scale)
    if distance_scale.shape not in ((), (1,)):
        raise ValueError(
            f"`distance_scale` must have shape [1] or be a scalar; got {distance_scale.shape}."
        )
    return jnp.reshape(distance_scale, ()).astype(dtype)


def isomax_logits(
    features: jax.typing.ArrayLike,
    prototypes: jax.typing.ArrayLike,
    *,
    temperature: jax.typing.ArrayLike = 1.0,
    method: str = "exact",
) -> jax.Array:
    """IsoMax logits ``-||f_i - p_j||_2 / T`` (Macêdo et al., arXiv 1908.05569).

    Args:
      features: ``[batch, features]`` floating array.
      prototypes: ``[num_classes, features]`` floating array (zeros at initialisation).
      temperature: finite scalar ``T`` > 0, 1 in training; set after post-hoc calibration.
        A traced bad value (under ``jit``) gives NaN logits
        (:func:`isomax_jax.validation.check_temperature`).
      method: distance computation, see :func:`pairwise_distance`.

    Returns:
      ``[batch, num_classes]`` logits (float32 or wider).

    Raises:
      ValueError: for a concrete ``temperature`` that is not a finite scalar > 0, bad shapes or
        an unknown ``method``.

    Example:
      >>> isomax_logits(jnp.array([[3.0, 4.0]]), jnp.zeros((2, 2)))
      Array([[-5., -5.]], dtype=float32)
    """
    temperature = validation.check_temperature(temperature)
    distance = pairwise_distance(features, prototypes, method=method)
    return -distance / jnp.asarray(temperature, distance.dtype)


def _scaled_normalized_distance(features, prototypes, distance_scale, method, divisor=None):
    features = validation.as_array("features", features)
    prototypes = validation.as_array("prototypes", prototypes)
    dtype = _check_pair(features, prototypes)
    scale = _check_scale(distance_scale, dtype)
    if method not in _METHODS:
        raise ValueError(f"`method` must be one of {_METHODS}; got {method!r}.")
    # The prototypes are normalised inside the distance: no [C, D] copy (issue 19.5).
    unit = _exact_unit_distance if method == "exact" else _matmul_unit_distance
    distance = unit(l2_normalize(features.astype(dtype)), prototypes.astype(dtype))
    if divisor is not None:
        distance = distance / divisor
    return safe_abs(scale) * distance


def isomax_plus_logits(
    features: jax.typing.ArrayLike,
    prototypes: jax.typing.ArrayLike,
    distance_scale: jax.typing.ArrayLike,
    *,
    temperature: jax.typing.ArrayLike = 1.0,
    method: str = "exact",
) -> jax.Array:
    """IsoMax+ logits ``-|s| ||f̂_i - p̂_j||_2 / T`` with ``v̂ = v / max(||v||, 1e-12)``.

    Reference: Macêdo & Ludermir, "Enhanced Isotropy Maximization Loss", arXiv 2105.14399.

    Args:
      features: ``[batch, features]`` floating array.
      prototypes: ``[num_classes, features]`` floating array.
      distance_scale: learnable scale ``s``, shape ``[1]`` or scalar, used through ``|s|``.
      temperature: finite scalar ``T`` > 0 (traced bad value: NaN logits).
      method: distance computation, see :func:`pairwise_distance`.

    Returns:
      ``[batch, num_classes]`` logits in ``[-2|s|/T, 0]``.

    Example:
      >>> f = jnp.array([[1.0, 0.0]])
      >>> p = jnp.array([[2.0, 0.0], [-1.0, 0.0]])
      >>> isomax_plus_logits(f, p, jnp.ones(1))
      Array([[-0., -2.]], dtype=float32)
    """
    temperature = validation.check_temperature(temperature)
    distance = _scaled_normalized_distance(features, prototypes, distance_scale, method)
    return -distance / jnp.asarray(temperature, distance.dtype)


def dismax_logits(
    features: jax.typing.ArrayLike,
    prototypes: jax.typing.ArrayLike,
    distance_scale: jax.typing.ArrayLike,
    *,
    temperature: jax.typing.ArrayLike = 1.0,
    method: str = "exact",
) -> jax.Array:
    """DisMax logits ``-(d_ij + mean_k d_ik) / T``, ``d_ij = |s| ||f̂_i - p̂_j||_2 / sqrt(2)``.

    Reference: Macêdo et al., "Distinction Maximization Loss", arXiv 2205.05874.

    Args:
      features: ``[batch, features]`` floating array.
      prototypes: ``[num_classes, features]`` floating array.
      distance_scale: learnable scale ``s``, shape ``[1]`` or scalar, used through ``|s|``.
      temperature: finite scalar ``T`` > 0, not trained; calibrated post hoc (traced bad value:
        NaN logits).
      method: distance computation, see :func:`pairwise_distance`.

    Returns:
      ``[batch, num_classes]`` logits.

    Example:
      >>> f = jnp.array([[1.0, 0.0]])
      >>> p = jnp.array([[2.0, 0.0], [-1.0, 0.0]])
      >>> dismax_logits(f, p, jnp.ones(1))
      Array([[-0.70710677, -2.1213202 ]], dtype=float32)
    """
    temperature = validation.check_temperature(temperature)
    distance = _scaled_normalized_distance(
        features, prototypes, distance_scale, method, divisor=math.sqrt(2.0)
    )
    logits = -(distance + jnp.mean(distance, axis=1, keepdims=True))
    return logits / jnp.asarray(temperature, logits.dtype)
