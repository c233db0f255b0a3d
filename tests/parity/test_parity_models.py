"""Parity: the PyTorch twins (``tests/parity/torch_models.py``; heads are the reference's
``robust_deep_learning`` first parts) with random weights, converted by
``isomax_jax.torch_import``, give the same eval-mode features and logits in float32.

Every backbone is run once per framework (op by op in JAX, where repeated shapes hit the
compilation cache; DenseNet under jit); each model is converted and applied whole with one
head, and all four heads are also compared on the shared features.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("robust_deep_learning")

from isomax_jax import torch_import  # noqa: E402
from isomax_jax.models import HEADS, feature_dim, get_model, make_head  # noqa: E402
from isomax_jax.torch_import import convert_state_dict, load_torch_checkpoint  # noqa: E402

from .torch_models import HEADS as TORCH_HEADS  # noqa: E402
from .torch_models import build, randomize_  # noqa: E402

RTOL = 1e-4  # float32, relative to each tensor's largest magnitude
NUM_CLASSES = 10

# (model, head used for the whole-model conversion): every head is used whole at least once.
CASES = [
    ("small_resnet", "softmax"),
    ("small_resnet", "isomax"),
    ("small_resnet", "isomax_plus"),
    ("small_resnet", "dismax"),
    ("densenet_bc100", "isomax"),
    ("resnet110", "softmax"),
    ("resnet34", "isomax_plus"),
    ("wrn28_10", "dismax"),
]


class _HeadOnly(nn.Module):
    """A head under the name ``classifier``, so its torch keys are ``classifier.*``."""

    classifier: nn.Module

    def __call__(self, features):
        return self.classifier(features)


def _close(actual, expected, what):
    scale = float(np.max(np.abs(expected)))
    np.testing.assert_allclose(
        np.asarray(actual), expected, rtol=RTOL, atol=RTOL * scale, err_msg=what
    )
    # Not a trivially-equal case: the values vary.
    assert np.std(expected) > 1e-3 * max(scale, 1e-6), what


def _random_torch_head(head, dim, seed):
    wrapper = torch.nn.Module()
    wrapper.classifier = TORCH_HEADS[head](dim, NUM_CLASSES)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in wrapper.classifier.named_parameters():
            if pname == "distance_scale":
                param.copy_(1.0 + torch.rand(param.shape, generator=gen))
            elif pname != "temperature":
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    return wrapper.eval()


@pytest.mark.parametrize("name, whole_head", CASES)
def test_converted_weights_give_the_same_outputs(name, whole_head):
    torch.manual_seed(0)
    torch_model = randomize_(build(name, num_classes=NUM_CLASSES, head=whole_head), seed=1).eval()
    images = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        features_t = torch_model.features(torch.from_numpy(images))
        logits_t = torch_model.classifier(features_t).numpy()

    model = get_model(name, num_classes=NUM_CLASSES, head=whole_head)
    variables = convert_state_dict(model, torch_model.state_dict())
    apply = lambda v, x: model.apply(v, x, return_features=True)  # noqa: E731
    if name == "densenet_bc100":  # every layer has a new shape: op-by-op would compile ~200 ops
        apply = jax.jit(apply)
    logits, features = apply(variables, jnp.asarray(images.transpose(0, 2, 3, 1)))
    _close(features, features_t.numpy(), f"{name} features")
    _close(logits, logits_t, f"{name} + {whole_head} logits")

    if name == "small_resnet":
        return  # every head is run whole on small_resnet
    dim = feature_dim(name)
    for seed, head in enumerate(h for h in HEADS if h != whole_head):
        torch_head = _random_torch_head(head, dim, seed)
        with torch.no_grad():
            expected = torch_head.classifier(features_t).numpy()
        flax_head = _HeadOnly(make_head(head, num_classes=NUM_CLASSES))
        head_vars = convert_state_dict(flax_head, torch_head.state_dict(), image_shape=(dim,))
        _close(flax_head.apply(head_vars, features), expected, f"{name} + {head} logits")


def test_reference_head_keys_are_the_documented_ones():
    """The keys of ``robust_deep_learning``'s heads (docs/isomax.md, torch_import's docstring):
    all four store ``temperature``; IsoMax+ and DisMax store the same keys and shapes."""
    keys = {
        head: {k: tuple(v.shape) for k, v in TORCH_HEADS[head](8, 3).state_dict().items()}
        for head in HEADS
    }
    plus = {"prototypes": (3, 8), "distance_scale": (1,), "temperature": (1,)}
    assert keys == {
        "softmax": {"weights": (3, 8), "bias": (3,), "temperature": (1,)},
        "isomax": {"prototypes": (3, 8), "temperature": (1,)},
        "isomax_plus": plus,
        "dismax": plus,
    }


@pytest.mark.parametrize("head", HEADS)
def test_saved_heads_load_into_the_reference_and_back(head, tmp_path):
    """``save_torch_checkpoint`` files (with the head record) load strictly into the reference
    head, and a file saved by PyTorch from it loads back into the Flax head."""
    flax_head = _HeadOnly(make_head(head, num_classes=NUM_CLASSES, temperature=1.5))
    shapes = jax.eval_shape(flax_head.init, jax.random.key(0), jnp.zeros((1, 8)))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    torch_import.save_torch_checkpoint(flax_head, variables, tmp_path / "flax.pth")
    wrapper = torch.nn.Module()
    wrapper.classifier = TORCH_HEADS[head](8, NUM_CLASSES, temperature=1.5)
    wrapper.load_state_dict(torch.load(tmp_path / "flax.pth", weights_only=True), strict=True)
    features = rng.normal(size=(4, 8)).astype(np.float32)
    with torch.no_grad():
        expected = wrapper.classifier(torch.from_numpy(features)).numpy()
    _close(flax_head.apply(variables, features), expected, f"{head} logits")

    torch.save(wrapper.state_dict(), tmp_path / "torch.pth")
    back = load_torch_checkpoint(flax_head, tmp_path / "torch.pth", image_shape=(8,))
    jax.tree.map(np.testing.assert_array_equal, back["params"], variables["params"])


def test_batch_norm_matches_torch_over_training_steps():
    """Outputs and running statistics of our BatchNorm equal torch.nn.BatchNorm2d's."""
    import torch

    from isomax_jax.models.layers import BatchNorm

    rng = np.random.default_rng(0)
    torch_bn = torch.nn.BatchNorm2d(5, momentum=0.1, eps=1e-5).double()
    with torch.no_grad():
        torch_bn.weight.copy_(torch.from_numpy(rng.normal(size=5)))
        torch_bn.bias.copy_(torch.from_numpy(rng.normal(size=5)))
    params = {
        "scale": jnp.asarray(torch_bn.weight.detach().numpy(), jnp.float32),
        "bias": jnp.asarray(torch_bn.bias.detach().numpy(), jnp.float32),
    }
    train_bn, eval_bn = BatchNorm(use_running_average=False), BatchNorm(use_running_average=True)
    stats = {"mean": jnp.zeros(5), "var": jnp.ones(5)}
    step = jax.jit(lambda v, x: train_bn.apply(v, x, mutable=["batch_stats"]))
    for _ in range(3):
        x = rng.normal(loc=2.0, scale=3.0, size=(4, 5, 3, 3))  # NCHW, 36 values per channel
        want = torch_bn.train()(torch.from_numpy(x)).detach().numpy()
        got, updates = step({"params": params, "batch_stats": stats}, x.transpose(0, 2, 3, 1))
        stats = updates["batch_stats"]
        np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats["mean"], torch_bn.running_mean.numpy(), rtol=1e-5)
        np.testing.assert_allclose(stats["var"], torch_bn.running_var.numpy(), rtol=1e-5)
    x = rng.normal(size=(2, 5, 3, 3))
    want = torch_bn.eval()(torch.from_numpy(x)).detach().numpy()
    got = eval_bn.apply({"params": params, "batch_stats": stats}, x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
