"""Virtual-logit matching (ViM): a linear head's energy minus a scaled feature residual."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from isomax_jax import scores, validation
from isomax_jax.detectors import gaussian, streaming
from isomax_jax.detectors.base import Detector, as_matrix, check_width

_HIGHEST = jax.lax.Precision.HIGHEST


def principal_dim(dim: int) -> int:
    """The paper's principal-space size for ``dim``-wide features: 1000 if ``dim >= 2048``, 512
    if ``dim >= 768`` (the authors' code), else ``dim // 2`` (their rule for small backbones)."""
    if dim >= 2048:
        return 1000
    if dim >= 768:
        return 512
    return dim // 2


def _linear_head(kernel, bias, dim: int) -> tuple[jax.Array, jax.Array]:
    kernel = as_matrix("kernel", kernel, "[features, num_classes]")
    bias = jnp.asarray(bias)
    if kernel.shape[0] != dim:
        raise ValueError(
            f"`kernel` must have shape [D, C] with D = {dim} (the features' width; the linear "
            f"head's kernel, models/classifier.py); got {tuple(kernel.shape)}."
        )
    if bias.shape != kernel.shape[1:]:
        raise ValueError(
            f"`bias` must have shape [C] = ({kernel.shape[1]},); got {tuple(bias.shape)}."
        )
    return kernel, bias.astype(kernel.dtype)


@dataclasses.dataclass(frozen=True)
class ViM(Detector):
    """ViM score: ``logsumexp(f W + b) - alpha ||(f - u) N||``.

    Wang, Li, Zhang & Wu, "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR 2022.
    ``u = -(W^T)^+ b`` is the origin of the linear head ``logits = f W + b`` (``kernel`` ``W`` is
    ``[D, C]``, ``bias`` ``b`` is ``[C]``); ``N`` (``[D, D - dim]``) spans the eigenvectors of the
    training covariance about ``u`` (``(1/N) sum (f - u)(f - u)^T``, accumulated in chunks) with the
    smallest ``D - dim`` eigenvalues; ``alpha = mean_i max_j logit_ij / mean_i ||(f_i - u) N||``
    over the training set, all fitted in float64 on the host, chunk by chunk. The score is the
    authors' code's ``-vlogit + energy``. Default
    ``dim=None``: the paper's rule :func:`principal_dim` (1000 for ``D >= 2048``, 512 for
    ``D >= 768``, ``D // 2`` below). ``chunk=4096`` rows per fit chunk.

    Needs the linear head: pass ``kernel`` and ``bias`` to both ``fit`` and ``score``. It does not
    apply to distance heads (their logits are not affine in the features): ``applies_to`` is
    False for them and calling it without a kernel raises ``ValueError`` saying so.
    """

    dim: int | None = None
    chunk: int = 4096
    name = "vim"
    title = "ViM"
    heads = frozenset({"softmax"})
    fit_inputs = frozenset({"features", "kernel", "bias"})
    score_inputs = frozenset({"features", "kernel", "bias"})
    state_keys = frozenset({"origin", "null_space", "alpha"})

    def __post_init__(self) -> None:
        validation.check_int("dim", self.dim, allow_none=True)
        validation.check_int("chunk", self.chunk)

    def _require(self, needed, given, method):
        if given.get("kernel") is None or given.get("bias") is None:
            missing = "kernel" if given.get("kernel") is None else "bias"
            raise ValueError(
                f"`vim.{method}` needs `{missing}`: ViM needs a linear head's `kernel` [D, C] and "
                "`bias` [C]; it does not apply to distance-based heads (IsoMax, IsoMax+, DisMax), "
                "whose logits are not affine in the features."
            )
        super()._require(needed, given, method)

    def _fit(self, *, features, kernel, bias, **_):
        x = as_matrix("features", features, "[N, D]")
        validation.check_finite("features", x)
        accumulator = self.accumulator(kernel=kernel, bias=bias)
        streaming.drive([accumulator], streaming.row_chunks({"features": x}, self.chunk), "vim")
        return accumulator.finalize()

    def accumulator(self, *, kernel=None, bias=None, **_):
        return _ViMAccumulator(self, kernel, bias)

    def _prepare(self, state, *, features, kernel, bias):
        x = as_matrix("features", features, "[batch, features]")
        check_width("features", x, state["origin"].shape[0], "feature dimensions")
        kernel, bias = _linear_head(kernel, bias, x.shape[1])
        return {"features": x, "kernel": kernel, "bias": bias}

    def _score(self, state, head_fn, *, features, kernel, bias):
        logits = jnp.matmul(features, kernel, precision=_HIGHEST) + bias[None, :]
        residual = jnp.matmul(
            features - state["origin"][None, :], state["null_space"], precision=_HIGHEST
        )
        virtual = state["alpha"] * jnp.sqrt(jnp.sum(residual * residual, axis=1))
        return scores.energy(logits) - virtual


class _ViMAccumulator(streaming.Accumulator):
    """Two passes in float64 on the host (the null space is spanned by the smallest eigenvalues,
    which a float32 fit resolves poorly): the moments about the mean, then ``alpha``'s sums."""

    passes = 2
    inputs = frozenset({"features"})

    def __init__(self, detector: ViM, kernel, bias):
        self.detector = detector
        self.kernel = as_matrix("kernel", kernel, "[features, num_classes]")
        validation.check_finite("kernel", self.kernel)
        validation.check_finite("bias", jnp.asarray(bias))
        self.bias = bias
        self.moments = gaussian.ClassMoments(num_classes=1)
        self.null_space = None
        self.max_logit = self.residual = 0.0
        self.dtype = None

    def update(self, batch, pass_index):
        rows = batch["features"]
        if pass_index == 0:
            if self.dtype is None:
                kernel, bias = _linear_head(self.kernel, self.bias, rows.shape[1])
                self.k64, self.b64 = np.float64(kernel), np.float64(bias)
                self.origin = -(np.linalg.pinv(self.k64.T) @ self.b64)
                self.dtype = streaming.state_dtype(rows.dtype)
                self.dim = self._principal_dim(rows.shape[1])
            self.moments.update(rows, np.zeros(rows.shape[0], np.int64))
            return
        if self.null_space is None:  # the first batch of the second pass
            offset = self.moments.mean() - self.origin  # about the origin: covariance + offset^2
            _, vectors = np.linalg.eigh(self.moments.covariance() + np.outer(offset, offset))
            self.null_space = vectors[:, : len(offset) - self.dim]  # eigenvalues ascend
        rows = np.asarray(rows, np.float64)
        # np.float64(array) is an array (the stub types it a scalar).
        logits = rows @ self.k64 + self.b64[None, :]  # pyright: ignore[reportIndexIssue]
        self.max_logit += float(np.sum(np.max(logits, axis=1)))
        self.residual += float(
            np.sum(np.linalg.norm((rows - self.origin) @ self.null_space, axis=1))
        )

    def _principal_dim(self, width: int) -> int:
        dim = principal_dim(width) if self.detector.dim is None else self.detector.dim
        if not 1 <= dim < width:
            raise ValueError(f"`dim`={dim} must be in [1, D) for features of width D = {width}.")
        return dim

    def finalize(self):
        if not self.residual > 0:
            raise ValueError(
                "`features` have no residual outside the principal space (all training features "
                "lie in it), so ViM's alpha is undefined; use a smaller `dim`."
            )
        cast = functools.partial(jnp.asarray, dtype=self.dtype)
        return {
            "origin": cast(self.origin),
            "null_space": cast(self.null_space),
            "alpha": cast(self.max_logit / self.residual),
        }


DETECTORS = (ViM,)
