"""The exact sweeps behind :func:`isomax_jax.metrics.ood_metrics`, one per convention.

Both work on order-preserving integer keys of the scores (:func:`sort_keys`), sorted, with
integer counts; memory is O(n_in + n_out). :func:`reference` is the IsoMax papers' sweep
(``calculate_log.py``), written from per-sample counts instead of the explicit loop;
:func:`openood` is scikit-learn's ``roc_curve`` / ``precision_recall_curve`` as OpenOOD v1.5
uses them, over groups of tied scores. ``docs/metrics.md`` states both conventions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def sort_keys(scores: jax.Array, valid: jax.Array) -> jax.Array:
    """Order-preserving integer keys of float scores; masked entries get the largest key."""
    itype = jnp.int64 if scores.dtype == jnp.float64 else jnp.int32
    imax = jnp.iinfo(itype).max
    scores = jnp.where(scores == 0, jnp.zeros_like(scores), scores)  # -0.0 -> +0.0
    bits = lax.bitcast_convert_type(scores, itype)
    keys = jnp.where(bits < 0, bits ^ imax, bits)  # negative floats: reverse their order
    return jnp.where(valid, keys, imax)


def _safe_div(num, den, empty):
    """num / den, and ``empty`` where den == 0."""
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), empty)


def _ieee_div(num, den):
    """num / den (num >= 0) with true IEEE division, for decisions that must match NumPy.

    XLA rewrites ``x / broadcast(d)`` into ``x * (1 / d)``, which can differ in the last bit
    (and flip a tie such as |4/5 - 0.9| vs |5/5 - 0.9|). Routing the denominator through a
    data-dependent select (always true here) keeps it from being seen as a broadcast.
    """
    num, den = jnp.broadcast_arrays(num, den)
    return num / jnp.where(num >= 0, den, jnp.nan)


def _closest_count(n_in, tpr, dtype):
    """Number k of accepted in-distribution scores whose k / n_in is closest to tpr.

    Among equally close counts the largest wins (the reference sweep starts at k = n_in and
    ``argmin`` returns the first minimum). Distances are the reference's ``|k / n_in - tpr|``
    with IEEE division, so ties from rounding resolve as in NumPy (exactly so in float64).
    """
    base = jnp.floor(tpr * n_in).astype(jnp.int32)
    ks = jnp.clip(base + jnp.arange(-1, 3, dtype=jnp.int32), 0, n_in)
    dist = jnp.abs(_ieee_div(ks.astype(dtype), n_in.astype(dtype)) - tpr)
    return jnp.max(jnp.where(dist == jnp.min(dist), ks, -1))


def first_count_reaching(n, tpr, dtype):
    """Smallest count t in [0, n] with ``t / n >= tpr`` (IEEE division, as scikit-learn's
    ``tps / tps[-1] >= tpr``); n + 1 if none (tpr > 1)."""
    base = jnp.ceil(tpr * n).astype(jnp.int32)
    ts = jnp.clip(base + jnp.arange(-2, 3, dtype=jnp.int32), 0, n)
    ok = _ieee_div(ts.astype(dtype), n.astype(dtype)) >= tpr
    return jnp.min(jnp.where(ok, ts, n + 1))


def reference(in_keys, out_keys, n_in, n_out, tpr, dtype):
    """Reference sweep (``docs/metrics.md``), from per-sample counts instead of the explicit sweep.

    With I, O the sorted scores: in-sample j (0-based) is removed when ``lt[j] = #{O < I[j]}``
    OOD scores have been removed (tie: in first). Its removal is the only step that moves TPR,
    so AUROC and AUPR-in are sums over in-samples; OOD removals are the only steps that move
    FPR, so AUPR-out is a sum over OOD samples.
    """
    in_sorted = lax.sort(in_keys)
    out_sorted = lax.sort(out_keys)
    ni, no = in_sorted.shape[0], out_sorted.shape[0]
    # le[i] = #{valid I <= O[i]}; lt[j] = #{i : le[i] <= j} = #{valid O < I[j]}.
    le = jnp.searchsorted(in_sorted, out_sorted, side="right").astype(jnp.int32)
    out_ok = jnp.arange(no) < n_out
    in_ok = jnp.arange(ni) < n_in
    hist = jnp.zeros(ni + 1, jnp.int32).at[le].add(out_ok.astype(jnp.int32))
    lt = jnp.cumsum(hist)[:ni]

    f = functools.partial(jnp.asarray, dtype=dtype)
    nin, nout = f(n_in), f(n_out)
    j = jnp.arange(ni, dtype=jnp.int32)
    tp = f(n_in - j)  # accepted in-distribution scores just before I[j] is removed
    fp = f(n_out - lt)  # accepted OOD scores at that moment
    auroc = jnp.sum(jnp.where(in_ok, f(lt) / nout, 0)) / nin
    dtacc = 0.5 * jnp.maximum(1.0, jnp.max(jnp.where(in_ok, tp / nin + f(lt) / nout, 0)))
    prec_before = _safe_div(tp, tp + fp, 0.0)
    prec_after = _safe_div(tp - 1, tp - 1 + fp, 0.0)  # tp + fp == 0: dropped, pad 0 at recall 0
    aupr_in = jnp.sum(jnp.where(in_ok, 0.5 * (prec_before + prec_after), 0)) / nin
    i = f(jnp.arange(no))  # OOD scores removed before O[i]
    c = f(le)  # in-distribution scores removed before O[i]
    q_before = _safe_div(i, c + i, 0.0)  # first sweep point is dropped, pad 0 at recall 0
    q_after = (i + 1) / (c + i + 1)
    aupr_out = jnp.sum(jnp.where(out_ok, 0.5 * (q_before + q_after), 0)) / nout

    k = _closest_count(n_in, tpr, dtype)
    # k == n_in: the closest point is the start of the sweep (every OOD input accepted, TNR 0
    # whatever the scores): tpr is not resolved by n_in scores, the operating point is NaN.
    fp_at = n_out - lt[jnp.clip(n_in - k - 1, 0, ni - 1)]
    fpr = jnp.where(k == n_in, jnp.nan, f(fp_at) / nout)
    return dict(tnr_at_tpr=1.0 - fpr, fpr_at_tpr=fpr, auroc=auroc, aupr_in=aupr_in,
                aupr_out=aupr_out, detection_accuracy=dtacc)  # fmt: skip


def openood(in_keys, out_keys, n_in, n_out, tpr, dtype):
    """OpenOOD / scikit-learn curves over groups of tied scores.

    Groups are the distinct values of the merged sorted scores (ascending = OOD-positive
    thresholds of ``-score`` in scikit-learn's descending order). At the last position p of a
    group with value v: ``F = #{in <= v}`` and ``T = p + 1 - F = #{out <= v}``.
    """
    merged = lax.sort(jnp.concatenate([in_keys, out_keys]))
    in_sorted = lax.sort(in_keys)
    n = merged.shape[0]
    n_valid = n_in + n_out
    pos = jnp.arange(n, dtype=jnp.int32)
    nxt = jnp.concatenate([merged[1:], merged[-1:]])
    end = (pos < n_valid) & ((pos == n_valid - 1) | (merged != nxt))
    # #{in <= v} at group ends, without a 2n-query search: for in-sample j, a_j = #{all <= I[j]}
    # is the group end + 1 of its value, so #{in <= merged[p]} = #{j : a_j <= p + 1}.
    a = jnp.searchsorted(merged, in_sorted, side="right").astype(jnp.int32)
    in_ok = jnp.arange(in_sorted.shape[0]) < n_in
    hist = jnp.zeros(n + 1, jnp.int32).at[a].add(in_ok.astype(jnp.int32))
    cum_in = jnp.cumsum(hist)[1:]  # cum_in[p] = #{j : a_j <= p + 1}

    # Last group end before p (-1 if none) and first group end after p (n if none).
    prev_end = jnp.concatenate([jnp.array([-1], jnp.int32), lax.cummax(jnp.where(end, pos, -1))])
    prev_end = prev_end[:-1]
    next_end = lax.cummin(jnp.where(end, pos, n), reverse=True)
    next_end = jnp.concatenate([next_end, jnp.array([n], jnp.int32)])[1:]
    has_prev, has_next = prev_end >= 0, next_end < n
    F = cum_in
    T = pos + 1 - F
    F_prev = jnp.where(has_prev, F[jnp.clip(prev_end, 0, n - 1)], 0)
    T_prev = jnp.where(has_prev, prev_end + 1 - F_prev, 0)
    F_next = F[jnp.clip(next_end, 0, n - 1)]
    T_next = next_end + 1 - F_next
    dF, dT = F - F_prev, T - T_prev
    # scikit-learn roc_curve(drop_intermediate=True): keep the first and last points and every
    # point where the step to it differs from the step after it (np.diff(., 2) != 0).
    kept = end & (~has_prev | ~has_next | (dF != F_next - F) | (dT != T_next - T))

    f = functools.partial(jnp.asarray, dtype=dtype)
    nin, nout = f(n_in), f(n_out)
    t = first_count_reaching(n_out, tpr, dtype)
    hit = kept & (T >= t)
    fp_at = jnp.min(jnp.where(hit, F, jnp.iinfo(jnp.int32).max))  # F grows along the curve
    # t >= n_out: only the end of the curve (every OOD input flagged) reaches tpr: unresolved.
    fpr = jnp.where(jnp.any(hit) & (t < n_out), f(fp_at) / nin, jnp.nan)

    auroc = jnp.sum(jnp.where(end, (f(dF) / nin) * (f(T + T_prev) / (2 * nout)), 0))
    dtacc = 0.5 * jnp.maximum(1.0, jnp.max(jnp.where(end, f(T) / nout + 1 - f(F) / nin, 0)))
    # AUPR-in: in positive, thresholds descending; the point of group g has precision
    # #{in >= v} / #{all >= v}; the curve ends at (recall 0, precision 1).
    prec_g = f(n_in - F_prev) / f(n_valid - (prev_end + 1))
    prec_up = _safe_div(f(n_in - F), f(n_valid - (pos + 1)), 1.0)
    aupr_in = jnp.sum(jnp.where(end, (f(dF) / nin) * 0.5 * (prec_g + prec_up), 0))
    # AUPR-out: OOD positive on -score, thresholds ascending in score.
    q_g = f(T) / f(pos + 1)
    q_down = _safe_div(f(T_prev), f(prev_end + 1), 1.0)
    aupr_out = jnp.sum(jnp.where(end, (f(dT) / nout) * 0.5 * (q_g + q_down), 0))
    return dict(tnr_at_tpr=1.0 - fpr, fpr_at_tpr=fpr, auroc=auroc, aupr_in=aupr_in,
                aupr_out=aupr_out, detection_accuracy=dtacc)  # fmt: skip
