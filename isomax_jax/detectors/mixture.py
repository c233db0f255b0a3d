"""Class-conditional Gaussian mixture (GMM): the log-density of the features under one Gaussian
per class, each with its own covariance.

Fit: per class, float64 moments accumulated over row chunks (:class:`gaussian.ClassMoments`, one
per class: ``O(C D^2)`` memory, never ``N x D``), then each class's pseudo-inverse whitening
``W_c`` (:func:`gaussian.whitening`, the rule Mahalanobis uses: eigenvalues at most
``lambda_max * D * eps`` dropped) in float64, stored in the features' dtype. With ``W_c`` of
rank ``r_c`` and ``lambda`` its kept eigenvalues, the class log-density is
``log N(f; mu_c, Sigma_c) = -(||(f - mu_c) W_c||^2 + sum log lambda + r_c log 2 pi) / 2``: the
Gaussian's density on the span of its covariance (with full-rank covariances, the usual one).
Scoring: each class's distance in the direct form (:func:`gaussian.direct_squared_distance`,
whose error bound :mod:`isomax_jax.detectors.gaussian` states), one class at a time
(``lax.map``: ``O(B D)`` temporaries), then a ``logsumexp`` over the classes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from isomax_jax import validation
from isomax_jax.detectors import gaussian, streaming
from isomax_jax.detectors.base import Detector, as_matrix, check_labels, check_width


@dataclasses.dataclass(frozen=True)
class GMM(Detector):
    """Class-conditional Gaussian mixture: ``log sum_c pi_c N(f; mu_c, Sigma_c)``.

    Mukhoti, Kirsch, van Amersfoort, Torr & Gal, "Deep Deterministic Uncertainty: A New Simple
    Baseline", CVPR 2023 (DDU; Gaussian discriminant analysis on the features): one Gaussian per
    class with the class mean ``mu_c``, the class covariance ``Sigma_c`` (divided by the class
    count ``N_c``: the maximum-likelihood fit; DDU's code divides by ``N_c - 1``) and the weight
    ``pi_c = N_c / N`` (the class prior of the paper's ``q(z) = sum_y q(z | y) q(y)``); the
    score is the log-density of the features under the mixture. It is Mahalanobis (Lee et al.,
    NeurIPS 2018) with one covariance per class and the mixture's ``logsumexp`` in place of the
    nearest class.

    Hyperparameters: ``ridge=0`` (``Sigma_c + ridge I``; directions of no variance in a class are
    dropped from its density, the pseudo-inverse rule of :mod:`isomax_jax.detectors.gaussian`:
    see the module docstring. When classes have fewer rows than dimensions their covariances have
    different spans, and their densities are then on different subspaces: pass ``ridge > 0``, as
    DDU's jitter and pytorch-ood's ``reg=1e-6`` do), ``num_classes=None`` (else
    ``max(labels) + 1``), ``chunk=4096`` rows per fit chunk. Applies to every head.

    pytorch-ood 0.4.0 always adds ``1e-6 I`` (and fails on a covariance that is still singular);
    with ``ridge=1e-6``, ``ours = -pytorch_ood`` (tested).
    """

    ridge: float = 0.0
    num_classes: int | None = None
    chunk: int = 4096
    name = "gmm"
    title = "GMM"
    fit_inputs = frozenset({"features", "labels"})
    score_inputs = frozenset({"features"})
    state_keys = frozenset({"means", "whitening", "log_normalizer"})

    def __post_init__(self) -> None:
        validation.check_real("ridge", self.ridge, minimum=0)
        validation.check_int("num_classes", self.num_classes, allow_none=True)
        validation.check_int("chunk", self.chunk)

    def _fit(self, *, features, labels, **_):
        x = as_matrix("features", features, "[N, D]")
        validation.check_finite("features", x)
        y, num_classes = check_labels(labels, x.shape[0], self.num_classes, None)
        accumulator = _ClassGaussians(self, num_classes)
        chunks = streaming.row_chunks({"features": x, "labels": y}, self.chunk)
        streaming.drive([accumulator], chunks, self.name)
        return accumulator.finalize()

    def accumulator(self, **head):
        return _ClassGaussians(self, self.num_classes)

    def _prepare(self, state, *, features):
        x = as_matrix("features", features, "[batch, features]")
        check_width("features", x, state["means"].shape[1], "feature dimensions")
        return {"features": x}

    def _score(self, state, head_fn, *, features):
        def squared_distance(mean_and_whitening):
            mean, white = mean_and_whitening
            return gaussian.direct_squared_distance(features, mean[None, :], white)

        d2 = lax.map(squared_distance, (state["means"], state["whitening"]))  # [C, B]
        return jax.nn.logsumexp(state["log_normalizer"][:, None] - 0.5 * d2, axis=0)


class _ClassGaussians(streaming.LabelledAccumulator):
    """Float64 moments of each class (one :class:`gaussian.ClassMoments` per class); one pass,
    ``O(C D^2)`` memory."""

    def __init__(self, detector: GMM, num_classes: int | None):
        super().__init__(detector, num_classes)
        self.moments = [gaussian.ClassMoments(1) for _ in range(num_classes or 0)]

    def update(self, batch, pass_index):
        x, y = self.labelled(batch)
        if not y.size:
            return
        while len(self.moments) <= y.max():  # a new class (num_classes not fixed)
            self.moments.append(gaussian.ClassMoments(1))
        order = np.argsort(y, kind="stable")
        classes, starts = np.unique(y[order], return_index=True)
        for c, rows in zip(classes, np.split(x[order], starts[1:]), strict=True):
            self.moments[c].update(rows, np.zeros(len(rows), np.int64))

    def finalize(self):
        counts = np.array([m.total for m in self.moments])
        missing = np.flatnonzero(counts == 0)
        if not counts.size or missing.size:
            raise ValueError(
                f"`labels` cover {counts.size - missing.size} of {counts.size} classes; class(es) "
                f"{missing[:10].tolist()} have no training example, so their Gaussian is "
                "undefined."
            )
        whitenings, log_normalizer = [], []
        for c, moments in enumerate(self.moments):
            white = gaussian.whitening(moments.covariance(), ridge=self.detector.ridge,
                                       dtype=self.dtype, name=f"features of class {c}")  # fmt: skip
            # W^T W = diag(1 / lambda) over the kept eigenvalues: log pdet = -2 sum log ||w_j||
            log_det = -2 * np.sum(np.log(np.linalg.norm(white, axis=0)))
            rank = white.shape[1]
            log_weight = np.log(counts[c] / counts.sum())
            log_normalizer.append(log_weight - 0.5 * (log_det + rank * np.log(2 * np.pi)))
            whitenings.append(white)
        rank = max(w.shape[1] for w in whitenings)
        padded = np.stack([np.pad(w, ((0, 0), (0, rank - w.shape[1]))) for w in whitenings])
        means = np.stack([m.mean() for m in self.moments])
        return {
            "means": jnp.asarray(means, self.dtype),
            "whitening": jnp.asarray(padded, self.dtype),
            "log_normalizer": jnp.asarray(np.array(log_normalizer), self.dtype),
        }


DETECTORS = (GMM,)
