"""Tests of SCALE, DICE, fDBD, GradNorm and WeightedEBO against independent NumPy float64
references.

Each detector: its scores against a NumPy reference (float64 at ``rtol=1e-10``) under ``jit``;
float32 scores within a stated rounding-error bound (each of these subtracts or exponentiates
terms that cancel or grow, so a fixed ``rtol`` would be either loose or CPU-dependent); ``vmap``
over stacked OOD sets; a state that round-trips through ``flax.serialization.msgpack``;
``fit_from`` equal to ``fit``; and every bad input the API promises to reject.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from detector_helpers import (
    B,
    C,
    D,
    N,
    as64,
    check_float32_within_bound,
    fit_score,
    head_fn_of,
    make_data,
)

from isomax_jax import detectors, distances

F64 = dict(rtol=1e-10, atol=1e-12)
U32 = 2.0**-24  # unit roundoff of float32
CLASS_WEIGHTS = (0.5, 2.0, -1.0, 1.5)  # one negative weight: clipped to 0 by the ReLU
NEW = ("scale", "dice", "fdbd", "gradnorm", "weighted_ebo")
HPARAMS = {"weighted_ebo": {"weights": CLASS_WEIGHTS}}
FITTED = ("dice", "fdbd")


def _fit_score(name, data, **hparams):
    return fit_score(name, data, {**HPARAMS.get(name, {}), **hparams})


# -- NumPy references ----------------------------------------------------------------------------


def np_energy(z):
    m = z.max(1)
    return m + np.log(np.exp(z - m[:, None]).sum(1))


def np_softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def np_scale(data, x, percentile=85.0):
    keep = x.shape[1] - int(np.round(x.shape[1] * percentile / 100))
    top = -np.sort(-x, axis=1)[:, :keep].sum(1)
    shaped = x * np.exp(x.sum(1) / top)[:, None]
    return np_energy(shaped @ data["kernel"] + data["bias"])


def np_dice_mask(data, percentile=90.0):
    contribution = data["features"].mean(0)[:, None] * data["kernel"]
    return contribution > np.percentile(contribution, percentile)


def np_dice(data, x, percentile=90.0):
    sparse = data["kernel"] * np_dice_mask(data, percentile)
    return np_energy(x @ sparse + data["bias"])


def np_fdbd(data, x):
    w, mean = data["kernel"], data["features"].mean(0)
    z = x @ w + data["bias"]
    out = np.empty(len(x))
    for i, row in enumerate(z):
        y = row.argmax()
        others = [c for c in range(w.shape[1]) if c != y]
        gaps = [abs(row[y] - row[c]) / np.linalg.norm(w[:, y] - w[:, c]) for c in others]
        out[i] = np.mean(gaps) / np.linalg.norm(x[i] - mean)
    return out


def np_gradnorm(data, x, z, temperature=1.0):
    """The L1 norm of the explicit outer-product gradient d KL(u || p) / dW, row by row."""
    grads = [np.outer(f, (p - 1 / len(p)) / temperature)
             for f, p in zip(x, np_softmax(z / temperature), strict=True)]  # fmt: skip
    return np.array([np.abs(g).sum() for g in grads])


def np_weighted_ebo(z, weights):
    return np.log(np.sum(np.maximum(np.asarray(weights), 0) * np.exp(z), axis=1))


REFERENCES = {
    "scale": lambda d, x, z: np_scale(d, x),
    "dice": lambda d, x, z: np_dice(d, x),
    "fdbd": lambda d, x, z: np_fdbd(d, x),
    "gradnorm": lambda d, x, z: np_gradnorm(d, x, z),
    "weighted_ebo": lambda d, x, z: np_weighted_ebo(z, CLASS_WEIGHTS),
}


def test_registered_with_names_titles_heads_and_defaults():
    titles = {n: detectors.get(n).title for n in NEW}
    assert titles == dict(scale="SCALE", dice="DICE", fdbd="fDBD", gradnorm="GradNorm",
                          weighted_ebo="WeightedEBO")  # fmt: skip
    assert set(NEW) <= set(detectors.NAMES) and set(REFERENCES) == set(NEW)
    heads = {n: {h for h in detectors.HEADS if detectors.get(n).applies_to(h)} for n in NEW}
    assert heads["weighted_ebo"] == set(detectors.HEADS)
    assert heads["scale"] == {"softmax", "isomax"}  # IsoMax+/DisMax normalise: SCALE = energy
    assert heads["dice"] == heads["fdbd"] == heads["gradnorm"] == {"softmax"}
    assert detectors.hyperparameters("scale") == {"percentile": 85.0}
    assert detectors.hyperparameters("dice") == {"percentile": 90.0}
    assert detectors.hyperparameters("gradnorm") == {"temperature": 1.0}
    assert detectors.hyperparameters("weighted_ebo") == {"weights": None}
    assert detectors.hyperparameters("fdbd") == {}
    inputs = {n: sorted(detectors.get(n).inputs) for n in NEW}
    assert inputs == dict(
        scale=["features", "head_fn"], dice=["bias", "features", "kernel"],
        fdbd=["features", "kernel", "logits"], gradnorm=["features", "logits"],
        weighted_ebo=["logits"],
    )  # fmt: skip


@pytest.mark.parametrize("name", NEW)
def test_matches_numpy_float64_and_jit(name, x64):
    data = make_data()
    det, state, inputs = _fit_score(name, data)
    expected = REFERENCES[name](data, data["test"], data["test_logits"])
    head_fn = inputs.pop("head_fn")
    jitted = jax.jit(lambda s, i: det.score(s, head_fn=head_fn, **i))(state, inputs)
    assert jitted.shape == (B,) and jitted.dtype == jnp.float64
    np.testing.assert_allclose(jitted, expected, **F64)
    np.testing.assert_allclose(det.score(state, head_fn=head_fn, **inputs), expected, **F64)


# -- float32 error bounds ------------------------------------------------------------------------


def _gamma(n):
    return n * U32 / (1 - n * U32)


def _energy_bound(z, logit_error):
    """|fl32(logsumexp(z~)) - logsumexp(z)| where |z~ - z| <= logit_error: logsumexp is
    1-Lipschitz in the max norm; its own evaluation (shift, exp, sum, log, add) adds at most
    gamma(C + 4) (|E| + 1) (the +4 also covers a few ulps of XLA's exp and log)."""
    return np.max(logit_error, axis=1) + _gamma(z.shape[1] + 4) * (np.abs(np_energy(z)) + 1)


def float32_error_bound(name, state, data64, x, z):
    """Per-row bound on |float32 score - exact score|, from the float32 inputs (exact in float64)
    and the float32 state (the float64 fit rounded once: tested below)."""
    kernel, bias = data64["kernel"], data64["bias"]
    dim, classes = kernel.shape
    if name == "scale":  # r = sum(f) / sum(top-k f); f exp(r) W + b; energy
        keep = dim - int(np.round(dim * 85.0 / 100))
        r = x.sum(1) / -np.sort(-x, axis=1)[:, :keep].sum(1)
        scale_error = r * (_gamma(dim) + _gamma(keep) + U32) + 3 * U32  # exp(r), relative
        g = np.abs(x) * np.exp(r)[:, None]
        logit_error = (scale_error + U32)[:, None] * (g @ np.abs(kernel)) + _gamma(dim + 1) * (
            g @ np.abs(kernel) + np.abs(bias)
        )
        return 1.01 * _energy_bound(x * np.exp(r)[:, None] @ kernel + bias, logit_error)
    if name == "dice":  # f (W * M) + b, the mask exact; energy
        sparse = np.abs(kernel) * np.asarray(state["mask"])
        logit_error = _gamma(dim + 1) * (np.abs(x) @ sparse + np.abs(bias))
        return 1.01 * _energy_bound(x @ (kernel * np.asarray(state["mask"])) + bias, logit_error)
    if name == "fdbd":  # A / ||f - m||, A a sum of non-negative terms (rel. gamma(C + 4))
        score = np_fdbd(data64, x)
        mean = data64["features"].mean(0)
        distance = np.linalg.norm(x - mean, axis=1)
        component = U32 * (np.abs(mean) + np.abs(x - mean)) * (1 + U32)  # m rounded, subtracted
        distance_error = np.linalg.norm(component, axis=1) + _gamma(dim + 2) * distance
        return 1.01 * np.abs(score) * (_gamma(classes + 4) + distance_error / distance + U32)
    if name == "gradnorm":  # ||f||_1 sum_c |p_c - 1/C| (T = 1): p_c - 1/C cancels
        p = np_softmax(z)
        shifted = z - z.max(1, keepdims=True)
        spread = np.abs(p - 1 / classes).sum(1)
        p_error = np.sum(p * (U32 * np.abs(shifted) + _gamma(classes + 5)), axis=1)
        spread_error = p_error + U32 * (1 + spread) + _gamma(classes) * spread
        norm = np.abs(x).sum(1)
        return 1.01 * (norm * spread_error + (_gamma(dim) + 2 * U32) * norm * spread)
    # weighted_ebo: z + log relu(w), the weights rounded to float32, XLA's log within 2 ulps
    with np.errstate(divide="ignore"):
        log_w = np.log(np.maximum(np.asarray(CLASS_WEIGHTS), 0))
    finite = np.isfinite(log_w)
    shifted = np.where(finite, z + np.where(finite, log_w, 0), -np.inf)
    safe_log_w = np.where(finite, np.abs(log_w), 0)
    logit_error = np.where(finite, 3 * U32 * (1 + safe_log_w) + U32 * np.abs(shifted), 0)
    return 1.01 * _energy_bound(np.where(finite, shifted, -1e300), logit_error)


@pytest.mark.parametrize("name", NEW)
def test_float32_within_error_bound_vmap_and_checkpoint(name):
    data = make_data(seed=1, dtype=np.float32)
    det, state, inputs = _fit_score(name, data)
    data64 = as64(data)
    x, z = data64["test"], data64["test_logits"]
    expected, bound = REFERENCES[name](data64, x, z), float32_error_bound(name, state, data64, x, z)
    scale = np.max(np.abs(expected))  # the row-by-row scale is too strict where scores near 0
    check_float32_within_bound(det, state, inputs, expected, bound, scale)


@pytest.mark.parametrize("name", FITTED)
def test_float32_fit_is_the_float64_fit_rounded_once(name):
    data = make_data(seed=1, dtype=np.float32)
    _, state32, _ = _fit_score(name, data)
    with jax.enable_x64(True):
        _, state64, _ = _fit_score(name, as64(data))
        state64 = {k: np.asarray(v) for k, v in state64.items()}
    assert set(state32) == set(state64)
    for key, value in state32.items():
        want = state64[key] if state64[key].dtype == bool else state64[key].astype(np.float32)
        assert value.dtype == want.dtype, key
        np.testing.assert_array_equal(value, want, err_msg=key)


def _batches(data, sizes, keys=("features", "labels", "logits")):
    bounds = np.cumsum((0, *sizes))
    assert bounds[-1] == N
    return [{k: data[k][a:b] for k in keys} for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@pytest.mark.parametrize("name", FITTED)
def test_fit_from_equals_fit(name):
    """A list and a generator of uneven batches give fit's state: DICE's mask and fDBD's inverse
    norms exactly, fDBD's mean to one float32 ulp (float64 sums in another order, rounded)."""
    data = make_data(seed=2, dtype=np.float32)
    det, state, inputs = _fit_score(name, data)
    head = dict(kernel=data["kernel"], bias=data["bias"])
    for sizes in ((1, 50, 2, 67), (N,), (7,) * 17 + (1,)):
        batches = _batches(data, sizes)
        for source in (batches, (b for b in batches)):
            got = det.fit_from(source, **head)
            assert set(got) == set(state)
            for key in state:
                if key == "mean":
                    np.testing.assert_allclose(got[key], state[key], rtol=2.0**-23, atol=0)
                else:
                    np.testing.assert_array_equal(got[key], state[key], err_msg=key)
            np.testing.assert_allclose(
                det.score(got, **inputs), det.score(state, **inputs), rtol=1e-6
            )
    assert not np.all(state.get("mask", False))  # a real sparsification (not all kept)


def test_hyperparameters_change_scores(x64):
    data = make_data()
    x, z = data["test"], data["test_logits"]
    det, state, inputs = _fit_score("scale", data, percentile=50.0)
    np.testing.assert_allclose(det.score(state, **inputs), np_scale(data, x, 50.0), **F64)
    det, state, inputs = _fit_score("dice", data, percentile=50.0)
    assert int(np.sum(state["mask"])) == D * C // 2
    np.testing.assert_allclose(det.score(state, **inputs), np_dice(data, x, 50.0), **F64)
    det = detectors.get("gradnorm", temperature=2.5)
    np.testing.assert_allclose(det.score({}, **inputs), np_gradnorm(data, x, z, 2.5), **F64)
    for weights in ((1.0, 0.0, 0.0, 3.0), np.array([[0.1], [0.2], [0.3], [0.4]])):
        det = detectors.get("weighted_ebo", weights=weights)
        np.testing.assert_allclose(
            det.score({}, logits=z), np_weighted_ebo(z, np.ravel(weights)), **F64
        )


def test_gradnorm_is_the_norm_of_the_kernels_gradient(x64):
    """The closed form equals jax.grad of the paper's loss KL(u || softmax((f W + b) / T))
    with respect to the kernel W, one example at a time."""
    data = make_data(seed=3)
    kernel, bias = data["kernel"], data["bias"]

    def kl(w, f, t):
        log_p = jax.nn.log_softmax((f @ w + bias) / t)
        return -jnp.mean(log_p) - jnp.log(C)

    for t in (1.0, 0.3):
        grads = [jax.grad(kl)(jnp.asarray(kernel), f, t) for f in data["test"]]
        want = np.array([float(jnp.sum(jnp.abs(g))) for g in grads])
        got = detectors.get("gradnorm", temperature=t).score({}, **_fit_score("msp", data)[2])
        np.testing.assert_allclose(got, want, **F64)


def test_scale_is_energy_on_normalising_heads_and_not_on_isomax(x64):
    """Why SCALE applies to softmax and isomax only: IsoMax+ and DisMax normalise the features,
    so SCALE's positive per-row factor cancels and the score is the head's energy."""
    data = make_data(seed=4)
    prototypes = jnp.asarray(np.random.default_rng(5).normal(size=(C, D)))
    x = jnp.asarray(data["test"])
    det = detectors.get("scale")
    for logits_fn in (
        lambda f: distances.isomax_plus_logits(f, prototypes, distance_scale=jnp.ones(1) * 3.0),
        lambda f: distances.dismax_logits(f, prototypes, distance_scale=jnp.ones(1) * 3.0),
    ):
        got = det.score({}, features=x, head_fn=logits_fn)
        np.testing.assert_allclose(got, np_energy(np.asarray(logits_fn(x))), rtol=1e-12)
    isomax = lambda f: distances.isomax_logits(f, prototypes)  # noqa: E731
    shifted = det.score({}, features=x, head_fn=isomax) - np_energy(np.asarray(isomax(x)))
    assert np.all(np.abs(shifted) > 1e-3)


def test_scale_shaping_keeps_every_entry_and_sums_the_top_k(x64):
    x = np.array([[3.0, 1.0, 2.0, 2.0, 0.0], [0.0] * 5, [5.0, 4.0, 3.0, 2.0, 1.0]])
    shaped = np.asarray(detectors.activation.scale_shaping(jnp.asarray(x), 60.0))  # top 2 of 5
    # the tie at the 2nd value counts once (top-k's values: 3 + 2), nothing is pruned
    np.testing.assert_allclose(shaped[0], x[0] * np.exp(8 / 5), **F64)
    np.testing.assert_array_equal(shaped[1], np.zeros(5))  # 0 / 0: factor 1, not NaN
    np.testing.assert_allclose(shaped[2], x[2] * np.exp(15 / 9), **F64)
    ash = np.asarray(detectors.activation.ash_s(jnp.asarray(x), 60.0))
    np.testing.assert_allclose(ash[2], np.array([5, 4, 0, 0, 0]) * np.exp(15 / 9), **F64)


def test_dice_keeps_contributions_strictly_above_the_percentile(x64):
    """Six contributions m_d W_dc = (1..6) / 2; at p = 40 numpy's percentile is the 3rd value,
    1.5 itself: the authors' strict ``>`` keeps the top 3 (``>=`` would keep 4)."""
    features = np.array([[1.0, 3.0], [1.0, 1.0]])  # mean (1, 2)
    kernel = np.array([[1.0, 2.0, 3.0], [2.0, 2.5, 3.0]]) / 2  # contributions (0.5 1 1.5; 2 2.5 3)
    state = detectors.get("dice", percentile=40.0).fit(features=features, kernel=kernel)
    np.testing.assert_array_equal(state["mask"], [[False, False, False], [True, True, True]])


def test_weighted_ebo_defaults_to_energy_and_does_not_overflow(x64):
    z = make_data()["test_logits"]
    energy = detectors.get("energy").score({}, logits=z)
    np.testing.assert_array_equal(detectors.get("weighted_ebo").score({}, logits=z), energy)
    ones = detectors.get("weighted_ebo", weights=[1.0] * C)
    assert ones.weights == (1.0,) * C and hash(ones) == hash(
        detectors.get("weighted_ebo", weights=(1, 1, 1, 1))
    )
    np.testing.assert_array_equal(ones.score({}, logits=z), energy)
    big = np.array([[1000.0, 990.0, 0.0, -5.0]])  # exp(1000) overflows float64
    got = detectors.get("weighted_ebo", weights=CLASS_WEIGHTS).score({}, logits=big)
    want = 1000.0 + np.log(0.5 + 2.0 * np.exp(-10.0))
    np.testing.assert_allclose(got, [want], **F64)
    with np.errstate(over="ignore"):
        assert not np.isfinite(np_weighted_ebo(big, CLASS_WEIGHTS)[0])  # the naive formula


def test_fdbd_edges(x64):
    data = make_data(seed=6)
    det, state, _ = _fit_score("fdbd", data)
    mean = np.asarray(state["mean"])
    z = mean @ data["kernel"] + data["bias"]
    at_mean = det.score(state, features=mean[None], logits=z[None])
    assert at_mean[0] == np.inf  # the feature at the training mean: boundary / 0
    np.testing.assert_array_equal(np.diag(state["inverse_norms"]), np.zeros(C))
    # nearly equal classes: the norms are recomputed directly, not from the Gram matrix
    kernel = data["kernel"].copy()
    kernel[:, 1] = kernel[:, 0] * (1 + 1e-9)
    state = det.fit(features=data["features"], kernel=kernel)
    want = 1 / (1e-9 * np.linalg.norm(kernel[:, 0]))
    np.testing.assert_allclose(state["inverse_norms"][0, 1], want, rtol=1e-6)


# -- bad input -----------------------------------------------------------------------------------


def test_missing_head_inputs_name_them():
    data = make_data(dtype=np.float32)
    for name in ("dice", "fdbd"):
        with pytest.raises(ValueError, match=f"`{name}.fit` needs `kernel`.*distance-based heads"):
            detectors.get(name).fit(features=data["features"], logits=data["logits"])
        with pytest.raises(ValueError, match=f"`{name}.fit_from` needs `kernel`"):
            detectors.get(name).fit_from(_batches(data, (N,)))
    det, state, _ = _fit_score("dice", data)
    with pytest.raises(ValueError, match="`dice.score` needs `bias`"):
        det.score(state, features=data["test"], kernel=data["kernel"])
    with pytest.raises(ValueError, match="`gradnorm.score` needs `logits`"):
        detectors.get("gradnorm").score({}, features=data["test"])
    with pytest.raises(ValueError, match="`scale.score` needs `head_fn`"):
        detectors.get("scale").score({}, features=data["test"])
    with pytest.raises(ValueError, match="`fdbd.fit` needs `features`"):
        detectors.get("fdbd").fit(kernel=data["kernel"])


def test_bad_shapes_and_states():
    data = make_data(dtype=np.float32)
    x, z = data["test"], data["test_logits"]
    dice, dice_state, inputs = _fit_score("dice", data)
    fdbd, fdbd_state, _ = _fit_score("fdbd", data)
    with pytest.raises(ValueError, match="`kernel` must have shape \\[D, C\\] with D = 8"):
        detectors.get("dice").fit(features=data["features"], kernel=data["kernel"].T)
    with pytest.raises(ValueError, match="`kernel` has 3 columns but the detector was fitted on 4"):
        dice.score(dice_state, features=x, kernel=data["kernel"][:, :3], bias=data["bias"][:3])
    with pytest.raises(ValueError, match="`features` has 7 columns but the detector was fitted"):
        dice.score(dice_state, features=x[:, :7], kernel=data["kernel"], bias=data["bias"])
    with pytest.raises(ValueError, match="`logits` has 3 columns but the detector was fitted on 4"):
        fdbd.score(fdbd_state, features=x, logits=z[:, :3])
    with pytest.raises(ValueError, match="same number of rows"):
        fdbd.score(fdbd_state, features=x[:5], logits=z)
    with pytest.raises(ValueError, match="same number of rows"):
        detectors.get("gradnorm").score({}, features=x[:5], logits=z)
    with pytest.raises(ValueError, match="at least 2 classes for GradNorm"):
        detectors.get("gradnorm").score({}, features=x, logits=z[:, :1])
    with pytest.raises(ValueError, match=r"`state` was not fitted by `dice`.*'inverse_norms'"):
        dice.score(fdbd_state, **inputs)
    with pytest.raises(ValueError, match="`kernel` columns 0 and 2 are equal"):
        same = data["kernel"].copy()
        same[:, 2] = same[:, 0]
        fdbd.fit(features=data["features"], kernel=same)
    with pytest.raises(ValueError, match="fDBD needs at least 2 classes"):
        fdbd.fit(features=data["features"], kernel=data["kernel"][:, :1])
    with pytest.raises(ValueError, match="`logits` has 3 columns but `weights` has 4 entries"):
        detectors.get("weighted_ebo", weights=CLASS_WEIGHTS).score({}, logits=z[:, :3])
    with pytest.raises(ValueError, match="prunes all 8 features"):
        detectors.get("scale", percentile=100).score({}, features=x, head_fn=head_fn_of(data))
    with pytest.raises(ValueError, match="`head_fn` must map"):
        detectors.get("scale").score({}, features=x, head_fn=lambda f: f[:, 0])


def test_bad_values_and_hyperparameters():
    data = make_data(dtype=np.float32)
    bad = data["features"].copy()
    bad[3, 2] = np.nan
    for name in FITTED:
        with pytest.raises(ValueError, match=r"`features` must be finite; got 1 .* \(3, 2\)"):
            detectors.get(name).fit(features=bad, kernel=data["kernel"])
        with pytest.raises(ValueError, match=r"`kernel` must be finite"):
            detectors.get(name).fit(features=data["features"], kernel=data["kernel"] * np.inf)
        with pytest.raises(TypeError, match="outside jax.jit"):
            jax.jit(lambda f, n=name: detectors.get(n).fit(features=f, kernel=data["kernel"]))(
                data["features"]
            )
        with pytest.raises(ValueError, match="has 7 columns; the batches before had 8"):
            detectors.get(name).fit_from(
                [{"features": data["features"][:10]}, {"features": data["features"][10:, :7]}],
                kernel=data["kernel"],
            )
        with pytest.raises(ValueError, match="got no batches"):
            detectors.get(name).fit_from(iter([]), kernel=data["kernel"])
    z = data["test_logits"].copy()
    z[0, 1] = np.inf
    for name in ("gradnorm", "weighted_ebo"):
        with pytest.raises(ValueError, match="`logits` must be finite"):
            detectors.get(name).score({}, features=data["test"], logits=z)
    for name, hparams, match in [
        ("scale", {"percentile": 0.85}, "looks like a fraction .* pass 85"),
        ("dice", {"percentile": 0.9}, "looks like a fraction .* pass 90"),
        ("dice", {"percentile": 120}, "`percentile` must be a number in \\[0, 100\\]"),
        ("gradnorm", {"temperature": -1.0}, "`temperature` must be a finite number > 0"),
        ("weighted_ebo", {"weights": (-1.0, 0.0)}, "no positive entry"),
        ("weighted_ebo", {"weights": (1.0, np.nan)}, "C finite numbers"),
        ("weighted_ebo", {"weights": np.ones((2, 2))}, "shape \\[C\\]\\); got shape \\(2, 2\\)"),
        ("weighted_ebo", {"weights": ()}, "C finite numbers"),
        ("weighted_ebo", {"weights": "abc"}, "sequence of C numbers"),
        ("fdbd", {"k": 3}, "`k` is not a hyperparameter.*valid: none"),
    ]:
        with pytest.raises(ValueError, match=match):
            detectors.get(name, **hparams)
