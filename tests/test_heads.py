"""Tests of the Flax Linen heads: parameters, initialisers, equality with the pure functions."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isomax_jax import distances, heads, losses

HEADS = {
    "isomax": heads.IsoMaxHead,
    "isomax_plus": heads.IsoMaxPlusHead,
    "dismax": heads.DisMaxHead,
}


def _pure(name, params, features, temperature=1.0, method="exact"):
    if name == "isomax":
        return distances.isomax_logits(
            features, params["prototypes"], temperature=temperature, method=method
        )
    fn = distances.isomax_plus_logits if name == "isomax_plus" else distances.dismax_logits
    return fn(
        features,
        params["prototypes"],
        params["distance_scale"],
        temperature=temperature,
        method=method,
    )


@pytest.mark.parametrize("name", list(HEADS))
def test_params_shapes_and_initialisers(name, key):
    head = HEADS[name](num_classes=50)
    variables = head.init(key, jnp.ones((2, 40)))
    assert set(variables) == {"params"}
    params = variables["params"]
    assert params["prototypes"].shape == (50, 40)
    if name == "isomax":
        assert set(params) == {"prototypes"}
        np.testing.assert_array_equal(params["prototypes"], 0.0)
    else:
        assert set(params) == {"prototypes", "distance_scale"}
        np.testing.assert_array_equal(params["distance_scale"], [1.0])
        protos = np.asarray(params["prototypes"])
        assert abs(protos.mean()) < 0.05 and abs(protos.std() - 1.0) < 0.05


@pytest.mark.parametrize("name", list(HEADS))
@pytest.mark.parametrize("method", ["exact", "matmul"])
def test_apply_equals_pure_function(name, method, key):
    features = jax.random.normal(key, (4, 8))
    head = HEADS[name](num_classes=3, temperature=1.5, method=method)
    params = head.init(jax.random.key(1), features)["params"]
    if name == "isomax":  # move off the all-zero init so the test is informative
        params = {"prototypes": jax.random.normal(jax.random.key(2), (3, 8))}
    out = jax.jit(head.apply)({"params": params}, features)
    pure = jax.jit(lambda p, f: _pure(name, p, f, 1.5, method))(params, features)
    np.testing.assert_allclose(out, pure, rtol=1e-6, atol=1e-7)
    assert out.shape == (4, 3) and out.dtype == jnp.float32


class _Classifier(nn.Module):
    head: str

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x))
        if self.head == "dense":
            return nn.Dense(5, name="classifier")(x)
        return HEADS[self.head](5, name="classifier")(x)


@pytest.mark.parametrize("name", ["dense", *HEADS])
def test_drop_in_replacement_trains(name, key):
    x = jax.random.normal(key, (16, 12))
    y = jnp.arange(16) % 5
    model = _Classifier(name)
    params = model.init(jax.random.key(3), x)["params"]

    @jax.jit
    def loss_fn(params):
        logits = model.apply({"params": params}, x)
        return jnp.mean(losses.isomax_loss(logits, y, entropic_scale=1.0))

    @jax.jit
    def step(params):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), loss, grads

    params, initial, grads = step(params)
    chex.assert_tree_all_finite(grads)
    for _ in range(10):
        params, loss, grads = step(params)
        chex.assert_tree_all_finite(grads)
    assert loss < initial


def test_bfloat16_features_and_param_dtype(key):
    head = heads.DisMaxHead(num_classes=3, param_dtype=jnp.float64)
    with jax.enable_x64(True):
        variables = head.init(key, jnp.ones((2, 4)))
        assert variables["params"]["prototypes"].dtype == jnp.float64
        assert head.apply(variables, jnp.ones((2, 4))).dtype == jnp.float64
    head = heads.IsoMaxPlusHead(num_classes=3)
    variables = head.init(key, jnp.ones((2, 4), jnp.bfloat16))
    assert head.apply(variables, jnp.ones((2, 4), jnp.bfloat16)).dtype == jnp.float32


def test_bad_feature_shapes(key):
    head = heads.IsoMaxHead(num_classes=3)
    with pytest.raises(ValueError, match=r"`features` must have rank 2"):
        head.init(key, jnp.ones((2, 4, 4)))
    variables = head.init(key, jnp.ones((2, 4)))
    with pytest.raises(
        ValueError, match=r"`features` must have shape \[batch, 4\] .*\(3, 4\)\); got \(2, 5\)"
    ):
        head.apply(variables, jnp.ones((2, 5)))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_temperature_must_be_finite_and_positive(bad, key):
    from isomax_jax.models import SoftMaxHead

    features = jnp.ones((2, 4))
    for cls in (*HEADS.values(), SoftMaxHead):
        variables = cls(num_classes=3).init(key, features)
        with pytest.raises(ValueError, match="`temperature`"):
            cls(num_classes=3, temperature=bad).apply(variables, features)
        # Calibration's clone(temperature=...) path is checked as well.
        with pytest.raises(ValueError, match="`temperature`"):
            cls(num_classes=3).clone(temperature=bad).apply(variables, features)


def test_num_classes_must_be_a_positive_int(key):
    """Issue 22.7: Linen heads accepted num_classes=0 (NNX and get_model refused it)."""
    for cls in (*HEADS.values(), heads.SoftMaxHead):
        for bad in (0, -3, True, 2.0):
            with pytest.raises(ValueError, match="`num_classes` must be a positive int"):
                cls(num_classes=bad)
    features = jnp.ones((2, 4))
    variables = heads.SoftMaxHead(3).init(key, features)
    with pytest.raises(ValueError, match=r"`features` must have shape \[batch, 4\] .*\(2, 5\)"):
        heads.SoftMaxHead(3).apply(variables, jnp.ones((2, 5)))
