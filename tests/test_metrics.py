"""Tests of isomax_jax.metrics against loop-based NumPy sweeps and scikit-learn."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sklearn.metrics as skm

from isomax_jax.metrics import METRIC_NAMES, ood_metrics

TOL64 = dict(rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------------


def loop_reference(ins, outs, tpr=0.95):
    """The reference sweep (docs/metrics.md), written as the plain loop of calculate_log.py."""
    known, novel = np.sort(np.asarray(ins, np.float64)), np.sort(np.asarray(outs, np.float64))
    num_k, num_n = len(known), len(novel)
    tp, fp = [num_k], [num_n]
    k = n = 0
    for _ in range(num_k + num_n):
        if k == num_k:  # only OOD scores left
            tp.append(tp[-1])
            fp.append(fp[-1] - 1)
            n += 1
        elif n == num_n:
            tp.append(tp[-1] - 1)
            fp.append(fp[-1])
            k += 1
        elif novel[n] < known[k]:  # strictly lower OOD score: remove it
            tp.append(tp[-1])
            fp.append(fp[-1] - 1)
            n += 1
        else:  # tie or lower in-distribution score: remove the in-distribution one first
            tp.append(tp[-1] - 1)
            fp.append(fp[-1])
            k += 1
    tp, fp = np.array(tp, np.float64), np.array(fp, np.float64)
    pos = int(np.abs(tp / num_k - tpr).argmin())  # first closest point in sweep order
    # The sweep's start (everything accepted) cannot resolve tpr < 1: NaN (docs/metrics.md).
    tnr = 1.0 - fp[pos] / num_n if tp[pos] < num_k else np.nan
    tpr_c = np.concatenate([[1.0], tp / num_k, [0.0]])
    fpr_c = np.concatenate([[1.0], fp / num_n, [0.0]])
    auroc = -np.trapezoid(1.0 - fpr_c, tpr_c)
    dtacc = 0.5 * (tp / num_k + 1.0 - fp / num_n).max()
    denom = tp + fp
    keep = np.concatenate([[True], denom > 0, [True]])
    pin = np.concatenate([[0.5], tp / np.where(denom > 0, denom, 1), [0.0]])
    aupr_in = -np.trapezoid(pin[keep], tpr_c[keep])
    denom = num_k - tp + num_n - fp
    keep = np.concatenate([[True], denom > 0, [True]])
    pout = np.concatenate([[0.0], (num_n - fp) / np.where(denom > 0, denom, 1), [0.5]])
    aupr_out = np.trapezoid(pout[keep], 1.0 - fpr_c[keep])
    return dict(tnr_at_tpr=tnr, fpr_at_tpr=1 - tnr, auroc=auroc, aupr_in=aupr_in,
                aupr_out=aupr_out, detection_accuracy=dtacc)  # fmt: skip


def sklearn_openood(ins, outs, tpr=0.95):
    """OpenOOD v1.5 auc_and_fpr_recall, verbatim in terms of scikit-learn calls."""
    conf = np.concatenate([ins, outs]).astype(np.float64)
    ood = np.concatenate([np.zeros(len(ins), int), np.ones(len(outs), int)])
    fpr_list, tpr_list, _ = skm.roc_curve(ood, -conf)
    fpr = fpr_list[np.argmax(tpr_list >= tpr)]
    if (len(outs) - 1) / len(outs) < tpr:  # only TPR 1 reaches tpr: unresolved, NaN
        fpr = np.nan
    p_in, r_in, _ = skm.precision_recall_curve(1 - ood, conf)
    p_out, r_out, _ = skm.precision_recall_curve(ood, -conf)
    dtacc = 0.5 * np.max(tpr_list + 1 - fpr_list)
    return dict(tnr_at_tpr=1 - fpr, fpr_at_tpr=fpr, auroc=skm.auc(fpr_list, tpr_list),
                aupr_in=skm.auc(r_in, p_in), aupr_out=skm.auc(r_out, p_out),
                detection_accuracy=dtacc)  # fmt: skip


EXPECTED = {"reference": loop_reference, "openood": sklearn_openood}


def _cases():
    rng = np.random.default_rng(0)
    c = {}
    c["continuous"] = rng.normal(1.0, 1.0, 300), rng.normal(0.0, 1.0, 200)
    c["tied_1dec"] = rng.normal(1.0, 1.0, 300).round(1), rng.normal(0.0, 1.0, 250).round(1)
    c["tied_2dec"] = rng.random(400).round(2), (rng.random(150) * 0.8).round(2)
    c["saturated"] = np.minimum(rng.random(200) * 2, 1.0), np.minimum(rng.random(100) * 1.2, 1.0)
    c["constant"] = np.full(20, 0.5), np.full(13, 0.5)
    c["constant_apart"] = np.full(5, 1.0), np.full(7, -1.0)
    c["tiny_1_1"] = np.array([0.3]), np.array([0.3])
    c["tiny_1_2"] = np.array([0.2]), np.array([0.5, 0.1])
    c["tiny_3_2"] = np.array([0.2, 0.9, 0.2]), np.array([0.2, -0.4])
    c["tiny_2_3"] = np.array([-1.0, 2.0]), np.array([3.0, 3.0, -1.0])
    c["unbalanced_in"] = rng.normal(0.5, 1, 1000).round(1), rng.normal(0, 1, 7).round(1)
    c["unbalanced_out"] = rng.normal(0.5, 1, 9), rng.normal(0, 1, 900)
    c["collinear_0_39"] = np.arange(40.0), np.arange(40.0)
    c["n20_boundary"] = rng.normal(1, 1, 20).round(1), rng.normal(0, 1, 20).round(1)
    c["n10_equidistant"] = rng.random(10), rng.random(10)
    c["signed_zeros"] = np.array([0.0, -0.0, 1.0, -1.0, 0.0]), np.array([-0.0, 0.0, -0.0, -2.0])
    flip = lambda x: np.where(x == 0, -np.copysign(0.0, x), x)  # noqa: E731
    c["signed_zeros_flipped"] = tuple(flip(x) for x in c["signed_zeros"])
    return c


CASES = _cases()


PAD = 1024  # every case padded to one length: one compilation serves all cases
TPRS = (0.95, 0.05, 0.5, 0.8, 0.9, 0.99, 1.5)  # 1.5: invalid, NaN under jit


def _np(metrics):
    return {k: float(v) for k, v in metrics.items()}


def _pad(x, rng):
    """x placed at random positions of a [PAD] row; padding holds random, NaN and inf values."""
    fill = rng.choice(np.array([np.nan, np.inf, -np.inf, 0.0, 1.0, -1.0, 5.0]), PAD - len(x))
    perm = rng.permutation(PAD)
    vals = np.r_[x, fill][perm]
    mask = np.r_[np.ones(len(x), bool), np.zeros(PAD - len(x), bool)][perm]
    return vals, mask


# Rows appended after the cases: invalid inputs that must give NaN under jit.
INVALID = ("nan_in", "inf_out", "in_all_masked", "out_all_masked")


def _stack():
    rng = np.random.default_rng(1)
    rows = [(*_pad(CASES[c][0], rng), *_pad(CASES[c][1], rng)) for c in sorted(CASES)]
    x, y = CASES["tied_1dec"]
    rows.append((*_pad(np.r_[x, np.nan], rng), *_pad(y, rng)))
    rows.append((*_pad(x, rng), *_pad(np.r_[-np.inf, y], rng)))
    rows.append((*_pad(x[:0], rng), *_pad(y, rng)))
    rows.append((*_pad(x, rng), *_pad(y[:0], rng)))
    return [np.stack(col) for col in zip(*rows, strict=True)]


@functools.partial(jax.jit, static_argnames="convention")
def _batched(ins, im, outs, om, tprs, *, convention):
    """metrics[tpr_index, case_index]: vmap over cases and over tpr values."""

    def one(i, a, o, b, t):
        return ood_metrics(i, o, in_mask=a, out_mask=b, tpr=t, convention=convention)

    over_cases = jax.vmap(one, in_axes=(0, 0, 0, 0, None))
    return jax.vmap(over_cases, in_axes=(None, None, None, None, 0))(ins, im, outs, om, tprs)


@pytest.fixture(scope="module", params=["reference", "openood"])
def batched(request):
    """All cases x all TPRS in one jitted, vmapped, masked float64 call per convention."""
    with jax.enable_x64(True):
        ins, im, outs, om = _stack()
        got = _batched(ins, im, outs, om, jnp.asarray(TPRS), convention=request.param)
        return request.param, {k: np.asarray(v) for k, v in got.items()}, (ins, im, outs, om)


@pytest.mark.parametrize("case_index", range(len(CASES)), ids=sorted(CASES))
def test_exact_float64_padded_vmapped(batched, case_index):
    """Padded + masked + vmapped + jitted == the plain implementations, to 1e-12."""
    convention, got, _ = batched
    ins, outs = CASES[sorted(CASES)[case_index]]
    for t_index, tpr in enumerate(TPRS[:-1]):
        want = EXPECTED[convention](ins, outs, tpr)
        for k in METRIC_NAMES if t_index == 0 else ("tnr_at_tpr", "fpr_at_tpr"):
            value = got[k][t_index, case_index]
            np.testing.assert_allclose(value, want[k], **TOL64, err_msg=f"tpr={tpr} {k}")
            assert 0.0 <= value <= 1.0 or (np.isnan(value) and k.endswith("_at_tpr"))
    assert all(np.isnan(got[k][-1, case_index]) for k in METRIC_NAMES)  # tpr = 1.5


def test_looped_eager_equal_vmapped_jitted(x64, batched):
    """One set at a time, eagerly (masked row; and unpadded) == the jitted vmap."""
    convention, got, (ins, im, outs, om) = batched
    row = sorted(CASES).index("tied_2dec")
    i, a, o, b = (jnp.asarray(x[row]) for x in (ins, im, outs, om))
    looped = _np(ood_metrics(i, o, in_mask=a, out_mask=b, convention=convention))
    eager = _np(ood_metrics(*map(jnp.asarray, CASES["tied_2dec"]), convention=convention))
    for k in METRIC_NAMES:
        np.testing.assert_allclose(looped[k], got[k][0, row], **TOL64, err_msg=k)
        np.testing.assert_allclose(eager[k], got[k][0, row], **TOL64, err_msg=k)


def test_collinear_drop_intermediate_moves_fpr95(batched):
    """in = out = 0..39: every interior ROC point is collinear with equal steps; scikit-learn
    keeps only the ends, so its first point with TPR >= 95% is (1, 1): OpenOOD's FPR@95 is 1.0
    where the unthinned curve gives 0.95."""
    convention, got, _ = batched
    ins, outs = CASES["collinear_0_39"]
    fpr_all, tpr_all, _ = skm.roc_curve(np.r_[np.zeros(40), np.ones(40)], -np.r_[ins, outs],
                                        drop_intermediate=False)  # fmt: skip
    assert fpr_all[np.argmax(tpr_all >= 0.95)] == 0.95
    value = got["fpr_at_tpr"][0, sorted(CASES).index("collinear_0_39")]
    if convention == "openood":
        np.testing.assert_allclose(value, 1.0, **TOL64)
    else:  # the reference sweep keeps 38 of 40 in-distribution scores and accepts 38 OOD ones
        want = loop_reference(ins, outs)["fpr_at_tpr"]  # 39/40: the tie removes ins first
        np.testing.assert_allclose(value, want, **TOL64)


def test_signed_zeros_equal(batched):
    """-0.0 and +0.0 are one value: flipping the sign of every zero changes nothing."""
    _, got, _ = batched
    i, j = sorted(CASES).index("signed_zeros"), sorted(CASES).index("signed_zeros_flipped")
    for k in METRIC_NAMES:
        np.testing.assert_array_equal(got[k][:, i], got[k][:, j], err_msg=k)


def test_reference_ties_lower_auroc_than_sklearn(batched):
    convention, got, _ = batched
    i = sorted(CASES).index("tied_1dec")
    ins, outs = CASES["tied_1dec"]
    sk = skm.roc_auc_score(np.r_[np.ones(len(ins)), np.zeros(len(outs))], np.r_[ins, outs])
    if convention == "reference":
        assert got["auroc"][0, i] < sk - 1e-3
    else:
        np.testing.assert_allclose(got["auroc"][0, i], sk, **TOL64)


@pytest.mark.parametrize("convention", ["reference", "openood"])
def test_float32_close_to_float64(convention):
    ins, outs = CASES["tied_2dec"]
    got = _np(ood_metrics(jnp.asarray(ins, jnp.float32), jnp.asarray(outs, jnp.float32),
                          convention=convention))  # fmt: skip
    want = EXPECTED[convention](ins.astype(np.float32), outs.astype(np.float32))
    for k in METRIC_NAMES:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_bfloat16_is_upcast():
    ins = jnp.asarray(CASES["tied_2dec"][0], jnp.bfloat16)
    outs = jnp.asarray(CASES["tied_2dec"][1], jnp.bfloat16)
    got = ood_metrics(ins, outs)
    assert all(v.dtype == jnp.float32 for v in got.values())
    want = loop_reference(np.asarray(ins, np.float32), np.asarray(outs, np.float32))
    for k in METRIC_NAMES:
        np.testing.assert_allclose(float(got[k]), want[k], rtol=1e-5, atol=1e-6, err_msg=k)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

GOOD = jnp.array([0.1, 0.5, 0.9])


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(in_scores=jnp.array([1, 2, 3])), TypeError, "`in_scores` must have a floating"),
        (dict(out_scores=jnp.array([True, False])), TypeError, "`out_scores` must have a floating"),
        (dict(in_scores=jnp.ones((3, 2))), ValueError, r"`in_scores` must be 1-D .* \(3, 2\)"),
        (dict(out_scores=jnp.ones(())), ValueError, "`out_scores` must be 1-D"),
        (dict(in_scores=jnp.zeros((0,))), ValueError, "`in_scores` must hold at least one"),
        (dict(out_scores=jnp.array([0.1, jnp.nan])), ValueError, "`out_scores` must be finite"),
        (dict(in_scores=jnp.array([jnp.inf, 0.1])), ValueError, "`in_scores` must be finite"),
        (dict(in_mask=jnp.zeros(3, bool)), ValueError, "`in_scores` must hold an unmasked"),
        (dict(out_mask=jnp.ones(4, bool)), ValueError, r"`out_mask` must have the shape .* \(4,\)"),
        (dict(tpr=1.0), ValueError, "`tpr` must be a float scalar in"),
        (dict(tpr=0.0), ValueError, "`tpr` must be a float scalar in"),
        (dict(convention="sklearn"), ValueError, "`convention` must be one of"),
        (dict(in_scores=(GOOD, GOOD)), TypeError, "`in_scores` must be one array"),
    ],
)
def test_bad_input_eager(kwargs, err, match):
    args = dict(in_scores=GOOD, out_scores=GOOD) | kwargs
    with pytest.raises(err, match=match):
        ood_metrics(args.pop("in_scores"), args.pop("out_scores"), **args)


def test_nan_input_inside_masked_region_is_fine():
    """Eagerly, NaN/inf in masked positions is allowed and changes nothing."""
    ins, outs = (jnp.asarray(x, jnp.float32) for x in CASES["tied_2dec"])
    mask = jnp.ones(ins.shape, bool).at[:2].set(False)
    got = _np(ood_metrics(ins.at[0].set(jnp.nan).at[1].set(jnp.inf), outs, in_mask=mask))
    want = _np(ood_metrics(ins.at[0].set(-5.0).at[1].set(7.0), outs, in_mask=mask))
    assert got == want and all(np.isfinite(v) for v in got.values())


@pytest.mark.parametrize("row", range(len(INVALID)), ids=INVALID)
def test_bad_values_under_jit_give_nan(batched, row):
    """NaN/inf unmasked scores or an all-masked set: every metric NaN under jit/vmap."""
    _, got, _ = batched
    for k in METRIC_NAMES:
        assert np.all(np.isnan(got[k][:, len(CASES) + row])), k


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int32, jnp.uint8])
def test_non_boolean_masks_refused(dtype):
    """A float mask used to be read as ``mask != 0``: 0.5 counted as a real score."""
    for kwargs in (dict(in_mask=jnp.full(3, 0.5)), dict(out_mask=jnp.ones(3))):
        kwargs = {k: v.astype(dtype) for k, v in kwargs.items()}
        (name,) = kwargs
        with pytest.raises(TypeError, match=rf"`{name}` must be a boolean mask .* got dtype"):
            ood_metrics(GOOD, GOOD, **kwargs)
        with pytest.raises(TypeError, match=rf"`{name}` must be a boolean mask"):
            jax.jit(lambda i, o, kw=kwargs: ood_metrics(i, o, **kw))(GOOD, GOOD)


def _equal_scores_cases():
    rng = np.random.default_rng(5)
    return [
        (np.ones(100), np.ones(100)),  # all equal: TNR was 2.2e-08 under jit, 0.0 eagerly
        (np.full(37, -2.5), np.full(91, -2.5)),
        (rng.integers(0, 3, 200).astype(float), rng.integers(0, 3, 77).astype(float)),
        (rng.normal(size=1000), rng.normal(size=333)),
    ]


@pytest.mark.parametrize("convention", ["reference", "openood"])
@pytest.mark.parametrize("case", range(4))
def test_eager_and_jit_give_identical_bits(convention, case):
    """Eager, jitted with arguments, and jitted with the inputs as compile-time constants."""
    ins, outs = (jnp.asarray(x, jnp.float32) for x in _equal_scores_cases()[case])
    eager = _np(ood_metrics(ins, outs, convention=convention))
    jitted = _np(jax.jit(lambda i, o: ood_metrics(i, o, convention=convention))(ins, outs))
    constants = _np(jax.jit(lambda: ood_metrics(ins, outs, convention=convention))())
    traced_tpr = jax.jit(lambda i, o, t: ood_metrics(i, o, tpr=t, convention=convention))
    masks = dict(in_mask=jnp.ones(ins.shape, bool), out_mask=jnp.ones(outs.shape, bool))
    masked = _np(jax.jit(lambda i, o: ood_metrics(i, o, convention=convention, **masks))(ins, outs))
    for other in (jitted, constants, _np(traced_tpr(ins, outs, 0.95)), masked):
        assert other == eager
    if case < 2:  # all scores equal: nothing is separated
        assert eager["tnr_at_tpr"] == 0.0 and eager["fpr_at_tpr"] == 1.0


def test_static_errors_raise_under_jit():
    f = jax.jit(ood_metrics)
    with pytest.raises(TypeError, match="floating"):
        f(jnp.array([1, 2]), GOOD)
    with pytest.raises(ValueError, match="1-D"):
        f(jnp.ones((2, 2)), GOOD)
    with pytest.raises(ValueError, match="`out_mask` must have the shape"):
        f(GOOD, GOOD, out_mask=jnp.ones(2))


@pytest.mark.parametrize("convention", ["reference", "openood"])
def test_unresolvable_tpr_is_nan_and_warns_eagerly(convention):
    """Perfectly separated sets of 5 and 10: the reference sweep's closest point to TPR 95 % was
    its start, TNR 0.0 with AUROC 1.0, silently. Now NaN, with a warning naming the count."""
    from isomax_jax.metrics import TPRResolutionWarning

    for n in (5, 10):
        ins, outs = np.linspace(1, 2, n), np.linspace(-2, -1, n)
        with pytest.warns(TPRResolutionWarning, match=r"cannot resolve tpr=0.95.*at least \d+"):
            got = _np(ood_metrics(ins, outs, convention=convention))
        assert np.isnan(got["tnr_at_tpr"]) and np.isnan(got["fpr_at_tpr"])
        assert got["auroc"] == 1.0 and got["detection_accuracy"] == 1.0
        jitted = _np(jax.jit(lambda i, o: ood_metrics(i, o, convention=convention))(ins, outs))
        assert np.isnan(jitted["tnr_at_tpr"]) and jitted["auroc"] == 1.0  # no warning in jit
    n = 11 if convention == "reference" else 20
    ins, outs = np.linspace(1, 2, n), np.linspace(-2, -1, n)
    assert _np(ood_metrics(ins, outs, convention=convention))["tnr_at_tpr"] == 1.0


@pytest.mark.parametrize("convention", ["reference", "openood"])
def test_tpr_resolved_predicts_the_nan(convention):
    """tpr_resolved(n, tpr) == "tnr_at_tpr is not NaN" for n = 1..39 positives and 4 targets."""
    from isomax_jax.metrics import min_resolvable_count, tpr_resolved

    rng = np.random.default_rng(3)
    sizes = np.arange(1, 40)
    pos = rng.normal(size=(len(sizes), 64)).astype(np.float32)
    pos_mask = np.arange(64)[None, :] < sizes[:, None]
    other = jnp.asarray(rng.normal(size=25), jnp.float32)

    @jax.jit
    def tnr(p, m, t):
        if convention == "reference":
            return ood_metrics(p, other, in_mask=m, tpr=t)["tnr_at_tpr"]
        return ood_metrics(other, p, out_mask=m, tpr=t, convention="openood")["tnr_at_tpr"]

    for tpr in (0.95, 0.9, 0.8, 0.99):
        got = np.asarray(jax.vmap(tnr, in_axes=(0, 0, None))(pos, pos_mask, tpr))
        want = [not tpr_resolved(int(n), tpr, convention) for n in sizes]
        np.testing.assert_array_equal(np.isnan(got), want, err_msg=f"tpr={tpr}")
        first = min_resolvable_count(tpr, convention)
        assert tpr_resolved(first, tpr, convention) and not tpr_resolved(first - 1, tpr, convention)
