"""Gaussian feature detectors: Mahalanobis (tied covariance) and relative Mahalanobis.

Fit (eager, bounded memory): class means from chunked one-hot matmuls, then the tied covariance
``Sigma = (1/N) sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T + ridge I`` accumulated over row chunks
(two passes, no cancellation; ``O(chunk * D + D^2)`` temporary memory, never ``N x N``). The state
stores the class means and a whitening matrix ``W`` with ``W W^T = Sigma^{-1}`` (from
``eigh(Sigma)``), so scoring is one ``[B, D] x [D, D]`` matmul for all classes:
``d_c(x)^2 = ||(x - mu_c) W||^2``.

A covariance whose smallest eigenvalue is at most ``D * eps(dtype) * largest`` (NumPy's
``matrix_rank`` tolerance) is singular: ``fit`` raises ``ValueError`` naming ``features`` (dead or
collinear feature dimensions, or fewer rows than dimensions) instead of silently using a
pseudo-inverse; pass ``ridge > 0`` to regularise explicitly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from isomax_jax import validation
from isomax_jax.detectors import chunked
from isomax_jax.detectors.base import (
    Detector,
    as_matrix,
    check_labels,
    check_width,
    images_jit,
    model_outputs,
)
from isomax_jax.detectors.perturbation import check_images, check_norm_std, perturb


def whitening(cov: jax.Array, name: str = "features") -> jax.Array:
    """``W = V diag(lambda)^{-1/2}`` with ``W W^T = cov^{-1}``; ``ValueError`` if singular."""
    eigenvalues, vectors = jnp.linalg.eigh(cov)
    dim = cov.shape[0]
    tol = float(eigenvalues[-1]) * dim * float(jnp.finfo(cov.dtype).eps)
    rank = int(jnp.sum(eigenvalues > tol))
    if rank < dim:
        raise ValueError(
            f"The covariance of `{name}` is singular (numerical rank {rank} of {dim}: constant or "
            f"collinear feature dimensions, e.g. dead ReLU units, or fewer rows than dimensions); "
            f"pass ridge > 0 to add ridge * I, or drop those dimensions."
        )
    return vectors / jnp.sqrt(eigenvalues)[None, :]


def fit_tied_gaussian(x, labels, num_classes: int, *, ridge: float, chunk: int):
    """Class means ``[C, D]`` and the whitening ``[D, D]`` of the tied covariance."""
    counts = np.bincount(labels, minlength=num_classes)
    y = jnp.asarray(labels, jnp.int32)
    sums = chunked.class_sums(x, y, num_classes=num_classes, chunk=chunk)
    means = sums / jnp.asarray(counts, x.dtype)[:, None]
    scatter = chunked.centered_scatter(x, y, means, chunk=chunk)
    cov = scatter / x.shape[0] + ridge * jnp.eye(x.shape[1], dtype=x.dtype)
    return means, whitening(cov)


def squared_distances(x: jax.Array, means: jax.Array, white: jax.Array) -> jax.Array:
    """``||(x_b - mu_c) W||^2``, ``[B, D], [C, D], [D, D] -> [B, C]`` (clamped at 0).

    Expanded as ``|z|^2 - 2 z.m + |m|^2`` (one matmul for all classes) after centring at the mean
    of the class means, which keeps the terms small and the cancellation mild.
    """
    center = jnp.mean(means, axis=0)[None, :]
    z = (x - center) @ white
    m = (means - center) @ white
    cross = z @ m.T
    d2 = jnp.sum(z * z, axis=1)[:, None] - 2 * cross + jnp.sum(m * m, axis=1)[None, :]
    return jnp.maximum(d2, 0)


def _check_common(detector) -> None:
    validation.check_real("ridge", detector.ridge, minimum=0)
    validation.check_int("num_classes", detector.num_classes, allow_none=True)
    validation.check_int("chunk", detector.chunk)


def _fit_features(features, labels, logits, num_classes):
    x = as_matrix("features", features, "[N, D]")
    validation.check_finite("features", x)
    if logits is not None:
        validation.check_finite("logits", jnp.asarray(logits))
    y, num_classes = check_labels(labels, x.shape[0], num_classes, logits)
    return x, y, num_classes


def _needed(features):
    if features is None:
        raise ValueError(
            "`mahalanobis.score_images` needs features: `apply_fn` must return (logits, features) "
            "or a dict with 'features'; it returned logits only."
        )
    return features


@dataclasses.dataclass(frozen=True)
class Mahalanobis(Detector):
    """Mahalanobis score: ``-min_c (x - mu_c)^T Sigma^{-1} (x - mu_c)``, tied covariance.

    Lee, Lee, Lee & Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
    Adversarial Attacks", NeurIPS 2018: class means and the tied covariance ``Sigma`` (divided by
    ``N``, as in the paper and its code) of the penultimate features; optional input
    pre-processing ``x' = x - eps sign(grad_x d_chat(x)^2) / std`` (``chat`` the nearest class)
    through :meth:`score_images`. The paper's feature ensemble over layers and its logistic
    regression (both tuned on OOD validation data) are not part of this detector.

    Hyperparameters: ``eps=0`` (no pre-processing: the paper tunes ``eps`` on OOD validation data,
    which nothing here may do; with ``eps > 0`` ``needs_images`` is True), ``norm_std=None``
    (per-channel input std, as in ODIN), ``ridge=0`` (``Sigma + ridge I``; a singular ``Sigma``
    raises), ``num_classes=None`` (else the logits' width or ``max(labels) + 1``), ``chunk=4096``
    rows per fit chunk.

    pytorch-ood 0.4.0 differs: its covariance is the *sum* ``S`` (not divided by ``N``) plus
    ``1e-6 I``, and its outlier score is ``0.5 min_c d_c^2``. With ``ridge = 1e-6 / N`` the two are
    related exactly by ``ours = -2 N * pytorch_ood`` (tested; ``docs/detectors.md``).
    """

    eps: float = 0.0
    norm_std: tuple[float, ...] | None = None
    ridge: float = 0.0
    num_classes: int | None = None
    chunk: int = 4096
    name = "mahalanobis"
    title = "Mahalanobis"
    fit_inputs = frozenset({"features", "labels"})
    score_inputs = frozenset({"features"})
    state_keys = frozenset({"means", "whitening"})

    def __post_init__(self):
        _check_common(self)
        validation.check_real("eps", self.eps, minimum=0)
        check_norm_std(self.norm_std)

    @property
    def needs_images(self) -> bool:
        return self.eps > 0

    def _fit(self, *, features, labels, logits, **_):
        x, y, num_classes = _fit_features(features, labels, logits, self.num_classes)
        means, white = fit_tied_gaussian(x, y, num_classes, ridge=self.ridge, chunk=self.chunk)
        return {"means": means, "whitening": white}

    def _prepare(self, state, *, features):
        x = as_matrix("features", features, "[batch, features]")
        check_width("features", x, state["means"].shape[1], "feature dimensions")
        return {"features": x}

    def _score(self, state, head_fn, *, features):
        d2 = squared_distances(features, state["means"], state["whitening"])
        return -jnp.min(d2, axis=1)

    def score_images(self, state, apply_fn, images, **head_inputs):
        """Scores ``images``; with ``eps > 0`` after the paper's input pre-processing.

        ``apply_fn(images) -> (logits, features)``; the gradient is taken in JAX. Internally
        jitted with ``apply_fn`` static (pass the same function object to reuse the compilation).
        """
        images = check_images(images, self.norm_std)
        self.check_state(state)
        return images_jit(self, apply_fn, state, images)

    def _score_images(self, state, apply_fn, images):
        def loss(logits, features):
            d2 = squared_distances(_needed(features), state["means"], state["whitening"])
            nearest = jnp.argmin(jax.lax.stop_gradient(d2), axis=1)
            return jnp.take_along_axis(d2, nearest[:, None], axis=1)[:, 0]

        x = images
        if self.eps > 0:
            x = perturb(apply_fn, images, loss, eps=self.eps, norm_std=self.norm_std)
        _, features = model_outputs(apply_fn(x))
        return self._score(state, None, **self._prepare(state, features=_needed(features)))


@dataclasses.dataclass(frozen=True)
class RelativeMahalanobis(Detector):
    """Relative Mahalanobis score: ``-min_c [d_c(x)^2 - d_0(x)^2]``.

    Ren, Fort, Liu, Roy, Padhy & Lakshminarayanan, "A Simple Fix to Mahalanobis Distance for
    Improving Near-OOD Detection", arXiv 2106.09022, 2021. ``d_c`` is the Mahalanobis distance to
    class ``c`` under the tied class covariance (as in :class:`Mahalanobis`), ``d_0`` the distance
    under one background Gaussian fitted to all training features (mean ``mu_0``, covariance
    ``Sigma_0``, both divided by ``N`` as in the paper). No tuned hyperparameters; ``ridge=0``,
    ``num_classes=None`` and ``chunk=4096`` as in :class:`Mahalanobis`.

    pytorch-ood 0.4.0 uses the undivided sums ``S + 1e-6 I`` for both covariances and returns
    ``min_c [d_c^2 - d_0^2]`` as outlier score; with ``ridge = 1e-6 / N``,
    ``ours = -N * pytorch_ood`` exactly (tested).
    """

    ridge: float = 0.0
    num_classes: int | None = None
    chunk: int = 4096
    name = "relative_mahalanobis"
    title = "RMD"
    fit_inputs = frozenset({"features", "labels"})
    score_inputs = frozenset({"features"})
    state_keys = frozenset({"means", "whitening", "background_mean", "background_whitening"})

    def __post_init__(self):
        _check_common(self)

    def _fit(self, *, features, labels, logits, **_):
        x, y, num_classes = _fit_features(features, labels, logits, self.num_classes)
        means, white = fit_tied_gaussian(x, y, num_classes, ridge=self.ridge, chunk=self.chunk)
        background, white0 = fit_tied_gaussian(
            x, np.zeros_like(y), 1, ridge=self.ridge, chunk=self.chunk
        )
        return {
            "means": means,
            "whitening": white,
            "background_mean": background[0],
            "background_whitening": white0,
        }

    _prepare = Mahalanobis._prepare

    def _score(self, state, head_fn, *, features):
        d2 = squared_distances(features, state["means"], state["whitening"])
        z0 = (features - state["background_mean"][None, :]) @ state["background_whitening"]
        return jnp.sum(z0 * z0, axis=1) - jnp.min(d2, axis=1)


DETECTORS = (Mahalanobis, RelativeMahalanobis)
