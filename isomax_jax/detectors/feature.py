"""Gaussian feature detectors: Mahalanobis (tied covariance) and relative Mahalanobis.

Fit (eager, bounded memory): float64 sufficient statistics accumulated over row chunks
(:class:`isomax_jax.detectors.gaussian.ClassMoments`: ``O(C D + D^2)`` memory, never ``N x N``),
then the pseudo-inverse whitening ``W`` of the tied covariance
``Sigma = (1/N) sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T + ridge I`` in float64, stored in the
features' dtype. Directions of no variance (dead ReLU units, collinear features, fewer rows
than dimensions: eigenvalues at most ``lambda_max * D * eps``) are left out of the distance, as
the original code's pseudo-inverse does, so the default ``ridge = 0`` works on real features.
Scoring: all classes at matrix-product speed, the nearest two per row recomputed in the direct
form ``||(x - mu_c) W||^2``; the error bound is in :mod:`isomax_jax.detectors.gaussian`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from isomax_jax import validation
from isomax_jax.detectors import gaussian, streaming
from isomax_jax.detectors.base import (
    Detector,
    as_matrix,
    check_labels,
    check_width,
    images_jit,
    model_outputs,
)
from isomax_jax.detectors.perturbation import check_images, check_norm_std, perturb

_STATE = ("means", "whitening", "center", "whitened_means")


def _check_common(detector) -> None:
    validation.check_real("ridge", detector.ridge, minimum=0)
    validation.check_int("num_classes", detector.num_classes, allow_none=True)
    validation.check_int("chunk", detector.chunk)


class _GaussianAccumulator(streaming.LabelledAccumulator):
    """Float64 class moments of a stream of (features, labels); one pass, O(C D + D^2)."""

    def __init__(self, detector, num_classes: int | None, background: bool):
        super().__init__(detector, num_classes)
        self.background = background
        self.moments = gaussian.ClassMoments(num_classes)

    def update(self, batch, pass_index):
        x, y = self.labelled(batch)
        if y.size:
            self.moments.update(x, y)

    def finalize(self):
        counts = self.moments.counts
        missing = np.flatnonzero(counts == 0)
        if self.moments.shift is None or missing.size:
            raise ValueError(
                f"`labels` cover {len(counts) - missing.size} of {len(counts)} classes; class(es) "
                f"{missing[:10].tolist()} have no training example, so their mean is undefined."
            )
        detector, moments, dtype = self.detector, self.moments, self.dtype
        white = gaussian.whitening(moments.within_class_covariance(), ridge=detector.ridge,
                                   dtype=dtype)  # fmt: skip
        state = gaussian.gaussian_state(moments.class_means(), white, dtype)
        if self.background:
            white0 = gaussian.whitening(moments.covariance(), ridge=detector.ridge, dtype=dtype)
            state["background_mean"] = jnp.asarray(moments.mean(), dtype)
            state["background_whitening"] = jnp.asarray(white0, dtype)
        return state


def _fit(detector, features, labels, logits, *, background: bool) -> dict[str, jax.Array]:
    """``fit``: the streamed fit over ``chunk``-row views of the checked arrays."""
    x = as_matrix("features", features, "[N, D]")
    validation.check_finite("features", x)
    if logits is not None:
        validation.check_finite("logits", jnp.asarray(logits))
    y, num_classes = check_labels(labels, x.shape[0], detector.num_classes, logits)
    accumulator = _GaussianAccumulator(detector, num_classes, background)
    chunks = streaming.row_chunks({"features": x, "labels": y}, detector.chunk)
    streaming.drive([accumulator], chunks, detector.name)
    return accumulator.finalize()


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
    (per-channel input std, as in ODIN), ``ridge=0`` (``Sigma + ridge I``; directions of no
    variance are dropped, as by the paper code's pseudo-inverse: see the module docstring),
    ``num_classes=None`` (else the logits' width or ``max(labels) + 1``), ``chunk=4096`` rows
    per fit chunk.

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
    state_keys = frozenset(_STATE)

    def __post_init__(self) -> None:
        _check_common(self)
        validation.check_real("eps", self.eps, minimum=0)
        check_norm_std(self.norm_std)

    @property
    def needs_images(self) -> bool:
        return self.eps > 0

    def _fit(self, *, features, labels, logits, **_):
        return _fit(self, features, labels, logits, background=False)

    def accumulator(self, **head):
        return _GaussianAccumulator(self, self.num_classes, background=False)

    def _prepare(self, state, *, features):
        x = as_matrix("features", features, "[batch, features]")
        check_width("features", x, state["means"].shape[1], "feature dimensions")
        return {"features": x}

    def _score(self, state, head_fn, *, features):
        return -gaussian.nearest_squared_distance(features, state)

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
            return gaussian.nearest_squared_distance(_needed(features), state)

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
    state_keys = frozenset((*_STATE, "background_mean", "background_whitening"))

    def __post_init__(self) -> None:
        _check_common(self)

    def _fit(self, *, features, labels, logits, **_):
        return _fit(self, features, labels, logits, background=True)

    def accumulator(self, **head):
        return _GaussianAccumulator(self, self.num_classes, background=True)

    # The same inputs as Mahalanobis (features): its keyword-only signature stands in for
    # the base's **arrays dispatch, as every detector's own _prepare does.
    _prepare = Mahalanobis._prepare  # pyright: ignore[reportAssignmentType]

    def _score(self, state, head_fn, *, features):
        d0 = gaussian.direct_squared_distance(
            features, state["background_mean"][None, :], state["background_whitening"]
        )
        return d0 - gaussian.nearest_squared_distance(features, state)


DETECTORS = (Mahalanobis, RelativeMahalanobis)
