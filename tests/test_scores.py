"""Tests of isomax_jax.scores against independent NumPy float64 references.

The reference checks run in chex variants: eagerly, under ``jit`` and under ``pmap``.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

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


INF = np.inf
# Rows of extended-real logits and the score each one must give (see the module docstring).
INFINITE_ROWS = [[-INF, 0.0], [INF, 0.0], [INF, INF], [-INF, -INF], [INF, -INF], [-INF, 2.0]]
INFINITE_EXPECTED = {
    "max_probability": [1.0, 1.0, 0.5, 0.5, 1.0, 1.0],
    "entropic": [0.0, 0.0, -np.log(2.0), -np.log(2.0), 0.0, 0.0],
    "min_distance": [0.0, INF, INF, -INF, INF, 2.0],
    "mmls": [-INF, INF, INF, -INF, np.nan, -INF],
    "mmles": [-INF, INF, INF, -INF, np.nan, -INF],
    "energy": [0.0, INF, INF, -INF, INF, 2.0],
}
NAMES = [(name, name) for name in REFERENCES]


class ScoresMatchNumpyTest(chex.TestCase):
    """Every score against its NumPy float64 reference, eagerly, under jit and under pmap.

    ``with_pmap`` replicates the logits to the 8 devices (chex's ``broadcast_args_to_devices``)
    and checks the first device's scores.
    """

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    @parameterized.named_parameters(*NAMES)
    def test_float32_float64_and_bfloat16(self, name):
        fn = getattr(scores, name)
        logits = _logits(0)
        out = self.variant(fn)(logits)
        assert out.shape == (7,) and out.dtype == jnp.float32
        np.testing.assert_allclose(out, REFERENCES[name](logits), rtol=1e-5, atol=1e-6)
        # batched == vmap over single rows
        rows = self.variant(jax.vmap(lambda z: fn(z[None])[0]))(logits)
        np.testing.assert_allclose(rows, out, rtol=1e-6, atol=1e-7)
        logits = _logits(1)
        with jax.enable_x64(True):
            out = self.variant(fn)(logits.astype(np.float64))
            assert out.dtype == jnp.float64
            np.testing.assert_allclose(out, REFERENCES[name](logits), rtol=1e-10, atol=1e-12)
        low = logits.astype(jnp.bfloat16)
        out = self.variant(fn)(low)
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(
            out, REFERENCES[name](np.asarray(low, np.float64)), rtol=1e-5, atol=1e-6
        )

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    @parameterized.named_parameters(*NAMES)
    def test_infinite_logits_give_the_extended_real_value(self, name):
        logits = np.array(INFINITE_ROWS, np.float32)
        out = self.variant(getattr(scores, name))(logits)
        np.testing.assert_allclose(out, INFINITE_EXPECTED[name], rtol=1e-6, atol=0, err_msg=name)

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    @parameterized.named_parameters(*NAMES)
    def test_nan_logit_gives_nan_for_its_row_only(self, name):
        logits = np.array([[np.nan, 0.0, 1.0], [0.5, 0.0, 1.0]], np.float32)
        out = np.asarray(self.variant(getattr(scores, name))(logits))
        assert np.isnan(out[0]) and np.isfinite(out[1])
        np.testing.assert_allclose(out[1], REFERENCES[name](logits[1:])[0], rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_energy_temperature(self):
        logits = _logits(2)
        # The temperature is traced under jit and pmap (broadcast with the logits), concrete
        # without jit.
        out = self.variant(scores.energy)(logits, temperature=2.0)
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


@pytest.mark.parametrize("name", ["max_probability", "entropic"])
def test_bounded_scores_are_finite_for_every_nan_free_input(name):
    """The README's promise: ES (and MPS) never return NaN unless a logit is NaN."""
    rng = np.random.default_rng(3)
    values = np.array([-INF, INF, 0.0, -1e30, 1e30, 3.0, -3.0, 1e-40], np.float32)
    logits = rng.choice(values, size=(4000, 4))
    out = np.asarray(getattr(scores, name)(logits))
    assert np.all(np.isfinite(out)), logits[~np.isfinite(out)][:5]
    low = 0.25 if name == "max_probability" else -np.log(4.0)
    assert np.all(out >= low - 1e-6) and np.all(out <= 1.0)


def test_gradients_finite_with_an_infinite_logit():
    logits = jnp.array([[-INF, 0.0, 1.0], [2.0, -INF, -INF]])
    for name in ("max_probability", "entropic", "mmles"):
        fn = getattr(scores, name)
        grad = jax.grad(lambda z, fn=fn: jnp.sum(fn(z)))(logits)
        finite = np.isfinite(np.asarray(logits))
        assert np.all(np.isfinite(np.asarray(grad)[finite])), name


@pytest.mark.parametrize("name", ["max_probability", "entropic", "mmles"])
def test_one_class_is_refused_where_the_score_is_constant(name):
    with pytest.raises(ValueError, match=rf"at least 2 class\(es\) for {name}.*\(3, 1\)"):
        getattr(scores, name)(np.zeros((3, 1), np.float32))


@pytest.mark.parametrize("name", ["min_distance", "mmls", "energy"])
def test_one_class_is_fine_where_the_score_is_defined(name):
    logits = np.array([[-1.0], [-4.0]], np.float32)
    np.testing.assert_allclose(getattr(scores, name)(logits), REFERENCES[name](logits), rtol=1e-6)


@pytest.mark.parametrize("name", list(REFERENCES))
def test_zero_classes_refused(name):
    with pytest.raises(ValueError, match=r"at least \d class\(es\)"):
        getattr(scores, name)(np.zeros((3, 0), np.float32))


@pytest.mark.parametrize("temperature", [0.0, -1.0, np.inf, np.nan, jnp.float32(0.0)])
def test_energy_bad_temperature_raises(temperature):
    with pytest.raises(ValueError, match="`temperature` must be a finite number > 0"):
        scores.energy(_logits(0), temperature=temperature)


def test_energy_temperature_type_and_traced_value():
    with pytest.raises(TypeError, match="`temperature` must be a real number"):
        scores.energy(_logits(0), temperature="2")
    with pytest.raises(ValueError, match="`temperature` must be a scalar"):
        scores.energy(_logits(0), temperature=np.ones(7))
    f = jax.jit(lambda z, t: scores.energy(z, temperature=t))
    np.testing.assert_allclose(f(_logits(0), 2.0), scores.energy(_logits(0), temperature=2.0))
    for bad in (0.0, -2.0, np.inf, np.nan):  # traced: cannot raise, NaN instead of garbage
        assert np.all(np.isnan(f(_logits(0), bad))), bad
