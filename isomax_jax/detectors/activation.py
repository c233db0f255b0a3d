"""Activation-shaping detectors: ReAct (clip) and ASH-S (prune + scale), then energy.

Both change the penultimate features and re-apply the classification head through
``head_fn(features) -> logits`` (any head: linear or distance-based), then score the new logits
with the energy :func:`isomax_jax.scores.energy`. They assume non-negative (post-ReLU, pooled)
activations, as in the papers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from isomax_jax import scores, validation
from isomax_jax.detectors import chunked
from isomax_jax.detectors.base import Detector, as_matrix


def _check_percentile(value) -> None:
    """A percentile in [0, 100]; a value in (0, 1) is refused as a likely fraction."""
    validation.check_real("percentile", value, minimum=0, maximum=100)
    if 0 < value < 1:
        raise ValueError(
            f"`percentile` is in percent, in [0, 100]; got {value!r}, which looks like a fraction "
            f"(pytorch-ood writes 0.65 for the 65th percentile): pass {100 * value:g}. Percentiles "
            "between 0 and 1 are refused."
        )


def _head_logits(head_fn, features: jax.Array) -> jax.Array:
    logits = jnp.asarray(head_fn(features))
    if logits.ndim != 2 or logits.shape[0] != features.shape[0]:
        raise ValueError(
            f"`head_fn` must map [batch, features] to [batch, num_classes] logits; it mapped "
            f"{tuple(features.shape)} to {tuple(logits.shape)}."
        )
    return logits


@dataclasses.dataclass(frozen=True)
class ReAct(Detector):
    """ReAct: energy of the head applied to clipped features, ``T logsumexp(h(min(f, c)))``.

    Sun, Guo & Li, "ReAct: Out-of-distribution Detection With Rectified Activations", NeurIPS
    2021. ``c`` is the ``percentile``-th percentile (default 90, the paper's) of *all* training
    activations (``numpy.percentile`` with linear interpolation over the ``N x D`` entries,
    computed exactly by chunked radix selection: bounded memory, no sort). State:
    ``{"threshold": c}``. ``chunk=4096`` rows per fit chunk. Applies to every head.
    """

    percentile: float = 90.0
    chunk: int = 4096
    name = "react"
    title = "ReAct"
    fit_inputs = frozenset({"features"})
    score_inputs = frozenset({"features", "head_fn"})
    state_keys = frozenset({"threshold"})

    def __post_init__(self):
        _check_percentile(self.percentile)
        validation.check_int("chunk", self.chunk)

    def _fit(self, *, features, **_):
        x = as_matrix("features", features, "[N, D]")
        validation.check_finite("features", x)
        return {"threshold": chunked.percentile(x, float(self.percentile), chunk=self.chunk)}

    def _score(self, state, head_fn, *, features):
        clipped = jnp.minimum(features, state["threshold"].astype(features.dtype))
        return scores.energy(_head_logits(head_fn, clipped))


def ash_s(features: jax.Array, percentile: float) -> jax.Array:
    """ASH-S on ``[B, D]``: keep each row's ``D - round(D p / 100)`` largest entries, zero the rest,
    multiply by ``exp(sum(row) / sum(kept))``.

    Entries tied with the smallest kept value are all kept (deterministic; ``torch.topk`` keeps an
    arbitrary subset of such ties). A row whose kept entries sum to 0 keeps scale ``exp(0) = 1``
    (instead of NaN).
    """
    dim = features.shape[1]
    keep = dim - int(np.round(dim * percentile / 100.0))
    if keep < 1:
        raise ValueError(f"`percentile`={percentile} prunes all {dim} features; keep at least one.")
    threshold = jnp.min(jax.lax.top_k(features, keep)[0], axis=1)
    pruned = jnp.where(features >= threshold[:, None], features, 0)
    total = jnp.sum(features, axis=1)
    kept = jnp.sum(pruned, axis=1)
    scale = jnp.where(kept != 0, total / jnp.where(kept != 0, kept, 1), 0)
    return pruned * jnp.exp(scale)[:, None]


@dataclasses.dataclass(frozen=True)
class ASH(Detector):
    """ASH-S: energy of the head applied to pruned and rescaled features (:func:`ash_s`).

    Djurisic, Bozanic, Ashok & Liu, "Extremely Simple Activation Shaping for Out-of-Distribution
    Detection", ICLR 2023. Default ``percentile=90`` (ASH-S@90, the paper's setting for CIFAR and
    ImageNet), applied to the pooled penultimate features as in the paper. Nothing to fit.
    Applies to every head. pytorch-ood's default is 65 (a fraction, 0.65); its ASH-S is the same
    formula on ``[B, D, 1, 1]`` feature maps.
    """

    percentile: float = 90.0
    name = "ash"
    title = "ASH"
    score_inputs = frozenset({"features", "head_fn"})

    def __post_init__(self):
        _check_percentile(self.percentile)

    def _score(self, state, head_fn, *, features):
        return scores.energy(_head_logits(head_fn, ash_s(features, self.percentile)))


DETECTORS = (ReAct, ASH)
