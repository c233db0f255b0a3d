"""Logit detectors: ``[B, C]`` logits -> ``[B]`` scores, nothing to fit.

All but GEN delegate to :mod:`isomax_jax.scores`, so each formula has one implementation.

==============  ========  ============================================  ======================
name            title     score (higher = in-distribution)              heads
==============  ========  ============================================  ======================
msp             MPS       ``max_j softmax(z)_j``                        all
max_logit       MaxLogit  ``max_j z_j``                                 softmax
energy          energy    ``T logsumexp(z / T)``                        all
gen             GEN       ``-sum_{top M} p_j^g (1 - p_j)^g``            all
entropic        ES        ``sum_j p_j log p_j``                         all
min_distance    MDS       ``max_j z_j`` (= minus the nearest distance)  isomax, isomax+, dismax
mmls            MMLS      ``max_j z_j + mean_j z_j``                    isomax, isomax+, dismax
mmles           MMLES     ``mmls + sum_j p_j log p_j``                  isomax, isomax+, dismax
==============  ========  ============================================  ======================

``max_logit`` and ``min_distance`` are the same formula; ``max_logit`` is its name for the
linear (SoftMax) head and ``min_distance`` for distance heads, so each head gets it once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from isomax_jax import scores, validation
from isomax_jax.detectors.base import DISTANCE_HEADS, Detector

_LOGITS = frozenset({"logits"})


@dataclasses.dataclass(frozen=True)
class _LogitDetector(Detector):
    score_inputs = _LOGITS

    def _prepare(self, state, *, logits):
        return {"logits": super()._prepare(state, logits=logits)["logits"]}


@dataclasses.dataclass(frozen=True)
class MSP(_LogitDetector):
    """Maximum softmax probability (MSP), ``max_j softmax(z)_j``.

    Delegates to :func:`isomax_jax.scores.max_probability`.

    Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution Examples
    in Neural Networks", ICLR 2017. No hyperparameters. Applies to every head.
    """

    name = "msp"
    title = "MPS"

    def _score(self, state, head_fn, *, logits):
        return scores.max_probability(logits)


@dataclasses.dataclass(frozen=True)
class MaxLogit(_LogitDetector):
    """Maximum logit, ``max_j z_j`` (:func:`isomax_jax.scores.min_distance`, the same formula).

    Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings", ICML 2022.
    No hyperparameters. Applies to the SoftMax head only: on a distance head it *is*
    ``min_distance``.
    """

    name = "max_logit"
    title = "MaxLogit"
    heads = frozenset({"softmax"})

    def _score(self, state, head_fn, *, logits):
        return scores.min_distance(logits)


@dataclasses.dataclass(frozen=True)
class Energy(_LogitDetector):
    """Negative free energy, ``T logsumexp(z / T)`` (:func:`isomax_jax.scores.energy`).

    Liu, Wang, Owens & Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020. Default
    ``temperature=1`` (the paper's). Applies to every head.
    """

    temperature: float = 1.0
    name = "energy"
    title = "energy"

    def __post_init__(self) -> None:
        validation.check_temperature(self.temperature)

    def _score(self, state, head_fn, *, logits):
        return scores.energy(logits, temperature=self.temperature)


@dataclasses.dataclass(frozen=True)
class GEN(_LogitDetector):
    """Generalized entropy, ``-sum_{j in top-M} p_j^gamma (1 - p_j)^gamma``, ``p = softmax(z)``.

    Liu, Lochman & Zach, "GEN: Pushing the Limits of Softmax-Based Out-of-Distribution
    Detection", CVPR 2023. Defaults are the paper's: ``gamma=0.1``, ``M=100`` (its ImageNet
    setting; ``M`` is capped at the number of classes, so for ``C <= 100`` every class counts, as
    in the authors' code). The paper *sums* the top-M terms and does not clip probabilities;
    pytorch-ood 0.4.0 averages them and clamps ``p`` to ``[1e-7, 1 - 1e-7]``
    (``docs/detectors.md``).
    Powers are taken as ``exp(gamma log p)`` from log-softmax, so tiny probabilities keep their
    precision. Applies to every head.
    """

    gamma: float = 0.1
    M: int = 100
    name = "gen"
    title = "GEN"

    def __post_init__(self) -> None:
        validation.check_real("gamma", self.gamma, minimum=0, strict=True)
        validation.check_int("M", self.M)

    def _score(self, state, head_fn, *, logits):
        log_p = jax.nn.log_softmax(logits, axis=1)
        m = min(self.M, logits.shape[1])
        if m < logits.shape[1]:
            log_p = jax.lax.top_k(log_p, m)[0]
        log_q = jnp.log(-jnp.expm1(log_p))  # log(1 - p), -inf where p == 1
        return -jnp.sum(jnp.exp(self.gamma * (log_p + log_q)), axis=1)


@dataclasses.dataclass(frozen=True)
class Entropic(_LogitDetector):
    """Entropic score (ES), ``sum_j p_j log p_j`` (:func:`isomax_jax.scores.entropic`).

    Macêdo, Ren, Zanchettin, Oliveira & Ludermir, "Entropic Out-of-Distribution Detection",
    IJCNN 2021 (IsoMax). No hyperparameters. Applies to every head. pytorch-ood's ``Entropy``
    clamps ``p`` at ``1e-7``; here it comes from log-softmax and is exact (``docs/detectors.md``).
    """

    name = "entropic"
    title = "ES"

    def _score(self, state, head_fn, *, logits):
        return scores.entropic(logits)


@dataclasses.dataclass(frozen=True)
class MinDistance(_LogitDetector):
    """Minimum distance score (MDS), ``max_j z_j`` (:func:`isomax_jax.scores.min_distance`).

    Macêdo & Ludermir, "Enhanced Isotropy Maximization Loss" (IsoMax+), arXiv 2105.14399, 2021.
    No hyperparameters. Applies to distance heads (IsoMax, IsoMax+, DisMax), whose logits are
    negative distances; on the SoftMax head use ``max_logit``.
    """

    name = "min_distance"
    title = "MDS"
    heads = DISTANCE_HEADS

    def _score(self, state, head_fn, *, logits):
        return scores.min_distance(logits)


@dataclasses.dataclass(frozen=True)
class MMLS(_LogitDetector):
    """Max-mean logit score, ``max_j z_j + mean_j z_j`` (:func:`isomax_jax.scores.mmls`).

    Macêdo, Zanchettin & Ludermir, "Distinction Maximization Loss" (DisMax), arXiv 2205.05874,
    2022. No hyperparameters. Applies to distance heads.
    """

    name = "mmls"
    title = "MMLS"
    heads = DISTANCE_HEADS

    def _score(self, state, head_fn, *, logits):
        return scores.mmls(logits)


@dataclasses.dataclass(frozen=True)
class MMLES(_LogitDetector):
    """Max-mean logit entropy score, ``mmls + sum_j p_j log p_j`` (:func:`isomax_jax.scores.mmles`).

    DisMax's default score (Macêdo et al., arXiv 2205.05874, 2022). No hyperparameters. Applies to
    distance heads.
    """

    name = "mmles"
    title = "MMLES"
    heads = DISTANCE_HEADS

    def _score(self, state, head_fn, *, logits):
        return scores.mmles(logits)


DETECTORS = (MSP, MaxLogit, Energy, GEN, Entropic, MinDistance, MMLS, MMLES)
