"""Tests for isomax_jax.models: shapes, heads, parameter counts, initialisers, bad input.

Big models are only traced abstractly (``jax.eval_shape``); real forwards use ``small_resnet``.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isomax_jax import heads
from isomax_jax.models import BACKBONES, HEADS, SoftMaxHead, feature_dim, get_model, layers
from isomax_jax.models.densenet import DenseNetBC
from isomax_jax.models.layers import BatchNorm
from isomax_jax.models.resnet import BasicBlock, CifarResNet
from isomax_jax.models.wide_resnet import WideResNet

PAPER_BACKBONE_PARAMS = {
    "densenet_bc100": 765_732,
    "resnet110": 1_727_312,
    "resnet34": 21_276_992,
    "wrn28_10": 36_482_880,
}


def _abstract_variables(model, batch=2):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((batch, 32, 32, 3)))


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", sorted(PAPER_BACKBONE_PARAMS))
def test_backbone_parameter_counts_and_feature_dims(name):
    num_classes = 10
    dim = feature_dim(name)
    variables = _abstract_variables(get_model(name, num_classes=num_classes, head="isomax_plus"))
    assert _count(variables["params"]["backbone"]) == PAPER_BACKBONE_PARAMS[name]
    # Running statistics are batch_stats, not params; one (mean, var) per BN scale.
    bn_scales = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
        if path[-1].key == "scale"
    ]
    assert _count(variables["batch_stats"]) == 2 * _count(bn_scales)
    assert _count(variables["params"]["classifier"]) == num_classes * dim + 1
    out = jax.eval_shape(
        lambda v, x: get_model(name, num_classes=num_classes, head="isomax_plus").apply(
            v, x, return_features=True
        ),
        variables,
        jnp.zeros((2, 32, 32, 3)),
    )
    assert out[0].shape == (2, num_classes) and out[1].shape == (2, dim)


@pytest.mark.parametrize(
    "head, extra", [("softmax", 10), ("isomax", 0), ("isomax_plus", 1), ("dismax", 1)]
)
def test_head_parameter_counts(head, extra):
    variables = _abstract_variables(get_model("resnet110", num_classes=10, head=head))
    assert _count(variables["params"]["classifier"]) == 10 * 64 + extra


def test_head_types_and_param_shapes():
    expected = {
        "softmax": (SoftMaxHead, {"kernel": (128, 7), "bias": (7,)}),
        "isomax": (heads.IsoMaxHead, {"prototypes": (7, 128)}),
        "isomax_plus": (heads.IsoMaxPlusHead, {"prototypes": (7, 128), "distance_scale": (1,)}),
        "dismax": (heads.DisMaxHead, {"prototypes": (7, 128), "distance_scale": (1,)}),
    }
    for head, (cls, shapes) in expected.items():
        model = get_model("small_resnet", num_classes=7, head=head)
        assert isinstance(model.classifier, cls) and model.classifier.name == "classifier"
        params = _abstract_variables(model)["params"]["classifier"]
        assert {k: v.shape for k, v in params.items()} == shapes


def test_small_resnet_forward_train_and_eval():
    model = get_model("small_resnet", num_classes=10, head="isomax_plus")
    images = 3.0 + jax.random.normal(jax.random.key(1), (8, 32, 32, 3))

    @jax.jit
    def run(key, images):
        variables = model.init(key, images)
        logits, features = model.apply(variables, images, return_features=True)
        head_logits = model.classifier.apply(
            {"params": variables["params"]["classifier"]}, features
        )
        _, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
        kernel = variables["params"]["backbone"]["conv1"]["kernel"]
        stem = jax.lax.conv_general_dilated(
            images, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        one = model.apply(variables, images[:1])
        stats = (variables["batch_stats"], updates["batch_stats"])
        return logits, features, head_logits, stats, stem, one, variables["params"]

    logits, features, head_logits, (old, new), stem, one, params = run(jax.random.key(0), images)
    # Initialisers: Kaiming normal (not truncated), fan_out = 3 * 3 * 128, ReLU gain; BN 1 / 0.
    kernel = np.asarray(params["backbone"]["layer3_0"]["conv2"]["kernel"])
    std = np.sqrt(2.0 / (3 * 3 * 128))
    assert kernel.shape == (3, 3, 128, 128)
    assert kernel.std() == pytest.approx(std, rel=0.01)
    assert abs(kernel.mean()) < 0.01 * std
    assert np.abs(kernel).max() > 3.5 * std  # a truncated normal would stop at 2 std
    np.testing.assert_array_equal(params["backbone"]["layer3_0"]["bn2"]["scale"], np.ones(128))
    np.testing.assert_array_equal(params["backbone"]["layer3_0"]["bn2"]["bias"], np.zeros(128))
    np.testing.assert_array_equal(params["classifier"]["distance_scale"], np.ones(1))
    assert logits.shape == (8, 10) and features.shape == (8, 128)
    assert np.all(np.isfinite(logits)) and np.all(np.isfinite(features))
    # The head applied to the returned features gives the returned logits.
    np.testing.assert_allclose(logits, head_logits, rtol=1e-6, atol=1e-6)
    # Eval mode uses running averages: an example's logits do not depend on the batch.
    np.testing.assert_allclose(one, logits[:1], rtol=1e-5, atol=1e-5)
    old, new = old["backbone"]["bn1"], new["backbone"]["bn1"]
    # Running mean moves 10% of the way to the batch mean (torch momentum 0.1); the running
    # variance likewise, towards the unbiased batch variance as in torch.
    np.testing.assert_allclose(
        new["mean"], 0.9 * old["mean"] + 0.1 * stem.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        new["var"], 0.9 * old["var"] + 0.1 * stem.var(axis=(0, 1, 2), ddof=1), rtol=1e-4, atol=1e-6
    )


def test_zero_init_last_bn():
    # ResNet-34's blocks start with the last BN scale at zero; the others at one.
    norm = functools.partial(BatchNorm, use_running_average=True)
    block = BasicBlock(
        8, conv=layers.conv, norm=norm, stride=2, shortcut="projection", zero_init_last_bn=True
    )
    params = jax.jit(block.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 4)))["params"]
    np.testing.assert_array_equal(params["bn2"]["scale"], np.zeros(8))
    np.testing.assert_array_equal(params["bn1"]["scale"], np.ones(8))
    np.testing.assert_array_equal(params["shortcut_1"]["scale"], np.ones(8))
    resnet34 = get_model("resnet34", num_classes=10, head="isomax").backbone
    assert resnet34.zero_init_last_bn
    assert not get_model("resnet110", num_classes=10, head="isomax").backbone.zero_init_last_bn


def test_softmax_head_init_matches_reference_distribution():
    head = SoftMaxHead(num_classes=50)
    params = head.init(jax.random.key(0), jnp.ones((1, 400)))["params"]
    bound = np.sqrt(1.0 / 400)
    kernel = np.asarray(params["kernel"])
    assert kernel.min() >= -bound and kernel.max() <= bound
    assert kernel.std() == pytest.approx(bound / np.sqrt(3.0), rel=0.05)
    np.testing.assert_array_equal(params["bias"], np.zeros(50))


@pytest.mark.parametrize("head", HEADS)
def test_temperature_divides_logits(head):
    features = jax.random.normal(jax.random.key(1), (3, 16))
    cold = get_model("small_resnet", num_classes=4, head=head).classifier
    hot = get_model("small_resnet", num_classes=4, head=head, temperature=2.0).classifier
    variables = cold.init(jax.random.key(0), features)
    np.testing.assert_allclose(
        hot.apply(variables, features), cold.apply(variables, features) / 2.0, rtol=1e-6
    )


def test_unknown_name_head_and_bad_num_classes():
    with pytest.raises(ValueError, match="densenet_bc100.*resnet110.*resnet34.*wrn28_10"):
        get_model("resnet50", num_classes=10, head="isomax")
    with pytest.raises(ValueError, match="softmax.*isomax.*isomax_plus.*dismax"):
        get_model("resnet34", num_classes=10, head="arcface")
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="num_classes"):
            get_model("resnet34", num_classes=bad, head="isomax")
    with pytest.raises(ValueError, match="name"):
        feature_dim("vgg16")
    assert sorted(BACKBONES) == sorted([*PAPER_BACKBONE_PARAMS, "small_resnet"])


def test_bad_images():
    model = get_model("small_resnet", num_classes=10, head="isomax")
    variables = _abstract_variables(model, batch=1)

    def apply(images):
        return jax.eval_shape(model.apply, variables, images)

    with pytest.raises(
        ValueError, match=r"`images`.*\[batch, height, width, 3\].*\(2, 3, 32, 32\)"
    ):
        apply(jnp.zeros((2, 3, 32, 32)))  # NCHW
    with pytest.raises(ValueError, match=r"`images`.*\(32, 32, 3\)"):
        apply(jnp.zeros((32, 32, 3)))
    with pytest.raises(TypeError, match=r"`images`.*uint8"):
        apply(jnp.zeros((1, 32, 32, 3), jnp.uint8))


@pytest.mark.parametrize(
    "backbone",
    [
        CifarResNet(stage_sizes=(1, 1), widths=(8, 16), stem_width=8, shortcut="zero_pad"),
        DenseNetBC(depth=10, growth_rate=4),
        WideResNet(depth=10, widen_factor=1),
    ],
    ids=["resnet", "densenet", "wide_resnet"],
)
def test_pmap_batch_norm_axis_name_gives_global_batch_statistics(backbone):
    # With bn_axis_name, a pmapped train-mode forward over 8 devices equals the forward on
    # the whole batch: same features and same running-statistics update.
    images = jax.random.normal(jax.random.key(1), (16, 8, 8, 3))
    variables = jax.jit(lambda k: backbone.init(k, images[:2], train=False))(jax.random.key(0))
    whole, want = backbone.apply(variables, images, train=True, mutable=["batch_stats"])
    synced = backbone.clone(bn_axis_name="batch")
    pmapped = jax.pmap(
        lambda x: synced.apply(variables, x, train=True, mutable=["batch_stats"]),
        axis_name="batch",
    )
    parts, got = pmapped(images.reshape(8, 2, 8, 8, 3))
    np.testing.assert_allclose(parts.reshape(whole.shape), whole, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], got), want, rtol=1e-4, atol=1e-6)
    model = get_model("small_resnet", num_classes=10, head="isomax", bn_axis_name="batch")
    assert model.backbone.bn_axis_name == "batch"
