"""Tests of temperature calibration against an independent NumPy ECE."""

import jax
import numpy as np
import pytest

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


@pytest.mark.parametrize("temperature", [0.3, 1.0, 7.0])
def test_ece_matches_numpy(temperature):
    logits, labels = _overconfident(0)
    out = jax.jit(expected_calibration_error)(logits, labels, temperature=temperature)
    np.testing.assert_allclose(out, np_ece(logits, labels, temperature), rtol=1e-5, atol=1e-6)
    with jax.enable_x64(True):
        out = expected_calibration_error(logits.astype(np.float64), labels, temperature=temperature)
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
