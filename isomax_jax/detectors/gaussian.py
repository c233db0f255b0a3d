"""Gaussian statistics of features, shared by Mahalanobis and relative Mahalanobis.

**Fitting** accumulates sufficient statistics in float64 on the host, chunk by chunk
(:class:`ClassMoments`): per-class counts and sums and one scatter matrix of the features
shifted by the first chunk's mean, so the memory is ``O(C D + D^2)`` whatever the number of rows
and a float32 fit is as accurate as the float64 one up to the final rounding of the state
(a float32 accumulation loses about ``condition number x 1e-7`` in the inverse covariance).

**Whitening** (:func:`whitening`) is the pseudo-inverse square root of the covariance, as the
original Mahalanobis code's ``sklearn.covariance.EmpiricalCovariance`` (``pinvh``): with
``Sigma = V diag(lambda) V^T`` (float64), ``W = V_r diag(lambda_r)^{-1/2}`` over the ``r``
eigenvalues above ``lambda_max * D * eps(dtype)`` (NumPy's ``matrix_rank`` tolerance in the
state's dtype). Directions of no variance -- dead ReLU units, collinear features, fewer rows
than dimensions -- are dropped from the distance instead of making the fit fail; a ``ridge``
``> 0`` adds ``ridge * I`` first. ``d(x)^2 = ||(x - mu) W||^2``.

**Distances** (:func:`nearest_squared_distance`): all classes at matrix-product speed after
centring at the mean of the class means (``|z|^2 - 2 z.m + |m|^2``, ``z = (x - center) W``,
``m = (mu - center) W``), then the :data:`EXACT_PER_ROW` nearest classes of each row recomputed
in the direct form ``||(x - mu_c) W||^2``: the difference is formed before the whitening and
the squaring. Error bound of the direct form in a dtype of unit roundoff ``u``, with
``gamma_n = n u / (1 - n u)``, ``a = x - mu_c``, ``z = a W`` and the float32 state rounded
from float64 (``|dmu| <= u |mu|``, ``|dW| <= u |W|``)::

    |fl(d^2) - d^2| <= gamma_{r+1} d^2 + 2 gamma_{D+3} sum_j |z_j| ((|a| + |mu_c|)^T |W|)_j

(to first order in ``u``). The relative Mahalanobis score ``d_0^2 - d_c^2`` is the difference of
two such values, so its error is bounded by the sum of their two bounds: small next to each
term, not next to their difference, which is why the float32 tests use this bound
(``tests/test_detectors.py``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

#: Classes of each row recomputed in the direct form (the nearest by the expansion).
EXACT_PER_ROW = 2
_HIGHEST = jax.lax.Precision.HIGHEST


class ClassMoments:
    """Float64 sufficient statistics of ``[n, D]`` features per class, one chunk at a time.

    ``update(features, labels)`` adds a chunk; any chunk sizes give the same result up to
    float64 rounding. The number of classes grows with the largest label seen unless fixed.
    """

    def __init__(self, num_classes: int | None = None):
        self.num_classes = num_classes
        # Set by the first chunk (the width is not known before): None until then.
        self.shift: Any = None  # the first chunk's mean: keeps the sums small
        self.counts = np.zeros(num_classes or 0, np.int64)
        self.sums: Any = None  # [C, D] sums of (x - shift)
        self.scatter: Any = None  # [D, D] sum of (x - shift)(x - shift)^T

    def update(self, features, labels) -> None:
        """Adds ``features [n, D]`` with integer ``labels [n]`` (labels checked by the caller)."""
        x = np.asarray(features, np.float64)
        y = np.asarray(labels, np.int64)
        if self.shift is None:
            self.shift = x.mean(axis=0)
            dim = x.shape[1]
            self.sums = np.zeros((len(self.counts), dim))
            self.scatter = np.zeros((dim, dim))
        needed = int(y.max()) + 1 if y.size else 0
        if needed > len(self.counts):  # a new class: grow (only when num_classes is not fixed)
            self.counts = np.pad(self.counts, (0, needed - len(self.counts)))
            self.sums = np.pad(self.sums, ((0, needed - len(self.sums)), (0, 0)))
        x = x - self.shift
        self.counts += np.bincount(y, minlength=len(self.counts))
        np.add.at(self.sums, y, x)
        self.scatter += x.T @ x

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def class_means(self) -> np.ndarray:
        """``[C, D]`` float64 class means."""
        return self.shift + self.sums / self.counts[:, None]

    def within_class_covariance(self) -> np.ndarray:
        """``(1/N) sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T``, float64 ``[D, D]`` (tied)."""
        between = self.sums.T @ (self.sums / self.counts[:, None])
        return (self.scatter - between) / self.total

    def mean(self) -> np.ndarray:
        """``[D]`` float64 mean of all rows."""
        return self.shift + self.sums.sum(axis=0) / self.total

    def covariance(self) -> np.ndarray:
        """``(1/N) sum_i (x_i - mu)(x_i - mu)^T`` of all rows, float64 ``[D, D]``."""
        total = self.sums.sum(axis=0)
        return (self.scatter - np.outer(total, total) / self.total) / self.total


def whitening(cov: np.ndarray, *, ridge: float, dtype, name: str = "features") -> np.ndarray:
    """``W [D, r]`` with ``W W^T = pinv(cov + ridge I)`` over the resolvable eigenvalues.

    Eigenvalues at most ``lambda_max * D * eps(dtype)`` are dropped (module docstring).

    Raises:
      ValueError: no eigenvalue is left (every feature vector is the same and ``ridge = 0``).
    """
    dim = cov.shape[0]
    eigenvalues, vectors = np.linalg.eigh(cov + ridge * np.eye(dim))
    tol = max(float(eigenvalues[-1]), 0.0) * dim * float(jnp.finfo(dtype).eps)
    keep = eigenvalues > tol
    if not keep.any():
        raise ValueError(
            f"The covariance of `{name}` is zero (every training feature vector is the same), "
            "so a Mahalanobis distance is undefined; with ridge > 0 (any value) the distance is "
            "the Euclidean one divided by sqrt(ridge)."
        )
    return vectors[:, keep] / np.sqrt(eigenvalues[keep])[None, :]


def gaussian_state(means: np.ndarray, white: np.ndarray, dtype) -> dict[str, jax.Array]:
    """The scoring state of class means ``[C, D]`` and a whitening ``[D, r]`` (float64 in,
    ``dtype`` out): also the centre of the means and the whitened means for the expansion."""
    center = means.mean(axis=0)
    cast = functools.partial(jnp.asarray, dtype=dtype)
    return {
        "means": cast(means),
        "whitening": cast(white),
        "center": cast(center),
        "whitened_means": cast((means - center) @ white),
    }


def squared_distances(x: jax.Array, state) -> jax.Array:
    """All ``[B, C]`` squared distances by the expansion (clamped at 0): fast, less accurate."""
    z = jnp.matmul(x - state["center"][None, :], state["whitening"], precision=_HIGHEST)
    m = state["whitened_means"]
    cross = jnp.matmul(z, m.T, precision=_HIGHEST)
    d2 = jnp.sum(z * z, axis=1)[:, None] - 2 * cross + jnp.sum(m * m, axis=1)[None, :]
    return jnp.maximum(d2, 0)


def direct_squared_distance(x: jax.Array, mean: jax.Array, white: jax.Array) -> jax.Array:
    """``||(x - mean) W||^2`` in the direct form; ``x [..., D]`` and ``mean`` broadcast."""
    z = jnp.matmul(x - mean, white, precision=_HIGHEST)
    return jnp.sum(z * z, axis=-1)


def nearest_squared_distance(x: jax.Array, state) -> jax.Array:
    """``min_c d_c(x)^2`` ``[B]``: the expansion picks the nearest classes, the direct form
    computes their distances (exact to the module docstring's bound when the true nearest class
    is among the :data:`EXACT_PER_ROW` nearest by the expansion)."""
    k = min(EXACT_PER_ROW, state["means"].shape[0])
    _, index = jax.lax.top_k(-squared_distances(x, state), k)
    means = state["means"].at[index].get(mode="promise_in_bounds")  # [B, k, D]
    exact = direct_squared_distance(x[:, None, :], means, state["whitening"])
    return jnp.min(exact, axis=1)


def moments_of(features, labels, *, num_classes: int | None, chunk: int) -> ClassMoments:
    """:class:`ClassMoments` of ``features [N, D]`` read ``chunk`` rows at a time."""
    moments = ClassMoments(num_classes)
    for start in range(0, features.shape[0], chunk):
        moments.update(features[start : start + chunk], labels[start : start + chunk])
    return moments


__all__ = [
    "EXACT_PER_ROW",
    "ClassMoments",
    "direct_squared_distance",
    "gaussian_state",
    "moments_of",
    "nearest_squared_distance",
    "squared_distances",
    "whitening",
]
