"""Exact out-of-distribution detection metrics, on device, in two conventions.

Scores follow one rule throughout: **higher = more in-distribution**. :func:`ood_metrics` returns
``tnr_at_tpr``, ``fpr_at_tpr`` (``= 1 - tnr_at_tpr``), ``auroc``, ``aupr_in``, ``aupr_out`` and
``detection_accuracy`` as fractions in [0, 1] (multiply by 100 only to format them, see
:mod:`isomax_jax.tables`). Two conventions exist in the literature and give different numbers on
the same scores (``docs/metrics.md``), so the convention is an explicit argument:

* ``"reference"`` -- the IsoMax papers' ``calculate_log.py`` (inherited from the Mahalanobis code):
  in-distribution is positive; a threshold sweeps upward through the sorted scores, removing one
  score per step, and on a tie the in-distribution score is removed first (``n_in + n_out + 1``
  points). ``tnr_at_tpr`` is the fraction of OOD inputs rejected at the sweep point whose
  in-distribution acceptance rate is closest to ``tpr`` (the first such point of the sweep, i.e.
  the largest FPR among equally close points). AUROC, AUPR-in and AUPR-out are the trapezoids with
  the paddings of ``docs/metrics.md``; with tied scores this AUROC counts ties as errors (it is the
  probability that an in-distribution score is *strictly* above an OOD one).
* ``"openood"`` -- OpenOOD v1.5: OOD is positive and the score is negated; scikit-learn's
  ``roc_curve`` (``drop_intermediate=True``) and ``precision_recall_curve``, where tied scores form
  one point. ``fpr_at_tpr`` is the fraction of *in-distribution* inputs flagged as OOD at the first
  point of scikit-learn's (thinned) ROC curve where at least ``tpr`` of the OOD inputs are caught;
  this is a different operating point from the reference one. AUROC counts ties as 1/2; AUPR-in /
  AUPR-out are scikit-learn ``auc(recall, precision)`` of the in-positive / OOD-positive curves.

In both conventions ``detection_accuracy`` is the best mean of the two per-class accuracies over the
convention's curve.

**The key ``fpr_at_tpr`` is not the same quantity in the two conventions**: in ``"reference"``
it is the fraction of *OOD* inputs accepted as in-distribution (in-distribution is positive);
in ``"openood"`` it is the fraction of *in-distribution* inputs flagged as OOD (OOD is
positive). ``tnr_at_tpr`` is ``1 - fpr_at_tpr`` in both.

**Too few scores to resolve ``tpr``.** A sweep over ``n`` positives (in-distribution scores in
the reference convention, OOD scores in OpenOOD's) moves its TPR in steps of ``1 / n``. When
the steps are too coarse for the target -- the reference rule's closest rate to ``tpr`` is 1
(``n <= 10`` for ``tpr = 0.95``), or no rate below 1 reaches ``tpr`` in OpenOOD's
(``n < 20``) -- the operating point is the end of the sweep, where every positive is accepted
and, in the reference convention, every OOD input too: its TNR would be 0 whatever the scores.
Then ``tnr_at_tpr`` and ``fpr_at_tpr`` are **NaN** (eager and jitted alike), the other metrics
are unaffected, and an eager call also warns (:class:`TPRResolutionWarning`, naming the count
needed: :func:`min_resolvable_count`; :func:`tpr_resolved` tells in advance).

Everything is exact and sort-based: scores are mapped to order-preserving integer keys (``-0.0`` and
``+0.0`` are equal), sorted, and all counts are integers; memory is O(n_in + n_out). Scores are
computed in float32 at least (bfloat16/float16 are upcast) and in float64 when given float64 with
``jax_enable_x64``. The few decisions that compare a rate with ``tpr`` (``k / n`` closest to
``tpr``; first ``k / n >= tpr``) use IEEE division in the working dtype, exactly as NumPy does in
float64; in float32 a rate within float32 rounding of ``tpr`` can resolve the other way than the
float64 reference code. Eager and jitted calls give bit-identical results, also when the inputs
are constants inside the caller's ``jit``. The function is ``jax.jit``-able (``convention`` is
static; ``tpr`` may be a Python float or a traced scalar) and ``jax.vmap``-able, so one call
evaluates a stack of OOD sets padded to one length with ``out_mask``.

Bad input: with concrete (non-traced) inputs, an empty or fully masked score set, a NaN/inf among
the unmasked scores or ``tpr`` outside (0, 1) raise ``ValueError``; integer/bool scores and
non-boolean masks raise ``TypeError`` and non-1-D scores or masks of the wrong shape ``ValueError``
(also under ``jit``). Masks must be boolean: a float mask such as ``0.5`` has no meaning.
Under ``jit``/``vmap`` the value checks cannot raise, so **every** metric is NaN instead.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from isomax_jax import registry, sweeps, validation
from isomax_jax.sweeps import first_count_reaching as first_count_reaching

CONVENTIONS = ("reference", "openood")
METRIC_NAMES = registry.METRIC_NAMES  # titles and directions: isomax_jax.registry.METRICS


class TPRResolutionWarning(UserWarning):
    """The score sets are too small to resolve the target TPR (``tnr_at_tpr`` is NaN)."""


def prepare_scores(
    scores: jax.typing.ArrayLike, mask: jax.typing.ArrayLike | None, name: str, mask_name: str
) -> tuple[jax.Array, jax.Array]:
    """Static checks of a score set and its mask (also under ``jit``).

    Returns:
      ``(scores, mask)``: float scores (float32 or wider) and a boolean mask (all True if None).

    Raises:
      TypeError: non-floating scores or a non-boolean mask. ValueError: scores that are not
      1-D or empty, a mask of another shape.
    """
    scores = validation.as_array(name, scores)
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        raise TypeError(f"`{name}` must have a floating dtype; got {scores.dtype}.")
    if scores.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D [n]; got shape {scores.shape}.")
    if scores.shape[0] == 0:
        raise ValueError(f"`{name}` must hold at least one score; got shape {scores.shape}.")
    scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
    if mask is None:
        mask = jnp.ones(scores.shape, dtype=bool)
    else:
        mask = validation.as_array(mask_name, mask)
        if mask.shape != scores.shape:
            raise ValueError(
                f"`{mask_name}` must have the shape of `{name}` {scores.shape}; got {mask.shape}."
            )
        if mask.dtype != jnp.bool_:
            raise TypeError(
                f"`{mask_name}` must be a boolean mask (True = a real score, False = padding); "
                f"got dtype {mask.dtype}. Use e.g. `{mask_name}.astype(bool)` for a 0/1 mask."
            )
    return scores, mask


def check_score_values(scores: jax.Array, mask: jax.Array, name: str, mask_name: str) -> int:
    """Eager value checks of a concrete score set, reduced on device (two scalars reach the host).

    Concrete inputs may also be constants inside a caller's ``jit``: the reduction is then
    evaluated at trace time, not staged.

    Returns:
      The number of unmasked scores.

    Raises:
      ValueError: every score is masked, or an unmasked score is NaN or infinite.
    """
    with jax.ensure_compile_time_eval():
        n_valid, n_bad = (int(v) for v in _count_valid_bad(scores, mask))
    if n_valid == 0:
        raise ValueError(f"`{name}` must hold an unmasked score; got `{mask_name}` all False.")
    if n_bad:
        raise ValueError(
            f"`{name}` must be finite; got {n_bad} non-finite (NaN/inf) unmasked score(s)."
        )
    return n_valid


@jax.jit
def _count_valid_bad(scores, mask):
    return jnp.sum(mask, dtype=jnp.int32), jnp.sum(mask & ~jnp.isfinite(scores), dtype=jnp.int32)


def check_tpr(tpr: jax.typing.ArrayLike) -> None:
    """Raises ``ValueError`` unless a concrete ``tpr`` is a float scalar in (0, 1)."""
    if validation.is_concrete(tpr):
        t = np.asarray(tpr)
        if t.shape != () or not np.issubdtype(t.dtype, np.floating) or not 0.0 < float(t) < 1.0:
            raise ValueError(f"`tpr` must be a float scalar in (0, 1); got {tpr!r}.")


@functools.partial(jax.jit, static_argnames="convention")
def _ood_metrics(in_scores, out_scores, in_mask, out_mask, tpr, *, convention):
    dtype = jnp.result_type(in_scores, out_scores)
    in_scores, out_scores = in_scores.astype(dtype), out_scores.astype(dtype)
    tpr = jnp.asarray(tpr, dtype)
    # Eager and jitted calls must give the same bits. Inside a caller's jit, a mask or tpr built
    # there is a compile-time constant, and XLA then rewrites ``x / n`` into ``x * (1 / n)`` and
    # fuses ``1 - x * r`` into one FMA: on all-equal scores TNR became 2.2e-08 instead of 0.
    # The barrier hides the inputs' values from the compiler, so the program is the same.
    in_scores, out_scores, in_mask, out_mask, tpr = lax.optimization_barrier(
        (in_scores, out_scores, in_mask, out_mask, tpr)
    )
    n_in = jnp.sum(in_mask, dtype=jnp.int32)
    n_out = jnp.sum(out_mask, dtype=jnp.int32)
    finite = jnp.all(jnp.isfinite(in_scores) | ~in_mask) & jnp.all(
        jnp.isfinite(out_scores) | ~out_mask
    )
    ok = finite & (n_in > 0) & (n_out > 0) & (tpr > 0) & (tpr < 1)
    n_in_safe, n_out_safe = jnp.maximum(n_in, 1), jnp.maximum(n_out, 1)
    impl = sweeps.reference if convention == "reference" else sweeps.openood
    out = impl(
        sweeps.sort_keys(in_scores, in_mask),
        sweeps.sort_keys(out_scores, out_mask),
        n_in_safe,
        n_out_safe,
        tpr,
        dtype,
    )
    # Clipping only removes last-bit rounding (e.g. 1 - fpr = -1e-17); NaN stays NaN.
    return {k: jnp.where(ok, jnp.clip(out[k], 0, 1), jnp.nan).astype(dtype) for k in METRIC_NAMES}


def ood_metrics(
    in_scores: jax.typing.ArrayLike,
    out_scores: jax.typing.ArrayLike,
    *,
    convention: str = "reference",
    tpr: float | jax.typing.ArrayLike = 0.95,
    in_mask: jax.typing.ArrayLike | None = None,
    out_mask: jax.typing.ArrayLike | None = None,
) -> dict[str, jax.Array]:
    """Exact OOD detection metrics of one in-distribution and one OOD score set.

    Higher scores mean "more in-distribution". See the module docstring for the two conventions;
    in words, the operating points are:

    * ``"reference"``: ``tnr_at_tpr`` is the fraction of OOD inputs rejected when (the sweep
      point closest to) a fraction ``tpr`` of the in-distribution inputs is accepted;
      ``fpr_at_tpr`` the fraction of OOD inputs accepted there.
    * ``"openood"``: ``fpr_at_tpr`` is the fraction of in-distribution inputs wrongly flagged
      as OOD at the first point of scikit-learn's ROC curve where a fraction ``tpr`` of the OOD
      inputs is flagged; ``tnr_at_tpr`` the fraction of in-distribution inputs kept there.

    Args:
      in_scores: [n_in] float scores of in-distribution inputs.
      out_scores: [n_out] float scores of OOD inputs.
      convention: ``"reference"`` (the IsoMax papers) or ``"openood"`` (OpenOOD v1.5 /
        scikit-learn); static under ``jit``.
      tpr: target true-positive rate in (0, 1); a Python float or a (possibly traced) scalar.
      in_mask: optional [n_in] boolean mask; False marks padding, excluded exactly.
      out_mask: optional [n_out] boolean mask, likewise.

    Returns:
      A dict with float scalars ``tnr_at_tpr``, ``fpr_at_tpr``, ``auroc``, ``aupr_in``,
      ``aupr_out``, ``detection_accuracy`` (fractions, dtype float32 or float64). Under ``jit``
      or ``vmap``, invalid values (NaN/inf unmasked scores, an all-masked set, ``tpr`` outside
      (0, 1)) give NaN for every metric. Too few positives to resolve ``tpr`` (module docstring)
      give NaN ``tnr_at_tpr`` and ``fpr_at_tpr``, eagerly with a :class:`TPRResolutionWarning`.

    Raises:
      TypeError: non-floating scores, non-boolean masks.
      ValueError: non-1-D or empty scores, a mask of another shape, an unknown convention; with
        concrete inputs also NaN/inf unmasked scores, all entries masked, ``tpr`` outside (0, 1).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from isomax_jax.metrics import ood_metrics
      >>> ins = jnp.array([0.9, 0.8, 0.7, 0.4])
      >>> outs = jnp.array([0.1, 0.4, 0.5])
      >>> ref = ood_metrics(ins, outs, tpr=0.75)  # keep 3 of 4 in: rejects 1 of 3 OOD
      >>> round(float(ref["tnr_at_tpr"]), 4), round(float(ref["auroc"]), 4)
      (0.3333, 0.8333)
      >>> oo = ood_metrics(ins, outs, tpr=0.6, convention="openood")  # catch 2 of 3 OOD
      >>> round(float(oo["fpr_at_tpr"]), 4), round(float(oo["auroc"]), 4)  # tie counts 1/2
      (0.25, 0.875)
      >>> # Several OOD sets padded to one length: vmap with masks.
      >>> outs2 = jnp.stack([jnp.array([0.1, 0.4, 0.5, 0.0]), jnp.array([0.95, 0.2, 0.0, 0.0])])
      >>> masks = jnp.array([[True, True, True, False], [True, True, False, False]])
      >>> many = jax.vmap(lambda o, m: ood_metrics(ins, o, out_mask=m))(outs2, masks)
      >>> many["auroc"].round(4).tolist()
      [0.8333, 0.5]
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"`convention` must be one of {CONVENTIONS}; got {convention!r}.")
    in_s, in_m = prepare_scores(in_scores, in_mask, "in_scores", "in_mask")
    out_s, out_m = prepare_scores(out_scores, out_mask, "out_scores", "out_mask")
    check_tpr(tpr)
    if validation.is_concrete(in_s, in_m):
        check_score_values(in_s, in_m, "in_scores", "in_mask")
    if validation.is_concrete(out_s, out_m):
        check_score_values(out_s, out_m, "out_scores", "out_mask")
    out = _ood_metrics(in_s, out_s, in_m, out_m, tpr, convention=convention)
    if validation.is_concrete(out, tpr):
        _warn_if_unresolved(out, in_m, out_m, tpr, convention)
    return out


def _warn_if_unresolved(out, in_mask, out_mask, tpr, convention: str) -> None:
    """The eager half of the unresolved-TPR rule (the module docstring): say why it is NaN."""
    tnr, auroc = float(out["tnr_at_tpr"]), float(out["auroc"])
    if not (np.isnan(tnr) and not np.isnan(auroc)):
        return
    positives = "in-distribution" if convention == "reference" else "OOD"
    mask = in_mask if convention == "reference" else out_mask
    with jax.ensure_compile_time_eval():
        n = int(jnp.sum(mask))
    warnings.warn(
        f"tnr_at_tpr and fpr_at_tpr are NaN: {n} {positives} score(s) cannot resolve tpr="
        f"{float(tpr):g} in the {convention!r} convention (its operating point would be the end "
        f"of the sweep, TPR = 1: {_UNRESOLVED[convention]}). Use at least "
        f"{min_resolvable_count(float(tpr), convention, out['auroc'].dtype)} {positives} scores.",
        TPRResolutionWarning,
        stacklevel=3,
    )


_UNRESOLVED = {
    "reference": "every OOD input accepted, so TNR 0 whatever the scores",
    "openood": "every OOD input flagged, the FPR at TPR 100 % rather than at tpr",
}


def tpr_resolved(
    n: int, tpr: float, convention: str = "reference", dtype: jax.typing.DTypeLike = np.float32
) -> bool:
    """Whether ``n`` positive scores resolve ``tpr``, with the rates computed in ``dtype``.

    The positives are the in-distribution scores in the ``"reference"`` convention and the OOD
    scores in the ``"openood"`` one. The operating point of a sweep over ``n`` positives moves
    in steps of ``1 / n``; it is unresolved when the convention's rule picks the end of the
    sweep, where every positive is accepted (TPR = 1) although ``tpr < 1``: in the reference
    convention when ``1`` is the closest of the rates ``k / n`` to ``tpr`` (ties going to the
    larger count), in OpenOOD's when no rate below 1 reaches ``tpr``. The rates are compared in
    the scores' dtype, as :func:`ood_metrics` does (float32 unless float64 scores with x64):
    ``|9/10 - 0.95|`` and ``|1 - 0.95|`` tie in float32 but not in float64.

    Example:
      >>> [tpr_resolved(n, 0.95) for n in (5, 10, 11, 19, 20)]
      [False, False, True, True, True]
      >>> [tpr_resolved(n, 0.95, "openood") for n in (10, 19, 20)]
      [False, False, True]
    """
    dtype = np.dtype(dtype).type
    t = dtype(tpr)
    if convention == "reference":
        ks = np.arange(n + 1, dtype=dtype)
        dist = np.abs(ks / dtype(n) - t)
        return int(np.flatnonzero(dist == dist.min())[-1]) < n
    return bool(np.any(np.arange(n, dtype=dtype) / dtype(n) >= t))


def min_resolvable_count(
    tpr: float, convention: str = "reference", dtype: jax.typing.DTypeLike = np.float32
) -> int:
    """The smallest number of positive scores that resolves ``tpr`` (:func:`tpr_resolved`).

    Example:
      >>> min_resolvable_count(0.95), min_resolvable_count(0.95, "openood")
      (11, 20)
    """
    n = max(1, int(np.floor(0.5 / (1.0 - tpr))) - 2)
    while not tpr_resolved(n, tpr, convention, dtype):
        n += 1
    return n


@jax.jit
def _fit_threshold(scores, mask, tpr):
    dtype = scores.dtype
    tpr = jnp.asarray(tpr, dtype)
    scores, mask, tpr = lax.optimization_barrier((scores, mask, tpr))  # see _ood_metrics
    n = jnp.sum(mask, dtype=jnp.int32)
    ok = jnp.all(jnp.isfinite(scores) | ~mask) & (n > 0) & (tpr > 0) & (tpr < 1)
    m = first_count_reaching(jnp.maximum(n, 1), tpr, dtype)  # accept >= m of n
    ascending = jnp.sort(jnp.where(mask, scores, -jnp.inf))  # padding first
    threshold = ascending[jnp.clip(scores.shape[0] - m, 0, scores.shape[0] - 1)]
    return jnp.where(ok, threshold, jnp.nan)


def fit_threshold(
    in_scores: jax.typing.ArrayLike,
    *,
    tpr: float | jax.typing.ArrayLike = 0.95,
    in_mask: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """Threshold that accepts a fraction ``tpr`` of in-distribution validation inputs.

    An input is classified in-distribution when ``score >= threshold``. The threshold is the
    ``m``-th largest validation score, with ``m`` the smallest count such that ``m / n >= tpr``:
    the largest threshold that accepts at least ``tpr`` of the ``n`` validation scores (exactly
    ``m`` of them without ties; ties at the threshold are all accepted).

    Args:
      in_scores: [n] float in-distribution validation scores (higher = more in-distribution).
      tpr: target fraction of in-distribution inputs to accept, in (0, 1).
      in_mask: optional [n] boolean mask; False marks padding.

    Returns:
      A float scalar (float32, or float64 for float64 input with x64). Under ``jit``, NaN for
      NaN/inf unmasked scores, an all-masked set or ``tpr`` outside (0, 1).

    Raises:
      TypeError, ValueError: as :func:`isomax_jax.metrics.ood_metrics` for the same inputs.

    Example:
      >>> import jax.numpy as jnp
      >>> from isomax_jax.thresholds import fit_threshold
      >>> fit_threshold(jnp.arange(20.0), tpr=0.95)  # 19 of 20 scores are >= 1
      Array(1., dtype=float32)
    """
    scores, mask = prepare_scores(in_scores, in_mask, "in_scores", "in_mask")
    check_tpr(tpr)
    if validation.is_concrete(scores, mask):
        check_score_values(scores, mask, "in_scores", "in_mask")
    return _fit_threshold(scores, mask, tpr)
