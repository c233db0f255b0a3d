"""Helpers shared by the detector test modules (test_detectors*.py): one linear head, one fit."""

import jax.numpy as jnp
import numpy as np

from isomax_jax import detectors

N, D, C, B = 120, 8, 4, 20  # training rows, feature width, classes, test rows


def make_data(seed=0, dtype=np.float64):
    """Class-structured non-negative features (like pooled ReLU ones) and a linear head, in
    ``dtype``; the logits are the rounded head's on the rounded features, as a model in that
    dtype gives them."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(C, D)) * 2
    labels = np.arange(N) % C
    train = np.abs(centers[labels] + rng.normal(size=(N, D)))
    test = np.abs(rng.normal(size=(B, D)) * 2)
    kernel = rng.normal(size=(D, C)) / np.sqrt(D)
    bias = rng.normal(size=(C,)) * 0.1
    cast = lambda x: x.astype(dtype)  # noqa: E731
    data = dict(features=cast(train), labels=labels, test=cast(test), kernel=cast(kernel),
                bias=cast(bias))  # fmt: skip
    data["logits"] = cast(data["features"] @ data["kernel"] + data["bias"])
    data["test_logits"] = cast(data["test"] @ data["kernel"] + data["bias"])
    return data


def as64(data):
    """The same data in float64 (what float32 inputs are exactly)."""
    return {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in data.items()}


def head_fn_of(data):
    """The linear head ``f @ kernel + bias`` of a test data dict, as ``head_fn``."""
    kernel, bias = jnp.asarray(data["kernel"]), jnp.asarray(data["bias"])
    return lambda f: f @ kernel + bias[None, :]


def fit_score(name, data, hparams):
    """``(detector, state fitted on data's training rows, score inputs of data's test rows)``."""
    det = detectors.get(name, **hparams)
    state = det.fit(
        features=data["features"], logits=data["logits"], labels=data["labels"],
        kernel=data["kernel"], bias=data["bias"],
    )  # fmt: skip
    inputs = dict(
        features=data["test"], logits=data["test_logits"], head_fn=head_fn_of(data),
        kernel=data["kernel"], bias=data["bias"],
    )  # fmt: skip
    return det, state, inputs


def check_vmap_and_checkpoint(det, state, inputs):
    """``vmap`` over three stacked OOD sets equals one call per set, and the state round-trips
    through a checkpoint (msgpack) with the same arrays and the same scores."""
    import chex
    import flax.serialization
    import jax
    import numpy as np

    fixed = {k: v for k, v in inputs.items() if k in ("head_fn", "kernel", "bias")}
    sets = {
        k: np.stack([v, v[::-1], v * 0.5]) for k, v in inputs.items() if k in ("features", "logits")
    }
    stacked = jax.vmap(lambda arrays: det.score(state, **arrays, **fixed))(sets)
    for i in range(3):
        one = np.asarray(det.score(state, **{k: v[i] for k, v in sets.items()}, **fixed))
        scale = max(1.0, float(np.max(np.abs(one))))
        np.testing.assert_allclose(stacked[i], one, rtol=1e-5, atol=1e-6 * scale)
    restored = flax.serialization.msgpack_restore(flax.serialization.msgpack_serialize(state))
    chex.assert_trees_all_equal(restored, jax.tree.map(np.asarray, state))
    np.testing.assert_array_equal(det.score(restored, **inputs), det.score(state, **inputs))


def check_float32_within_bound(det, state, inputs, expected, bound, scale=None):
    """Float32 scores within a stated error ``bound`` of the float64 ``expected`` ones, the bound
    not vacuous (below 1e-4 of ``scale + 1``, default ``|expected|`` row by row), then vmap and
    checkpoint."""
    got = det.score(state, **inputs)
    assert got.dtype == jnp.float32
    error = np.abs(np.float64(got) - expected)
    assert np.all(error <= bound), (error, bound)
    scale = np.abs(expected) if scale is None else scale
    assert np.all(bound < 1e-4 * (scale + 1))
    check_vmap_and_checkpoint(det, state, inputs)
