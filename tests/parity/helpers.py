"""Comparison helpers shared by the detector parity tests (pytorch-ood 0.4.0, float64)."""

import numpy as np

RTOL = 1e-6


def assert_close(actual, expected, *, rtol=RTOL):
    """``|a - e| <= rtol * |e| + rtol * max|e|`` elementwise (scores may cross 0)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)) and np.all(np.isfinite(expected))
    scale = float(np.max(np.abs(expected)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def relative_error(actual, expected) -> float:
    """``max |a - e| / max |e|`` (reported by ``docs/detectors.md``)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def t(x):
    """A float64/int array as a torch tensor (shares memory)."""
    import torch

    return torch.from_numpy(np.asarray(x))


def make_data(seed=0, n=400, d=16, c=5, b=64):
    """Class-structured non-negative float64 features (like pooled ReLU ones), a linear head."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(c, d)) * 2.0
    labels = np.arange(n) % c
    train = np.abs(centers[labels] + rng.normal(size=(n, d)))
    test_in = np.abs(centers[np.arange(b // 2) % c] + rng.normal(size=(b // 2, d)))
    test_out = np.abs(rng.normal(size=(b - b // 2, d)) * 3.0)
    kernel = rng.normal(size=(d, c)) / np.sqrt(d)
    bias = rng.normal(size=(c,)) * 0.1
    test = np.concatenate([test_in, test_out])
    return dict(train=train, labels=labels, test=test, kernel=kernel, bias=bias,
                test_logits=test @ kernel + bias)  # fmt: skip


def torch_head(data):
    """The data's linear head on flattened torch tensors (pytorch-ood's model stand-in)."""
    kernel, bias = t(data["kernel"]), t(data["bias"])
    return lambda x: x.flatten(1) @ kernel + bias


def jax_head(data):
    """The same head as ``head_fn`` for our detectors."""
    import jax.numpy as jnp

    kernel, bias = jnp.asarray(data["kernel"]), jnp.asarray(data["bias"])
    return lambda x: x @ kernel + bias[None, :]
