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
from isomax_jax.models.torchvision_resnet import Bottleneck, TorchvisionResNet
from isomax_jax.models.vit import VisionTransformer
from isomax_jax.models.wide_resnet import WideResNet

PAPER_BACKBONE_PARAMS = {
    "densenet_bc100": 765_732,
    "resnet110": 1_727_312,
    "resnet34": 21_276_992,
    "wrn28_10": 36_482_880,
}


#: torchvision's parameter counts without the classifier (sum over ``model.parameters()`` of
#: ``torchvision.models.<name>()`` minus ``fc`` / ``heads``) and feature dimensions.
TV_BACKBONES = {
    "tv_resnet18": (11_176_512, 512),
    "tv_resnet34": (21_284_672, 512),
    "tv_resnet50": (23_508_032, 2048),
    "tv_resnet101": (42_500_160, 2048),
    "tv_resnet152": (58_143_808, 2048),
    "tv_vit_b_16": (85_798_656, 768),
}
SMALL_VIT = {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 4}
SMALL_VIT_WIDTHS = {"hidden_dim": 32, "mlp_dim": 64}


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
    assert sorted(BACKBONES) == sorted([*PAPER_BACKBONE_PARAMS, "small_resnet", *TV_BACKBONES])


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


# ---- torchvision architectures (issue 18.1) ---------------------------------------------------


@pytest.mark.parametrize("name", sorted(TV_BACKBONES))
def test_torchvision_backbones_with_every_head(name):
    """Parameter counts are torchvision's; every head sits on the features (ImageNet size)."""
    count, dim = TV_BACKBONES[name]
    assert feature_dim(name) == dim
    images = jnp.zeros((2, 224, 224, 3))
    for head in HEADS:
        model = get_model(name, num_classes=1000, head=head)
        variables = jax.eval_shape(model.init, jax.random.key(0), images)
        assert _count(variables["params"]["backbone"]) == count
        logits, features = jax.eval_shape(
            lambda v, x, m=model: m.apply(v, x, return_features=True), variables, images
        )
        assert logits.shape == (2, 1000) and features.shape == (2, dim)
        assert logits.dtype == features.dtype == jnp.float32
    if name == "tv_vit_b_16":
        assert "batch_stats" not in variables  # LayerNorm only
    else:
        bn_scales = [
            leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
            if path[-1].key == "scale"
        ]
        assert _count(variables["batch_stats"]) == 2 * _count(bn_scales)


def test_torchvision_resnet_layout_and_padding():
    """V1.5 (stride in the 3×3 conv), ``downsample`` shortcuts, and torch's explicit padding:
    the stem equals a conv padded (3, 3) on both sides, which "SAME" would not at stride 2."""
    model = get_model("tv_resnet50", num_classes=10, head="softmax")
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    block = abstract["params"]["backbone"]["layer2_0"]
    assert sorted(block) == ["bn1", "bn2", "bn3", "conv1", "conv2", "conv3", "downsample_0",
                             "downsample_1"]  # fmt: skip
    assert block["conv1"]["kernel"].shape == (1, 1, 256, 128)
    assert block["conv2"]["kernel"].shape == (3, 3, 128, 128)
    assert block["downsample_0"]["kernel"].shape == (1, 1, 256, 512)
    assert "downsample_0" not in abstract["params"]["backbone"]["layer2_1"]

    backbone = TorchvisionResNet(stage_sizes=(1, 1, 1, 1), block=Bottleneck)
    images = jax.random.normal(jax.random.key(1), (1, 32, 32, 3))  # even: "SAME" pads (2, 3)
    variables = _random_variables(backbone, images)
    _, state = backbone.apply(variables, images, capture_intermediates=True)
    captured = state["intermediates"]
    kernel = variables["params"]["conv1"]["kernel"]
    numbers = ("NHWC", "HWIO", "NHWC")
    want = jax.lax.conv_general_dilated(
        images, kernel, (2, 2), ((3, 3), (3, 3)), None, None, numbers
    )
    same = jax.lax.conv_general_dilated(images, kernel, (2, 2), "SAME", None, None, numbers)
    got = captured["conv1"]["__call__"][0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert not np.allclose(got, same, rtol=1e-3, atol=1e-3)
    # V1.5: the first 1×1 keeps the resolution, the 3×3 halves it (8×8 after the max-pool).
    layer2 = captured["layer2_0"]
    assert layer2["conv1"]["__call__"][0].shape == (1, 8, 8, 128)
    assert layer2["conv2"]["__call__"][0].shape == (1, 4, 4, 128)
    assert layer2["downsample_0"]["__call__"][0].shape == (1, 4, 4, 512)


def _random_variables(module, images, seed=0):
    """Random variables in ``module``'s structure without running its (slow) initialisers:
    kernels ``N(0, 1 / fan_in)``, BatchNorm variances ``U(0.5, 1.5)``, the rest ``N(0, 0.1)``."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), images)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if path[-1].key == "var":
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        std = 1 / np.sqrt(np.prod(leaf.shape[:-1])) if path[-1].key == "kernel" else 0.1
        return (std * rng.normal(size=leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _small_vit(**fields):
    return VisionTransformer(**{**SMALL_VIT, **SMALL_VIT_WIDTHS, **fields})


def test_vision_transformer_forward_and_names():
    backbone = _small_vit(num_layers=1)
    images = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    variables = jax.jit(backbone.init)(jax.random.key(0), images)
    params = variables["params"]
    assert sorted(params) == ["class_token", "conv_proj", "encoder"]
    assert params["encoder"]["pos_embedding"].shape == (1, 17, 32)  # 4 × 4 patches + class
    block = params["encoder"]["layers"]["encoder_layer_0"]
    assert sorted(block) == ["ln_1", "ln_2", "mlp_0", "mlp_3", "self_attention"]
    assert block["self_attention"]["in_proj"]["kernel"].shape == (32, 96)
    assert "batch_stats" not in variables
    # torchvision's initialisation: zero class token and in_proj bias, N(0, 0.02) positions.
    np.testing.assert_array_equal(params["class_token"], np.zeros((1, 1, 32)))
    np.testing.assert_array_equal(block["self_attention"]["in_proj"]["bias"], np.zeros(96))
    assert float(np.std(params["encoder"]["pos_embedding"])) == pytest.approx(0.02, rel=0.2)
    features = backbone.apply(variables, images)
    assert features.shape == (3, 32) and features.dtype == jnp.float32
    # No dropout or BatchNorm: train mode is eval mode, and examples are independent.
    np.testing.assert_array_equal(backbone.apply(variables, images, train=True), features)
    np.testing.assert_allclose(
        backbone.apply(variables, images[:1]), features[:1], rtol=1e-5, atol=1e-5
    )


def test_vision_transformer_refuses_other_image_sizes():
    backbone = _small_vit()
    with pytest.raises(ValueError, match=r"`images` must be 32×32.*got 64×64"):
        jax.eval_shape(backbone.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    with pytest.raises(ValueError, match="`images` must be 224×224"):
        model = get_model("tv_vit_b_16", num_classes=10, head="isomax")
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


@pytest.mark.parametrize(
    "backbone",
    [TorchvisionResNet(stage_sizes=(1, 1, 1, 1)), _small_vit()],
    ids=["tv_resnet", "vit"],
)
def test_torchvision_backbones_in_bfloat16(backbone):
    """bfloat16 compute, float32 parameters and features, close to the float32 features."""
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = _random_variables(backbone, images)
    half_model = backbone.clone(dtype=jnp.bfloat16)
    shapes = jax.eval_shape(half_model.init, jax.random.key(0), images)
    assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    full = backbone.apply(variables, images)
    half = half_model.apply(variables, images)
    assert half.dtype == jnp.float32
    scale = float(np.max(np.abs(full)))
    np.testing.assert_allclose(half, full, rtol=0.05, atol=0.05 * scale)
    assert not np.array_equal(half, full)  # bfloat16 did compute something
    model = get_model("tv_vit_b_16", num_classes=10, head="dismax", dtype=jnp.bfloat16)
    assert model.backbone.dtype == jnp.bfloat16
