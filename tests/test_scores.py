"""Tests of isomax_jax.scores against independent NumPy float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isomax_jax import scores


def np_softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def np_neg_entropy(z):
    p = np_softmax(z)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, p * np.log(p), 0.0).sum(1)


REFERENCES = {
    "max_probability": lambda z: np_softmax(z).max(1),
    "entropic": np_neg_entropy,
    "min_distance": lambda z: np.asarray(z, np.float64).max(1),
    "mmls": lambda z: np.asarray(z, np.float64).max(1) + np.asarray(z, np.float64).mean(1),
    "mmles": lambda z: np.max(z, 1) + np.mean(np.asarray(z, np.float64), 1) + np_neg_entropy(z),
    "energy": lambda z: np.log(np.exp(np.asarray(z, np.float64)).sum(1)),
}


def _logits(seed, b=7, c=5):
    return np.random.default_rng(seed).normal(size=(b, c)).astype(np.float32) * 3


@pytest.mark.parametrize("name", list(REFERENCES))
def test_scores_match_numpy(name):
    logits = _logits(0)
    fn = getattr(scores, name)
    out = jax.jit(fn)(logits)
    assert out.shape == (7,) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, REFERENCES[name](logits), rtol=1e-5, atol=1e-6)
    # batched == vmap over single rows
    rows = jax.vmap(lambda z: fn(z[None])[0])(logits)
    np.testing.assert_allclose(rows, out, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(REFERENCES))
def test_scores_float64_and_bfloat16(name):
    fn = getattr(scores, name)
    logits = _logits(1)
    with jax.enable_x64(True):
        out = fn(logits.astype(np.float64))
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(out, REFERENCES[name](logits), rtol=1e-10, atol=1e-12)
    low = logits.astype(jnp.bfloat16)
    out = fn(low)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(
        out, REFERENCES[name](np.asarray(low, np.float64)), rtol=1e-5, atol=1e-6
    )


def test_energy_temperature():
    logits = _logits(2)
    out = scores.energy(logits, temperature=2.0)
    ref = 2.0 * np.log(np.exp(np.asarray(logits, np.float64) / 2.0).sum(1))
    np.testing.assert_allclose(out, ref, rtol=1e-5)


def test_entropic_scores_finite_when_probabilities_underflow():
    logits = np.array([[0.0, -1e4, -2e4], [5.0, 5.0, -1e30]], np.float32)
    for name in ("entropic", "mmles"):
        out = getattr(scores, name)(logits)
        assert np.all(np.isfinite(out)), name
    np.testing.assert_allclose(scores.entropic(logits), [0.0, -np.log(2.0)], rtol=1e-6, atol=1e-7)
    grad = jax.grad(lambda z: jnp.sum(scores.mmles(z)))(logits)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("name", list(REFERENCES))
def test_bad_inputs(name):
    fn = getattr(scores, name)
    with pytest.raises(ValueError, match=r"`logits` must have rank 2 .*\[batch, num_classes\]"):
        fn(np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="`logits` must have a floating-point dtype"):
        fn(np.zeros((2, 3), np.int32))
