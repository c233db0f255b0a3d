"""Tests of isomax_jax.detectors against independent NumPy float64 references.

Each detector: its scores against a NumPy reference (float64 at ``rtol=1e-10``, float32 at
``1e-5``), under ``jit``, ``vmap`` over stacked OOD sets, sharded over 8 devices, with a state
that round-trips through a checkpoint; and every bad input the API promises to reject.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from detector_helpers import (
    B,
    C,
    D,
    N,
    check_vmap_and_checkpoint,
    fit_score,
    head_fn_of,
    make_data,
)
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from isomax_jax import detectors, scores
from isomax_jax.detectors import chunked, gaussian

F64 = dict(rtol=1e-10, atol=1e-12)
F32 = dict(rtol=1e-5, atol=1e-5)


# -- NumPy references ----------------------------------------------------------------------------


def np_log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def np_energy(z, t=1.0):
    m = (z / t).max(1)
    return t * (m + np.log(np.exp(z / t - m[:, None]).sum(1)))


def np_gen(z, gamma=0.1, m=100):
    p = np.sort(np.exp(np_log_softmax(z)), axis=1)[:, ::-1][:, :m]
    return -np.sum(p**gamma * (1 - p) ** gamma, axis=1)


def np_neg_entropy(z):
    lp = np_log_softmax(z)
    return np.sum(np.exp(lp) * lp, axis=1)


def np_gaussian(train, labels, ridge=0.0):
    classes = labels.max() + 1
    means = np.stack([train[labels == c].mean(0) for c in range(classes)])
    centered = train - means[labels]
    cov = centered.T @ centered / len(train) + ridge * np.eye(train.shape[1])
    return means, np.linalg.inv(cov)


def np_squared_mahalanobis(x, means, precision):
    diff = x[:, None, :] - means[None, :, :]
    return np.einsum("bcd,de,bce->bc", diff, precision, diff)


def np_mahalanobis(data, x):
    means, precision = np_gaussian(data["features"], data["labels"])
    return -np_squared_mahalanobis(x, means, precision).min(1)


def np_relative_mahalanobis(data, x):
    train = data["features"]
    means, precision = np_gaussian(train, data["labels"])
    mean0, precision0 = np_gaussian(train, np.zeros(len(train), int))
    d0 = np_squared_mahalanobis(x, mean0, precision0)[:, 0]
    return -(np_squared_mahalanobis(x, means, precision) - d0[:, None]).min(1)


def np_knn(data, x, k=50, normalize=True):
    bank = data["features"]
    if normalize:
        bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    dist = np.linalg.norm(x[:, None, :] - bank[None, :, :], axis=2)
    return -np.sort(dist, axis=1)[:, k - 1]


def np_vim(data, x, dim):
    kernel, bias, train = data["kernel"], data["bias"], data["features"]
    u = -np.linalg.pinv(kernel.T) @ bias
    centered = train - u
    _, vectors = np.linalg.eigh(centered.T @ centered / len(train))
    null = vectors[:, : train.shape[1] - dim]
    alpha = (train @ kernel + bias).max(1).mean() / np.linalg.norm(centered @ null, axis=1).mean()
    return np_energy(x @ kernel + bias) - alpha * np.linalg.norm((x - u) @ null, axis=1)


def np_react(data, x, percentile=90.0):
    clip = np.percentile(data["features"], percentile)
    return np_energy(np.minimum(x, clip) @ data["kernel"] + data["bias"])


def np_ash(data, x, percentile=90.0):
    keep = x.shape[1] - int(np.round(x.shape[1] * percentile / 100))
    order = np.argsort(-x, axis=1, kind="stable")[:, :keep]
    pruned = np.zeros_like(x)
    np.put_along_axis(pruned, order, np.take_along_axis(x, order, 1), 1)
    shaped = pruned * np.exp(x.sum(1) / pruned.sum(1))[:, None]
    return np_energy(shaped @ data["kernel"] + data["bias"])


REFERENCES = {
    "msp": lambda d, x, z: np.exp(np_log_softmax(z)).max(1),
    "max_logit": lambda d, x, z: z.max(1),
    "energy": lambda d, x, z: np_energy(z),
    "gen": lambda d, x, z: np_gen(z),
    "entropic": lambda d, x, z: np_neg_entropy(z),
    "min_distance": lambda d, x, z: z.max(1),
    "mmls": lambda d, x, z: z.max(1) + z.mean(1),
    "mmles": lambda d, x, z: z.max(1) + z.mean(1) + np_neg_entropy(z),
    "odin": lambda d, x, z: np.exp(np_log_softmax(z / 1000.0)).max(1),  # eps = 0 here
    "mahalanobis": lambda d, x, z: np_mahalanobis(d, x),
    "relative_mahalanobis": lambda d, x, z: np_relative_mahalanobis(d, x),
    "knn": lambda d, x, z: np_knn(d, x, k=50),
    "vim": lambda d, x, z: np_vim(d, x, dim=D // 2),
    "react": lambda d, x, z: np_react(d, x),
    "ash": lambda d, x, z: np_ash(d, x),
}
HPARAMS = {"odin": {"eps": 0.0}}


def _fit_score(name, data, **hparams):
    return fit_score(name, data, {**HPARAMS.get(name, {}), **hparams})


def test_names_titles_inputs():
    expected = (
        "msp max_logit energy gen entropic min_distance mmls mmles odin mahalanobis "
        "relative_mahalanobis knn vim react ash"
    ).split()
    # this file holds the references of these 15; the later detectors have test files of their own
    assert set(expected) == set(REFERENCES) and set(REFERENCES) <= set(detectors.NAMES)
    titles = {detectors.get(n).name: detectors.get(n).title for n in detectors.NAMES}
    assert titles["entropic"] == "ES" and titles["msp"] == "MPS" and titles["vim"] == "ViM"
    assert titles["relative_mahalanobis"] == "RMD" and titles["min_distance"] == "MDS"
    for name in detectors.NAMES:
        det = detectors.get(name)
        assert det.inputs <= set(detectors.INPUT_NAMES), name
        assert det.__doc__ and any(str(y) in det.__doc__ for y in range(2017, 2027)), name
    assert detectors.get("odin").needs_images and not detectors.get("mahalanobis").needs_images
    assert detectors.get("mahalanobis", eps=0.001).needs_images


def test_applies_to():
    table = {
        n: {h for h in detectors.HEADS if detectors.get(n).applies_to(h)} for n in detectors.NAMES
    }
    distance = {"isomax", "isomax_plus", "dismax"}
    assert table["vim"] == {"softmax"} and table["max_logit"] == {"softmax"}
    assert table["min_distance"] == table["mmles"] == table["mmls"] == distance
    for name in ("msp", "energy", "gen", "entropic", "odin", "mahalanobis", "knn", "react", "ash"):
        assert table[name] == set(detectors.HEADS), name
    with pytest.raises(ValueError, match="`head` must be one of"):
        detectors.get("msp").applies_to("linear")


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_matches_numpy_float64_and_jit(name, x64):
    data = make_data()
    det, state, inputs = _fit_score(name, data)
    expected = REFERENCES[name](data, data["test"], data["test_logits"])
    head_fn = inputs.pop("head_fn")  # (the eager path is tested in float32 below)
    jitted = jax.jit(lambda s, i: det.score(s, head_fn=head_fn, **i))(state, inputs)
    assert jitted.shape == (B,) and jitted.dtype == jnp.float64
    np.testing.assert_allclose(jitted, expected, **F64)


# -- float32 error bounds (isomax_jax/detectors/gaussian.py states the first) --------------------

U32 = 2.0**-24  # unit roundoff of float32


def _gamma(n):
    return n * U32 / (1 - n * U32)


def _direct_bound(x, mean, white):
    """Bound on |fl32(||(x - mean) W||^2) - ||(x - mean) W||^2| with a float32-rounded state."""
    a = x - mean
    z = a @ white
    e = (np.abs(a) + np.abs(mean)) @ np.abs(white)
    dim, rank = white.shape
    return _gamma(rank + 1) * np.sum(z * z, 1) + 2 * _gamma(dim + 3) * np.sum(np.abs(z) * e, 1)


def float32_error_bound(name, state, data64, x, z):
    """Per-row error bound of the float32 scores of the Gaussian detectors and ViM, which
    subtract large terms (the others: F32). The state is the float32 rounding of the float64
    fit (tested separately)."""
    st = {k: np.asarray(v, np.float64) for k, v in state.items()}
    if name in ("mahalanobis", "relative_mahalanobis"):
        means, precision = np_gaussian(data64["features"], data64["labels"])
        nearest = np_squared_mahalanobis(x, means, precision).argmin(1)
        bound = _direct_bound(x, st["means"][nearest], st["whitening"])
        if name == "relative_mahalanobis":
            bound += _direct_bound(x, st["background_mean"][None], st["background_whitening"])
        return bound
    # ViM: energy(x K + b) - alpha ||(x - u) N||; logsumexp is 1-Lipschitz in the max norm.
    kernel, bias = data64["kernel"], data64["bias"]
    dim = x.shape[1]
    logit_error = _gamma(dim + 2) * np.max(np.abs(x) @ np.abs(kernel) + np.abs(bias), axis=1)
    energy = np_energy(x @ kernel + bias)
    energy_error = logit_error + _gamma(kernel.shape[1] + 4) * (np.abs(energy) + 1)
    null = st["null_space"]
    residual = (x - st["origin"]) @ null
    rho = np.linalg.norm(residual, axis=1)
    component = _gamma(dim + 3) * ((np.abs(x) + np.abs(st["origin"])) @ np.abs(null))
    rho_error = np.linalg.norm(component, axis=1) + _gamma(null.shape[1] + 2) * rho
    alpha = abs(float(st["alpha"]))
    virtual_error = alpha * rho_error + 2 * U32 * alpha * rho
    return energy_error + virtual_error + U32 * np.abs(energy - alpha * rho)


BOUNDED = ("mahalanobis", "relative_mahalanobis", "vim")


@pytest.mark.parametrize("name", BOUNDED)
def test_float32_fit_is_the_float64_fit_rounded_once(name):
    """Issue 17.0: statistics accumulate in float64 (a float32 fit put ~1e-5 errors in RMD's
    scores on some CPUs): fitting float32 features gives the float64 fit's state, rounded."""
    data = make_data(seed=1, dtype=np.float32)
    _, state32, _ = _fit_score(name, data)
    data64 = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in data.items()}
    with jax.enable_x64(True):
        _, state64, _ = _fit_score(name, data64)
        state64 = {k: np.asarray(v) for k, v in state64.items()}
    assert set(state32) == set(state64)
    for key, value in state32.items():
        assert value.dtype == jnp.float32, key
        np.testing.assert_array_equal(value, state64[key].astype(np.float32), err_msg=key)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_float32_vmap_and_checkpoint(name):
    data = make_data(seed=1, dtype=np.float32)
    det, state, inputs = _fit_score(name, data)
    data64 = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in data.items()}
    x, z = np.float64(data["test"]), np.float64(data["test_logits"])
    expected = REFERENCES[name](data64, x, z)
    got = det.score(state, **inputs)
    assert got.dtype == jnp.float32
    if name in BOUNDED:  # a stated bound: holds on any x86 CPU, whatever XLA's rounding
        bound = float32_error_bound(name, state, data64, x, z)
        assert np.all(np.abs(np.float64(got) - expected) <= bound), (got - expected, bound)
    else:
        np.testing.assert_allclose(got, expected, **F32)
    check_vmap_and_checkpoint(det, state, inputs)


@pytest.mark.parametrize("name", ["mahalanobis", "knn", "vim", "react", "entropic"])
def test_sharded_over_devices(name):
    data = make_data(seed=2, dtype=np.float32)
    det, state, inputs = _fit_score(name, data)
    head_fn = inputs.pop("head_fn")
    inputs["features"], inputs["logits"] = inputs["features"][:16], inputs["logits"][:16]
    mesh = Mesh(np.array(jax.devices()), ("data",))
    split = NamedSharding(mesh, PartitionSpec("data"))
    sharded = {k: jax.device_put(inputs[k], split) for k in ("features", "logits")}
    fn = jax.jit(
        lambda s, f, z: det.score(
            s, features=f, logits=z, head_fn=head_fn, kernel=inputs["kernel"], bias=inputs["bias"]
        )
    )
    expected = det.score(state, head_fn=head_fn, **inputs)
    np.testing.assert_allclose(
        fn(state, sharded["features"], sharded["logits"]), expected, rtol=1e-5, atol=1e-6
    )
    # per-device scoring of local shards with shard_map gives the same numbers
    local = jax.shard_map(
        lambda f, z: det.score(
            state,
            features=f,
            logits=z,
            head_fn=head_fn,
            kernel=inputs["kernel"],
            bias=inputs["bias"],
        ),
        mesh=mesh,
        in_specs=(PartitionSpec("data"), PartitionSpec("data")),
        out_specs=PartitionSpec("data"),
    )
    np.testing.assert_allclose(
        jax.jit(local)(sharded["features"], sharded["logits"]), expected, rtol=1e-5, atol=1e-6
    )


def test_logit_detectors_delegate_to_scores():
    z = make_data(dtype=np.float32)["test_logits"]
    for name, fn in [
        ("msp", scores.max_probability),
        ("entropic", scores.entropic),
        ("min_distance", scores.min_distance),
        ("max_logit", scores.min_distance),
        ("mmles", scores.mmles),
        ("mmls", scores.mmls),
        ("energy", scores.energy),
    ]:
        np.testing.assert_array_equal(detectors.get(name).score({}, logits=z), fn(z), name)


def test_ash_keeps_ties_at_the_threshold_and_zero_rows_finite(x64):
    x = np.array([[3.0, 1.0, 2.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    shaped = np.asarray(detectors.activation.ash_s(jnp.asarray(x), 60.0))  # keep 2 of 5
    np.testing.assert_allclose(
        shaped[0], np.array([3, 0, 2, 2, 0]) * np.exp(8 / 7), **F64
    )  # tie kept
    np.testing.assert_array_equal(shaped[1], np.zeros(5))
    np.testing.assert_allclose(shaped[2], np.array([5, 4, 0, 0, 0]) * np.exp(15 / 9), **F64)


def test_hyperparameters_change_scores(x64):
    data = make_data()
    z, x = data["test_logits"], data["test"]
    det = detectors.get("energy", temperature=3.0)
    np.testing.assert_allclose(det.score({}, logits=z), np_energy(z, 3.0), **F64)
    det = detectors.get("gen", gamma=0.5, M=2)
    np.testing.assert_allclose(det.score({}, logits=z), np_gen(z, 0.5, 2), **F64)
    for k, normalize in [(1, True), (7, False)]:
        det, state, inputs = _fit_score(
            "knn", data, k=k, normalize=normalize, bank_chunk=25, query_chunk=6
        )
        assert state["bank"].shape == (5, 24, D)  # 120 rows in 5 balanced blocks
        np.testing.assert_allclose(
            det.score(state, features=x), np_knn(data, x, k, normalize), **F64
        )
    det, state, inputs = _fit_score("vim", data, dim=3)
    np.testing.assert_allclose(det.score(state, **inputs), np_vim(data, x, 3), **F64)
    det, state, inputs = _fit_score("react", data, percentile=37.5, chunk=7)
    np.testing.assert_allclose(det.score(state, **inputs), np_react(data, x, 37.5), **F64)
    det, state, inputs = _fit_score("ash", data, percentile=50.0)
    np.testing.assert_allclose(det.score(state, **inputs), np_ash(data, x, 50.0), **F64)
    det, state, _ = _fit_score("mahalanobis", data, ridge=0.5, chunk=7)
    means, precision = np_gaussian(data["features"], data["labels"], ridge=0.5)
    np.testing.assert_allclose(
        det.score(state, features=x), -np_squared_mahalanobis(x, means, precision).min(1), **F64
    )


# -- input perturbation: linear "models" with analytic input gradients ----------------------------

IMAGE_SHAPE = (B, 2, 2, 3)


def linear_model(seed=3):
    rng = np.random.default_rng(seed)
    to_features = rng.normal(size=(12, D))
    w, b = rng.normal(size=(D, C)), rng.normal(size=(C,))

    def apply_fn(images):
        features = images.reshape(images.shape[0], -1) @ to_features
        return features @ w + b[None, :], features

    return apply_fn, to_features, w, b, rng.normal(size=IMAGE_SHAPE)


@pytest.mark.parametrize("norm_std", [None, (0.5, 1.0, 2.0)])
def test_odin_matches_numpy(x64, norm_std):
    apply_fn, a, w, b, images = linear_model()
    t, eps = 10.0, 0.05
    x = images.reshape(B, -1)
    z = (x @ a @ w + b) / t
    p = np.exp(np_log_softmax(z))
    onehot = np.eye(C)[p.argmax(1)]
    grad = (p - onehot) @ (a @ w).T / t  # d/dx of -log p_yhat(x / T)
    std = np.tile(norm_std, 4) if norm_std else 1.0
    x_hat = x - eps * np.sign(grad) / std
    expected = np.exp(np_log_softmax((x_hat @ a @ w + b) / t)).max(1)
    det = detectors.get("odin", temperature=t, eps=eps, norm_std=norm_std)
    np.testing.assert_allclose(det.score_images({}, apply_fn, images), expected, **F64)
    outer = jax.jit(lambda im: det.score_images({}, apply_fn, im))
    np.testing.assert_allclose(outer(images), expected, **F64)


def test_mahalanobis_preprocessing_matches_numpy(x64):
    apply_fn, a, w, b, images = linear_model(seed=4)
    rng = np.random.default_rng(5)
    train_images = rng.normal(size=(N, 2, 2, 3))
    features = train_images.reshape(N, -1) @ a
    labels = np.arange(N) % C
    det = detectors.get("mahalanobis", eps=0.01)
    state = det.fit(features=features, labels=labels)
    means, precision = np_gaussian(features, labels)
    x = images.reshape(B, -1)
    f = x @ a
    nearest = np_squared_mahalanobis(f, means, precision).argmin(1)
    grad = 2 * (f - means[nearest]) @ precision @ a.T
    f_hat = (x - 0.01 * np.sign(grad)) @ a
    expected = -np_squared_mahalanobis(f_hat, means, precision).min(1)
    np.testing.assert_allclose(det.score_images(state, apply_fn, images), expected, **F64)
    plain = detectors.get("mahalanobis").score_images(state, apply_fn, images)
    np.testing.assert_allclose(plain, -np_squared_mahalanobis(f, means, precision).min(1), **F64)


# -- exact chunked helpers -----------------------------------------------------------------------


def test_percentile_is_numpy_percentile():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(37, 5)).astype(np.float32)
    x[:4] = 0.0
    x[4, :3] = -0.0
    x[5:9] = x[9:13]  # ties
    with jax.enable_x64(True):
        x64_ = rng.normal(size=(21, 3))
    for q in [0.0, 12.5, 50.0, 90.0, 99.9, 100.0]:
        got = chunked.percentile(jnp.asarray(x), q, chunk=6)
        expected = np.percentile(x.astype(np.float64), q)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
        with jax.enable_x64(True):
            got = chunked.percentile(jnp.asarray(x64_), q, chunk=4)
            np.testing.assert_allclose(got, np.percentile(x64_, q), rtol=1e-15, atol=0)


def test_class_moments_match_two_pass_numpy_for_any_chunking():
    """Float64 one-pass statistics (shifted by the first chunk's mean) equal NumPy's two-pass
    ones, also far from the origin, whatever the chunk sizes and the order classes appear in."""
    rng = np.random.default_rng(7)
    x = 1e4 + rng.normal(size=(50, 6)).astype(np.float32)  # mean >> spread: no cancellation
    y = rng.integers(0, 3, 50)
    y[:9] = 2  # the first chunk has only the last class: the class count grows later
    x64 = x.astype(np.float64)
    means = np.stack([x64[y == c].mean(0) for c in range(3)])
    within = (x64 - means[y]).T @ (x64 - means[y]) / 50
    total = (x64 - x64.mean(0)).T @ (x64 - x64.mean(0)) / 50
    for sizes in ((50,), (9, 41), (9, 1, 13, 27), (1,) * 50):
        moments = gaussian.ClassMoments()
        for start, stop in zip(np.cumsum((0, *sizes[:-1])), np.cumsum(sizes), strict=True):
            moments.update(x[start:stop], y[start:stop])
        np.testing.assert_allclose(moments.class_means(), means, rtol=1e-14)
        np.testing.assert_allclose(moments.within_class_covariance(), within, rtol=1e-9)
        np.testing.assert_allclose(moments.mean(), x64.mean(0), rtol=1e-14)
        np.testing.assert_allclose(moments.covariance(), total, rtol=1e-9)


def test_memory_is_bounded_at_imagenet_scale():
    """Compiled (not run) at 1.28M x 2048: temporaries stay far below one N x N or N x D array."""
    bank_rows = jax.ShapeDtypeStruct((157, 8153, 2048), jnp.float32)  # 1.28M balanced rows
    sq_norms = jax.ShapeDtypeStruct((157, 8153), jnp.float32)
    queries = jax.ShapeDtypeStruct((50_000, 2048), jnp.float32)
    knn = jax.jit(lambda q, b, s: detectors.knn.kth_neighbour_distance(q, b, s, k=1000, chunk=1024))
    temp = knn.lower(queries, bank_rows, sq_norms).compile().memory_analysis().temp_size_in_bytes
    assert temp < 256 * 2**20, temp  # vs 256 GB for a 50k x 1.28M distance matrix
    features = jax.ShapeDtypeStruct((1_281_167, 2048), jnp.float32)
    pct = jax.jit(lambda x: chunked.kth_smallest_pair(x, 10**9, chunk=4096))
    assert pct.lower(features).compile().memory_analysis().temp_size_in_bytes < 256 * 2**20


# -- bad input -----------------------------------------------------------------------------------


def test_get_rejects_unknown_names_and_hyperparameters():
    with pytest.raises(ValueError, match="unknown detector 'mahalanobis2'.*valid names: msp"):
        detectors.get("mahalanobis2")
    with pytest.raises(ValueError, match="`kk` is not a hyperparameter.*valid: k, normalize"):
        detectors.get("knn", kk=5)
    with pytest.raises(ValueError, match="valid: none"):
        detectors.get("msp", temperature=2.0)
    for name, hparams, arg in [
        ("knn", {"k": 0}, "k"), ("energy", {"temperature": -1.0}, "temperature"),
        ("react", {"percentile": 120}, "percentile"), ("gen", {"M": 0}, "M"),
        ("odin", {"eps": -0.1}, "eps"), ("odin", {"norm_std": [0.2]}, "norm_std"),
        ("mahalanobis", {"ridge": -1.0}, "ridge"), ("vim", {"dim": 0}, "dim"),
        ("relative_mahalanobis", {"num_classes": 0}, "num_classes"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=f"`{arg}`"):
            detectors.get(name, **hparams)
    assert detectors.hyperparameters("knn")["k"] == 50


def test_missing_inputs_name_the_argument():
    data = make_data(dtype=np.float32)
    with pytest.raises(ValueError, match="`mahalanobis.fit` needs `labels`"):
        detectors.get("mahalanobis").fit(features=data["features"])
    with pytest.raises(ValueError, match="`relative_mahalanobis.fit` needs `features`"):
        detectors.get("relative_mahalanobis").fit(labels=data["labels"])
    with pytest.raises(ValueError, match="`entropic.score` needs `logits`"):
        detectors.get("entropic").score({}, features=data["test"])
    det = detectors.get("react")
    state = det.fit(features=data["features"])
    with pytest.raises(ValueError, match="`react.score` needs `head_fn`"):
        det.score(state, features=data["test"])
    with pytest.raises(ValueError, match="`vim.fit` needs `kernel`.*distance-based heads"):
        detectors.get("vim").fit(features=data["features"], logits=data["logits"])
    vim, vstate, _ = _fit_score("vim", data)
    with pytest.raises(ValueError, match="`vim.score` needs `bias`"):
        vim.score(vstate, features=data["test"], kernel=data["kernel"])
    with pytest.raises(ValueError, match="needs `features`"):
        detectors.get("knn").fit(logits=data["logits"])
    with pytest.raises(TypeError, match="outside jax.jit"):
        jax.jit(lambda f: detectors.get("knn", k=2).fit(features=f))(data["features"])


def test_absent_and_invalid_classes():
    data = make_data(dtype=np.float32)
    f, y = data["features"], data["labels"]
    det = detectors.get("mahalanobis")
    nine = y % 3  # labels 0..2 only, 4 logits columns
    with pytest.raises(ValueError, match="`labels` cover 3 of 4 classes.*\\[3\\]"):
        det.fit(features=f, labels=nine, logits=data["logits"])
    with pytest.raises(ValueError, match="`labels` cover 3 of 10 classes"):
        detectors.get("relative_mahalanobis", num_classes=10).fit(features=f, labels=nine)
    gap = np.where(y == 1, 2, y)  # class 1 absent in the middle
    with pytest.raises(ValueError, match="class\\(es\\) \\[1\\]"):
        det.fit(features=f, labels=gap)
    with pytest.raises(ValueError, match="`labels` must lie in \\[0, 4\\)"):
        det.fit(features=f, labels=np.where(y == 0, -1, y), logits=data["logits"])
    with pytest.raises(ValueError, match="`logits` has 4 columns but num_classes=5"):
        detectors.get("mahalanobis", num_classes=5).fit(features=f, labels=y, logits=data["logits"])
    with pytest.raises(ValueError, match="`labels` must have shape"):
        det.fit(features=f, labels=y[:-1])
    with pytest.raises(TypeError, match="`labels` must have an integer dtype"):
        det.fit(features=f, labels=y.astype(np.float32))


def test_dead_units_work_by_default_as_the_papers_pseudo_inverse():
    """Issue 22.2: ReLU features with dead units raised "covariance is singular ... pass
    ridge > 0", and ridge = 1e-8, 1e-6 (pytorch-ood's) and 1e-4 gave the same message. The
    default now drops the directions of no variance (the original code's pinvh): the distance
    is the Mahalanobis distance over the live units, any ridge works."""
    data = make_data(dtype=np.float64)
    live = [0, 1, 2, 4, 6, 7]
    f = data["features"].copy()
    f[:, 3] = 0.0  # dead units: zero on every training input (ReLU)
    f[:, 5] = 0.0
    test = data["test"].copy()
    test[:, [3, 5]] = np.abs(test[:, [3, 5]])  # an OOD input may activate them
    sub = {**data, "features": data["features"][:, live]}
    want = {
        "mahalanobis": np_mahalanobis(sub, test[:, live]),
        "relative_mahalanobis": np_relative_mahalanobis(sub, test[:, live]),
    }
    with jax.enable_x64(True):
        for name, expected in want.items():
            det = detectors.get(name)
            state = det.fit(features=f, labels=data["labels"])
            assert state["whitening"].shape == (8, 6)  # two directions dropped
            np.testing.assert_allclose(det.score(state, features=test), expected, **F64)
            for ridge in (1e-8, 1e-6, 1e-4):
                det = detectors.get(name, ridge=ridge)
                out = det.score(det.fit(features=f, labels=data["labels"]), features=test)
                assert np.all(np.isfinite(out)), (name, ridge)
    few = detectors.get("mahalanobis").fit(features=f[:6], labels=np.arange(6) % 2)
    assert few["whitening"].shape[1] <= 4  # fewer rows than dimensions: rank <= 6 - 2
    with pytest.raises(ValueError, match="covariance of `features` is zero.*ridge > 0 \\(any"):
        detectors.get("mahalanobis").fit(features=np.ones((10, 4)), labels=np.arange(10) % 2)


@pytest.mark.parametrize("name", ["mahalanobis", "relative_mahalanobis", "knn", "vim"])
def test_feature_width_must_match_fit(name):
    data = make_data(dtype=np.float32)
    det, state, inputs = _fit_score(name, data)
    inputs["features"] = inputs["features"][:, :-1]
    with pytest.raises(
        ValueError, match="`features` has 7 columns but the detector was fitted on 8"
    ):
        det.score(state, **inputs)
    head_fn = inputs.pop("head_fn")
    with pytest.raises(ValueError, match="`features` has 7 columns"):
        jax.jit(lambda s, i: det.score(s, head_fn=head_fn, **i))(state, inputs)


def test_non_finite_inputs():
    data = make_data(dtype=np.float32)
    bad = data["features"].copy()
    bad[3, 2] = np.nan
    for name in ("mahalanobis", "relative_mahalanobis", "knn", "vim", "react"):
        with pytest.raises(ValueError, match=r"`features` must be finite; got 1 .* \(3, 2\)"):
            detectors.get(name).fit(
                features=bad, labels=data["labels"], kernel=data["kernel"], bias=data["bias"]
            )
    z = data["test_logits"].copy()
    z[0, 0] = np.inf
    with pytest.raises(ValueError, match="`logits` must be finite; got 1 NaN/inf"):
        detectors.get("energy").score({}, logits=z)
    det, state, inputs = _fit_score("knn", data)
    inputs["features"] = inputs["features"].copy()
    inputs["features"][5, 0] = np.nan
    with pytest.raises(ValueError, match="`features` must be finite"):
        det.score(state, **inputs)
    # Under jit values cannot be checked: the documented behaviour is a non-finite score there.
    out = jax.jit(lambda s, f: det.score(s, features=f))(state, inputs["features"])
    assert not np.isfinite(out[5]) and np.all(np.isfinite(np.delete(np.asarray(out), 5)))
    with pytest.raises(ValueError, match="`images` must be finite"):
        apply_fn, *_, images = linear_model()
        images[0, 0, 0, 0] = np.nan
        detectors.get("odin").score_images({}, apply_fn, images)


def test_other_bad_inputs():
    data = make_data(dtype=np.float32)
    with pytest.raises(ValueError, match="call `score_images"):
        detectors.get("odin").score({}, logits=data["test_logits"])
    det, state, _ = _fit_score("mahalanobis", data)
    with pytest.raises(ValueError, match="call `score_images"):
        detectors.get("mahalanobis", eps=0.01).score(state, features=data["test"])
    with pytest.raises(ValueError, match="`features` has 8 rows; k=50 needs at least 50"):
        detectors.get("knn").fit(features=data["features"][:8])
    with pytest.raises(ValueError, match="`dim`=8 must be in \\[1, D\\)"):
        detectors.get("vim", dim=8).fit(
            features=data["features"], kernel=data["kernel"], bias=data["bias"]
        )
    with pytest.raises(ValueError, match="`kernel` must have shape \\[D, C\\] with D = 8"):
        detectors.get("vim").fit(
            features=data["features"], kernel=data["kernel"].T, bias=data["bias"]
        )
    with pytest.raises(ValueError, match="`bias` must have shape \\[C\\]"):
        detectors.get("vim").fit(
            features=data["features"], kernel=data["kernel"], bias=data["bias"][:2]
        )
    with pytest.raises(ValueError, match="`logits` must have rank 2"):
        detectors.get("msp").score({}, logits=data["test_logits"][0])
    with pytest.raises(TypeError, match="`features` must have a floating-point dtype"):
        detectors.get("knn", k=2).fit(features=np.ones((4, 3), np.int32))
    knn_state = detectors.get("knn", k=2).fit(features=data["features"])
    with pytest.raises(ValueError, match="`features` is empty"):
        detectors.get("knn", k=2).score(knn_state, features=np.zeros((0, 8), np.float32))
    with pytest.raises(ValueError, match="prunes all"):
        detectors.get("ash", percentile=100).score(
            {}, features=data["test"], head_fn=head_fn_of(data)
        )
    with pytest.raises(ValueError, match="`head_fn` must map"):
        detectors.get("ash").score({}, features=data["test"], head_fn=lambda f: f[:, 0])
    apply_fn, *_, images = linear_model()
    with pytest.raises(ValueError, match="`norm_std` has 2 entries but `images` has 3 channels"):
        detectors.get("odin", norm_std=(0.5, 0.5)).score_images({}, apply_fn, images)


def test_docs_example_runs(capsys):
    """The runnable example at the top of docs/detectors.md stays runnable."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "docs" / "detectors.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    exec(compile(code, "docs/detectors.md", "exec"), {})
    printed = capsys.readouterr().out.split()
    assert "ES" in printed and "ViM" in printed and "ODIN" not in printed


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_score_images_takes_logits_only_a_pair_or_a_dict(batch):
    """Issue 22.3: an apply_fn returning only logits gave a different unrelated error for each
    batch size (the [B, C] array was unpacked as a pair of rows)."""
    apply_fn, *_, images = linear_model()
    images = images[:batch].astype(np.float32)
    logits_only = lambda x: apply_fn(x)[0]  # noqa: E731
    as_dict = lambda x: dict(zip(("logits", "features"), apply_fn(x), strict=True))  # noqa: E731
    for name in ("odin", "msp"):
        det = detectors.get(name)
        want = det.score_images({}, apply_fn, images)
        assert want.shape == (batch,)
        np.testing.assert_array_equal(det.score_images({}, logits_only, images), want)
        np.testing.assert_array_equal(det.score_images({}, as_dict, images), want)
        with pytest.raises(TypeError, match=r"`apply_fn` must return logits .* tuple of 3"):
            det.score_images({}, lambda x: (*apply_fn(x), x), images)
    data = make_data(dtype=np.float32)
    maha = detectors.get("mahalanobis", eps=0.01)
    to_features = jnp.asarray(linear_model()[1], jnp.float32)
    state = maha.fit(features=data["features"], labels=data["labels"])
    with_features = lambda x: (x[:, 0, 0, :1] * 0, x.reshape(x.shape[0], -1) @ to_features)  # noqa: E731
    assert maha.score_images(state, with_features, images).shape == (batch,)
    with pytest.raises(ValueError, match="needs features: `apply_fn` must return"):
        maha.score_images(state, lambda x: with_features(x)[0], images)


def test_rough_edges_of_detector_arguments():
    """Issue 22.7: a KNN state given to Mahalanobis raised a bare KeyError; `percentile=0.65`
    (a fraction) and `chunk=True` were accepted; the (logits, features) pair where one array is
    expected gave NumPy's "inhomogeneous shape"."""
    data = make_data(dtype=np.float32)
    knn_state = detectors.get("knn", k=5).fit(features=data["features"])
    with pytest.raises(ValueError, match=r"`state` was not fitted by `mahalanobis`.*'bank'"):
        detectors.get("mahalanobis").score(knn_state, features=data["test"])
    with pytest.raises(ValueError, match=r"looks like a fraction .* pass 65"):
        detectors.get("ash", percentile=0.65)
    with pytest.raises(ValueError, match=r"looks like a fraction"):
        detectors.get("react", percentile=0.9)
    assert detectors.get("ash", percentile=0).percentile == 0  # 0 and 1..100 are percentiles
    for name, field in (("mahalanobis", "chunk"), ("knn", "k"), ("vim", "chunk"), ("gen", "M")):
        with pytest.raises(ValueError, match=f"`{field}` must be a positive int; got True"):
            detectors.get(name, **{field: True})
    for name, field in (("energy", "temperature"), ("odin", "temperature")):
        with pytest.raises(ValueError, match=f"`{field}` must be a finite number > 0"):
            detectors.get(name, **{field: -1.0})
    with pytest.raises(ValueError, match="`eps` must be a non-negative number; got -0.1"):
        detectors.get("mahalanobis", eps=-0.1)
    pair = (data["test_logits"], data["test"])
    with pytest.raises(TypeError, match=r"`logits` must be one array; got a tuple of 2"):
        detectors.get("energy").score({}, logits=pair)
    with pytest.raises(TypeError, match=r"`features` must be one array; got a tuple of 2"):
        detectors.get("knn", k=5).fit(features=pair)


# -- streamed fitting ----------------------------------------------------------------------------


def _batches(data, sizes, keys=("features", "labels", "logits")):
    """The training rows of `data` in batches of the given (uneven) sizes."""
    bounds = np.cumsum((0, *sizes))
    assert bounds[-1] == N
    return [{k: data[k][a:b] for k in keys} for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


FITTED = [n for n in sorted(REFERENCES) if detectors.get(n, **HPARAMS.get(n, {})).fit_inputs]


@pytest.mark.parametrize("name", FITTED)
def test_fit_from_equals_fit(name):
    """Issue 17.1: a generator (spooled where two passes are needed) and a list of uneven
    batches give the state `fit` gives on all rows: scores equal to float32 precision
    (float64 statistics summed in another order), KNN's and ReAct's exactly."""
    data = make_data(seed=2, dtype=np.float32)
    det, state, inputs = _fit_score(name, data)
    head = dict(kernel=data["kernel"], bias=data["bias"], head_fn=inputs["head_fn"])
    want = det.score(state, **inputs)
    for sizes in ((1, 50, 2, 67), (N,), (7,) * 17 + (1,)):
        batches = _batches(data, sizes)
        for source in (batches, (b for b in batches)):
            got_state = det.fit_from(source, **head)
            assert set(got_state) == set(state)
            got = det.score(got_state, **inputs)
            if name in ("knn", "react"):
                chex.assert_trees_all_equal(got_state, state)
            else:
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_react_fit_from_is_numpys_percentile_in_float64(x64):
    rng = np.random.default_rng(4)
    x = np.maximum(rng.normal(size=(300, 7)), 0)  # ties at 0, as ReLU activations
    x[5, 3] = -0.0
    for q in (0.0, 12.5, 50.0, 90.0, 99.9, 100.0):
        det = detectors.get("react", percentile=q)
        batches = ({"features": x[i : i + 41]} for i in range(0, 300, 41))
        got = det.fit_from(batches)["threshold"]
        assert got.dtype == jnp.float64 and float(got) == np.percentile(x, q), q


def test_fit_from_memory_stays_far_below_the_data():
    """Mahalanobis from a generator of 400 MiB of float32 features: peak traced host memory is
    one batch and the statistics, not the data."""
    import tracemalloc

    dim, rows, classes = 512, 4096, 10
    num_batches = 400 * 2**20 // (rows * dim * 4)  # 50 batches of 8 MiB: 400 MiB in all

    def batches():
        rng = np.random.default_rng(0)
        for _ in range(num_batches):
            yield {
                "features": rng.standard_normal((rows, dim), np.float32),
                "labels": rng.integers(0, classes, rows),
            }

    tracemalloc.start()
    try:
        state = detectors.get("mahalanobis").fit_from(batches())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert state["means"].shape == (classes, dim)
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB for 400 MiB of features"


def test_fit_from_bad_batches():
    data = make_data(dtype=np.float32)
    det = detectors.get("mahalanobis")
    with pytest.raises(ValueError, match="needs `labels` in every batch"):
        det.fit_from([{"features": data["features"]}])
    with pytest.raises(ValueError, match="got no batches"):
        det.fit_from(iter([]))
    with pytest.raises(TypeError, match="batches that are dicts"):
        det.fit_from([data["features"]])
    bad = data["features"][:10].copy()
    bad[2, 1] = np.inf
    with pytest.raises(ValueError, match=r"`features` must be finite; got 1"):
        det.fit_from([{"features": bad, "labels": data["labels"][:10]}])
    with pytest.raises(ValueError, match="has 7 columns; the batches before had 8"):
        det.fit_from(
            [
                {"features": data["features"][:10], "labels": data["labels"][:10]},
                {"features": data["features"][10:20, :7], "labels": data["labels"][10:20]},
            ]
        )
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 3\)"):
        detectors.get("mahalanobis", num_classes=3).fit_from(_batches(data, (N,)))
    with pytest.raises(ValueError, match="class\\(es\\) \\[2\\] have no training example"):
        keep = data["labels"] != 2
        detectors.get("mahalanobis", num_classes=4).fit_from(
            [{"features": data["features"][keep], "labels": data["labels"][keep]}]
        )
    with pytest.raises(ValueError, match="`vim.fit_from` needs `kernel`"):
        detectors.get("vim").fit_from(_batches(data, (N,)))
    assert detectors.get("energy").fit_from(iter([])) == {}  # nothing to fit: nothing read
