"""Detectors that read or reshape the classification head's weights or their gradient.

==============  ===========  ===================================================  ===============
name            title        score (higher = in-distribution)                     heads
==============  ===========  ===================================================  ===============
dice            DICE         ``logsumexp(f (W * M) + b)``, ``M`` the top weight    softmax
                             contributions ``mean(f)_d W_dc``
fdbd            fDBD         ``mean_{c != y} |z_y - z_c| / ||w_y - w_c||``         softmax
                             ``/ ||f - mean(f_train)||``
gradnorm        GradNorm     ``||f||_1 ||softmax(z / T) - 1/C||_1 / T``            softmax
weighted_ebo    WeightedEBO  ``logsumexp(z + log relu(w))``                        all
==============  ===========  ===================================================  ===============

DICE and fDBD need the linear head's ``kernel`` ``W`` ``[D, C]`` (and DICE its ``bias``
``b`` ``[C]``); GradNorm's closed form holds for the logits ``z = f W + b`` of a linear head. None
of the three applies to distance heads (IsoMax, IsoMax+, DisMax), whose logits are not affine in
the features. DICE and fDBD fit the training features' mean in float64 on the host, in one
streamed pass (``O(D)`` memory).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from isomax_jax import scores, validation
from isomax_jax.detectors import streaming
from isomax_jax.detectors.activation import check_percentile
from isomax_jax.detectors.base import Detector, as_matrix, check_width
from isomax_jax.detectors.vim import _linear_head

_HIGHEST = jax.lax.Precision.HIGHEST
_CHUNK = 4096  # rows per fit chunk
_GRAM_TRUST = 1e8  # see FDBD._head_state


@dataclasses.dataclass(frozen=True)
class _LinearHeadDetector(Detector):
    """A detector that needs the linear (SoftMax) head's parameters."""

    heads = frozenset({"softmax"})

    def _require(self, needed, given, method):
        for key in ("kernel", "bias"):
            if key in needed and given.get(key) is None:
                head = (
                    "`kernel` [D, C] and `bias` [C]" if "bias" in self.inputs else "`kernel` [D, C]"
                )
                raise ValueError(
                    f"`{self.name}.{method}` needs `{key}`: {self.title} needs a linear head's "
                    f"{head}; it does not apply to distance-based heads (IsoMax, IsoMax+, DisMax), "
                    "whose logits are not affine in the features."
                )
        super()._require(needed, given, method)

    def _fit(self, *, features, kernel, **_):
        x = as_matrix("features", features, "[N, D]")
        validation.check_finite("features", x)
        accumulator = self.accumulator(kernel=kernel)
        streaming.drive([accumulator], streaming.row_chunks({"features": x}, _CHUNK), self.name)
        return accumulator.finalize()

    def accumulator(self, *, kernel=None, **_):
        return _MeanAccumulator(self, kernel)

    def _head_state(self, mean: np.ndarray, kernel: np.ndarray, dtype) -> dict[str, jax.Array]:
        raise NotImplementedError  # pragma: no cover


class _MeanAccumulator(streaming.Accumulator):
    """The float64 mean of a stream of ``[n, D]`` features (one pass, ``O(D)`` memory); the state
    is then computed from it and the head's kernel in float64 and rounded once."""

    inputs = frozenset({"features"})

    def __init__(self, detector: _LinearHeadDetector, kernel):
        self.detector = detector
        self.kernel = as_matrix("kernel", kernel, "[features, num_classes]")
        validation.check_finite("kernel", self.kernel)
        # Set by the first batch (the widths and dtype are not known before): None until then.
        self.total: Any = None
        self.count = 0
        self.dtype: Any = None

    def update(self, batch, pass_index):
        rows = batch["features"]
        if self.total is None:
            if self.kernel.shape[0] != rows.shape[1]:
                raise ValueError(
                    f"`kernel` must have shape [D, C] with D = {rows.shape[1]} (the features' "
                    f"width; the linear head's kernel); got {tuple(self.kernel.shape)}."
                )
            self.total = np.zeros(rows.shape[1], np.float64)
            self.dtype = streaming.state_dtype(rows.dtype)
        self.total += np.sum(rows, axis=0, dtype=np.float64)
        self.count += rows.shape[0]

    def finalize(self):
        if not self.count:
            raise ValueError(f"`{self.detector.name}.fit_from` got no features.")
        kernel = np.asarray(self.kernel, np.float64)
        return self.detector._head_state(self.total / self.count, kernel, self.dtype)


def _check_rows(features: jax.Array, logits: jax.Array) -> None:
    if features.shape[0] != logits.shape[0]:
        raise ValueError(
            f"`features` and `logits` must have the same number of rows; got "
            f"{tuple(features.shape)} and {tuple(logits.shape)}."
        )


@dataclasses.dataclass(frozen=True)
class DICE(_LinearHeadDetector):
    """DICE: energy of the sparsified linear head, ``logsumexp(f (W * M) + b)``.

    Sun & Li, "DICE: Leveraging Sparsification for Out-of-Distribution Detection", ECCV 2022.
    The contribution of weight ``W_dc`` is ``V_dc = m_d W_dc``, ``m`` the mean of the training
    features (float64, one streamed pass); the mask ``M = V > numpy.percentile(V, p)`` (linear
    interpolation over the ``D x C`` entries, strict ``>``, as the authors' code) keeps the
    ``100 - p`` % largest contributions. Default ``percentile=90`` (sparsity ``p = 90 %``, the
    paper's CIFAR setting; it uses 70 for ImageNet). State: ``{"mask": bool [D, C]}``.

    Needs the linear head: ``kernel`` ``[D, C]`` for ``fit`` and ``score``, ``bias`` ``[C]``
    for ``score``. pytorch-ood 0.4.0 takes ``p`` as a fraction (no default) and computes in
    float32; otherwise the same formula (``docs/detectors.md``).
    """

    percentile: float = 90.0
    name = "dice"
    title = "DICE"
    fit_inputs = frozenset({"features", "kernel"})
    score_inputs = frozenset({"features", "kernel", "bias"})
    state_keys = frozenset({"mask"})

    def __post_init__(self) -> None:
        check_percentile(self.percentile)

    def _head_state(self, mean, kernel, dtype):
        contribution = mean[:, None] * kernel
        return {"mask": jnp.asarray(contribution > np.percentile(contribution, self.percentile))}

    def _prepare(self, state, *, features, kernel, bias):
        x = as_matrix("features", features, "[batch, features]")
        check_width("features", x, state["mask"].shape[0], "feature dimensions")
        kernel, bias = _linear_head(kernel, bias, x.shape[1])
        check_width("kernel", kernel, state["mask"].shape[1], "classes")
        return {"features": x, "kernel": kernel, "bias": bias}

    def _score(self, state, head_fn, *, features, kernel, bias):
        sparse = jnp.where(state["mask"], kernel, 0)
        return scores.energy(jnp.matmul(features, sparse, precision=_HIGHEST) + bias[None, :])


@dataclasses.dataclass(frozen=True)
class FDBD(_LinearHeadDetector):
    """fDBD: the mean distance to the decision boundaries, over the distance to the mean feature,
    ``(1 / (C - 1)) sum_{c != y} |z_y - z_c| / ||w_y - w_c|| / ||f - m||``.

    Liu & Qin, "Fast Decision Boundary based Out-of-Distribution Detector", ICML 2024. ``z`` are
    the logits of the linear head ``z = f W + b``, ``y = argmax z``, ``w_c`` column ``c`` of the
    kernel ``W`` ``[D, C]`` (``|z_y - z_c| / ||w_y - w_c||`` is the distance from ``f`` to the
    boundary between classes ``y`` and ``c``), ``m`` the mean of the training features. No
    hyperparameters. State (float64 on the host, rounded once): ``{"mean": m [D],
    "inverse_norms": [C, C]}``, ``1 / ||w_p - w_c||`` with a zero diagonal.

    ``fit`` needs ``features`` and the ``kernel``; ``score`` needs ``features`` and ``logits``
    (of that head). A kernel with two equal columns (no boundary between the classes) raises
    ``ValueError``. A feature exactly at ``m`` scores ``+inf``. pytorch-ood 0.4.0 computes in
    float32 and clamps ``||f - m||`` at ``1e-8``; the authors' code omits the ``1 / (C - 1)``.
    """

    name = "fdbd"
    title = "fDBD"
    fit_inputs = frozenset({"features", "kernel"})
    score_inputs = frozenset({"features", "logits"})
    state_keys = frozenset({"mean", "inverse_norms"})

    def _head_state(self, mean, kernel, dtype):
        classes = kernel.shape[1]
        if classes < 2:
            raise ValueError(f"fDBD needs at least 2 classes; `kernel` has shape {kernel.shape}.")
        # ||w_p - w_c||^2 from the Gram matrix; where it is small against ||w_p||^2 + ||w_c||^2
        # (so that its rounding error could pass 1e-8 relative) it is recomputed directly.
        squares = np.sum(kernel * kernel, axis=0)
        sums = squares[:, None] + squares[None, :]
        gaps = np.maximum(sums - 2.0 * (kernel.T @ kernel), 0.0)
        off = ~np.eye(classes, dtype=bool)
        eps = np.finfo(np.float64).eps
        for p, c in np.argwhere(off & (gaps <= _GRAM_TRUST * (kernel.shape[0] + 2) * eps * sums)):
            gaps[p, c] = np.sum((kernel[:, p] - kernel[:, c]) ** 2)
        equal = np.argwhere(off & (gaps == 0))
        if equal.size:
            p, c = equal[0]
            raise ValueError(
                f"`kernel` columns {p} and {c} are equal: the decision boundary between those "
                "classes is undefined."
            )
        inverse = np.where(off, 1.0 / np.sqrt(np.where(off, gaps, 1.0)), 0.0)
        return {"mean": jnp.asarray(mean, dtype), "inverse_norms": jnp.asarray(inverse, dtype)}

    def _prepare(self, state, *, features, logits):
        x = as_matrix("features", features, "[batch, features]")
        check_width("features", x, state["mean"].shape[0], "feature dimensions")
        z = as_matrix("logits", logits, "[batch, num_classes]")
        check_width("logits", z, state["inverse_norms"].shape[0], "classes")
        _check_rows(x, z)
        return {"features": x, "logits": z}

    def _score(self, state, head_fn, *, features, logits):
        top = jnp.max(logits, axis=1, keepdims=True)
        inverse = state["inverse_norms"][jnp.argmax(logits, axis=1)]  # 0 at the predicted class
        boundary = jnp.sum(jnp.abs(top - logits) * inverse, axis=1) / (logits.shape[1] - 1)
        return boundary / jnp.linalg.norm(features - state["mean"][None, :], axis=1)


@dataclasses.dataclass(frozen=True)
class GradNorm(Detector):
    """GradNorm: the L1 norm of the gradient of ``KL(u || softmax(z / T))`` with respect to the
    linear head's kernel, in closed form ``||f||_1 ||softmax(z / T) - u||_1 / T``.

    Huang, Geng & Li, "On the Importance of Gradients for Detecting Distributional Shifts in the
    Wild", NeurIPS 2021. ``u`` is uniform over the ``C`` classes; for ``z = f W + b`` the gradient
    of ``-(1/C) sum_c log softmax(z / T)_c`` (the KL up to ``log C``) with respect to ``W`` is the
    outer product ``f (softmax(z / T) - u) / T``, whose L1 norm factorises as above (the paper's
    ``U V`` form). Default ``temperature=1``, the paper's. Nothing to fit; ``score`` needs
    ``features`` and ``logits``. The paper (and pytorch-ood 0.4.0) averages over the classes; the
    authors' code sums, which scales every score by ``C``.

    Applies to the SoftMax head only: a distance head's last-layer parameters are prototypes, and
    the gradient with respect to them has no such form.
    """

    temperature: float = 1.0
    name = "gradnorm"
    title = "GradNorm"
    heads = frozenset({"softmax"})
    score_inputs = frozenset({"features", "logits"})

    def __post_init__(self) -> None:
        validation.check_temperature(self.temperature)

    def _prepare(self, state, *, features, logits):
        x = as_matrix("features", features, "[batch, features]")
        z = as_matrix("logits", logits, "[batch, num_classes]")
        _check_rows(x, z)
        if z.shape[1] < 2:
            raise ValueError(
                f"`logits` must have at least 2 classes for GradNorm (one class has no gradient); "
                f"got shape {tuple(z.shape)}."
            )
        return {"features": x, "logits": z}

    def _score(self, state, head_fn, *, features, logits):
        dtype = jnp.result_type(features, logits)
        t = jnp.asarray(self.temperature, dtype)
        p = jax.nn.softmax(logits.astype(dtype) / t, axis=1)
        spread = jnp.sum(jnp.abs(p - 1.0 / logits.shape[1]), axis=1)
        return jnp.sum(jnp.abs(features.astype(dtype)), axis=1) * spread / t


def _class_weights(weights) -> tuple[float, ...] | None:
    """``None`` or the class weights as a tuple of floats (hashable), checked."""
    if weights is None:
        return None
    try:
        array = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"`weights` must be None or a sequence of C numbers; got {weights!r}."
        ) from e
    if array.ndim == 2 and 1 in array.shape:
        array = array.ravel()  # a Dense(C -> 1) kernel [C, 1] or a torch weight [1, C]
    if array.ndim != 1 or array.size == 0 or not np.isfinite(array).all():
        raise ValueError(
            f"`weights` must be None or C finite numbers (shape [C]); got shape {array.shape}."
        )
    if not np.any(array > 0):
        raise ValueError(
            "`weights` has no positive entry: relu(weights) = 0 gives every input the score -inf."
        )
    return tuple(float(w) for w in array)


@dataclasses.dataclass(frozen=True)
class WeightedEBO(Detector):
    """Weighted energy, ``log sum_c relu(w_c) exp(z_c)`` (``logsumexp(z + log relu(w))``).

    Du, Wang, Cai & Li, "VOS: Learning What You Don't Know by Virtual Outlier Synthesis", ICLR
    2022: the class weights ``w`` are learnt with the uncertainty loss (``weight_energy``, a
    ``Linear(C, 1)``) and clipped by ReLU. Hyperparameter ``weights``: ``None`` (default: every
    weight 1, which *is* ``energy``) or ``C`` numbers (a sequence or an array ``[C]``, ``[C, 1]``
    or ``[1, C]``; stored as a tuple), at least one positive. Computed through
    :func:`isomax_jax.scores.energy` (max-shifted, so large logits do not overflow; pytorch-ood
    0.4.0 exponentiates the raw logits). Nothing to fit. Applies to every head.
    """

    weights: tuple[float, ...] | None = None
    name = "weighted_ebo"
    title = "WeightedEBO"
    score_inputs = frozenset({"logits"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", _class_weights(self.weights))

    def _prepare(self, state, *, logits):
        z = as_matrix("logits", logits, "[batch, num_classes]")
        if self.weights is not None and z.shape[1] != len(self.weights):
            raise ValueError(
                f"`logits` has {z.shape[1]} columns but `weights` has {len(self.weights)} entries "
                f"(one per class); got logits of shape {tuple(z.shape)}."
            )
        return {"logits": z}

    def _score(self, state, head_fn, *, logits):
        if self.weights is None:
            return scores.energy(logits)
        weights = jnp.maximum(jnp.asarray(self.weights, logits.dtype), 0)
        return scores.energy(logits + jnp.log(weights)[None, :])  # log 0 = -inf: no term


DETECTORS = (DICE, FDBD, GradNorm, WeightedEBO)
