"""Parity of KL-Matching, SHE, NNGuide and GMM with pytorch-ood 0.4.0, in float64, to 1e-6.

Every number on the reference side is computed by pytorch-ood at test time on the same arrays.
pytorch-ood returns *outlier* scores (higher = OOD); ours are higher = in-distribution, so each
relation is ``ours = -reference``:

* KL-Matching and SHE: the same formulas (the papers'), also when a class is never predicted
  (both leave it out of KL-Matching's minimum).
* NNGuide: pytorch-ood casts the features to float32 (``Tensor.float()``) before building its
  bank; the ``float_keeps_float64`` fixture makes ``float()`` keep float64 tensors so its own
  code runs in float64 (as the ViM parity test does).
* GMM: pytorch-ood always adds ``reg * I`` (``1e-6``) to each class covariance; ours adds
  ``ridge * I`` (default 0: the pseudo-inverse rule) -> ``ridge = 1e-6`` gives the relation.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from isomax_jax import detectors

torch = pytest.importorskip("torch")

from .helpers import assert_close, t  # noqa: E402


def make_data(seed=0, n=400, d=16, c=5, b=64):
    """Non-negative class-structured float64 features (like pooled ReLU ones) and a
    nearest-centre linear head ``z = f K + bias`` (accurate, with positive energies)."""
    rng = np.random.default_rng(seed)
    centers = np.abs(rng.normal(size=(c, d))) * 2.0
    labels = np.arange(n) % c
    train = np.abs(centers[labels] + rng.normal(size=(n, d)) * 1.5)
    test_in = np.abs(centers[np.arange(b // 2) % c] + rng.normal(size=(b // 2, d)) * 1.5)
    test_out = np.abs(rng.normal(size=(b - b // 2, d)) * 3.0)
    kernel, bias = centers.T.copy(), 5.0 - 0.5 * np.sum(centers**2, axis=1)
    return dict(
        train=train, labels=labels, test=np.concatenate([test_in, test_out]), kernel=kernel,
        bias=bias,
    )  # fmt: skip


def torch_head(data):
    kernel, bias = t(data["kernel"]), t(data["bias"])
    return lambda z: z @ kernel + bias


def logits_of(data, features):
    """The logits pytorch-ood's head computes, as NumPy (so both sides see the same numbers)."""
    return torch_head(data)(t(features)).numpy()


@pytest.mark.parametrize("skip_class", [None, 2])
def test_kl_matching(pytorch_ood, x64, skip_class):
    data = make_data(seed=1)
    train, test = logits_of(data, data["train"]), logits_of(data, data["test"])
    if skip_class is not None:  # a class never predicted on the fit data: left out by both
        train[:, skip_class] -= 100.0
    reference = pytorch_ood.detector.KLMatching(None)
    reference.fit_logits(t(train))
    expected = reference.predict_logits(t(test)).numpy()
    det = detectors.get("kl_matching")
    state = det.fit(logits=train)
    assert int(np.sum(state["fitted"])) == len(reference.dists)
    got = det.score(state, logits=test)
    assert got.dtype == jnp.float64
    assert_close(got, -expected)


def test_she(pytorch_ood, x64):
    data = make_data(seed=2)
    right = logits_of(data, data["train"]).argmax(1) == data["labels"]
    assert 0.5 < right.mean() < 1  # some training examples are misclassified (and left out)
    reference = pytorch_ood.detector.SHE(None, head=torch_head(data))
    reference.fit_features(t(data["train"]), t(data["labels"]), batch_size=96)
    expected = reference.predict_features(t(data["test"])).numpy()
    det = detectors.get("she")
    state = det.fit(
        features=data["train"], logits=logits_of(data, data["train"]), labels=data["labels"]
    )
    np.testing.assert_allclose(state["patterns"], reference.patterns.numpy(), rtol=1e-12)
    got = det.score(state, features=data["test"], logits=logits_of(data, data["test"]))
    assert_close(got, -expected)


@pytest.mark.parametrize("k, bank_chunk, query_chunk", [(10, 8192, 1024), (3, 96, 24), (50, 7, 5)])
def test_nnguide(pytorch_ood, x64, float_keeps_float64, k, bank_chunk, query_chunk):
    data = make_data(seed=3)
    reference = pytorch_ood.detector.NNGuide(None, head=torch_head(data), k=k)
    reference.fit_features(t(data["train"]), t(data["labels"]), batch_size=128)
    assert reference._scaled_features.dtype == torch.float64  # (float() kept float64)
    expected = reference.predict_features(t(data["test"]), batch_size=150).numpy()
    det = detectors.get("nnguide", k=k, bank_chunk=bank_chunk, query_chunk=query_chunk)
    state = det.fit(features=data["train"], logits=logits_of(data, data["train"]))
    bank = np.asarray(state["bank"]).reshape(-1, data["train"].shape[1])[: len(data["train"])]
    np.testing.assert_allclose(bank, reference._scaled_features.numpy(), rtol=1e-12, atol=1e-14)
    got = det.score(state, features=data["test"], logits=logits_of(data, data["test"]))
    assert_close(got, -expected)


def test_gmm(pytorch_ood, x64, torch_float64):
    data = make_data(seed=4)
    reference = pytorch_ood.detector.GMM(None, reg=1e-6)
    reference.fit_features(t(data["train"]), t(data["labels"]))
    expected = reference.predict_features(t(data["test"])).numpy()
    det = detectors.get("gmm", ridge=1e-6)
    state = det.fit(features=data["train"], labels=data["labels"])
    np.testing.assert_allclose(state["means"], reference._mu.numpy(), rtol=1e-12)
    assert_close(det.score(state, features=data["test"]), -expected)
