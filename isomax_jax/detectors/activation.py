"""Activation-shaping detectors: ReAct (clip), ASH-S (prune + scale), SCALE (scale), then energy.

Each changes the penultimate features and re-applies the classification head through
``head_fn(features) -> logits`` (linear or distance-based), then scores the new logits with the
energy :func:`isomax_jax.scores.energy`. They assume non-negative (post-ReLU, pooled)
activations, as in the papers. ASH-S and SCALE share the sharpening factor
``exp(sum(row) / sum(top-k of row))``; ASH-S also prunes the row to its top-k, SCALE does not.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from isomax_jax import scores, validation
from isomax_jax.detectors import chunked, streaming
from isomax_jax.detectors.base import Detector, as_matrix


def check_percentile(value) -> None:
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

    def __post_init__(self) -> None:
        check_percentile(self.percentile)
        validation.check_int("chunk", self.chunk)

    def _fit(self, *, features, **_):
        x = as_matrix("features", features, "[N, D]")
        validation.check_finite("features", x)
        return {"threshold": chunked.percentile(x, float(self.percentile), chunk=self.chunk)}

    def accumulator(self, **head):
        return _PercentileAccumulator(float(self.percentile))

    def _score(self, state, head_fn, *, features):
        clipped = jnp.minimum(features, state["threshold"].astype(features.dtype))
        return scores.energy(_head_logits(head_fn, clipped))


class _PercentileAccumulator(streaming.Accumulator):
    """The exact ``numpy.percentile`` (linear) of every entry of a stream of ``[n, D]`` features:
    a radix selection of the two order statistics, one 16-bit digit of the order-preserving keys
    per pass over the data (2 passes for float32, 4 for float64), in ``2 x 65536`` counters."""

    inputs = frozenset({"features"})
    passes = 2  # 4 once float64 features are seen

    def __init__(self, q: float):
        self.q = q
        self.n = 0
        # Set by the first batch (the widths and dtype are not known before): None until then.
        self.dtype: Any = None
        self.bits: Any = None
        self.targets: list[list[int]] = []  # per order statistic: [prefix, remaining rank]
        self.hist: list[np.ndarray] = []
        self.resolved = 0  # digits resolved so far

    def _keys(self, rows: np.ndarray) -> np.ndarray:
        utype = np.dtype(f"uint{self.bits}")
        raw = np.ascontiguousarray(rows.astype(self.dtype, copy=False)).view(utype).ravel()
        top = utype.type(1) << utype.type(self.bits - 1)
        return np.where((raw & top) != 0, ~raw, raw | top)

    def update(self, batch, pass_index):
        rows = batch["features"]
        if self.dtype is None:
            self.dtype = streaming.state_dtype(rows.dtype)
            self.bits = self.dtype.itemsize * 8
            self.passes = self.bits // 16
        if pass_index > self.resolved:
            self._resolve()
        keys = self._keys(rows)
        shift = self.bits - 16 * (pass_index + 1)
        digits = ((keys >> np.uint64(shift)) & 0xFFFF).astype(np.int64)
        if pass_index == 0:
            self.n += keys.size
            if not self.hist:
                self.hist = [np.zeros(1 << 16, np.int64)]
            self.hist[0] += np.bincount(digits, minlength=1 << 16)
            return
        higher = keys >> np.uint64(shift + 16)
        for target, hist in zip(self.targets, self.hist, strict=True):
            hist += np.bincount(digits[higher == target[0]], minlength=1 << 16)

    def _resolve(self) -> None:
        """Fixes the next digit of each order statistic from the last pass's histograms."""
        if self.resolved == 0:  # ranks, as numpy.percentile: (n - 1) q / 100
            index = (self.n - 1) * (np.float64(self.q) / 100.0)
            self.low, self.t = int(np.floor(index)), float(index - np.floor(index))
            ranks = (self.low, min(self.low + 1, self.n - 1))
            self.targets = [[0, r] for r in ranks]
            self.hist = [self.hist[0], self.hist[0]]
        for target, hist in zip(self.targets, self.hist, strict=True):
            cumulative = np.cumsum(hist)
            digit = int(np.searchsorted(cumulative, target[1], side="right"))
            target[1] -= int(cumulative[digit - 1]) if digit else 0
            target[0] = (target[0] << 16) | digit
        self.resolved += 1
        self.hist = [np.zeros(1 << 16, np.int64) for _ in self.targets]

    def _value(self, key: int):
        utype = np.dtype(f"uint{self.bits}")
        key = utype.type(key)
        top = utype.type(1) << utype.type(self.bits - 1)
        raw = key ^ top if key & top else ~key
        return np.asarray(raw, utype).view(self.dtype)

    def finalize(self):
        if self.n == 0:
            raise ValueError("`react.fit_from` got no features.")
        self._resolve()  # the last pass's digit
        a, b = (jnp.asarray(self._value(t[0]), self.dtype) for t in self.targets)
        diff = b - a
        threshold = jnp.where(self.t >= 0.5, b - diff * (1.0 - self.t), a + diff * self.t)
        return {"threshold": threshold}


def _kept(dim: int, percentile: float) -> int:
    """The ``k`` of ASH-S's and SCALE's top-k of ``dim`` entries: ``dim - round(dim p / 100)``."""
    keep = dim - int(np.round(dim * percentile / 100.0))
    if keep < 1:
        raise ValueError(f"`percentile`={percentile} prunes all {dim} features; keep at least one.")
    return keep


def _sharpening(total: jax.Array, kept: jax.Array) -> jax.Array:
    """``exp(total / kept)`` per row; ``exp(0) = 1`` where ``kept`` is 0 (instead of NaN)."""
    return jnp.exp(jnp.where(kept != 0, total / jnp.where(kept != 0, kept, 1), 0))


def ash_s(features: jax.Array, percentile: float) -> jax.Array:
    """ASH-S on ``[B, D]``: keep each row's ``D - round(D p / 100)`` largest entries, zero the rest,
    multiply by ``exp(sum(row) / sum(kept))``.

    Entries tied with the smallest kept value are all kept (deterministic; ``torch.topk`` keeps an
    arbitrary subset of such ties). A row whose kept entries sum to 0 keeps scale ``exp(0) = 1``
    (instead of NaN).
    """
    threshold = jnp.min(jax.lax.top_k(features, _kept(features.shape[1], percentile))[0], axis=1)
    pruned = jnp.where(features >= threshold[:, None], features, 0)
    total = jnp.sum(features, axis=1)
    return pruned * _sharpening(total, jnp.sum(pruned, axis=1))[:, None]


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

    def __post_init__(self) -> None:
        check_percentile(self.percentile)

    def _score(self, state, head_fn, *, features):
        return scores.energy(_head_logits(head_fn, ash_s(features, self.percentile)))


def scale_shaping(features: jax.Array, percentile: float) -> jax.Array:
    """SCALE on ``[B, D]``: every entry multiplied by ``exp(sum(row) / sum(top-k of row))``,
    ``k = D - round(D p / 100)``; nothing is pruned.

    The top-k sum is that of ``lax.top_k``'s values, as the paper's code (``torch.topk``): ties at
    the k-th value do not change it. A row whose top-k sums to 0 keeps scale ``exp(0) = 1``.
    """
    total = jnp.sum(features, axis=1)
    top = jnp.sum(jax.lax.top_k(features, _kept(features.shape[1], percentile))[0], axis=1)
    return features * _sharpening(total, top)[:, None]


@dataclasses.dataclass(frozen=True)
class SCALE(Detector):
    """SCALE: energy of the head applied to rescaled, unpruned features (:func:`scale_shaping`),
    ``T logsumexp(h(f exp(sum(f) / sum(top-k of f))))`` with ``T = 1``.

    Xu, Chen, Franchi & Yao, "Scaling for Training Time and Post-hoc Out-of-distribution
    Detection Enhancement", ICLR 2024: ASH-S's sharpening factor without its pruning, applied to
    the pooled penultimate features. Default ``percentile=85``, the authors' setting (their code's
    configuration, also OpenOOD v1.5's, whose ImageNet-1K leaderboard SCALE leads among post-hoc
    methods with ResNet-50).
    Nothing to fit. pytorch-ood 0.4.0's default is 65 (a fraction, 0.65); its SCALE is the same
    formula on ``[B, D, H, W]`` feature maps.

    Applies to the SoftMax and IsoMax heads. IsoMax+ and DisMax L2-normalise the features before
    the distance, so a positive per-row scale leaves their logits unchanged: there SCALE *is*
    ``energy`` (tested), and ``applies_to`` is False so each head gets that score once.
    """

    percentile: float = 85.0
    name = "scale"
    title = "SCALE"
    heads = frozenset({"softmax", "isomax"})
    score_inputs = frozenset({"features", "head_fn"})

    def __post_init__(self) -> None:
        check_percentile(self.percentile)

    def _score(self, state, head_fn, *, features):
        return scores.energy(_head_logits(head_fn, scale_shaping(features, self.percentile)))


DETECTORS = (ReAct, ASH, SCALE)
