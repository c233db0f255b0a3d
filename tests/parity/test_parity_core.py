"""Parity of the core (heads, losses, scores, FPR, calibration) with the PyTorch reference.

Numbers come from ``robust_deep_learning`` 0.5.0 at test time. The reference heads' initial
weights are copied into the Flax heads. Tolerances: float64 ``1e-10``, float32 ``1e-5``, relative
to the largest entry of each compared array (see ``assert_close``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isomax_jax import calibration, heads, losses, scores

torch = pytest.importorskip("torch")

TOLERANCE = {np.float64: 1e-10, np.float32: 1e-5}
KINDS = ("isomax", "isomax_plus", "dismax")
FLAX_HEADS = {"isomax": heads.IsoMaxHead, "isomax_plus": heads.IsoMaxPlusHead}
FLAX_HEADS["dismax"] = heads.DisMaxHead


def assert_close(actual, expected, *, rtol, scale=0.0):
    """``|a - e| <= rtol * |e| + rtol * max(max|e|, scale)``: relative to the array's scale.

    Gradients have entries arbitrarily close to 0, where a purely elementwise relative test is
    meaningless; ``scale`` lets a gradient that is exactly 0 in exact arithmetic (both
    frameworks then return rounding noise) be compared to the scale of the other gradients.
    """
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(float(np.max(np.abs(expected))) if expected.size else 0.0, scale)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def _reference_parts(reference, kind):
    return {
        "isomax": (reference.IsoMaxLossFirstPart, reference.IsoMaxLossSecondPart),
        "isomax_plus": (reference.IsoMaxPlusLossFirstPart, reference.IsoMaxPlusLossSecondPart),
        "dismax": (reference.DisMaxLossFirstPart, reference.DisMaxLossSecondPart),
    }[kind]


def _torch_run(reference, kind, features, labels, dtype, *, train, prototypes=None, scale=None):
    """Reference logits, loss and gradients (features, prototypes, distance_scale)."""
    first, second = _reference_parts(reference, kind)
    torch.manual_seed(0)
    head = first(features.shape[1], 5)
    head = head.double() if dtype == np.float64 else head.float()
    with torch.no_grad():
        if prototypes is not None:
            head.prototypes.copy_(torch.from_numpy(prototypes))
        if scale is not None and kind != "isomax":
            head.distance_scale.copy_(torch.from_numpy(scale))
    head.train(train)
    f = torch.tensor(features, requires_grad=True)
    logits = head(f)
    loss = second(head)(logits, torch.from_numpy(labels).long())
    loss.backward()
    grads = {"features": f.grad.numpy(), "prototypes": head.prototypes.grad.numpy()}
    params = {"prototypes": head.prototypes.detach().numpy().copy()}
    if kind != "isomax":
        grads["distance_scale"] = head.distance_scale.grad.numpy()
        params["distance_scale"] = head.distance_scale.detach().numpy().copy()
    return logits.detach().numpy(), float(loss.detach()), grads, params


@functools.cache
def _jax_grad_fn(kind, entropic_scale):
    head = FLAX_HEADS[kind](num_classes=5)

    def loss_fn(params, features, labels):
        logits = head.apply({"params": params}, features)
        return jnp.mean(losses.isomax_loss(logits, labels, entropic_scale=entropic_scale)), logits

    return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))


def _jax_run(kind, params, features, labels, *, entropic_scale):
    (loss, logits), (grad_params, grad_features) = _jax_grad_fn(kind, entropic_scale)(
        params, features, labels
    )
    return logits, float(loss), {"features": grad_features, **grad_params}


def _compare(reference, kind, features, labels, dtype, *, train=True, prototypes=None, scale=None):
    ref_logits, ref_loss, ref_grads, params = _torch_run(
        reference, kind, features, labels, dtype, train=train, prototypes=prototypes, scale=scale
    )
    entropic_scale = 1.0 if (kind == "dismax" and not train) else 10.0
    logits, loss, grads = _jax_run(kind, params, features, labels, entropic_scale=entropic_scale)
    rtol = TOLERANCE[dtype]
    assert logits.dtype == dtype
    assert_close(logits, ref_logits, rtol=rtol)
    assert_close(loss, ref_loss, rtol=rtol)
    assert set(grads) == set(ref_grads)
    largest = max(float(np.max(np.abs(g))) for g in ref_grads.values())
    for name, ref in ref_grads.items():
        assert np.all(np.isfinite(grads[name])), name
        assert_close(grads[name], ref, rtol=rtol, scale=largest)


def _inputs(seed, dtype, batch=6, dim=7):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(batch, dim)).astype(dtype)
    labels = rng.integers(0, 5, batch).astype(np.int32)
    return features, labels


@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def dtype(request):
    if request.param == np.float64:
        with jax.enable_x64(True):
            yield np.float64
    else:
        yield np.float32


@pytest.mark.parametrize("kind", KINDS)
def test_random_inputs_reference_init(reference, kind, dtype):
    """Reference initial weights (IsoMax: all-zero prototypes), training-mode loss."""
    features, labels = _inputs(0, dtype)
    _compare(reference, kind, features, labels, dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_random_prototypes_and_signed_scale(reference, kind, dtype):
    features, labels = _inputs(1, dtype)
    prototypes = np.random.default_rng(2).normal(size=(5, 7)).astype(dtype)
    scale = np.array([-2.5], dtype)
    _compare(reference, kind, features, labels, dtype, prototypes=prototypes, scale=scale)


def test_dismax_eval_mode_loss(reference, dtype):
    features, labels = _inputs(3, dtype)
    _compare(reference, "dismax", features, labels, dtype, train=False)


@pytest.mark.parametrize("kind", KINDS)
def test_edge_cases_zero_distance_zero_row_zero_scale(reference, kind, dtype):
    rng = np.random.default_rng(4)
    prototypes = rng.normal(size=(5, 7)).astype(dtype)
    features, labels = _inputs(5, dtype)
    features[0] = prototypes[labels[0]]  # zero distance to the target prototype
    features[1] = prototypes[2]  # zero distance to another prototype
    features[2] = 0.0  # all-zero feature row
    scale = np.array([0.0 if kind != "isomax" else 1.0], dtype)  # |s| at 0: gradient 0
    _compare(reference, kind, features, labels, dtype, prototypes=prototypes, scale=scale)
    if kind != "isomax":
        _compare(reference, kind, features, labels, dtype, prototypes=prototypes)


@pytest.mark.parametrize("kind", KINDS)
def test_near_duplicate_features_and_prototypes(reference, kind, dtype):
    """Where the matrix-product form cancels: the exact head recomputes (module docstring).

    Offsets are relative to unit-scale vectors; for the normalised heads they stay at 1e-2,
    because below that the derivative's direction ``(f - p) / d`` is set by the rounding of
    the normalisation itself (in both frameworks, ~u / offset).
    """
    offset = 1e-4 if kind == "isomax" else 1e-2
    rng = np.random.default_rng(11)
    prototypes = rng.normal(size=(5, 7))
    prototypes[3] = prototypes[2] + offset * rng.normal(size=7)  # near-duplicate prototypes
    features, labels = _inputs(12, np.float64)
    features[0] = prototypes[labels[0]] + 10 * offset * rng.normal(size=7)  # near its target
    features[1] = prototypes[2] + offset * rng.normal(size=7)  # near both duplicates
    if kind == "isomax":
        # Exactly on one of them. Not for the normalised heads: f / ||f|| and p / ||p|| are
        # normalised in different fusions and can differ by an ulp, so "d = 0" becomes d ~ 1e-8
        # and the direction (f - p) / d is rounding noise, in either framework.
        features[2] = prototypes[3]
    prototypes, features = prototypes.astype(dtype), features.astype(dtype)
    scale = np.array([1.5], dtype)
    _compare(reference, kind, features, labels, dtype, prototypes=prototypes, scale=scale)


@pytest.mark.parametrize("kind", KINDS)
def test_huge_logits_compare_where_reference_is_finite(reference, kind, dtype):
    """Far-away targets make the reference's softmax-then-log loss ``inf``; ours stays finite."""
    rng = np.random.default_rng(6)
    prototypes = rng.normal(size=(5, 7)).astype(dtype)
    prototypes[0] += 40.0
    features, labels = _inputs(7, dtype)
    near = prototypes / np.linalg.norm(prototypes, axis=1, keepdims=True)
    if kind == "isomax":
        near = prototypes
    # Rows 0-2 sit on prototype 1 with target 0 far away: the reference loss is inf there.
    features[:3] = near[1] + 0.01 * features[:3]
    labels[:3] = 0
    # Rows 3-5 sit between prototypes 1 and 2 with target 1: a moderate, finite loss.
    features[3:] = (near[1] + near[2]) / 2 + 1e-3 * features[3:]
    labels[3:] = 1
    # Large enough to overflow the reference in this dtype; no larger, because the loss's
    # sensitivity to distance rounding grows with the scale (entropic_scale * |s| * eps).
    scale = np.array([20.0 if dtype == np.float32 else 200.0], dtype)
    _, full_loss, _, params = _torch_run(
        reference, kind, features, labels, dtype, train=True, prototypes=prototypes, scale=scale
    )
    assert np.isinf(full_loss), "the edge case must overflow the reference"
    per_example = np.array(
        [
            _torch_run(
                reference,
                kind,
                features[i : i + 1],
                labels[i : i + 1],
                dtype,
                train=True,
                prototypes=prototypes,
                scale=scale,
            )[1]
            for i in range(len(labels))
        ]
    )
    finite = np.isfinite(per_example)
    assert finite.any() and not finite.all()
    # Ours: finite loss and gradients everywhere...
    logits, loss, grads = _jax_run(kind, params, features, labels, entropic_scale=10.0)
    assert np.isfinite(loss)
    assert all(np.all(np.isfinite(g)) for g in grads.values())
    # ... and equal to the reference on the rows where the reference is finite.
    _compare(
        reference,
        kind,
        features[finite],
        labels[finite],
        dtype,
        prototypes=prototypes,
        scale=scale,
    )


@pytest.mark.parametrize("name", ["MPS", "ES", "MDS", "MMLS", "MMLES"])
def test_scores_match_get_scores(reference, name, dtype):
    logits = np.random.default_rng(8).normal(size=(9, 6)).astype(dtype) * 4
    ref = reference.get_scores(torch.from_numpy(logits), name)["values"].numpy()
    ours = {
        "MPS": scores.max_probability,
        "ES": scores.entropic,
        "MDS": scores.min_distance,
        "MMLS": scores.mmls,
        "MMLES": scores.mmles,
    }[name](logits)
    assert ours.dtype == dtype
    assert_close(ours, ref, rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("batch", [8, 7])
def test_fpr_augmentation_and_loss(reference, monkeypatch, batch, key):
    rng = np.random.default_rng(9)
    images = rng.normal(size=(batch, 6, 8, 3)).astype(np.float32)  # NHWC, non-square
    labels = rng.integers(0, 4, batch).astype(np.int32)
    permutation = np.array(jax.random.permutation(key, batch))
    monkeypatch.setattr(torch, "randperm", lambda n, *a, **k: torch.from_numpy(permutation))
    head = reference.DisMaxLossFirstPart(5, 4)
    criterion = reference.DisMaxLossSecondPart(head, add_on="fpr")
    ref_images, ref_labels = criterion.preprocess(
        torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.from_numpy(labels).long()
    )
    ours_images, ours_labels = jax.jit(losses.dismax_fpr_augment)(key, images, labels)
    np.testing.assert_array_equal(ours_images, ref_images.numpy().transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(ours_labels, ref_labels.numpy())

    logits = rng.normal(size=(batch, 4)).astype(np.float64) * 0.5
    torch_logits = torch.tensor(logits, requires_grad=True)
    head.train()
    # The reference builds its 0.25 targets with torch's default dtype; make that float64 so
    # its KL term is computed in float64 like the logits.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ref_loss = criterion(torch_logits, ref_labels)
    finally:
        torch.set_default_dtype(default_dtype)
    ref_loss.backward()
    with jax.enable_x64(True):
        loss, grad = jax.jit(jax.value_and_grad(losses.dismax_fpr_loss))(
            logits, np.asarray(ours_labels)
        )
        assert_close(loss, float(ref_loss.detach()), rtol=1e-10)
        assert_close(grad, torch_logits.grad.numpy(), rtol=1e-10)
    loss32 = jax.jit(losses.dismax_fpr_loss)(logits.astype(np.float32), np.asarray(ours_labels))
    assert_close(loss32, float(ref_loss.detach()), rtol=1e-5)


def test_ece_and_calibration_against_reference(reference):
    rng = np.random.default_rng(10)
    n, c = 500, 10
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) * 5
    logits[np.arange(n), labels] += 8.0 * (rng.random(n) < 0.7)
    ece = reference.ECELoss()
    with jax.enable_x64(True):
        for temperature in (0.5, 1.0, 3.0):
            ours = calibration.expected_calibration_error(logits, labels, temperature=temperature)
            ref = ece.loss(logits / temperature, labels, 15)
            assert_close(ours, ref, rtol=1e-10)

    # The reference's calibration (L-BFGS-B on the ECE from T = 1) on the same held-out logits.
    class LastLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.temperature = torch.nn.Parameter(torch.tensor([1.0]), requires_grad=False)

    last_layer = LastLayer()
    loader = [
        (torch.from_numpy(logits[i : i + 100]), torch.from_numpy(labels[i : i + 100]))
        for i in range(0, n, 100)
    ]
    reference.calibrate_temperature(last_layer, torch.nn.Identity(), loader)
    ref_t = float(last_layer.temperature)
    ours_t = float(calibration.calibrate_temperature(logits.astype(np.float32), labels))
    assert ece.loss(logits / ours_t, labels, 15) <= ece.loss(logits / ref_t, labels, 15) + 1e-6
    assert ece.loss(logits / ours_t, labels, 15) < ece.loss(logits, labels, 15)
