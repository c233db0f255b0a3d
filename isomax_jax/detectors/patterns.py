"""Detectors that store training patterns: typical posteriors, class patterns, neighbours.

=============  ===========  ===========================================================  =======
name           title        score (higher = in-distribution)                             heads
=============  ===========  ===========================================================  =======
kl_matching    KL-Matching  ``-min_k KL[p(x) || d_k]``, ``d_k`` the mean posterior of k  all
she            SHE          ``f(x) . S_yhat``, ``S_c`` the mean of class c's correct f   all
nnguide        NNGuide      ``mean_{top k} <f^(x), E(z_i) f^(z_i)> * E(x)``               softmax
=============  ===========  ===========================================================  =======

Fitting accumulates in float64 on the host, batch by batch (:meth:`Detector.fit_from`): the
``C x C`` sums of posteriors (KL-Matching) and the ``C x D`` sums of features (SHE) in one pass,
``O(state)`` memory; NNGuide's state is its bank, ``O(N D)`` like KNN's. NNGuide's exact search
is KNN's (:func:`isomax_jax.detectors.knn.kth_neighbour_distance`, see :func:`top_k_mean`).

Example:
  >>> import numpy as np
  >>> from isomax_jax import detectors
  >>> rng = np.random.default_rng(0)
  >>> logits = rng.normal(size=(100, 5)).astype(np.float32)
  >>> det = detectors.get("kl_matching")
  >>> state = det.fit(logits=logits)
  >>> det.score(state, logits=logits[:3]).shape
  (3,)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from isomax_jax import scores, validation
from isomax_jax.detectors import knn, streaming
from isomax_jax.detectors.base import Detector, as_matrix, check_labels, check_width

_HIGHEST = lax.Precision.HIGHEST


def _check_rows(features: jax.Array, logits: jax.Array) -> None:
    if features.shape[0] != logits.shape[0]:
        raise ValueError(
            f"`features` and `logits` must have the same number of rows; got "
            f"{tuple(features.shape)} and {tuple(logits.shape)}."
        )


def _softmax64(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(softmax(z), logsumexp(z))`` of ``[n, C]`` logits in float64."""
    z = np.asarray(logits, np.float64)
    top = z.max(axis=1, keepdims=True)
    e = np.exp(z - top)
    total = e.sum(axis=1, keepdims=True)
    return e / total, (top + np.log(total))[:, 0]


# -- KL-Matching -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KLMatching(Detector):
    """KL-Matching: ``-min_k KL[p(x) || d_k]``, ``p = softmax(z)``.

    Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt & Song, "Scaling
    Out-of-Distribution Detection for Real-World Settings", ICML 2022. The typical posterior of
    class ``k`` is ``d_k = mean{p(x') : argmax_j z_j(x') = k}`` over the fit data (the paper
    uses held-out in-distribution data; no labels are needed), and the minimum runs over the
    classes predicted for at least one fit example. ``KL[p || d] = sum_j p_j log p_j -
    sum_j p_j log d_j``, with ``log p`` from log-softmax and ``log d_k`` fitted in float64 (an
    entry ``d_kj = 0`` is stored as the dtype's most negative number, so ``p_j > 0`` there gives a
    divergence of ~``+inf``, as in pytorch-ood). No hyperparameters but ``chunk=4096`` rows per
    fit chunk. Applies to every head (it reads the softmax of any logits).
    """

    chunk: int = 4096
    name = "kl_matching"
    title = "KL-Matching"
    fit_inputs = frozenset({"logits"})
    score_inputs = frozenset({"logits"})
    state_keys = frozenset({"log_typical", "fitted"})

    def __post_init__(self) -> None:
        validation.check_int("chunk", self.chunk)

    def _fit(self, *, logits, **_):
        z = as_matrix("logits", logits, "[N, C]")
        validation.check_finite("logits", z)
        accumulator = self.accumulator()
        streaming.drive([accumulator], streaming.row_chunks({"logits": z}, self.chunk), self.name)
        return accumulator.finalize()

    def accumulator(self, **head):
        return _TypicalPosteriors()

    def _prepare(self, state, *, logits):
        z = as_matrix("logits", logits, "[batch, num_classes]")
        check_width("logits", z, state["log_typical"].shape[1], "classes")
        return {"logits": z}

    def _score(self, state, head_fn, *, logits):
        log_p = jax.nn.log_softmax(logits, axis=1)
        p = jnp.exp(log_p)
        log_typical = state["log_typical"].astype(log_p.dtype)
        cross = jnp.matmul(p, log_typical.T, precision=_HIGHEST)  # [B, C]: sum_j p_j log d_kj
        divergence = jnp.sum(p * log_p, axis=1)[:, None] - cross
        divergence = jnp.where(state["fitted"][None, :], divergence, jnp.inf)
        return -jnp.min(divergence, axis=1)


class _TypicalPosteriors(streaming.Accumulator):
    """Float64 sums of the posteriors per predicted class; one pass, ``O(C^2)``."""

    inputs = frozenset({"logits"})

    def __init__(self):
        # Set by the first batch (the widths and dtype are not known before): None until then.
        self.sums: Any = None
        self.counts: Any = None
        self.dtype: Any = None

    def update(self, batch, pass_index):
        logits = batch["logits"]
        if self.sums is None:
            width = logits.shape[1]
            self.sums, self.counts = np.zeros((width, width)), np.zeros(width, np.int64)
            self.dtype = streaming.state_dtype(logits.dtype)
        if not logits.shape[0]:
            return
        p, _ = _softmax64(logits)
        predicted = np.argmax(logits, axis=1)
        np.add.at(self.sums, predicted, p)
        self.counts += np.bincount(predicted, minlength=len(self.counts))

    def finalize(self):
        if self.counts is None or not self.counts.any():
            raise ValueError("`logits` has no rows to fit the typical posteriors on.")
        fitted = self.counts > 0
        log_typical = np.zeros_like(self.sums)
        with np.errstate(divide="ignore"):
            log_typical[fitted] = np.log(self.sums[fitted] / self.counts[fitted, None])
        log_typical = np.maximum(log_typical, np.finfo(self.dtype).min)
        return {
            "log_typical": jnp.asarray(log_typical, self.dtype),
            "fitted": jnp.asarray(fitted),
        }


# -- SHE -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SHE(Detector):
    """Simplified Hopfield energy (SHE): ``f(x) . S_yhat``, ``yhat = argmax_j z_j(x)``.

    Zhang, Fu, Chen, Du, Li, Wang, Liu, Han & Zhang, "Out-of-Distribution Detection based on
    In-Distribution Data Patterns Memorization with Modern Hopfield Energy", ICLR 2023. The
    stored pattern ``S_c`` is the mean penultimate feature of the training examples of class
    ``c`` that the model classifies correctly (``argmax_j z_j = label``), summed in float64;
    every class needs one. The predicted class comes from the ``logits`` passed with the
    features. No hyperparameters but ``chunk=4096`` rows per fit chunk. Applies to every head.
    """

    chunk: int = 4096
    name = "she"
    title = "SHE"
    fit_inputs = frozenset({"features", "logits", "labels"})
    score_inputs = frozenset({"features", "logits"})
    state_keys = frozenset({"patterns"})

    def __post_init__(self) -> None:
        validation.check_int("chunk", self.chunk)

    def _fit(self, *, features, logits, labels, **_):
        x = as_matrix("features", features, "[N, D]")
        z = as_matrix("logits", logits, "[N, C]")
        _check_rows(x, z)
        for name, value in (("features", x), ("logits", z)):
            validation.check_finite(name, value)
        y, _ = check_labels(labels, x.shape[0], None, z)
        accumulator = self.accumulator()
        chunks = streaming.row_chunks({"features": x, "logits": z, "labels": y}, self.chunk)
        streaming.drive([accumulator], chunks, self.name)
        return accumulator.finalize()

    def accumulator(self, **head):
        return _ClassPatterns()

    def _prepare(self, state, *, features, logits):
        x = as_matrix("features", features, "[batch, features]")
        z = as_matrix("logits", logits, "[batch, num_classes]")
        num_classes, dim = state["patterns"].shape
        check_width("features", x, dim, "feature dimensions")
        check_width("logits", z, num_classes, "classes")
        _check_rows(x, z)
        return {"features": x, "logits": z}

    def _score(self, state, head_fn, *, features, logits):
        patterns = state["patterns"].at[jnp.argmax(logits, axis=1)].get(mode="promise_in_bounds")
        return jnp.sum(features * patterns.astype(features.dtype), axis=1)


class _ClassPatterns(streaming.Accumulator):
    """Float64 sums of the correctly classified features per class; one pass, ``O(C D)``."""

    inputs = frozenset({"features", "logits", "labels"})

    def __init__(self):
        # Set by the first batch (the widths and dtype are not known before): None until then.
        self.sums: Any = None
        self.correct: Any = None
        self.seen: Any = None
        self.dtype: Any = None

    def update(self, batch, pass_index):
        x, logits, y = batch["features"], batch["logits"], batch["labels"]
        if self.sums is None:
            num_classes = logits.shape[1]
            self.sums = np.zeros((num_classes, x.shape[1]))
            self.correct = np.zeros(num_classes, np.int64)
            self.seen = np.zeros(num_classes, np.int64)
            self.dtype = streaming.state_dtype(x.dtype)
        validation.validate_labels(y, self.sums.shape[0])
        right = np.argmax(logits, axis=1) == y
        np.add.at(self.sums, y[right], np.asarray(x[right], np.float64))
        self.correct += np.bincount(y[right], minlength=len(self.correct))
        self.seen += np.bincount(y, minlength=len(self.seen))

    def finalize(self):
        if self.seen is None or not self.seen.any():
            raise ValueError("`features` has no rows to fit the class patterns on.")
        for counts, what in ((self.seen, "training example"),
                             (self.correct, "correctly classified training example")):  # fmt: skip
            missing = np.flatnonzero(counts == 0)
            if missing.size:
                raise ValueError(
                    f"class(es) {missing[:10].tolist()} of {len(counts)} have no {what}, so "
                    "their SHE pattern (the mean correctly classified feature) is undefined."
                )
        patterns = self.sums / self.correct[:, None]
        return {"patterns": jnp.asarray(patterns, self.dtype)}


# -- NNGuide ---------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def top_k_mean(queries, bank, lifted_sq_norms, *, k: int, chunk: int) -> jax.Array:
    """Mean of each query's ``k`` largest inner products with the bank rows, ``[B]``, exact.

    Args:
      queries: ``[B, D]`` with ``||q|| <= 1``.
      bank: ``[num_chunks, chunk_rows, D]`` (KNN's layout; padding rows are zero).
      lifted_sq_norms: ``[num_chunks, chunk_rows]``: one constant ``c >= 2 max_i ||b_i|| + 1``
        on the bank rows, ``+inf`` on padding rows.
      k: how many of the largest inner products to average.
      chunk: queries per chunk.

    The largest inner products are the nearest neighbours once every row ``b_i`` is lifted to
    the squared norm ``c`` (``b_i -> [b_i, sqrt(c - ||b_i||^2)]``, queries padded with 0:
    ``||q - b_i||^2 = ||q||^2 + c - 2 q.b_i``; Bachrach et al., RecSys 2014), so KNN's exact
    search (:func:`knn.kth_neighbour_distance`, given the lifted norms) finds the ``k``-th
    largest ``t = (||q||^2 + c - d_k^2) / 2``. A second pass over the bank adds the rest:
    ``mean_{top k} q.b = t + (1/k) sum_i max(q.b_i - t, 0)``, exact with ties. An error ``e`` in
    ``t`` moves the mean by at most ``e`` times ``1/k`` or, when ``m`` more products lie within
    ``e`` below the ``k``-th, ``m/k`` (the mean is the minimum over ``t`` of that expression).
    """
    lift = jnp.min(lifted_sq_norms)
    distance = knn.kth_neighbour_distance(queries, bank, lifted_sq_norms, k=k, chunk=chunk)
    threshold = 0.5 * (jnp.sum(queries * queries, axis=1) + lift - distance * distance)
    valid = jnp.isfinite(lifted_sq_norms)

    def excess(query_and_threshold):  # sum_i max(q.b_i - t, 0) for one query (lax.map batches)
        query, t = query_and_threshold

        def block(j, total):
            rows = lax.dynamic_index_in_dim(bank, j, 0, keepdims=False)
            above = jnp.maximum(jnp.matmul(rows, query, precision=_HIGHEST) - t, 0)
            keep = lax.dynamic_index_in_dim(valid, j, 0, keepdims=False)
            return total + jnp.sum(jnp.where(keep, above, 0))

        return lax.fori_loop(0, bank.shape[0], block, jnp.zeros((), queries.dtype))

    total = lax.map(excess, (queries, threshold), batch_size=max(1, min(chunk, len(queries))))
    return threshold + total / k


@dataclasses.dataclass(frozen=True)
class NNGuide(Detector):
    """Nearest-neighbour guidance: ``G(x) E(x)``, ``E = logsumexp(z)`` (the energy score),
    ``G(x) = (1/k) sum_{top k} <f^(x), E(z_i) f^(z_i)>``, ``f^ = f / ||f||``.

    Park, Jung & Teoh, "Nearest Neighbor Guidance for Out-of-Distribution Detection", ICCV 2023.
    The bank holds the normalised training features scaled by their energies (computed in
    float64, rounded once to the features' dtype); ``G`` averages the ``k`` largest inner
    products with it, found exactly (:func:`top_k_mean`, which runs KNN's search). Defaults:
    ``k=10`` (the authors' code and configuration). A bank of a random subset of the training
    set, as the paper also uses (pytorch-ood cites 1 % for ImageNet), is a fit on that subset.
    ``bank_chunk=8192`` and
    ``query_chunk=1024`` as in KNN (the bank is stored in KNN's blocks, the fit walks
    ``bank_chunk`` rows at a time).

    Applies to the SoftMax head: the bank is scaled by the training energies, which must be
    positive (``fit`` raises otherwise); a distance head's logits are negative distances,
    whose energies need not be.
    """

    k: int = 10
    bank_chunk: int = 8192
    query_chunk: int = 1024
    name = "nnguide"
    title = "NNGuide"
    heads = frozenset({"softmax"})
    fit_inputs = frozenset({"features", "logits"})
    score_inputs = frozenset({"features", "logits"})
    state_keys = frozenset({"bank", "lifted_sq_norms"})

    def __post_init__(self) -> None:
        for field in ("k", "bank_chunk", "query_chunk"):
            validation.check_int(field, getattr(self, field))

    def _fit(self, *, features, logits, **_):
        x = as_matrix("features", features, "[N, D]")
        z = as_matrix("logits", logits, "[N, C]")
        _check_rows(x, z)
        for name, value in (("features", x), ("logits", z)):
            validation.check_finite(name, value)
        accumulator = self.accumulator()
        chunks = streaming.row_chunks({"features": x, "logits": z}, self.bank_chunk)
        streaming.drive([accumulator], chunks, self.name)
        return accumulator.finalize()

    def accumulator(self, **head):
        return _EnergyBank(self)

    def _prepare(self, state, *, features, logits):
        x = as_matrix("features", features, "[batch, features]")
        z = as_matrix("logits", logits, "[batch, num_classes]")
        check_width("features", x, state["bank"].shape[2], "feature dimensions")
        _check_rows(x, z)
        return {"features": x, "logits": z}

    def _score(self, state, head_fn, *, features, logits):
        dtype = jnp.result_type(features.dtype, logits.dtype, state["bank"].dtype)
        guidance = top_k_mean(
            knn.normalize(features.astype(dtype)), state["bank"].astype(dtype),
            state["lifted_sq_norms"].astype(dtype), k=self.k, chunk=self.query_chunk,
        )  # fmt: skip
        return guidance * scores.energy(logits.astype(dtype))


class _EnergyBank(streaming.Accumulator):
    """The bank rows ``E(z) f / ||f||``, computed in float64 per batch and kept in the state's
    dtype (the state is the data: ``O(N D)``, like KNN's)."""

    inputs = frozenset({"features", "logits"})

    def __init__(self, detector: NNGuide):
        self.detector, self.parts, self.energies = detector, [], []
        # Set by the first batch (the widths and dtype are not known before): None until then.
        self.width: Any = None
        self.classes: Any = None
        self.dtype: Any = None

    def update(self, batch, pass_index):
        x, logits = batch["features"], batch["logits"]
        if self.width is None:
            self.width, self.dtype = x.shape[1], streaming.state_dtype(x.dtype)
            self.classes = logits.shape[1]
        x = np.asarray(x, np.float64)
        unit = x / np.maximum(np.sqrt(np.sum(x * x, axis=1)), 1e-12)[:, None]
        _, energy = _softmax64(logits)
        self.energies.append(energy)
        self.parts.append((unit * energy[:, None]).astype(self.dtype))

    def finalize(self):
        energy = np.concatenate(self.energies) if self.energies else np.zeros(0)
        if energy.size and energy.min() <= 0:
            raise ValueError(
                f"NNGuide scales its bank by the training energies logsumexp(logits), which must "
                f"be > 0; {int(np.sum(energy <= 0))} of {energy.size} are <= 0 (min "
                f"{energy.min():.4g}). It applies to a linear (SoftMax) head's logits, not to "
                "distance heads' (negative distances)."
            )
        search = knn.KNN(k=self.detector.k, normalize=False, bank_chunk=self.detector.bank_chunk)
        # KNN's state is a dict of arrays (State is any pytree).
        state = cast(
            dict[str, Any], search.fit(features=np.concatenate(self.parts) if self.parts else None)
        )
        sq_norms = np.asarray(state["bank_sq_norms"], np.float64)
        lift = 2 * np.sqrt(np.max(sq_norms[np.isfinite(sq_norms)])) + 1
        lifted = np.where(np.isfinite(sq_norms), lift, np.inf)
        return {"bank": state["bank"], "lifted_sq_norms": jnp.asarray(lifted, self.dtype)}


DETECTORS = (KLMatching, SHE, NNGuide)
