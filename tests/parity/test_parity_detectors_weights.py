"""Parity of SCALE, DICE, fDBD, GradNorm and WeightedEBO with pytorch-ood 0.4.0, in float64.

Every number on the reference side is computed by pytorch-ood at test time on the same arrays.
pytorch-ood returns *outlier* scores (higher = OOD); ours are higher = in-distribution, so the
relations are ``ours = -reference`` (``docs/detectors.md``), with these departures:

* percentiles: pytorch-ood takes fractions (SCALE ``0.65`` by default, DICE ``p`` without a
  default), ours percent (SCALE 85, DICE 90: the papers'); SCALE on ``[B, D, 1, 1]`` maps there.
* GradNorm: pytorch-ood's default ``param_filter`` takes the gradient of every parameter, the
  bias too: its score is then ``-(||f||_1 + 1) V / T``, ours (the paper: the kernel only)
  ``||f||_1 V / T``. With ``param_filter`` selecting the weight, ``ours = -reference``.
* WeightedEBO: pytorch-ood exponentiates the raw logits and overflows to ``-inf`` where ours
  (max-shifted) is finite (tested).

pytorch-ood's DICE and fDBD cast to float32 (``Tensor.float()``); the ``float_keeps_float64``
fixture makes ``float()`` keep float64 tensors so that their own code runs in float64.
"""

import numpy as np
import pytest

from isomax_jax import detectors

torch = pytest.importorskip("torch")

from .helpers import assert_close, jax_head, make_data, t, torch_head  # noqa: E402


def _torch_linear(data):
    """A float64 ``torch.nn.Linear`` holding the head ``f W + b`` (its weight is ``W^T``)."""
    d, c = data["kernel"].shape
    layer = torch.nn.Linear(d, c).double()
    with torch.no_grad():
        layer.weight.copy_(t(data["kernel"].T))
        layer.bias.copy_(t(data["bias"]))
    return layer


@pytest.mark.parametrize("percentile", [85.0, 65.0])
def test_scale(pytorch_ood, x64, percentile):
    data = make_data(seed=11, d=40)
    reference = pytorch_ood.detector.SCALE(None, head=torch_head(data), percentile=percentile / 100)
    maps = t(data["test"])[:, :, None, None]  # pytorch-ood's SCALE wants [B, D, H, W]
    expected = reference.predict_feature_maps(maps).numpy()
    det = detectors.get("scale", percentile=percentile)
    got = det.score(det.fit(), features=data["test"], head_fn=jax_head(data))
    assert_close(got, -expected)


@pytest.mark.parametrize("percentile", [90.0, 70.0])
def test_dice(pytorch_ood, x64, float_keeps_float64, percentile):
    data = make_data(seed=12)
    reference = pytorch_ood.detector.DICE(
        None, w=t(data["kernel"].T), b=t(data["bias"]), p=percentile / 100
    )
    reference.fit_features(t(data["train"]), t(data["labels"]))
    expected = reference.predict_features(t(data["test"])).numpy()
    det = detectors.get("dice", percentile=percentile)
    head = dict(kernel=data["kernel"], bias=data["bias"])
    state = det.fit(features=data["train"], **head)
    np.testing.assert_array_equal(state["mask"], reference.masked_w.numpy().T != 0)
    assert 0 < int(np.sum(state["mask"])) < state["mask"].size
    assert_close(det.score(state, features=data["test"], **head), -expected)


def test_fdbd(pytorch_ood, x64, float_keeps_float64):
    data = make_data(seed=13, c=7)
    reference = pytorch_ood.detector.fDBD(None, _torch_linear(data))
    reference.fit_features(t(data["train"]))
    expected = reference.predict_features(t(data["test"])).numpy()
    det = detectors.get("fdbd")
    state = det.fit(features=data["train"], kernel=data["kernel"])
    np.testing.assert_allclose(state["mean"], reference.train_mean.numpy(), rtol=1e-12)
    got = det.score(state, features=data["test"], logits=data["test_logits"])
    assert_close(got, -expected)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_gradnorm(pytorch_ood, x64, torch_float64, temperature):
    data = make_data(seed=14)
    linear = _torch_linear(data)
    reference = pytorch_ood.detector.GradNorm(
        linear, param_filter=lambda name: name == "weight", temperature=temperature
    )
    expected = reference.predict(t(data["test"])).detach().numpy()
    det = detectors.get("gradnorm", temperature=temperature)
    got = det.score({}, features=data["test"], logits=data["test_logits"])
    assert_close(got, -expected)
    # pytorch-ood's default filter takes every parameter, the bias too: (||f||_1 + 1) V / T
    everything = pytorch_ood.detector.GradNorm(linear, temperature=temperature)
    expected_all = everything.predict(t(data["test"])).detach().numpy()
    l1 = np.abs(data["test"]).sum(1)
    assert_close(np.asarray(got) * (l1 + 1) / l1, -expected_all)


@pytest.mark.parametrize("shape", [(5,), (1, 5)])
def test_weighted_ebo(pytorch_ood, x64, shape):
    logits = np.random.default_rng(15).normal(size=(50, 5)) * 3.0
    weights = np.array([0.7, -0.2, 1.9, 0.0, 0.05]).reshape(shape)  # ReLU'd on both sides
    reference = pytorch_ood.detector.WeightedEBO(None, weights=t(weights))
    expected = reference.predict_logits(t(logits)).numpy()
    det = detectors.get("weighted_ebo", weights=weights)
    assert_close(det.score({}, logits=logits), -expected)
    energy = pytorch_ood.detector.EnergyBased(None).predict_logits(t(logits)).numpy()
    assert_close(detectors.get("weighted_ebo").score({}, logits=logits), -energy)  # weights=None


def test_weighted_ebo_overflow_is_a_pytorch_ood_deviation(pytorch_ood, x64):
    """pytorch-ood sums exp(z) unshifted: logits above ~709 overflow float64 and its score is
    -inf; ours (the max-shifted log-sum-exp, as VOS's code) stays finite and exact."""
    logits = np.array([[800.0, 795.0, 0.0], [3.0, 1.0, -2.0]])
    weights = np.array([0.5, 2.0, 1.0])
    with np.errstate(over="ignore"):
        reference = pytorch_ood.detector.WeightedEBO(None, weights=t(weights))
        expected = reference.predict_logits(t(logits)).numpy()
    got = detectors.get("weighted_ebo", weights=weights).score({}, logits=logits)
    exact = 800.0 + np.log(0.5 + 2.0 * np.exp(-5.0) + np.exp(-800.0))
    np.testing.assert_allclose(got[0], exact, rtol=1e-15)
    assert expected[0] == -np.inf  # theirs overflowed
    np.testing.assert_allclose(got[1], -expected[1], rtol=1e-14)
