"""Tests of isomax_jax.thresholds: fit_threshold and the serialisable OODDetector."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isomax_jax import detectors, scores
from isomax_jax.metrics import ood_metrics
from isomax_jax.thresholds import SCORE_NAMES, OODDetector, fit_threshold

PAD = 256
TPRS = (0.95, 0.5, 0.9, 0.99, 0.05)


def numpy_threshold(x, tpr):
    """Loop reference: the largest observed value t with mean(x >= t) >= tpr (float32 rule)."""
    x = np.asarray(x, np.float32)
    n = len(x)
    m = next(m for m in range(1, n + 1) if np.float32(m) / np.float32(n) >= np.float32(tpr))
    return np.sort(x)[::-1][m - 1]


def _cases():
    rng = np.random.default_rng(0)
    return {
        "continuous": rng.normal(size=200),
        "tied": rng.normal(size=150).round(1),
        "n20": rng.normal(size=20),
        "one": np.array([0.3]),
        "constant": np.full(7, -2.0),
        "three": np.array([1.0, -0.0, 0.0]),
    }


CASES = _cases()


@pytest.fixture(scope="module")
def batched():
    """All cases padded (NaN padding) and masked, vmapped over cases and tpr: one compilation."""
    rng = np.random.default_rng(1)
    vals, masks = [], []
    for name in sorted(CASES):
        x = CASES[name]
        perm = rng.permutation(PAD)
        vals.append(np.r_[x, np.full(PAD - len(x), np.nan)][perm])
        masks.append(np.r_[np.ones(len(x), bool), np.zeros(PAD - len(x), bool)][perm])
    vals.append(np.r_[np.nan, np.ones(PAD - 1)])  # NaN among real scores
    masks.append(np.ones(PAD, bool))
    vals.append(np.ones(PAD))  # all masked
    masks.append(np.zeros(PAD, bool))
    f = jax.vmap(lambda s, m, t: fit_threshold(s, tpr=t, in_mask=m), in_axes=(0, 0, None))
    f = jax.jit(jax.vmap(f, in_axes=(None, None, 0)))
    tprs = jnp.asarray(TPRS + (1.0,), jnp.float32)
    return np.asarray(
        f(jnp.asarray(np.stack(vals), jnp.float32), jnp.asarray(np.stack(masks)), tprs)
    )


@pytest.mark.parametrize("index", range(len(CASES)), ids=sorted(CASES))
def test_fit_threshold_equals_numpy(batched, index):
    x = CASES[sorted(CASES)[index]].astype(np.float32)
    for t_index, tpr in enumerate(TPRS):
        got = batched[t_index, index]
        assert got == numpy_threshold(x, tpr), tpr
        frac = lambda t: np.float32(np.sum(x >= t)) / np.float32(len(x))  # noqa: E731
        assert frac(got) >= np.float32(tpr)
        higher = x[x > got]  # any larger threshold accepts fewer than tpr
        if higher.size:
            assert frac(higher.min()) < np.float32(tpr)
    assert np.isnan(batched[-1, index])  # tpr = 1.0 under jit


def test_fit_threshold_bad_values_nan_under_jit(batched):
    assert np.all(np.isnan(batched[:, len(CASES) :]))


def test_fit_threshold_eager_exact_count():
    x = jnp.asarray(CASES["n20"], jnp.float32)
    t = fit_threshold(x, tpr=0.95)
    assert int(jnp.sum(x >= t)) == 19
    assert t.dtype == jnp.float32 and t.shape == ()


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(in_scores=jnp.array([1, 2])), TypeError, "floating"),
        (dict(in_scores=jnp.ones((2, 2))), ValueError, r"1-D .*\(2, 2\)"),
        (dict(in_scores=jnp.array([jnp.nan, 1.0])), ValueError, "non-finite"),
        (dict(in_mask=jnp.zeros(3, bool)), ValueError, "must hold an unmasked score"),
        (dict(tpr=1.2), ValueError, "`tpr` must be"),
    ],
)
def test_fit_threshold_bad_input(kwargs, err, match):
    args = dict(in_scores=jnp.array([0.1, 0.2, 0.3])) | kwargs
    with pytest.raises(err, match=match):
        fit_threshold(args.pop("in_scores"), **args)


def _logits(seed, n, c=5, scale=3.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, c)) * scale, jnp.float32)


@pytest.mark.parametrize("score", SCORE_NAMES)
def test_detector_fit_and_classify(score):
    val, test = _logits(0, 64), _logits(1, 64)
    det = OODDetector.fit(score, val, tpr=0.9)
    # the same function as the detector registry's (eager) score of that name
    name = {"max_probability": "msp"}.get(score, score)
    expected = detectors.get(name).score({}, logits=val)
    np.testing.assert_allclose(det.scores(val), expected, rtol=1e-6, atol=1e-6)
    if hasattr(scores, score):  # and the function of isomax_jax.scores, where there is one
        np.testing.assert_allclose(
            det.scores(val), getattr(scores, score)(val), rtol=1e-6, atol=1e-6
        )
    assert det.threshold == float(fit_threshold(det.scores(val), tpr=0.9))
    assert float(jnp.mean(det.scores(val) >= det.threshold)) >= 0.9
    batch = det.is_in_distribution(test)
    assert batch.shape == (64,) and batch.dtype == jnp.bool_
    np.testing.assert_array_equal(batch, det.scores(test) >= det.threshold)
    for i in range(3):  # one input [C] at a time
        single = det.is_in_distribution(test[i])
        assert single.shape == () and bool(single) == bool(batch[i])
        assert bool(det.is_ood(test[i])) != bool(single)


def test_detector_serialisation_round_trip():
    det = OODDetector.fit("entropic", _logits(2, 32), tpr=0.95, convention="openood")
    text = det.to_json()
    back = OODDetector.from_json(text)
    assert back == det and back.threshold == det.threshold  # exact float round trip
    assert json.loads(text)["format"] == "isomax_jax.OODDetector/2"
    assert OODDetector.from_dict(det.to_dict()) == det


@pytest.mark.parametrize(
    "data, match",
    [
        (dict(score="softmax", threshold=0.5), "unknown detector 'softmax'"),
        (dict(detector="entropic", threshold=float("nan")), "`threshold` must be finite"),
        (dict(detector="entropic", threshold=0.5, tpr=1.0), "`tpr` must be in"),
        (dict(detector="entropic", threshold=0.5, convention="sk"), "`convention` must be one of"),
        (dict(detector="entropic", threshold=0.5, extra=1), "unknown detector fields"),
        (dict(detector="entropic", threshold=0.5, format="other/2"), "unknown detector format"),
        (dict(detector="knn", threshold=0.5), "`knn` needs its fitted state"),
        (dict(detector="energy", threshold=0.5, hyperparameters={"k": 3}), "`k` is not a hyper"),
        (dict(detector="odin", threshold=0.5), "perturbs images"),
    ],
)
def test_detector_bad_input(data, match):
    with pytest.raises(ValueError, match=match):
        OODDetector.from_dict(data)


@pytest.mark.parametrize(
    "text, match",
    [
        (
            '{"score": "entropic", "threshold": "0.5"}',
            r"field 'threshold' must be a number; got '0.5'",
        ),
        (
            '{"score": "entropic", "threshold": true}',
            r"field 'threshold' must be a number; got True",
        ),
        (
            '{"score": "entropic", "threshold": null}',
            r"field 'threshold' must be a number; got None",
        ),
        ('{"score": "entropic", "threshold": 0.5, "tpr": "0.9"}', r"field 'tpr' must be a number"),
        ('{"score": 3, "threshold": 0.5}', r"field 'score' must be a string; got 3"),
        ('{"score": "entropic", "threshold": 0.5, "convention": ["reference"]}', "'convention'"),
        ('{"score": "entropic"}', r"detector field\(s\) \['threshold'\] missing"),
        ('{"threshold": 0.5}', r"detector field\(s\) \['detector'\] missing"),
        ('[{"score": "entropic", "threshold": 0.5}]', "must be a JSON object .* got list"),
        ('"entropic"', "must be a JSON object .* got str"),
        ('{"score": "entropic", "threshold": 0.5', "detector JSON cannot be parsed"),
        ('{"score": "entropic", "threshold": NaN}', "`threshold` must be finite"),
    ],
)
def test_detector_json_validated_field_by_field(text, match):
    with pytest.raises(ValueError, match=match):
        OODDetector.from_json(text)


def test_detector_constructor_refuses_strings_and_bools():
    with pytest.raises(TypeError, match="`threshold` must be a real number; got '0.5'"):
        OODDetector(score="entropic", threshold="0.5")
    with pytest.raises(TypeError, match="`tpr` must be a real number; got True"):
        OODDetector(score="entropic", threshold=0.5, tpr=True)
    with pytest.raises(TypeError, match="`detector` must be a detector name"):
        OODDetector(score=None, threshold=0.5)
    det = OODDetector(score="entropic", threshold=np.float32(-0.25), tpr=jnp.asarray(0.9))
    assert det.threshold == -0.25 and isinstance(det.threshold, float)
    assert OODDetector.from_json(det.to_json()) == det


def test_fit_threshold_masks_must_be_boolean_and_jit_equals_eager():
    x = jnp.asarray(CASES["tied"], jnp.float32)
    with pytest.raises(TypeError, match="`in_mask` must be a boolean mask"):
        fit_threshold(x, in_mask=jnp.ones(x.shape, jnp.float32))
    mask = jnp.ones(x.shape, bool)
    eager = float(fit_threshold(x, in_mask=mask))
    assert eager == float(jax.jit(lambda s: fit_threshold(s, in_mask=mask))(x))
    assert eager == float(jax.jit(lambda: fit_threshold(x, in_mask=mask))())
    assert eager == numpy_threshold(CASES["tied"], 0.95)


def test_detector_bad_logits_shape():
    det = OODDetector(score="mmles", threshold=0.0)
    with pytest.raises(ValueError, match=r"\[num_classes\] \(one input\) or \[batch, num_cl"):
        det.is_in_distribution(jnp.ones((2, 3, 4)))


def test_detector_evaluate_matches_ood_metrics():
    det = OODDetector(score="max_probability", threshold=0.5, tpr=0.9, convention="openood")
    # The shapes of tests/test_metrics.py's float32 case: the compiled metrics are reused.
    ins, outs = _logits(3, 400, scale=4.0), _logits(4, 150, scale=1.0)
    got = det.evaluate(ins, outs)
    want = ood_metrics(
        scores.max_probability(ins), scores.max_probability(outs), convention="openood", tpr=0.9
    )
    for k in want:
        assert float(got[k]) == float(want[k]), k


def _feature_data():
    rng = np.random.default_rng(7)
    centers = np.abs(rng.normal(size=(4, 6))) * 2
    labels = np.arange(160) % 4
    train = np.abs(centers[labels] + rng.normal(size=(160, 6))).astype(np.float32)
    val = np.abs(centers[np.arange(40) % 4] + rng.normal(size=(40, 6))).astype(np.float32)
    kernel = (rng.normal(size=(6, 4)) / 3).astype(np.float32)
    bias = (rng.normal(size=4) * 0.1).astype(np.float32)
    return train, labels, val, kernel, bias


@pytest.mark.parametrize(
    "name", ["mahalanobis", "relative_mahalanobis", "knn", "vim", "react", "ash", "energy"]
)
def test_any_detector_deploys_saves_and_loads(name, tmp_path):
    """Issue 22.6: OODDetector.fit("knn", ...) was refused (logit scores only), so a fitted
    KNN/Mahalanobis detector and its threshold had no saved form."""
    train, labels, val, kernel, bias = _feature_data()
    head_fn = lambda f: f @ kernel + bias[None, :]  # noqa: E731
    head = dict(head_fn=head_fn, kernel=kernel, bias=bias)
    det_hp = detectors.get("knn", k=5) if name == "knn" else name
    fit_inputs = {"features": train, "labels": labels, "logits": train @ kernel + bias}
    det = OODDetector.fit(
        det_hp, val @ kernel + bias, features=val, train=fit_inputs, tpr=0.9, **head
    )
    # the threshold is fit_threshold of the detector's own scores of the validation data
    state = det.detector.fit(**fit_inputs, **head) if det.detector.fit_inputs else {}
    want = det.detector.score(state, features=val, logits=val @ kernel + bias, **head)
    np.testing.assert_array_equal(det.scores(val @ kernel + bias, features=val, **head), want)
    assert det.threshold == float(fit_threshold(want, tpr=0.9))
    path = tmp_path / "detector.npz"
    det.save(path)
    back = OODDetector.load(path)
    assert back == det and back.detector == det.detector and back.name == det.name
    single = back.is_in_distribution(val[0] @ kernel + bias, features=val[0], **head)
    batch = back.is_in_distribution(val @ kernel + bias, features=val, **head)
    assert single.shape == () and batch.shape == (40,) and bool(single) == bool(batch[0])
    np.testing.assert_array_equal(batch, want >= det.threshold)
    if det.state:  # arrays cannot go into the JSON form
        with pytest.raises(ValueError, match="has fitted arrays .* save"):
            det.to_json()
    else:
        assert OODDetector.from_json(det.to_json()) == det


def test_deployed_detector_refuses_a_state_of_another_detector(tmp_path):
    train, labels, val, *_ = _feature_data()
    knn_state = detectors.get("knn", k=5).fit(features=train)
    with pytest.raises(ValueError, match="`state` was not fitted by `mahalanobis`"):
        OODDetector("mahalanobis", 0.0, state=knn_state)
    with pytest.raises(ValueError, match="has something to fit: pass train="):
        OODDetector.fit("knn", features=val)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz.* not a saved OODDetector"):
        OODDetector.load(tmp_path / "junk.npz")


def test_one_score_name_for_msp_and_first_version_json_still_loads():
    """`scores.max_probability`, detector "msp" (title MPS): the alias works everywhere."""
    assert detectors.get("max_probability") == detectors.get("msp")
    assert detectors.get("msp").title == "MPS"
    logits = _logits(5, 32)
    a = OODDetector.fit("max_probability", logits, tpr=0.9)
    b = OODDetector.fit("msp", logits, tpr=0.9)
    assert a == b and a.name == "msp" and a.score == "msp"
    first = '{"format": "isomax_jax.OODDetector/1", "score": "max_probability", "threshold": 0.5}'
    assert OODDetector.from_json(first) == OODDetector("msp", 0.5)
