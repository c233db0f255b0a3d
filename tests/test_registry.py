"""The registry is the one table of heads: every other layer reads it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from isomax_jax import detectors, heads, losses, registry, train
from isomax_jax.models import get_model, make_head


@pytest.mark.parametrize("name", registry.HEAD_NAMES)
def test_each_head_spec_builds_its_head_and_loss(name, key):
    spec = registry.head(name)
    module = spec.linen(5, name="classifier", temperature=2.0)
    assert type(module) is getattr(heads, spec.linen_class) and module.temperature == 2.0
    assert type(make_head(name, num_classes=5)) is type(module)
    assert type(get_model("small_resnet", num_classes=5, head=name).classifier) is type(module)
    logits = jax.random.normal(key, (6, 5))
    labels = jnp.arange(6) % 5
    want = (
        losses.isomax_loss(logits, labels, entropic_scale=10.0)
        if name != "softmax"
        else optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    )
    got = train.per_example_loss(logits, labels, loss=train.LossConfig(name))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(spec.loss(logits, labels), want)
    for score in spec.paper_scores:
        assert detectors.get(score).applies_to(name)


def test_detector_heads_come_from_the_registry():
    assert detectors.HEADS == registry.HEAD_NAMES
    distance = {n for n, s in registry.HEADS.items() if s.distance_logits}
    assert registry.DISTANCE_HEADS == distance == {"isomax", "isomax_plus", "dismax"}
    assert {h for h in registry.HEAD_NAMES if detectors.get("mmles").applies_to(h)} == distance


def test_one_message_for_an_unknown_head():
    message = "`head` must be one of softmax, isomax, isomax_plus, dismax; got 'isomax+'."
    for call in (
        lambda: registry.head("isomax+"),
        lambda: get_model("small_resnet", num_classes=3, head="isomax+"),
        lambda: train.LossConfig("isomax+"),
        lambda: detectors.get("msp").applies_to("isomax+"),
    ):
        with pytest.raises(ValueError, match=message.replace("+", r"\+").replace(".", r"\.")):
            call()
