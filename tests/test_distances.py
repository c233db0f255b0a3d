"""Tests of isomax_jax.distances against independent NumPy float64 references.

The reference checks run in chex variants: eagerly, under ``jit`` and, for the logits (one row
per example), under ``pmap``.
"""

import functools
import math

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

from isomax_jax import calibration, distances, heads, scores, validation
from isomax_jax.distances import (
    dismax_logits,
    isomax_logits,
    isomax_plus_logits,
    l2_normalize,
    pairwise_distance,
)


def np_distance(f, p):
    f = np.asarray(f, np.float64)
    p = np.asarray(p, np.float64)
    return np.sqrt(((f[:, None, :] - p[None, :, :]) ** 2).sum(-1))


def np_normalize(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def np_isomax(f, p, t=1.0):
    return -np_distance(f, p) / t


def np_isomax_plus(f, p, s, t=1.0):
    return -abs(float(s)) * np_distance(np_normalize(f), np_normalize(p)) / t


def np_dismax(f, p, s, t=1.0):
    d = abs(float(s)) * np_distance(np_normalize(f), np_normalize(p)) / math.sqrt(2.0)
    return -(d + d.mean(1, keepdims=True)) / t


def _inputs(seed, b=5, c=4, d=6, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(b, d)).astype(dtype),
        rng.normal(size=(c, d)).astype(dtype),
        np.array([rng.uniform(0.5, 3.0)], dtype),
    )


class LogitsMatchNumpyTest(chex.TestCase):
    """Distances and the three logit maps against NumPy, eagerly, under jit and under pmap.

    ``with_pmap`` replicates the arguments to the 8 devices (chex's
    ``broadcast_args_to_devices``) and checks the first device's result.
    """

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    @parameterized.named_parameters(("exact", "exact"), ("matmul", "matmul"))
    def test_pairwise_distance(self, method):
        f, p, _ = _inputs(0)
        out = self.variant(functools.partial(pairwise_distance, method=method))(f, p)
        rtol = 1e-5 if method == "exact" else 1e-4
        np.testing.assert_allclose(out, np_distance(f, p), rtol=rtol, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_logits_float32(self):
        # The temperatures are traced under jit and pmap, concrete without jit.
        f, p, s = _inputs(1)
        np.testing.assert_allclose(
            self.variant(isomax_logits)(f, p, temperature=2.0), np_isomax(f, p, 2.0), rtol=1e-5
        )
        np.testing.assert_allclose(
            self.variant(isomax_plus_logits)(f, p, s, temperature=0.5),
            np_isomax_plus(f, p, s[0], 0.5),
            rtol=1e-5,
        )
        np.testing.assert_allclose(
            self.variant(dismax_logits)(f, p, s, temperature=3.0),
            np_dismax(f, p, s[0], 3.0),
            rtol=1e-5,
        )

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_logits_float64(self):
        with jax.enable_x64(True):
            f, p, s = _inputs(2, dtype=np.float64)
            for out, ref in [
                (self.variant(isomax_logits)(f, p), np_isomax(f, p)),
                (self.variant(isomax_plus_logits)(f, p, -s), np_isomax_plus(f, p, s[0])),
                (self.variant(dismax_logits)(f, p, s), np_dismax(f, p, s[0])),
            ]:
                assert out.dtype == jnp.float64
                np.testing.assert_allclose(out, ref, rtol=1e-10, atol=0)

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_bfloat16_inputs_give_float32(self):
        f, p, s = _inputs(8)
        out = self.variant(isomax_plus_logits)(f.astype(jnp.bfloat16), p.astype(jnp.bfloat16), s)
        assert out.dtype == jnp.float32
        ref = np_isomax_plus(
            np.asarray(f.astype(jnp.bfloat16), np.float64),
            np.asarray(p.astype(jnp.bfloat16), np.float64),
            s[0],
        )
        np.testing.assert_allclose(out, ref, rtol=1e-5)


def test_batched_equals_vmap():
    rng = np.random.default_rng(3)
    f = rng.normal(size=(3, 5, 6)).astype(np.float32)
    _, p, s = _inputs(3)
    batched = jax.jit(dismax_logits)(f.reshape(15, 6), p, s).reshape(3, 5, 4)
    mapped = jax.jit(jax.vmap(lambda x: dismax_logits(x, p, s)))(f)
    np.testing.assert_allclose(mapped, batched, rtol=1e-6)
    per_row = jax.jit(jax.vmap(lambda x: isomax_logits(x[None], p)[0]))(f[0])
    np.testing.assert_allclose(per_row, isomax_logits(f[0], p), rtol=1e-6)


@pytest.mark.parametrize("fn", ["isomax", "isomax_plus", "dismax"])
def test_check_grads_float64(fn):
    with jax.enable_x64(True):
        f, p, s = _inputs(4, b=3, c=4, d=5, dtype=np.float64)
        if fn == "isomax":
            check_grads(jax.jit(isomax_logits), (f, p), order=1, eps=1e-4)
        else:
            logits = jax.jit(isomax_plus_logits if fn == "isomax_plus" else dismax_logits)
            check_grads(logits, (f, p, s), order=1, eps=1e-4)


def test_gradient_zero_distance_is_zero_and_finite():
    p = jnp.array([[1.0, 2.0], [0.0, 0.0]])
    f = jnp.array([[1.0, 2.0]])  # exactly on prototype 0

    def loss(f, p):
        return jnp.sum(pairwise_distance(f, p)[:, 0])

    grad_f, grad_p = jax.jit(jax.grad(loss, argnums=(0, 1)))(f, p)
    np.testing.assert_array_equal(grad_f, 0.0)
    np.testing.assert_array_equal(grad_p, 0.0)
    # IsoMax at init: zero prototypes and a zero feature row.
    grads = jax.jit(jax.grad(lambda f, p: jnp.sum(isomax_logits(f, p)), argnums=(0, 1)))(
        jnp.zeros((2, 3)), jnp.zeros((4, 3))
    )
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)


def test_all_zero_feature_row_has_finite_gradients():
    f, p, s = _inputs(5)
    f[1] = 0.0
    for fn in (isomax_plus_logits, dismax_logits):
        grads = jax.jit(
            jax.grad(lambda f, p, s, fn=fn: jnp.sum(fn(f, p, s) ** 2), argnums=(0, 1, 2))
        )(f, p, s)
        for g in grads:
            assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(l2_normalize(f)[1], 0.0)


def test_distance_scale_gradient_zero_at_zero():
    f, p, _ = _inputs(6)
    grad = jax.grad(lambda s: jnp.sum(isomax_plus_logits(f, p, s)))(jnp.zeros(1))
    np.testing.assert_array_equal(grad, 0.0)
    grad = jax.grad(lambda s: jnp.sum(isomax_plus_logits(f, p, s)))(-jnp.ones(1))
    ref = np_distance(np_normalize(f), np_normalize(p)).sum()
    np.testing.assert_allclose(grad, [ref], rtol=1e-5)


def test_forward_mode_matches_reverse_mode():
    f, p, s = _inputs(7)
    jac_fwd = jax.jit(jax.jacfwd(dismax_logits, argnums=(0, 1, 2)))(f, p, s)
    jac_rev = jax.jit(jax.jacrev(dismax_logits, argnums=(0, 1, 2)))(f, p, s)
    for a, b in zip(jac_fwd, jac_rev, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_exact_distance_memory_has_no_batch_class_feature_term():
    """fwd+bwd temp memory of the exact head at B=256, C=1000, D=2048 vs an nn.Dense head.

    Budget above Dense: 16 [B, C] arrays, 2 [B, k, D] arrays (the recomputed pairs' exact
    differences and their cotangents) and 2 [C, D] arrays (normalised prototypes and their
    cotangent, IsoMax+/DisMax). A materialised difference would be B * C * D * 4 = 2 GiB.
    """
    b, c, d = 256, 1000, 2048
    k = distances.EXACT_PER_ROW
    f = jax.ShapeDtypeStruct((b, d), jnp.float32)
    p = jax.ShapeDtypeStruct((c, d), jnp.float32)
    s = jax.ShapeDtypeStruct((1,), jnp.float32)

    def temp_bytes(fn, *args):
        compiled = jax.jit(jax.grad(fn, argnums=tuple(range(len(args))))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    dense = temp_bytes(lambda f, w: jnp.sum(jnp.tanh(f @ w.T)), f, p)
    budget = dense + (16 * b * c + 2 * b * k * d + 2 * c * d) * 4
    assert budget < b * c * d * 4 / 40
    assert temp_bytes(lambda f, p: jnp.sum(jnp.tanh(isomax_logits(f, p))), f, p) <= budget
    assert temp_bytes(lambda f, p, s: jnp.sum(jnp.tanh(dismax_logits(f, p, s))), f, p, s) <= budget


def _adversarial_pairs(seed, d=256):
    """Feature/prototype sets on which the matrix-product form cancels badly."""
    rng = np.random.default_rng(seed)
    p = rng.normal(size=(6, d))
    u = rng.normal(size=(7, d))
    eps = np.array([0.0, 1e-6, 1e-4, 1e-2, 0.3, 1.0, 3.0])[:, None]
    cases = {
        # features at relative distance eps from prototype 0 (exactly on it for eps = 0)
        "near_one": (p[0] + eps * np.linalg.norm(p[0]) * u / np.linalg.norm(u, axis=1)[:, None], p),
        # two near-duplicate prototypes (k = 2 recomputed pairs per row suffice)
        "two_duplicates": (p[:3] + 1e-4 * u[:3], np.concatenate([p[:1], p[:1] + 1e-5 * u[3:4], p])),
        # three near-duplicates: more rejected entries than k, the whole matrix is recomputed
        "three_duplicates": (p[:2], np.concatenate([p[:1], p[:1], p[:1] + 1e-5 * u[:1], p[1:]])),
        # a large common offset: every pair cancels (||f|| + ||p|| >> d)
        "offset": (100.0 + rng.normal(size=(5, d)), 100.0 + rng.normal(size=(8, d))),
        # very different norms, no cancellation: the matrix product is kept everywhere
        "norms": (1e3 * rng.normal(size=(4, d)), 1e-2 * rng.normal(size=(9, d))),
    }
    return {name: (f.astype(np.float32), p.astype(np.float32)) for name, (f, p) in cases.items()}


CASES = [
    (case, case) for case in ("near_one", "two_duplicates", "three_duplicates", "offset", "norms")
]


class ExactDistanceMatchesNumpyTest(chex.TestCase):
    """The exact and matmul distances near d = 0 against float64, eagerly and under jit."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*CASES)
    def test_meets_the_written_error_bound(self, case):
        """Each entry within (K gamma_{D+3} + 2u) d of the float64 distance (float32 inputs)."""
        f, p = _adversarial_pairs(0)[case]
        ref = np_distance(f, p)
        u = np.finfo(np.float32).eps / 2
        n = f.shape[1] + 3
        bound = (distances.CANCELLATION_LIMIT * n * u / (1 - n * u) + 2 * u) * ref
        exact = np.asarray(self.variant(pairwise_distance)(f, p), np.float64)
        assert np.all(np.abs(exact - ref) <= bound), np.max(
            np.abs(exact - ref) / np.maximum(ref, 1e-30)
        )
        np.testing.assert_array_equal(exact[ref == 0], 0.0)
        matmul_fn = functools.partial(pairwise_distance, method="matmul")
        matmul = np.asarray(self.variant(matmul_fn)(f, p), np.float64)
        if case == "norms":  # no cancellation: the matrix-product form alone meets the bound too
            assert np.all(np.abs(matmul - ref) <= bound)
        else:  # the inputs are adversarial: the matrix-product form alone does not
            assert np.any(np.abs(matmul - ref) > bound)

    @chex.variants(with_jit=True, without_jit=True)
    def test_matmul_method_error_near_zero_distance(self):
        """Documents the matmul form's loss of precision near d = 0 (float32, unit vectors)."""
        rng = np.random.default_rng(9)
        p = np_normalize(rng.normal(size=(8, 512))).astype(np.float32)
        f = np.concatenate([p[:4], np_normalize(rng.normal(size=(4, 512)))]).astype(np.float32)
        exact = self.variant(functools.partial(pairwise_distance, method="exact"))(f, p)
        matmul = self.variant(functools.partial(pairwise_distance, method="matmul"))(f, p)
        ref = np_distance(f, p)
        np.testing.assert_allclose(exact, ref, rtol=1e-6, atol=1e-6)
        near = np.abs(np.asarray(matmul) - ref)[np.arange(4), np.arange(4)]
        far = np.abs(np.asarray(matmul) - ref)[4:]
        assert np.all(np.asarray(exact)[np.arange(4), np.arange(4)] == 0.0)
        assert far.max() < 1e-5
        assert near.max() < 2e-3  # documented bound in `pairwise_distance`

    @chex.variants(with_jit=True, without_jit=True)
    def test_float64_near_duplicates(self):
        with jax.enable_x64(True):
            for case, (f, p) in _adversarial_pairs(1).items():
                f, p = f.astype(np.float64), p.astype(np.float64)
                out = self.variant(pairwise_distance)(f, p)
                assert out.dtype == jnp.float64
                np.testing.assert_allclose(out, np_distance(f, p), rtol=1e-10, atol=0, err_msg=case)


def test_exact_distance_under_vmap_and_with_one_class():
    f, p = _adversarial_pairs(2)["three_duplicates"]
    mapped = jax.jit(jax.vmap(lambda x: pairwise_distance(x[None], p)[0]))(f)
    np.testing.assert_allclose(mapped, np_distance(f, p), rtol=1e-6, atol=0)
    np.testing.assert_allclose(pairwise_distance(f, p[:1]), np_distance(f, p[:1]), rtol=1e-6)


def test_head_matrix_products_run_at_highest_precision():
    f, p, s = _inputs(12)

    def dots(fn, *args):
        jaxpr = jax.make_jaxpr(fn)(*args)
        found = []

        def walk(jaxpr):
            for eqn in jaxpr.eqns:
                if eqn.primitive.name == "dot_general":
                    found.append(eqn.params["precision"])
                for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                    walk(sub)

        walk(jaxpr.jaxpr)
        return found

    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    for method in ("exact", "matmul"):
        forward = dots(functools.partial(isomax_logits, method=method), f, p)
        loss = functools.partial(
            lambda f, p, s, m: jnp.sum(dismax_logits(f, p, s, method=m)), m=method
        )
        backward = dots(jax.grad(loss, argnums=(0, 1)), f, p, s)
        assert forward and backward
        assert all(precision == highest for precision in forward + backward)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), np.ones(2), "warm"])
def test_temperature_must_be_finite_and_positive(bad):
    f, p, s = _inputs(13)
    error = TypeError if isinstance(bad, str) else ValueError
    for call in (
        lambda: isomax_logits(f, p, temperature=bad),
        lambda: isomax_plus_logits(f, p, s, temperature=bad),
        lambda: dismax_logits(f, p, s, temperature=bad),
        lambda: scores.energy(f, temperature=bad),
        lambda: validation.check_temperature(bad),
    ):
        with pytest.raises(error, match="`temperature`"):
            call()
    # A traced temperature cannot be checked; a valid one works under jit.
    logits = jax.jit(lambda t: isomax_logits(f, p, temperature=t))(2.0)
    np.testing.assert_allclose(logits, np_isomax(f, p, 2.0), rtol=1e-5)


def test_sign_flipped_temperature_no_longer_silent():
    """Issue 13: ``isomax_logits(f, P, temperature=-1.0)`` returned sign-flipped logits."""
    f, p, _ = _inputs(14)
    with pytest.raises(ValueError, match="`temperature` must be a finite number > 0; got -1.0"):
        isomax_logits(f, p, temperature=-1.0)


@pytest.mark.parametrize("bad", [-1.0, 0.0, np.inf, np.nan])
def test_traced_bad_temperature_gives_nan_everywhere(bad):
    """Issue 22.8: under jit, temperature=-1 gave sign-flipped logits and a NaN-free energy of
    them; one check (validation.check_temperature) now makes every result NaN."""
    f, p, s = _inputs(15)
    z = jnp.asarray(f[:, :4])
    labels = jnp.arange(f.shape[0]) % 4
    linen = heads.IsoMaxPlusHead(num_classes=4)
    variables = linen.init(jax.random.key(0), f)
    calls = {
        "isomax_logits": lambda t: isomax_logits(f, p, temperature=t),
        "isomax_plus_logits": lambda t: isomax_plus_logits(f, p, s, temperature=t),
        "dismax_logits": lambda t: dismax_logits(f, p, s, temperature=t),
        "energy": lambda t: scores.energy(z, temperature=t),
        "linen head": lambda t: linen.clone(temperature=t).apply(variables, f),
        "softmax head": lambda t: heads.SoftMaxHead(4, temperature=t).apply(
            heads.SoftMaxHead(4).init(jax.random.key(1), f), f
        ),
        "ece": lambda t: calibration.expected_calibration_error(z, labels, temperature=t),
    }
    for name, call in calls.items():
        out = np.asarray(jax.jit(call)(bad))
        assert np.all(np.isnan(out)), name
        assert np.all(np.isfinite(np.asarray(jax.jit(call)(1.5)))), name


def test_bad_inputs():
    f, p, s = _inputs(10)
    with pytest.raises(ValueError, match=r"`features`.*\[batch, features\].*\(6,\)"):
        isomax_logits(f[0], p)
    with pytest.raises(ValueError, match=r"`prototypes` has shape \(4, 5\)"):
        isomax_logits(f, p[:, :5])
    with pytest.raises(TypeError, match="`features` must have a floating-point dtype"):
        isomax_logits(f.astype(np.int32), p)
    with pytest.raises(ValueError, match="`distance_scale`.*got \\(2,\\)"):
        dismax_logits(f, p, np.ones(2, np.float32))
    with pytest.raises(ValueError, match="`method`"):
        pairwise_distance(f, p, method="cdist")
    with pytest.raises(ValueError, match="`features`"):
        jax.jit(isomax_logits)(f[None], p)


def test_safe_helpers():
    assert float(jax.grad(distances.safe_sqrt)(0.0)) == 0.0
    assert float(jax.grad(distances.safe_abs)(0.0)) == 0.0
    assert float(jax.grad(distances.safe_abs)(3.0)) == 1.0


def _assert_gradients_match_float64(f, p, weights):
    """Gradients of ``sum(weights * pairwise_distance(f, p))`` against float64 unit differences."""

    def loss(f, p):
        return jnp.sum(weights * pairwise_distance(f, p))

    grad_f, grad_p = jax.jit(jax.grad(loss, argnums=(0, 1)))(f, p)
    diff = f.astype(np.float64)[:, None, :] - p.astype(np.float64)[None, :, :]
    unit = diff / np.linalg.norm(diff, axis=-1, keepdims=True)
    ref_f = np.einsum("ij,ijk->ik", weights, unit)
    ref_p = -np.einsum("ij,ijk->jk", weights, unit)
    for got, ref in ((grad_f, ref_f), (grad_p, ref_p)):
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_exact_gradient_accurate_near_a_prototype():
    """The nearest-prototype term uses exact differences: no cancellation as d -> 0."""
    rng = np.random.default_rng(11)
    p = rng.normal(size=(6, 256)).astype(np.float32)
    u = rng.normal(size=(3, 256))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    norm = np.linalg.norm(p[0])
    f = (p[[0, 1, 2]] + np.array([[1e-2], [1e-3], [1e-4]]) * norm * u).astype(np.float32)
    weights = rng.normal(size=(3, 6))

    _assert_gradients_match_float64(f, p, weights)


def test_exact_gradient_accurate_near_two_duplicate_prototypes():
    """Both near-duplicate prototypes of a feature get exact-difference derivatives (k = 2)."""
    rng = np.random.default_rng(15)
    p = rng.normal(size=(5, 128))
    u = rng.normal(size=(3, 128))
    p = np.concatenate([p[:1], p[:1] + 1e-3 * u[:1], p[1:]]).astype(np.float32)
    f = (p[:1] + 1e-3 * u[1:]).astype(np.float32)
    weights = rng.normal(size=(2, 6))

    _assert_gradients_match_float64(f, p, weights)
