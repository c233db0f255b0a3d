"""Tests of temperature calibration against an independent NumPy ECE.

The reference checks run in chex variants: eagerly and under ``jit`` (the ECE reduces over the
batch: no ``pmap`` variant).
"""

import chex
import jax
import numpy as np
import pytest
from absl.testing import parameterized

from isomax_jax.calibration import calibrate_temperature, expected_calibration_error


def np_ece(logits, labels, temperature=1.0, bins=15):
    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    conf, correct = p.max(1), p.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(conf[m].mean() - correct[m].mean())
    return total


def _overconfident(seed, n=400, c=10, scale=6.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) * scale
    logits[np.arange(n), labels] += 4.0 * (rng.random(n) < 0.6) * scale
    return logits.astype(np.float32), labels


class EceMatchesNumpyTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("t_0_3", 0.3), ("t_1", 1.0), ("t_7", 7.0))
    def test_float32_and_float64(self, temperature):
        logits, labels = _overconfident(0)
        # The temperature is traced under jit, concrete without jit.
        ece = self.variant(expected_calibration_error)
        out = ece(logits, labels, temperature=temperature)
        np.testing.assert_allclose(out, np_ece(logits, labels, temperature), rtol=1e-5, atol=1e-6)
        with jax.enable_x64(True):
            out = ece(logits.astype(np.float64), labels, temperature=temperature)
            np.testing.assert_allclose(out, np_ece(logits, labels, temperature), rtol=1e-10)


def test_calibration_reduces_ece_and_is_grid_optimal():
    logits, labels = _overconfident(1)
    t = float(calibrate_temperature(logits, labels))
    assert 1e-3 <= t <= 100.0
    found = np_ece(logits, labels, t)
    assert found < np_ece(logits, labels, 1.0)
    # No temperature of an independent dense grid does better by more than a hair.
    grid = np.exp(np.linspace(np.log(1e-3), np.log(100.0), 2000))
    assert found <= min(np_ece(logits, labels, g) for g in grid) + 1e-3


def test_bad_inputs():
    logits, labels = _overconfident(2, n=10)
    with pytest.raises(ValueError, match=r"`labels` must have shape \[batch\] = \(10,\)"):
        calibrate_temperature(logits, labels[:3])
    with pytest.raises(ValueError, match="`bounds`"):
        calibrate_temperature(logits, labels, bounds=(2.0, 1.0))
    with pytest.raises(TypeError, match="`labels` must have an integer dtype"):
        expected_calibration_error(logits, labels.astype(np.float32))


def _with(array, index, value):
    array = array.copy()
    array[index] = value
    return array


@pytest.mark.parametrize(
    "kwargs, match",
    [  # each of these returned a plausible temperature (0.001, 12.59, 100.0, NaN) before
        (dict(logits=np.full((10, 10), np.nan, np.float32)), "`logits` must be finite; got 100"),
        (
            dict(logits="one_inf"),
            r"`logits` must be finite; got 1 NaN/inf .* inf at index \(3, 1\)",
        ),
        (dict(logits="one_nan"), r"`logits` must be finite; got 1 NaN/inf .* at index \(0, 0\)"),
        (dict(labels="out_of_range"), r"`labels` must lie in \[0, 10\); got 1 out-of-range"),
        (dict(labels="negative"), r"`labels` must lie in \[0, 10\); got 1 out-of-range"),
        (dict(num_bins=0), "`num_bins` must be at least 1; got 0"),
        (
            dict(bounds=(1.0, np.inf)),
            r"`bounds` must be finite with 0 < low < high; got \(1.0, inf\)",
        ),
        (dict(bounds=(np.nan, 1.0)), "`bounds` must be finite with 0 < low < high"),
        (dict(bounds=(0.0, 1.0)), "`bounds` must be finite with 0 < low < high"),
        (dict(bounds=(1.0,)), r"`bounds` must be a pair of numbers"),
        (dict(num_candidates=1), "`num_candidates` must be at least 2; got 1"),
    ],
)
def test_calibrate_temperature_refuses_meaningless_input(kwargs, match):
    logits, labels = _overconfident(2, n=10)
    special = {
        "one_inf": _with(logits, (3, 1), np.inf),
        "one_nan": _with(logits, (0, 0), np.nan),
        "out_of_range": _with(labels, 4, 10),
        "negative": _with(labels, 0, -1),
    }
    args = dict(logits=logits, labels=labels) | kwargs
    args = {k: special.get(v, v) if isinstance(v, str) else v for k, v in args.items()}
    with pytest.raises(ValueError, match=match):
        calibrate_temperature(args.pop("logits"), args.pop("labels"), **args)


def test_calibrate_temperature_type_errors():
    logits, labels = _overconfident(2, n=10)
    with pytest.raises(TypeError, match="`num_bins` must be a Python int"):
        calibrate_temperature(logits, labels, num_bins=15.0)
    with pytest.raises(TypeError, match="`num_candidates` must be a Python int"):
        calibrate_temperature(logits, labels, num_candidates=True)


@pytest.mark.parametrize("temperature", [0.0, -1.0, np.inf, np.nan])
def test_ece_refuses_bad_temperature(temperature):
    """T = 0 used to return 0.0, i.e. "perfectly calibrated"."""
    logits, labels = _overconfident(2, n=10)
    with pytest.raises(ValueError, match="`temperature` must be a finite number > 0"):
        expected_calibration_error(logits, labels, temperature=temperature)


def test_ece_refuses_bad_values_and_bins():
    logits, labels = _overconfident(2, n=10)
    with pytest.raises(ValueError, match="`logits` must be finite"):
        expected_calibration_error(_with(logits, (1, 1), -np.inf), labels)
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 10\)"):
        expected_calibration_error(logits, _with(labels, 2, 11))
    with pytest.raises(ValueError, match="`num_bins` must be at least 1; got 0"):
        expected_calibration_error(logits, labels, num_bins=0)


def test_traced_bad_values_give_nan():
    """Under jit the values cannot raise: NaN, never a plausible number."""
    logits, labels = _overconfident(3, n=50)
    ece = jax.jit(lambda z, y, t: expected_calibration_error(z, y, temperature=t))
    np.testing.assert_allclose(ece(logits, labels, 2.0), np_ece(logits, labels, 2.0), rtol=1e-5)
    for t in (0.0, -1.0, np.inf):
        assert np.isnan(ece(logits, labels, t)), t
    assert np.isnan(ece(_with(logits, (0, 0), np.nan), labels, 1.0))
    assert np.isnan(ece(logits, _with(labels, 0, 10), 1.0))
    calibrate = jax.jit(lambda z, y: calibrate_temperature(z, y, num_candidates=16))
    assert np.isfinite(calibrate(logits, labels))
    assert np.isnan(calibrate(np.full_like(logits, np.nan), labels))
    assert np.isnan(calibrate(logits, _with(labels, 0, -1)))
