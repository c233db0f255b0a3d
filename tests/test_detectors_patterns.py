"""Tests of KL-Matching, SHE, NNGuide and GMM against independent NumPy float64 references.

Each detector: its scores against a NumPy/SciPy reference (float64 at ``rtol=1e-10``), under
``jit``; float32 scores within a first-order rounding-error bound derived below for the
operations each detector performs (all four subtract or select terms larger than their result,
so a fixed ``rtol`` would be either unjustified or loose); ``vmap`` over stacked OOD sets; a
state that round-trips through ``flax.serialization.msgpack``; ``fit_from`` equal to ``fit`` on
uneven batches from a list and a generator; and the bad inputs each one rejects.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from detector_helpers import check_float32_within_bound
from scipy import special, stats

from isomax_jax import detectors
from isomax_jax.detectors import mixture, patterns

N, D, C, B = 120, 8, 4, 20
F64 = dict(rtol=1e-10, atol=1e-12)
NAMES = ("kl_matching", "she", "nnguide", "gmm")


def make_data(seed=0, dtype=np.float64):
    """Non-negative class-structured features (like pooled ReLU ones) and a nearest-centre
    linear head ``z_c = f . mu_c - |mu_c|^2 / 2 + 5`` (accurate, positive energies)."""
    rng = np.random.default_rng(seed)
    centers = np.abs(rng.normal(size=(C, D))) * 2
    labels = np.arange(N) % C
    train = np.abs(centers[labels] + rng.normal(size=(N, D)))
    near = np.abs(centers[np.arange(B // 2) % C] + rng.normal(size=(B // 2, D)))
    far = np.abs(rng.normal(size=(B - B // 2, D)) * 3)
    test = np.concatenate([near, far])
    kernel, bias = centers.T, 5 - 0.5 * np.sum(centers**2, axis=1)
    cast = lambda x: x.astype(dtype)  # noqa: E731
    data = dict(
        features=cast(train), labels=labels, logits=cast(train @ kernel + bias), test=cast(test),
        test_logits=cast(test @ kernel + bias),
    )  # fmt: skip
    right = data["logits"].argmax(1) == labels
    assert 0.5 < right.mean() < 1 and set(labels[right]) == set(range(C))  # SHE needs both
    return data


def as64(data):
    return {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in data.items()}


# -- NumPy references ----------------------------------------------------------------------------


def np_log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def np_kl_matching(data, x, z):
    train_p = np.exp(np_log_softmax(data["logits"]))
    predicted = data["logits"].argmax(1)
    typical = [train_p[predicted == k].mean(0) for k in np.unique(predicted)]
    log_p = np_log_softmax(z)
    kl = np.stack([np.sum(np.exp(log_p) * (log_p - np.log(d)), axis=1) for d in typical], 1)
    return -kl.min(1)


def np_she_patterns(data):
    right = data["logits"].argmax(1) == data["labels"]
    train, labels = data["features"], data["labels"]
    return np.stack([train[right & (labels == c)].mean(0) for c in range(C)])


def np_she(data, x, z):
    return np.sum(x * np_she_patterns(data)[z.argmax(1)], axis=1)


def np_unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def np_nnguide_similarities(data, x):
    bank = np_unit(data["features"]) * special.logsumexp(data["logits"], axis=1)[:, None]
    return np_unit(x) @ bank.T


def np_nnguide(data, x, z, k=10):
    top = -np.sort(-np_nnguide_similarities(data, x), axis=1)[:, :k]
    return top.mean(1) * special.logsumexp(z, axis=1)


def np_gmm_terms(data, x, ridge=0.0):
    """``[B, C]`` log pi_c + log N(x; mu_c, Sigma_c) by SciPy (covariance divided by N_c)."""
    train, labels = data["features"], data["labels"]
    terms = []
    for c in range(labels.max() + 1):
        rows = train[labels == c]
        cov = np.cov(rows.T, bias=True) + ridge * np.eye(train.shape[1])
        density = stats.multivariate_normal(rows.mean(0), cov).logpdf(x)
        terms.append(np.log(len(rows) / len(train)) + density)
    return np.stack(terms, axis=1)


def np_gmm(data, x, z, ridge=0.0):
    return special.logsumexp(np_gmm_terms(data, x, ridge), axis=1)


REFERENCES = {"kl_matching": np_kl_matching, "she": np_she, "nnguide": np_nnguide, "gmm": np_gmm}


def fit_score(name, data, **hparams):
    det = detectors.get(name, **hparams)
    state = det.fit(features=data["features"], logits=data["logits"], labels=data["labels"])
    return det, state, dict(features=data["test"], logits=data["test_logits"])


def test_registered_with_names_titles_inputs_and_heads():
    assert set(NAMES) <= set(detectors.NAMES)
    assert {d.name for d in (*patterns.DETECTORS, *mixture.DETECTORS)} == set(NAMES)
    titles = {n: detectors.get(n).title for n in NAMES}
    assert titles == {"kl_matching": "KL-Matching", "she": "SHE", "nnguide": "NNGuide",
                      "gmm": "GMM"}  # fmt: skip
    inputs = {n: set(detectors.get(n).inputs) for n in NAMES}
    assert inputs["kl_matching"] == {"logits"} and inputs["gmm"] == {"features", "labels"}
    assert inputs["she"] == {"features", "logits", "labels"}
    assert inputs["nnguide"] == {"features", "logits"}
    for name in NAMES:
        heads = {h for h in detectors.HEADS if detectors.get(name).applies_to(h)}
        assert heads == ({"softmax"} if name == "nnguide" else set(detectors.HEADS)), name
    assert detectors.hyperparameters("nnguide")["k"] == 10  # the authors' code
    assert detectors.hyperparameters("gmm")["ridge"] == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_matches_numpy_float64_and_jit(name, x64):
    data = make_data()
    det, state, inputs = fit_score(name, data)
    expected = REFERENCES[name](data, data["test"], data["test_logits"])
    jitted = jax.jit(lambda s, i: det.score(s, **i))(state, inputs)
    assert jitted.shape == (B,) and jitted.dtype == jnp.float64
    np.testing.assert_allclose(jitted, expected, **F64)
    np.testing.assert_allclose(det.score(state, **inputs), expected, **F64)  # eager


def test_hyperparameters_change_scores(x64):
    data = make_data(seed=1)
    x, z = data["test"], data["test_logits"]
    for k, bank_chunk, query_chunk in ((1, 7, 3), (37, 50, 8), (N, 8192, 1024)):
        det, state, inputs = fit_score(
            "nnguide", data, k=k, bank_chunk=bank_chunk, query_chunk=query_chunk
        )
        np.testing.assert_allclose(det.score(state, **inputs), np_nnguide(data, x, z, k), **F64)
    det, state, inputs = fit_score("nnguide", data, bank_chunk=50)
    assert state["bank"].shape == (3, 40, D)  # KNN's balanced blocks
    det, state, inputs = fit_score("gmm", data, ridge=0.3, chunk=7)
    np.testing.assert_allclose(det.score(state, **inputs), np_gmm(data, x, z, 0.3), **F64)
    for name in ("kl_matching", "she"):
        det, state, inputs = fit_score(name, data, chunk=7)
        np.testing.assert_allclose(det.score(state, **inputs), REFERENCES[name](data, x, z), **F64)


# -- float32: first-order rounding-error bounds ----------------------------------------------------

U32 = 2.0**-24  # unit roundoff of float32
FN = 4 * U32  # relative error allowed to XLA's exp, log and sqrt (polynomial approximations)


def gamma(n):
    return n * U32 / (1 - n * U32)


def energy_bound(z):
    """``|fl(logsumexp z) - logsumexp z|``: shift (u |s|), exp (FN), sum (gamma_C), log (FN),
    and the final addition of the maximum (u)."""
    s = z - z.max(1, keepdims=True)
    p = np.exp(np_log_softmax(z))
    log_sum = np.log(np.exp(s).sum(1))
    relative_sum = np.sum(p * (U32 * np.abs(s) + FN), axis=1) + gamma(z.shape[1])
    return relative_sum + FN * np.abs(log_sum) + U32 * np.abs(special.logsumexp(z, axis=1))


def kl_matching_bound(state, data64, z):
    """``jax.nn.log_softmax`` errs by ``e_j`` per entry; ``p = exp(log p)`` by ``e_j + FN``
    relative; ``H = sum p log p`` and ``X_k = p . L_k`` (``L`` the float32-rounded
    ``log d_k``) add ``gamma_C`` of their absolute sums; ``KL_k = H - X_k`` a ``u``; the
    minimum is 1-Lipschitz in the max norm, so the bound is the largest over fitted ``k``."""
    s = z - z.max(1, keepdims=True)
    log_p = np_log_softmax(z)
    p = np.exp(log_p)
    log_sum = np.log(np.exp(s).sum(1, keepdims=True))
    relative_sum = np.sum(p * (U32 * np.abs(s) + FN), axis=1, keepdims=True) + gamma(C)
    e = U32 * np.abs(s) + relative_sum + FN * np.abs(log_sum) + U32 * np.abs(log_p)
    rel_p = e + FN + U32
    h_error = np.sum(p * (np.abs(log_p) * rel_p + e), axis=1) + gamma(C) * np.sum(
        p * np.abs(log_p), axis=1
    )
    fitted = np.asarray(state["fitted"])
    big_l = np.abs(np.float64(np.asarray(state["log_typical"])[fitted]))  # [K, C]
    x_error = (p * rel_p) @ big_l.T + gamma(C + 1) * (p @ big_l.T)  # [B, K]
    kl = -np_kl_matching(data64, None, z)
    return np.max(h_error[:, None] + x_error, axis=1) + U32 * np.abs(kl)


def she_bound(state, data64, x, z):
    """A dot product of ``D`` terms with a float32-rounded pattern: ``gamma_{D+1} |x|.|S|``."""
    pattern = np.float64(np.asarray(state["patterns"]))[z.argmax(1)]
    return gamma(D + 1) * np.sum(np.abs(x) * np.abs(pattern), axis=1)


def nnguide_bound(state, data64, x, z, k=10):
    """``score = G E``. Similarities ``s_i = x^ . b_i``: the normalisation (``gamma_D`` for the
    norm, FN for the square root, ``u`` for the division), the rounded bank (``u``) and the
    product (``gamma_D``) give ``ds <= (2 gamma_D + FN + 2u) sum_j |x^_j| |b_ij|``. The ``k``-th
    largest ``t`` recovered from KNN's lifted distance adds the rounding of the lifted sums and
    of ``d^2``: ``dt <= 2 ds + 16 u (1 + c + d^2)``. ``G(t, s) = t + (1/k) sum max(s_i - t, 0)``
    then errs by at most ``dt max(1, (m - k)/k) + ds m / k`` with ``m`` the products above
    ``s_(k) - dt - ds`` (top_k_mean's docstring), plus the sum (``gamma_N``) and two ``u``."""
    bank = np.float64(np.asarray(state["bank"])).reshape(-1, D)
    lifted = np.float64(np.asarray(state["lifted_sq_norms"])).ravel()
    bank, lift = bank[np.isfinite(lifted)], lifted[np.isfinite(lifted)].min()
    unit = np_unit(x)
    sims = unit @ bank.T
    ds = (2 * gamma(D) + FN + 2 * U32) * np.max(np.abs(unit) @ np.abs(bank).T, axis=1)
    ordered = -np.sort(-sims, axis=1)
    t = ordered[:, k - 1]
    d2 = 1 + lift - 2 * t
    dt = 2 * ds + 16 * U32 * (1 + lift + d2)
    m = np.sum(sims > (t - dt - ds)[:, None], axis=1)
    guidance = ordered[:, :k].mean(1)
    dg = dt * np.maximum(1, (m - k) / k) + ds * m / k
    dg += gamma(len(bank)) * np.sum(np.maximum(sims - t[:, None], 0), axis=1) / k
    dg += 2 * U32 * (np.abs(guidance) + np.abs(t))
    energy = special.logsumexp(z, axis=1)
    return (
        np.abs(guidance) * energy_bound(z) + np.abs(energy) * dg + U32 * np.abs(guidance * energy)
    )


def direct_bound(x, mean, white):
    """``isomax_jax/detectors/gaussian.py``'s bound on ``||(x - mean) W||^2`` in float32 with
    a float32-rounded state (as tests/test_detectors.py's ``_direct_bound``)."""
    a = x - mean
    z = a @ white
    e = (np.abs(a) + np.abs(mean)) @ np.abs(white)
    dim, rank = white.shape
    return gamma(rank + 1) * np.sum(z * z, 1) + 2 * gamma(dim + 3) * np.sum(np.abs(z) * e, 1)


def gmm_bound(state, data64, x):
    """``a_c = log_normalizer_c - d_c^2 / 2``: the rounded normaliser (``u``), half the direct
    bound, the subtraction (``u``); ``logsumexp`` weighs each class's error by its softmax weight
    ``w_c`` and adds its own rounding (as :func:`energy_bound`)."""
    st = {key: np.float64(np.asarray(value)) for key, value in state.items()}
    a = np_gmm_terms(data64, x)
    per_class = np.stack(
        [direct_bound(x, st["means"][c][None], st["whitening"][c]) for c in range(C)], axis=1
    )
    da = U32 * np.abs(st["log_normalizer"])[None] + 0.5 * per_class + U32 * np.abs(a)
    w = np.exp(a - special.logsumexp(a, axis=1, keepdims=True))
    return np.sum(w * da, axis=1) + energy_bound(a)


def float32_error_bound(name, state, data64, x, z):
    if name == "kl_matching":
        return kl_matching_bound(state, data64, z)
    if name == "she":
        return she_bound(state, data64, x, z)
    if name == "nnguide":
        return nnguide_bound(state, data64, x, z)
    return gmm_bound(state, data64, x)


@pytest.mark.parametrize("name", NAMES)
def test_float32_within_error_bound_vmap_and_checkpoint(name):
    data = make_data(seed=1, dtype=np.float32)
    det, state, inputs = fit_score(name, data)
    data64 = as64(data)
    x, z = data64["test"], data64["test_logits"]
    expected, bound = REFERENCES[name](data64, x, z), float32_error_bound(name, state, data64, x, z)
    check_float32_within_bound(det, state, inputs, expected, bound)


@pytest.mark.parametrize("name", NAMES)
def test_float32_fit_is_the_float64_fit_rounded_once(name):
    """Statistics accumulate in float64 on the host: fitting float32 data gives the float64
    fit's state rounded once (NNGuide: its bank; the lift is derived from the rounded bank)."""
    data = make_data(seed=2, dtype=np.float32)
    _, state32, _ = fit_score(name, data)
    with jax.enable_x64(True):
        _, state64, _ = fit_score(name, as64(data))
        state64 = jax.tree.map(np.asarray, state64)
    assert set(state32) == set(state64)
    for key in set(state32) - {"lifted_sq_norms"}:
        want = state64[key].astype(np.float32) if state64[key].dtype == np.float64 else None
        got = np.asarray(state32[key])
        np.testing.assert_array_equal(got, state64[key] if want is None else want, err_msg=key)


# -- streamed fitting ----------------------------------------------------------------------------


def batches_of(data, sizes):
    bounds = np.cumsum((0, *sizes))
    assert bounds[-1] == N
    keys = ("features", "logits", "labels")
    return [{k: data[k][a:b] for k in keys} for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@pytest.mark.parametrize("name", NAMES)
def test_fit_from_equals_fit(name):
    """Uneven batches from a list and from a generator give ``fit``'s state: NNGuide's bank
    exactly (rows are computed one by one); the float64 sums of the others in another order,
    rounded once to float32 (within two ulps: the scores agree to float32 precision)."""
    data = make_data(seed=3, dtype=np.float32)
    det, state, inputs = fit_score(name, data)
    want = det.score(state, **inputs)
    for sizes in ((1, 50, 2, 67), (N,), (7,) * 17 + (1,)):
        batches = batches_of(data, sizes)
        for source in (batches, (b for b in batches)):
            got_state = det.fit_from(source)
            assert set(got_state) == set(state)
            if name == "nnguide":
                chex.assert_trees_all_equal(got_state, state)
            elif name != "gmm":  # (GMM: eigenvector signs may flip; compare scores)
                chex.assert_trees_all_close(got_state, state, rtol=2.5e-7, atol=1e-30)
            got = det.score(got_state, **inputs)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_fit_from_bad_batches():
    data = make_data(dtype=np.float32)
    batches = batches_of(data, (60, 60))
    for name in NAMES:
        det = detectors.get(name)
        for key, width in (("features", 7), ("logits", 3)):
            if key in det.fit_inputs:
                changed = [batches[0], {**batches[1], key: batches[1][key][:, :width]}]
                with pytest.raises(ValueError, match=f"`{key}` of a batch has {width} columns"):
                    det.fit_from(changed)
        with pytest.raises(ValueError, match="got no batches"):
            det.fit_from(iter([]))
    with pytest.raises(ValueError, match="needs `logits` in every batch"):
        detectors.get("she").fit_from([{"features": data["features"], "labels": data["labels"]}])
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 4\)"):
        detectors.get("she").fit_from([{**batches[0], "labels": batches[0]["labels"] + 1}])
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 3\)"):
        detectors.get("gmm", num_classes=3).fit_from(batches)


# -- behaviour of each detector --------------------------------------------------------------------


def test_kl_matching_leaves_out_classes_never_predicted(x64):
    """The minimum runs over the classes predicted on the fit data (as pytorch-ood's)."""
    data = make_data()
    logits = data["logits"].copy()
    logits[:, 3] -= 100.0  # class 3 is never predicted
    det = detectors.get("kl_matching")
    state = det.fit(logits=logits)
    np.testing.assert_array_equal(state["fitted"], [True, True, True, False])
    expected = np_kl_matching({"logits": logits}, None, data["test_logits"])
    np.testing.assert_allclose(det.score(state, logits=data["test_logits"]), expected, **F64)


def test_kl_matching_zero_probabilities(x64):
    """``0 log 0 = 0``; a positive ``p_j`` where a typical posterior is exactly 0 gives a huge
    divergence from that class, not NaN."""
    train = np.array([[0.0, -1000.0, -1000.0], [-1000.0, 0.0, 0.0]])  # d_0 = (1, 0, 0)
    det = detectors.get("kl_matching")
    state = det.fit(logits=train)
    assert np.all(np.isfinite(state["log_typical"]))  # log 0 stored as the dtype's minimum
    test = np.array([[0.0, -1000.0, -1000.0], [0.0, 0.0, -1000.0], [-1000.0, 0.0, 0.0]])
    got = np.asarray(det.score(state, logits=test))
    assert got[0] == 0.0 and got[2] == 0.0  # p = d_k exactly
    assert np.isfinite(got[1]) and got[1] < -1e300  # KL to d_0 ~ +inf, to d_1 ~ +inf too


def test_she_needs_a_correct_example_of_every_class():
    data = make_data(dtype=np.float32)
    labels = data["labels"].copy()
    wrong = (labels == 2) & (data["logits"].argmax(1) == 2)
    labels[wrong] = 0  # class 2 keeps only its misclassified examples
    with pytest.raises(ValueError, match=r"class\(es\) \[2\] of 4 have no correctly classified"):
        detectors.get("she").fit(features=data["features"], logits=data["logits"], labels=labels)
    keep = data["labels"] != 1
    with pytest.raises(ValueError, match=r"`labels` cover 3 of 4 classes"):
        detectors.get("she").fit(
            features=data["features"][keep], logits=data["logits"][keep], labels=labels[keep]
        )


@pytest.mark.parametrize("bank_chunk, chunk", [(5, 3), (7, 40), (64, 1)])
def test_top_k_mean_is_exact_with_ties_padding_and_negative_products(x64, bank_chunk, chunk):
    """The mean of the k largest inner products against a NumPy sort: duplicated bank rows
    (ties at the k-th), every product negative (padding rows, zero vectors, must not count),
    zero queries, a bank whose size no block size divides."""
    rng = np.random.default_rng(5)
    bank = np.abs(rng.normal(size=(23, 4))) * rng.uniform(0.5, 3, size=(23, 1))
    bank[10:14] = bank[3]  # ties
    queries = np.concatenate([np_unit(rng.normal(size=(9, 4))), np.zeros((1, 4))])
    queries[5] = -np_unit(bank.sum(0)[None])[0]  # only negative products
    state = detectors.get("knn", k=1, normalize=False, bank_chunk=bank_chunk).fit(features=bank)
    sq_norms = np.asarray(state["bank_sq_norms"])
    lift = 2 * np.sqrt(sq_norms[np.isfinite(sq_norms)].max()) + 1
    lifted = jnp.asarray(np.where(np.isfinite(sq_norms), lift, np.inf))
    sims = queries @ bank.T
    assert np.all(sims[5] < 0)
    for k in (1, 4, 11, 23):
        got = patterns.top_k_mean(jnp.asarray(queries), state["bank"], lifted, k=k, chunk=chunk)
        expected = -np.sort(-sims, axis=1)[:, :k].mean(1)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_gmm_dead_units_give_the_density_over_the_live_units(x64):
    """Units zero on every training input drop out of every class's Gaussian (the pseudo-inverse
    rule): the score is the mixture's log-density over the live units, and any ridge works."""
    data = make_data()
    live = [0, 1, 2, 4, 6, 7]
    f = data["features"].copy()
    f[:, [3, 5]] = 0.0
    test = data["test"].copy()
    test[:, [3, 5]] = np.abs(test[:, [3, 5]])  # an OOD input may activate them
    det = detectors.get("gmm")
    state = det.fit(features=f, labels=data["labels"])
    assert state["whitening"].shape == (C, D, len(live))
    sub = {**data, "features": data["features"][:, live]}
    np.testing.assert_allclose(det.score(state, features=test), np_gmm(sub, test[:, live], None),
                               **F64)  # fmt: skip
    for ridge in (1e-8, 1e-6, 1e-2):
        ridged = detectors.get("gmm", ridge=ridge)
        out = ridged.score(ridged.fit(features=f, labels=data["labels"]), features=test)
        assert np.all(np.isfinite(out)), ridge


def test_gmm_class_weights_are_the_class_frequencies(x64):
    """``pi_c = N_c / N``: uneven classes (the reference weighs by counts; equal weights fail)."""
    data = make_data()
    keep = np.ones(N, bool)
    keep[np.flatnonzero(data["labels"] == 1)[:20]] = False
    sub = {k: data[k][keep] for k in ("features", "labels")}
    det = detectors.get("gmm")
    got = det.score(det.fit(**sub), features=data["test"])
    np.testing.assert_allclose(got, np_gmm(sub, data["test"], None), **F64)


# -- bad inputs ----------------------------------------------------------------------------------


def test_bad_inputs():
    data = make_data(dtype=np.float32)
    states = {name: fit_score(name, data)[1] for name in NAMES}
    x, z = data["test"], data["test_logits"]
    for name in ("she", "nnguide", "gmm"):
        with pytest.raises(ValueError, match="`features` has 7 columns but the detector was"):
            detectors.get(name).score(states[name], features=x[:, :7], logits=z)
        with pytest.raises(ValueError, match="`features` has 7 columns"):  # also under jit
            jax.jit(lambda f, n=name: detectors.get(n).score(states[n], features=f, logits=z))(
                x[:, :7]
            )
    for name in ("kl_matching", "she"):
        with pytest.raises(ValueError, match="`logits` has 3 columns but the detector was fitted"):
            detectors.get(name).score(states[name], features=x, logits=z[:, :3])
    for name in ("she", "nnguide"):
        with pytest.raises(ValueError, match="`features` and `logits` must have the same number"):
            detectors.get(name).score(states[name], features=x, logits=z[:5])
    with pytest.raises(ValueError, match="`kl_matching.fit` needs `logits`"):
        detectors.get("kl_matching").fit(features=data["features"])
    with pytest.raises(ValueError, match="`features` has 8 rows; k=10 needs at least 10"):
        detectors.get("nnguide").fit(features=data["features"][:8], logits=data["logits"][:8])
    with pytest.raises(ValueError, match=r"energies .* must be > 0; 120 of 120 are <= 0"):
        detectors.get("nnguide").fit(features=data["features"], logits=-np.abs(data["logits"]))
    knn_state = detectors.get("knn", k=5).fit(features=data["features"])
    with pytest.raises(ValueError, match=r"`state` was not fitted by `nnguide`"):
        detectors.get("nnguide").score(knn_state, features=x, logits=z)
    with pytest.raises(ValueError, match=r"`state` was not fitted by `gmm`"):
        detectors.get("gmm").score(fit_score("mahalanobis", data)[1], features=x)
    single = data["labels"].copy()
    single[np.flatnonzero(single == 2)[1:]] = 0  # class 2 has one example: zero covariance
    with pytest.raises(ValueError, match="covariance of `features of class 2` is zero"):
        detectors.get("gmm").fit(features=data["features"], labels=single)
    out = detectors.get("gmm", ridge=0.1).fit(features=data["features"], labels=single)
    assert out["whitening"].shape == (C, D, D)
    bad = data["features"].copy()
    bad[3, 2] = np.nan
    for name in NAMES:
        if name != "kl_matching":
            with pytest.raises(ValueError, match=r"`features` must be finite; got 1"):
                detectors.get(name).fit(features=bad, logits=data["logits"], labels=data["labels"])
    for name, field, value in (("nnguide", "k", 0), ("she", "chunk", True),
                               ("kl_matching", "chunk", 0), ("gmm", "num_classes", 0),
                               ("nnguide", "query_chunk", 1.5)):  # fmt: skip
        with pytest.raises(ValueError, match=f"`{field}` must be"):
            detectors.get(name, **{field: value})
    with pytest.raises(ValueError, match="`ridge` must be a non-negative number; got -1"):
        detectors.get("gmm", ridge=-1.0)


def test_non_finite_score_inputs():
    """Eager scores raise on NaN; under jit a NaN row gives a non-finite score for that row only
    (the documented behaviour of every detector)."""
    data = make_data(dtype=np.float32)
    for name in NAMES:
        det, state, inputs = fit_score(name, data)
        key = "logits" if name == "kl_matching" else "features"
        inputs[key] = inputs[key].copy()
        inputs[key][4, 1] = np.nan
        with pytest.raises(ValueError, match=f"`{key}` must be finite"):
            det.score(state, **inputs)
        out = np.asarray(jax.jit(lambda s, i, d=det: d.score(s, **i))(state, inputs))
        assert not np.isfinite(out[4]) and np.all(np.isfinite(np.delete(out, 4))), name
