"""Tests of isomax_jax.losses against independent NumPy references.

The reference checks run in chex variants: eagerly, under ``jit`` and, for the per-example
``isomax_loss``, under ``pmap``.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

from isomax_jax import losses
from isomax_jax.losses import (
    dismax_fpr_augment,
    dismax_fpr_loss,
    fpr_mosaic,
    fpr_targets,
    isomax_loss,
)


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(1, keepdims=True))


def np_isomax_loss(logits, labels, scale=10.0):
    return -np_log_softmax(scale * np.asarray(logits, np.float64))[np.arange(len(labels)), labels]


def np_mosaic(images):
    """Loop-based mosaic, written independently of the vectorised version."""
    images = np.asarray(images)
    out = images.copy()
    b, h, w, _ = images.shape
    half, r, c = b // 2, h // 2, w // 2
    n = b - half
    for i in range(n):
        src = [half + (i - k) % n for k in range(4)]
        out[half + i, r:, :c] = images[src[1], r:, :c]
        out[half + i, :r, c:] = images[src[2], :r, c:]
        out[half + i, r:, c:] = images[src[3], r:, c:]
    return out


def np_fpr_loss(logits, labels, scale=10.0, alpha=1.0):
    b, c = logits.shape
    half = b // 2
    ce = np_isomax_loss(logits[:half], labels[:half], scale).mean()
    second = labels[half:]
    n = len(second)
    targets = np.zeros((n, c))
    for i in range(n):
        for k in range(4):
            targets[i, second[(i - k) % n]] += 0.25
    logq = np_log_softmax(scale * np.asarray(logits[half:], np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(targets > 0, targets * (np.log(targets) - logq), 0.0).sum() / n
    return (ce + alpha * kl) / 2


def _logits(seed, b=6, c=5, spread=1.0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(b, c)) * spread).astype(np.float32), rng.integers(0, c, b)


class IsoMaxLossMatchesNumpyTest(chex.TestCase):
    """``isomax_loss`` against NumPy, eagerly, under jit and under pmap.

    ``with_pmap`` replicates the arguments to the 8 devices (chex's
    ``broadcast_args_to_devices``) and checks the first device's losses.
    """

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    @parameterized.named_parameters(("scale_10", 10.0), ("scale_1", 1.0))
    def test_float32(self, scale):
        logits, labels = _logits(0)
        # The scale is traced under jit and pmap, concrete without jit.
        out = self.variant(isomax_loss)(logits, labels, entropic_scale=scale)
        assert out.shape == (6,)
        np.testing.assert_allclose(out, np_isomax_loss(logits, labels, scale), rtol=1e-5, atol=1e-7)

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_float64_value_and_gradient(self):
        with jax.enable_x64(True):
            logits, labels = _logits(1)
            logits = logits.astype(np.float64)
            out = self.variant(isomax_loss)(logits, labels)
            assert out.dtype == jnp.float64
            np.testing.assert_allclose(out, np_isomax_loss(logits, labels), rtol=1e-10)
            grad_fn = jax.grad(lambda z, y: jnp.sum(isomax_loss(z, y)))
            grad = self.variant(grad_fn)(logits, labels)
            probs = np.exp(np_log_softmax(10 * logits))
            ref = 10 * (probs - np.eye(5)[labels])
            np.testing.assert_allclose(grad, ref, rtol=1e-10, atol=1e-14)

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_bfloat16_gives_float32(self):
        logits, labels = _logits(2)
        out = self.variant(isomax_loss)(logits.astype(jnp.bfloat16), labels)
        assert out.dtype == jnp.float32
        ref = np_isomax_loss(np.asarray(logits.astype(jnp.bfloat16), np.float64), labels)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_extreme_logits_are_accurate_and_finite(self):
        logits = np.array([[0.0, -3.0, -4.0]], np.float32)
        out = self.variant(isomax_loss)(logits, np.array([0]))
        # log(1 + e^-30 + e^-40): the float64 log-softmax reference itself is off by 1e-3 here.
        np.testing.assert_allclose(out, [np.log1p(np.exp(-30.0) + np.exp(-40.0))], rtol=1e-6)
        logits = np.array([[0.0, -50.0], [-1e4, 0.0]], np.float32)
        labels = np.array([1, 0])
        out = self.variant(isomax_loss)(logits, labels)
        np.testing.assert_allclose(out, np_isomax_loss(logits, labels), rtol=1e-6)
        grad = self.variant(jax.grad(lambda z, y: jnp.sum(isomax_loss(z, y))))(logits, labels)
        assert np.all(np.isfinite(grad))

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_out_of_range_labels_are_nan(self):
        logits, _ = _logits(3, b=3, c=4)
        out = self.variant(isomax_loss)(logits, jnp.array([0, 4, -1]))
        assert np.isfinite(out[0]) and np.isnan(out[1]) and np.isnan(out[2])


def test_isomax_loss_check_grads_float64():
    with jax.enable_x64(True):
        logits, labels = _logits(1)
        logits = logits.astype(np.float64)
        check_grads(jax.jit(lambda z: isomax_loss(z, labels)), (logits,), order=1, eps=1e-4)


def test_isomax_loss_bad_inputs():
    logits, labels = _logits(4)
    with pytest.raises(
        ValueError, match=r"`labels` must have shape \[batch\] = \(6,\); got \(5,\)"
    ):
        isomax_loss(logits, labels[:5])
    with pytest.raises(TypeError, match="`labels` must have an integer dtype"):
        isomax_loss(logits, labels.astype(np.float32))
    with pytest.raises(ValueError, match=r"`logits` must have rank 2"):
        isomax_loss(logits[0], labels[:1])
    with pytest.raises(TypeError, match="`logits` must have a floating-point dtype"):
        isomax_loss(logits.astype(np.int32), labels)


class FprMatchesNumpyTest(chex.TestCase):
    """The DisMax FPR augmentation, targets and loss against NumPy, eagerly and under jit.

    They mix the examples of a batch: no ``pmap`` variant.
    """

    @chex.variants(with_jit=True, without_jit=True)
    def test_fpr_mosaic_matches_loop_reference(self):
        images = np.random.default_rng(5).normal(size=(9, 5, 6, 2)).astype(np.float32)
        np.testing.assert_array_equal(self.variant(fpr_mosaic)(images), np_mosaic(images))

    @chex.variants(with_jit=True, without_jit=True)
    def test_dismax_fpr_augment_permutes_then_mosaics(self):
        key = jax.random.key(0)
        images = np.random.default_rng(6).normal(size=(8, 4, 4, 3)).astype(np.float32)
        labels = np.arange(8, dtype=np.int32)
        out_images, out_labels = self.variant(dismax_fpr_augment)(key, images, labels)
        permutation = np.asarray(jax.random.permutation(key, 8))
        np.testing.assert_array_equal(out_labels, permutation)
        np.testing.assert_array_equal(out_images, np_mosaic(images[permutation]))
        assert sorted(np.asarray(out_labels).tolist()) == list(range(8))

    @chex.variants(with_jit=True, without_jit=True)
    def test_fpr_targets_sum_to_one(self):
        labels = np.array([0, 0, 3, 1, 2])
        targets = np.asarray(self.variant(functools.partial(fpr_targets, num_classes=4))(labels))
        np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)
        np.testing.assert_allclose(targets[0], [0.25, 0.25, 0.25, 0.25], rtol=1e-6)
        np.testing.assert_allclose(targets[1], [0.5, 0.25, 0.25, 0.0], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("even_batch", 8), ("odd_batch", 7))
    def test_dismax_fpr_loss_matches_numpy(self, batch):
        logits, labels = _logits(7, b=batch)
        # alpha is traced under jit, concrete without jit.
        out = self.variant(dismax_fpr_loss)(logits, labels, alpha=0.7)
        assert out.shape == ()
        np.testing.assert_allclose(out, np_fpr_loss(logits, labels, alpha=0.7), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_dismax_fpr_loss_finite_for_huge_logits(self):
        logits = np.array([[0.0, -100.0], [0.0, -100.0], [0.0, -100.0], [-100.0, 0.0]], np.float32)
        labels = np.array([1, 0, 1, 0])
        out = self.variant(dismax_fpr_loss)(logits, labels)
        assert np.isfinite(out)
        np.testing.assert_allclose(out, np_fpr_loss(logits, labels), rtol=1e-6)
        grad = self.variant(jax.grad(dismax_fpr_loss))(logits, labels)
        assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("batch", [8, 7])
def test_dismax_fpr_loss_check_grads_float64(batch):
    logits, labels = _logits(7, b=batch)
    with jax.enable_x64(True):
        z = logits.astype(np.float64)
        loss_fn = jax.jit(lambda z: dismax_fpr_loss(z, labels))
        check_grads(loss_fn, (z,), order=1, modes=["rev"], eps=1e-4)


def test_fpr_bad_inputs(key):
    with pytest.raises(ValueError, match=r"`images` must have rank 4"):
        dismax_fpr_augment(key, np.zeros((4, 3, 3)), np.zeros(4, np.int32))
    with pytest.raises(ValueError, match=r"`labels` must have shape \[batch\] = \(4,\)"):
        dismax_fpr_augment(key, np.zeros((4, 2, 2, 1)), np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="at least 2"):
        dismax_fpr_loss(np.zeros((1, 3), np.float32), np.zeros(1, np.int32))
    assert np.isnan(losses.dismax_fpr_loss(np.zeros((4, 3), np.float32), np.array([0, 1, 2, 5])))


def test_validate_labels_eager_helper():
    from isomax_jax import validate_labels

    np.testing.assert_array_equal(validate_labels(np.array([0, 4]), 5), [0, 4])
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 5\); got 2 out-of-range"):
        validate_labels(np.array([0, 5, -1]), 5)
    with pytest.raises(TypeError, match="integer dtype"):
        validate_labels(np.array([0.0]), 5)
    with pytest.raises(TypeError, match="outside `jax.jit`"):
        jax.jit(lambda y: validate_labels(y, 5))(jnp.array([0]))
