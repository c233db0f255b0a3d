"""Parity: torchvision's own models (0.28.0) with random weights and non-trivial BatchNorm
statistics, saved with ``torch.save(model.state_dict())`` and loaded by
``isomax_jax.torch_import.load_torch_checkpoint`` into the ``tv_*`` models, give the same
eval-mode logits and features in float32; the key sets are torchvision's exactly, both ways.

ImageNet-size forwards on the CPU are costly: batch 2, only the models the issue names
(ResNet-18/50, ViT-B/16) at 224×224; everything else runs at 64×64 (ResNets) or on a small ViT.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from isomax_jax.models import HEADS, Classifier, get_model, make_head  # noqa: E402
from isomax_jax.models.vit import VisionTransformer  # noqa: E402
from isomax_jax.torch_import import (  # noqa: E402
    convert_state_dict,
    load_torch_checkpoint,
    save_torch_checkpoint,
    to_torch_state_dict,
)

RTOL = 1e-4  # float32, relative to each tensor's largest magnitude
NUM_CLASSES = 10
SMALL_VIT = {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 4}
SMALL_VIT_WIDTHS = {"hidden_dim": 32, "mlp_dim": 64}


def _close(actual, expected, what):
    """Asserts closeness relative to the largest magnitude; returns the relative error."""
    scale = float(np.max(np.abs(expected)))
    error = float(np.max(np.abs(np.asarray(actual) - expected))) / scale
    np.testing.assert_allclose(
        np.asarray(actual), expected, rtol=RTOL, atol=RTOL * scale, err_msg=what
    )
    assert np.std(expected) > 1e-3 * max(scale, 1e-6), what  # not trivially equal
    return error


def _randomize_(model, seed):
    """Random BatchNorm/LayerNorm affine parameters and running statistics, class token and
    classifier (torchvision zero-initialises the ViT's), in place; the rest keeps
    torchvision's (random) initialisation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                c = module.weight.shape[0]
                module.weight.copy_(0.5 + torch.rand(c, generator=gen))
                module.bias.copy_(0.2 * torch.randn(c, generator=gen))
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                module.num_batches_tracked.fill_(7)
        for name, param in model.named_parameters():
            if name == "class_token" or name.startswith(("fc.", "heads.")):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    return model.eval()


def _torch_outputs(model, images):
    """``(logits, features)``: the features are what the classifier (``fc``/``heads``) gets."""
    head = model.fc if hasattr(model, "fc") else model.heads
    seen = {}
    hook = head.register_forward_hook(lambda module, inputs, output: seen.update(x=inputs[0]))
    try:
        with torch.no_grad():
            logits = model(torch.from_numpy(images))
    finally:
        hook.remove()
    return logits.numpy(), seen["x"].numpy()


def _images(size, seed=0):
    return np.random.default_rng(seed).normal(size=(2, 3, size, size)).astype(np.float32)


def _nhwc(images):
    return jnp.asarray(images.transpose(0, 2, 3, 1))


@pytest.mark.parametrize(
    "name",
    [
        "resnet18",
        pytest.param("resnet50", marks=pytest.mark.slow),
        pytest.param("vit_b_16", marks=pytest.mark.slow),
    ],
)
def test_torchvision_weights_give_the_same_outputs(torchvision, name, tmp_path):
    torch.manual_seed(0)
    torch_model = _randomize_(getattr(torchvision.models, name)(num_classes=NUM_CLASSES), seed=1)
    images = _images(224)
    logits_t, features_t = _torch_outputs(torch_model, images)
    torch.save(torch_model.state_dict(), tmp_path / f"{name}.pth")

    model = get_model(f"tv_{name}", num_classes=NUM_CLASSES, head="softmax")
    variables = load_torch_checkpoint(model, tmp_path / f"{name}.pth", image_shape=(224, 224, 3))
    apply = jax.jit(lambda v, x: model.apply(v, x, return_features=True))
    logits, features = apply(variables, _nhwc(images))
    errors = (
        _close(logits, logits_t, f"{name} logits"),
        _close(features, features_t, f"{name} features"),
    )
    print(f"{name}: max relative error logits {errors[0]:.1e}, features {errors[1]:.1e}")
    assert features.shape == (2, {"resnet18": 512, "resnet50": 2048, "vit_b_16": 768}[name])


@pytest.mark.parametrize(
    "name",
    [
        "resnet18",
        "resnet34",
        "resnet50",
        pytest.param("resnet101", marks=pytest.mark.slow),
        pytest.param("resnet152", marks=pytest.mark.slow),
        pytest.param("vit_b_16", marks=pytest.mark.slow),
    ],
)
def test_state_dict_round_trips_with_torchvision_keys(torchvision, name):
    """torchvision's state_dict converts (every key, no other) and comes back key for key,
    value for value, and loads strictly into torchvision's model."""
    torch_model = getattr(torchvision.models, name)(num_classes=NUM_CLASSES)
    state = torch_model.state_dict()
    model = get_model(f"tv_{name}", num_classes=NUM_CLASSES, head="softmax")
    back = to_torch_state_dict(model, convert_state_dict(model, state))
    assert sorted(back) == sorted(state)  # the same keys (no temperature for nn.Linear)
    for key, value in state.items():
        want = np.zeros(()) if key.endswith("num_batches_tracked") else value.numpy()
        np.testing.assert_array_equal(back[key], want, err_msg=key)
    result = torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()})
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize("head", HEADS)
def test_every_head_in_place_of_fc(torchvision, head, tmp_path):
    """A tv_resnet18 with any head saves to what torchvision's ResNet-18 with the reference
    head as ``fc`` loads strictly (``nn.Linear`` for SoftMax), with the same logits (64×64)."""
    rdl = pytest.importorskip("robust_deep_learning")
    torch_model = _randomize_(torchvision.models.resnet18(num_classes=NUM_CLASSES), seed=2)
    if head != "softmax":
        reference = {
            "isomax": rdl.IsoMaxLossFirstPart,
            "isomax_plus": rdl.IsoMaxPlusLossFirstPart,
            "dismax": rdl.DisMaxLossFirstPart,
        }[head]
        torch_model.fc = reference(512, NUM_CLASSES, temperature=1.5)
        with torch.no_grad():
            torch_model.fc.prototypes.copy_(torch.randn(NUM_CLASSES, 512))
            if hasattr(torch_model.fc, "distance_scale"):
                torch_model.fc.distance_scale.fill_(2.0)
    torch_model.eval()
    images = _images(64, seed=1)
    logits_t, _ = _torch_outputs(torch_model, images)
    temperature = 1.0 if head == "softmax" else 1.5
    model = get_model("tv_resnet18", num_classes=NUM_CLASSES, head=head, temperature=temperature)

    torch.save(torch_model.state_dict(), tmp_path / "torch.pth")  # saved by PyTorch: no record
    variables = load_torch_checkpoint(model, tmp_path / "torch.pth")
    _close(jax.jit(model.apply)(variables, _nhwc(images)), logits_t, f"resnet18 + {head}")
    save_torch_checkpoint(model, variables, tmp_path / "flax.pth")
    result = torch_model.load_state_dict(torch.load(tmp_path / "flax.pth", weights_only=True))
    assert not result.missing_keys and not result.unexpected_keys


def test_backbone_only_under_an_isomax_head(torchvision, tmp_path):
    """ImageNet-style file (1000-class fc) -> a 10-class IsoMax+ model: torchvision's features
    and a fresh head (that it is model.init's head is checked on a small model in
    tests/test_torch_import.py: a full init of ResNet-18 compiles for 20 s on the CPU)."""
    torch_model = _randomize_(torchvision.models.resnet18(), seed=3)
    torch.save(torch_model.state_dict(), tmp_path / "imagenet.pth")
    images = _images(64, seed=2)
    _, features_t = _torch_outputs(torch_model, images)
    model = get_model("tv_resnet18", num_classes=NUM_CLASSES, head="isomax_plus")
    variables = load_torch_checkpoint(
        model, tmp_path / "imagenet.pth", backbone_only=True, key=jax.random.key(4)
    )
    fresh = jax.eval_shape(model.init, jax.random.key(4), jnp.zeros((1, 64, 64, 3)))
    assert jax.tree.map(np.shape, variables) == jax.tree.map(np.shape, fresh)
    np.testing.assert_array_equal(variables["params"]["classifier"]["distance_scale"], [1.0])
    logits, features = jax.jit(lambda v, x: model.apply(v, x, return_features=True))(
        variables, _nhwc(images)
    )
    _close(features, features_t, "resnet18 backbone features")
    assert logits.shape == (2, NUM_CLASSES) and np.all(np.isfinite(logits))


def test_small_vision_transformer_matches_torchvision(torchvision):
    """torchvision's VisionTransformer class in a small configuration, whole and in parts."""
    torch_model = torchvision.models.vision_transformer.VisionTransformer(
        **SMALL_VIT, **SMALL_VIT_WIDTHS, num_classes=NUM_CLASSES
    )
    torch_model = _randomize_(torch_model, seed=5)
    images = _images(32, seed=3)
    logits_t, features_t = _torch_outputs(torch_model, images)
    model = Classifier(
        backbone=VisionTransformer(**SMALL_VIT, **SMALL_VIT_WIDTHS),
        classifier=make_head("softmax", num_classes=NUM_CLASSES),
    )
    variables = convert_state_dict(model, torch_model.state_dict())
    logits, features = model.apply(variables, _nhwc(images), return_features=True)
    _close(logits, logits_t, "small ViT logits")
    _close(features, features_t, "small ViT features")
