"""Tests of the Flax NNX heads: same parameters and outputs as the Linen heads."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from isomax_jax import distances, heads, losses
from isomax_jax import nnx as isomax_nnx

PAIRS = {
    "isomax": (isomax_nnx.IsoMaxHead, heads.IsoMaxHead),
    "isomax_plus": (isomax_nnx.IsoMaxPlusHead, heads.IsoMaxPlusHead),
    "dismax": (isomax_nnx.DisMaxHead, heads.DisMaxHead),
}


@pytest.mark.parametrize("name", list(PAIRS))
def test_same_params_and_outputs_as_linen(name, key):
    nnx_cls, linen_cls = PAIRS[name]
    head = nnx_cls(8, 3, temperature=2.0, rngs=nnx.Rngs(0))
    params = nnx.state(head, nnx.Param)
    linen_params = linen_cls(3).init(key, jnp.ones((1, 8)))["params"]
    chex.assert_trees_all_equal_shapes(nnx.to_pure_dict(params), linen_params)
    if name != "isomax":
        np.testing.assert_array_equal(head.distance_scale[...], [1.0])
        head.prototypes[...] = jax.random.normal(jax.random.key(4), (3, 8))
    else:
        np.testing.assert_array_equal(head.prototypes[...], 0.0)
        head.prototypes[...] = jax.random.normal(jax.random.key(4), (3, 8))
    features = jax.random.normal(key, (5, 8))
    linen = linen_cls(3, temperature=2.0)
    expected = linen.apply({"params": nnx.to_pure_dict(nnx.state(head, nnx.Param))}, features)
    np.testing.assert_allclose(head(features), expected, rtol=1e-6, atol=1e-7)
    if name == "dismax":
        ref = distances.dismax_logits(
            features, head.prototypes[...], head.distance_scale[...], temperature=2.0
        )
        np.testing.assert_allclose(head(features), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(PAIRS))
def test_nnx_training_step_is_finite_and_decreases_loss(name, key):
    nnx_cls, _ = PAIRS[name]
    model = nnx_cls(6, 4, rngs=nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)
    x = jax.random.normal(key, (16, 6))
    y = jnp.arange(16) % 4

    def loss_fn(model):
        return jnp.mean(losses.isomax_loss(model(x), y, entropic_scale=1.0))

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss, grads

    first, grads = step(model, optimizer)
    chex.assert_tree_all_finite(grads)
    for _ in range(15):
        last, _ = step(model, optimizer)
    assert last < first
    assert set(nnx.to_pure_dict(nnx.state(model, nnx.Param))) <= {"prototypes", "distance_scale"}


def test_bad_sizes_and_features():
    with pytest.raises(ValueError, match="`num_classes` must be a positive int"):
        isomax_nnx.IsoMaxHead(4, 0)
    head = isomax_nnx.DisMaxHead(4, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"`prototypes` has shape \(3, 4\)"):
        head(jnp.ones((2, 5)))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_temperature_must_be_finite_and_positive(bad):
    for nnx_cls, _ in PAIRS.values():
        with pytest.raises(ValueError, match="`temperature`"):
            nnx_cls(4, 3, temperature=bad, rngs=nnx.Rngs(0))
        head = nnx_cls(4, 3, rngs=nnx.Rngs(0))
        head.temperature = bad  # set after construction: refused when called
        with pytest.raises(ValueError, match="`temperature`"):
            head(jnp.ones((2, 4)))


def test_missing_rngs_named_and_signature_shown():
    """Issue 22.7: without rngs the error named a private class; the signature was
    (*args, **kwargs)."""
    import inspect

    for cls in (isomax_nnx.IsoMaxPlusHead, isomax_nnx.DisMaxHead):
        with pytest.raises(TypeError, match=rf"{cls.__name__} needs `rngs`, an nnx.Rngs"):
            cls(8, 3)
        params = list(inspect.signature(cls).parameters)
        assert params[:2] == ["num_features", "num_classes"] and "rngs" in params
    assert isomax_nnx.IsoMaxHead(8, 3).prototypes.shape == (3, 8)  # zeros: no rngs needed
