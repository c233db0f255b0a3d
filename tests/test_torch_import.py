"""Tests for isomax_jax.torch_import: key mapping, round trips, clear errors, safe loading."""

import os
import subprocess
import sys
import warnings
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isomax_jax import torch_import
from isomax_jax.models import Classifier, get_model, make_head
from isomax_jax.models.resnet import CifarResNet
from isomax_jax.models.vit import VisionTransformer
from isomax_jax.torch_import import convert_state_dict, load_torch_checkpoint, to_torch_state_dict


def _random_variables(model, seed=0):
    """Random values in the model's variable structure (no model.init compile)."""
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), abstract)


@pytest.fixture(scope="module")
def model():
    return get_model("small_resnet", num_classes=10, head="softmax")


@pytest.fixture(scope="module")
def variables(model):
    return _random_variables(model)


def test_round_trip_and_torch_layouts(model, variables):
    state = to_torch_state_dict(model, variables)
    kernel = variables["params"]["backbone"]["layer2_0"]["conv1"]["kernel"]  # [3, 3, 32, 64]
    np.testing.assert_array_equal(state["layer2.0.conv1.weight"], kernel.transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(
        state["classifier.weights"], variables["params"]["classifier"]["kernel"].T
    )
    np.testing.assert_array_equal(
        state["bn1.running_var"], variables["batch_stats"]["backbone"]["bn1"]["var"]
    )
    np.testing.assert_array_equal(
        state["bn1.weight"], variables["params"]["backbone"]["bn1"]["scale"]
    )
    assert state["classifier.temperature"].tolist() == [1.0]
    assert "layer1.0.bn2.num_batches_tracked" in state
    back = convert_state_dict(model, state)
    jax.tree.map(np.testing.assert_array_equal, back, variables)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(back))


def test_dataparallel_prefix_and_float64_inputs(model, variables):
    state = {f"module.{k}": v for k, v in to_torch_state_dict(model, variables).items()}
    state = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in state.items()}
    back = convert_state_dict(model, state)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(back))
    jax.tree.map(np.testing.assert_array_equal, back, variables)


def test_error_lists_missing_unexpected_and_misshaped_keys(model, variables):
    state = to_torch_state_dict(model, variables)
    del state["layer3.0.bn1.running_mean"]
    del state["classifier.bias"]
    state["fc.weight"] = np.zeros((10, 128), np.float32)
    state["layer1.0.conv2.weight"] = state["layer1.0.conv2.weight"][:, :16]
    with pytest.raises(ValueError) as err:
        convert_state_dict(model, state)
    message = str(err.value)
    assert "missing keys (2): classifier.bias, layer3.0.bn1.running_mean" in message
    assert "unexpected keys (1): fc.weight" in message
    assert "layer1.0.conv2.weight: checkpoint (32, 16, 3, 3), model expects (32, 32, 3, 3)" in (
        message
    )


def test_wrong_head_is_reported(model, variables):
    state = to_torch_state_dict(model, variables)  # softmax head, recorded
    isomax = get_model("small_resnet", num_classes=10, head="isomax")
    with pytest.raises(ValueError, match=r"the 'softmax' head, but this model has the 'isomax'"):
        convert_state_dict(isomax, state)
    state = dict(state)  # a reference state_dict has no record: the keys tell
    with pytest.raises(ValueError, match=r"missing keys \(1\): classifier.prototypes") as err:
        convert_state_dict(isomax, state)
    assert "unexpected keys (2): classifier.bias, classifier.weights" in str(err.value)


def test_temperature_is_checked():
    model = get_model("small_resnet", num_classes=10, head="dismax")
    variables = _random_variables(model)
    state = to_torch_state_dict(model, variables)
    state["classifier.temperature"] = np.asarray([2.5], np.float32)
    with pytest.raises(ValueError, match=r"temperature.*\[2.5\].*temperature=2.5"):
        convert_state_dict(model, state)
    hot = get_model("small_resnet", num_classes=10, head="dismax", temperature=2.5)
    jax.tree.map(np.testing.assert_array_equal, convert_state_dict(hot, state), variables)
    del state["classifier.temperature"]  # optional
    convert_state_dict(model, state)


def test_importing_does_not_import_torch():
    code = "import sys, isomax_jax.torch_import, isomax_jax.models; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "False"


class _Payload:
    """Unpickling this calls ``os.mkdir(path)``: arbitrary code execution."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_load_checkpoint_and_malicious_pickle_refused(model, variables, tmp_path):
    torch = pytest.importorskip("torch")
    state = {
        k: torch.from_numpy(np.asarray(v)) for k, v in to_torch_state_dict(model, variables).items()
    }
    torch.save(state, tmp_path / "model1.pth")
    loaded = load_torch_checkpoint(model, tmp_path / "model1.pth")
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "wrapped.pth")
    jax.tree.map(
        np.testing.assert_array_equal,
        load_torch_checkpoint(model, tmp_path / "wrapped.pth"),
        variables,
    )
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not a state_dict"):
        load_torch_checkpoint(model, tmp_path / "list.pth")

    marker = tmp_path / "pwned"
    evil = dict(state, **{"conv1.weight": _Payload(str(marker))})
    torch.save(evil, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refusing to load"):
        load_torch_checkpoint(model, tmp_path / "evil.pth")
    assert not marker.exists()
    # The payload is live: an unsafe load does run it (so the refusal above is meaningful).
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.is_dir()


def test_exported_state_dict_loads_into_the_torch_twin(model, variables):
    torch = pytest.importorskip("torch")
    pytest.importorskip("robust_deep_learning")
    from parity.torch_models import build

    twin = build("small_resnet", num_classes=10, head="softmax")
    state = {
        k: torch.as_tensor(np.asarray(v)) for k, v in to_torch_state_dict(model, variables).items()
    }
    result = twin.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    np.testing.assert_array_equal(
        twin.layer3[0].conv2.weight.detach().numpy(),
        np.asarray(variables["params"]["backbone"]["layer3_0"]["conv2"]["kernel"]).transpose(
            3, 2, 0, 1
        ),
    )


def test_converted_weights_do_not_alias_the_source(model, variables):
    # Changing the source arrays (e.g. training the torch model further) after conversion must
    # not change the converted variables.
    state = to_torch_state_dict(model, variables)
    back = convert_state_dict(model, state)
    before = jax.tree.map(np.array, back)
    for value in state.values():
        value[...] = 7
    jax.tree.map(np.testing.assert_array_equal, back, before)


def _saved(model, variables, path):
    torch = pytest.importorskip("torch")
    state = {
        k: torch.from_numpy(np.asarray(v)) for k, v in to_torch_state_dict(model, variables).items()
    }
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    "damage, match",
    [
        ("empty", r"is empty \(0 bytes\)"),  # was a bare EOFError
        ("half", "truncated or corrupted .*RuntimeError"),  # was torch's RuntimeError
        ("tail", "truncated or corrupted"),
        ("junk", "refusing to load .*not a plain weights file"),
    ],
)
def test_damaged_files_give_value_error_naming_the_file(model, variables, tmp_path, damage, match):
    good = _saved(model, variables, tmp_path / "good.pth").read_bytes()
    damaged = {"empty": b"", "half": good[: len(good) // 2], "tail": good[:-40]}
    path = tmp_path / "damaged.pth"
    path.write_bytes(damaged.get(damage, b"not a checkpoint at all " * 40))
    with pytest.raises(ValueError, match=match) as info:
        load_torch_checkpoint(model, path)
    assert "damaged.pth" in str(info.value)


def test_missing_file_and_directory(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_torch_checkpoint(model, tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="no PyTorch checkpoint file"):
        load_torch_checkpoint(model, tmp_path)


def test_non_finite_weights_refused_unless_allowed(model, variables, tmp_path):
    bad = jax.tree.map(np.array, variables)
    bad["params"]["backbone"]["conv1"]["kernel"][0, 0, 0, :3] = np.nan
    bad["batch_stats"]["backbone"]["bn1"]["var"][1] = np.inf
    state = to_torch_state_dict(model, bad)
    with pytest.raises(ValueError, match="non-finite weights") as info:
        convert_state_dict(model, state)
    message = str(info.value)
    assert "keys with NaN/inf (2)" in message
    assert "conv1.weight (3 NaN, 0 inf of" in message and "bn1.running_var (0 NaN, 1 inf" in message
    assert "allow_non_finite=True" in message
    loaded = convert_state_dict(model, state, allow_non_finite=True)
    assert np.isnan(loaded["params"]["backbone"]["conv1"]["kernel"]).sum() == 3

    path = _saved(model, bad, tmp_path / "nan.pth")
    with pytest.raises(ValueError, match="conv1.weight"):
        load_torch_checkpoint(model, path)
    loaded = load_torch_checkpoint(model, path, allow_non_finite=True)
    assert np.isinf(loaded["batch_stats"]["backbone"]["bn1"]["var"]).sum() == 1


# ---- Torch interchange (issue 22, point 5) ---------------------------------------------------


def test_exported_arrays_are_writable_private_copies(model, variables):
    torch = pytest.importorskip("torch")
    on_device = jax.tree.map(jnp.asarray, variables)  # np.asarray of these is read-only
    state = to_torch_state_dict(model, on_device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns at from_numpy of a read-only array
        tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    assert all(v.flags.writeable and v.flags.c_contiguous for v in state.values())
    assert tensors["classifier.bias"].shape == (10,)
    # Private copies: changing the exported arrays leaves the caller's variables alone.
    state = to_torch_state_dict(model, variables)
    before = jax.tree.map(np.array, variables)
    for value in state.values():
        value[...] = 7
    jax.tree.map(np.testing.assert_array_equal, variables, before)


def test_torch_save_of_exported_state_dict_round_trips_through_a_file(model, variables, tmp_path):
    torch = pytest.importorskip("torch")
    torch.save(to_torch_state_dict(model, variables), tmp_path / "numpy.pth")
    loaded = load_torch_checkpoint(model, tmp_path / "numpy.pth")
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(loaded))


def test_numpy_object_arrays_stay_refused(model, variables, tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    state = dict(to_torch_state_dict(model, variables))
    state["conv1.weight"] = np.array([_Payload(str(marker))], dtype=object)
    torch.save(state, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refusing to load .*evil.pth"):
        load_torch_checkpoint(model, tmp_path / "evil.pth")
    assert not marker.exists()


def test_save_torch_checkpoint_writes_tensors_torch_and_we_can_read(model, variables, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("robust_deep_learning")
    from parity.torch_models import build

    path = tmp_path / "saved.pth"
    torch_import.save_torch_checkpoint(model, variables, path)
    plain = torch.load(path, weights_only=True)  # PyTorch's own safe load, no extra globals
    assert all(isinstance(v, torch.Tensor) for v in plain.values())
    twin = build("small_resnet", num_classes=10, head="softmax")
    twin.load_state_dict(plain, strict=True)  # the head record does not bother PyTorch
    np.testing.assert_array_equal(
        twin.classifier.weights.detach().numpy(),
        np.asarray(variables["params"]["classifier"]["kernel"]).T,
    )
    jax.tree.map(np.testing.assert_array_equal, load_torch_checkpoint(model, path), variables)
    # Saved from the twin (a reference file, no record): loads too.
    torch.save(twin.state_dict(), tmp_path / "twin.pth")
    back = load_torch_checkpoint(model, tmp_path / "twin.pth")
    jax.tree.map(np.testing.assert_array_equal, back, variables)


@pytest.mark.parametrize("writer", ["save_torch_checkpoint", "torch.save", "in memory"])
def test_recorded_head_refuses_another_head_with_identical_keys(writer, tmp_path):
    torch = pytest.importorskip("torch")
    plus = get_model("small_resnet", num_classes=10, head="isomax_plus")
    dismax = get_model("small_resnet", num_classes=10, head="dismax")
    variables = _random_variables(plus)
    path = tmp_path / "plus.pth"
    if writer == "save_torch_checkpoint":
        torch_import.save_torch_checkpoint(plus, variables, path)
    else:
        torch.save(to_torch_state_dict(plus, variables), path)
    load = (
        (lambda m: convert_state_dict(m, to_torch_state_dict(plus, variables)))
        if writer == "in memory"
        else (lambda m: load_torch_checkpoint(m, path))
    )
    jax.tree.map(np.testing.assert_array_equal, load(plus), variables)
    with pytest.raises(ValueError, match="'isomax_plus' head.*'dismax' head") as info:
        load(dismax)
    if writer != "in memory":
        assert "plus.pth" in str(info.value)
    else:
        state = to_torch_state_dict(plus, variables)
        state._metadata[""]["isomax_jax"] = {"head": "cosine"}
        with pytest.raises(ValueError, match="names no known head"):
            convert_state_dict(plus, state)
        with pytest.raises(
            ValueError,
            match=r"'isomax_plus' head, but this model has no isomax_jax head \(Dense as",
        ):
            convert_state_dict(_Mlp(classifier=nn.Dense(3)), to_torch_state_dict(plus, variables))


def test_reference_isomax_plus_and_dismax_keys_cannot_be_told_apart(tmp_path):
    # Documented limitation: without a record (files saved by PyTorch) the keys decide alone.
    plus = get_model("small_resnet", num_classes=10, head="isomax_plus")
    dismax = get_model("small_resnet", num_classes=10, head="dismax")
    variables = _random_variables(plus)
    state = dict(to_torch_state_dict(plus, variables))  # a plain dict drops the record
    jax.tree.map(np.testing.assert_array_equal, convert_state_dict(dismax, state), variables)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_checkpoints_load_exactly(model, variables, dtype, tmp_path):
    torch = pytest.importorskip("torch")
    tensors = {
        k: torch.from_numpy(v).to(getattr(torch, dtype))
        if v.dtype == np.float32
        else torch.from_numpy(v)
        for k, v in to_torch_state_dict(model, variables).items()
    }
    torch.save(tensors, tmp_path / f"{dtype}.pth")
    loaded = load_torch_checkpoint(model, tmp_path / f"{dtype}.pth")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(loaded))
    expected = convert_state_dict(model, {k: v.float() for k, v in tensors.items()})
    jax.tree.map(np.testing.assert_array_equal, loaded, expected)
    rounded = jax.tree.map(lambda x: np.asarray(x).astype(jnp.dtype(dtype)), variables)
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.float32, rounded))


def test_unconvertible_weight_names_key_and_file(model, variables, tmp_path):
    torch = pytest.importorskip("torch")
    tensors = {k: torch.from_numpy(v) for k, v in to_torch_state_dict(model, variables).items()}
    tensors["layer2.0.bn1.bias"] = tensors["layer2.0.bn1.bias"].to(torch.complex64)
    torch.save(tensors, tmp_path / "complex.pth")
    with pytest.raises(
        TypeError, match=r"'layer2.0.bn1.bias' in the checkpoint '.*complex.pth'.*complex64"
    ):
        load_torch_checkpoint(model, tmp_path / "complex.pth")
    with pytest.raises(TypeError, match=r"'layer2.0.bn1.bias' in the state_dict.*complex64"):
        convert_state_dict(model, tensors)


class _Mlp(nn.Module):
    """A user model: a custom Linen ``nn.Dense`` (named ``hidden``) and one as ``classifier``."""

    classifier: nn.Module

    @nn.compact
    def __call__(self, x):
        return self.classifier(nn.relu(nn.Dense(5, name="hidden")(x)))


def test_custom_dense_maps_to_torch_linear_weight():
    torch = pytest.importorskip("torch")
    flax_model = _Mlp(classifier=nn.Dense(3))
    torch.manual_seed(0)
    torch_model = torch.nn.Module()
    torch_model.hidden, torch_model.classifier = torch.nn.Linear(4, 5), torch.nn.Linear(5, 3)
    x = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    with torch.no_grad():
        expected = torch_model.classifier(torch.relu(torch_model.hidden(torch.from_numpy(x))))

    variables = convert_state_dict(flax_model, torch_model.state_dict(), image_shape=(4,))
    np.testing.assert_allclose(
        flax_model.apply(variables, x), expected.numpy(), rtol=1e-5, atol=1e-6
    )
    state = to_torch_state_dict(flax_model, variables)
    assert sorted(state) == ["classifier.bias", "classifier.weight", "hidden.bias", "hidden.weight"]
    for key, value in torch_model.state_dict().items():
        np.testing.assert_array_equal(state[key], value.numpy(), err_msg=key)
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)


def test_bfloat16_variables_save_as_bfloat16_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    model = _Mlp(classifier=nn.Dense(3, param_dtype=jnp.bfloat16))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4)))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)
    path = tmp_path / "bf16.pth"
    torch_import.save_torch_checkpoint(model, variables, path)
    plain = torch.load(path, weights_only=True)
    assert plain["classifier.weight"].dtype == torch.bfloat16
    assert plain["hidden.weight"].dtype == torch.float32
    np.testing.assert_array_equal(
        plain["classifier.weight"].float().numpy(),
        np.asarray(variables["params"]["classifier"]["kernel"], np.float32).T,
    )
    back = load_torch_checkpoint(model, path, image_shape=(4,))
    assert back["params"]["classifier"]["kernel"].dtype == jnp.bfloat16
    jax.tree.map(np.testing.assert_array_equal, back["params"], variables["params"])
    assert not list(tmp_path.glob("*.partial-*"))


# ---- torchvision's layout and backbone-only loading (issue 18.2) ------------------------------

SMALL_VIT = {"image_size": 32, "patch_size": 8, "num_layers": 1, "num_heads": 2}


def _small_vit_model(head="softmax", **head_fields):
    return Classifier(
        backbone=VisionTransformer(**SMALL_VIT, hidden_dim=8, mlp_dim=16),
        classifier=make_head(head, num_classes=3, **head_fields),
    )


def _variables_at(model, image_shape, seed=0):
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_shape)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), abstract)


def test_torchvision_resnet_keys_and_round_trip():
    model = get_model("tv_resnet18", num_classes=10, head="softmax")
    variables = _random_variables(model)
    state = to_torch_state_dict(model, variables)
    backbone = variables["params"]["backbone"]
    np.testing.assert_array_equal(state["fc.weight"], variables["params"]["classifier"]["kernel"].T)
    np.testing.assert_array_equal(
        state["layer2.0.downsample.0.weight"],
        backbone["layer2_0"]["downsample_0"]["kernel"].transpose(3, 2, 0, 1),
    )
    np.testing.assert_array_equal(
        state["layer2.0.downsample.1.running_var"],
        variables["batch_stats"]["backbone"]["layer2_0"]["downsample_1"]["var"],
    )
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert "layer4.1.bn2.num_batches_tracked" in state and "fc.bias" in state
    assert not any(k.startswith("classifier") or k.endswith("temperature") for k in state)
    assert state._metadata == {"": {"isomax_jax": {"head": "softmax"}}}
    jax.tree.map(np.testing.assert_array_equal, convert_state_dict(model, state), variables)


def test_isomax_head_in_torchvision_layout_and_its_temperature():
    model = get_model("tv_resnet18", num_classes=10, head="dismax", temperature=2.0)
    variables = _random_variables(model)
    state = to_torch_state_dict(model, variables)
    assert {k for k in state if k.startswith("fc.")} == {
        "fc.prototypes",
        "fc.distance_scale",
        "fc.temperature",
    }
    assert state["fc.temperature"].tolist() == [2.0]
    jax.tree.map(np.testing.assert_array_equal, convert_state_dict(model, state), variables)
    cold = get_model("tv_resnet18", num_classes=10, head="dismax")
    with pytest.raises(ValueError, match=r"fc.temperature is \[2.0\].*temperature=2.0"):
        convert_state_dict(cold, state)


def test_vision_transformer_keys_are_torchvisions():
    model = _small_vit_model()
    variables = _variables_at(model, (32, 32, 3))
    state = to_torch_state_dict(model, variables)
    layer = "encoder.layers.encoder_layer_0."
    block = [
        "ln_1.weight", "ln_1.bias", "self_attention.in_proj_weight", "self_attention.in_proj_bias",
        "self_attention.out_proj.weight", "self_attention.out_proj.bias", "ln_2.weight",
        "ln_2.bias", "mlp.0.weight", "mlp.0.bias", "mlp.3.weight", "mlp.3.bias",
    ]  # fmt: skip
    expected = [
        "class_token", "conv_proj.weight", "conv_proj.bias", "encoder.pos_embedding",
        *(layer + k for k in block), "encoder.ln.weight", "encoder.ln.bias", "heads.head.weight",
        "heads.head.bias",
    ]  # fmt: skip
    assert sorted(state) == sorted(expected)
    attention = variables["params"]["backbone"]["encoder"]["layers"]["encoder_layer_0"]
    attention = attention["self_attention"]
    assert state[layer + "self_attention.in_proj_weight"].shape == (24, 8)  # [3D, D]
    np.testing.assert_array_equal(
        state[layer + "self_attention.in_proj_weight"], attention["in_proj"]["kernel"].T
    )
    assert state["conv_proj.weight"].shape == (8, 3, 8, 8)
    assert state["encoder.pos_embedding"].shape == (1, 17, 8)
    # The default image shape is the ViT's own. No BatchNorm: batch_stats is empty.
    back = convert_state_dict(model, state)
    assert back["batch_stats"] == {}
    jax.tree.map(np.testing.assert_array_equal, back["params"], variables["params"])
    with pytest.raises(ValueError, match="must be 32×32"):
        convert_state_dict(model, state, image_shape=(64, 64, 3))


def test_backbone_only_keeps_a_fresh_head_and_checks_the_backbone():
    # A tiny get_model-like model, so that model.init (the reference for the head) is cheap.
    def tiny(head, num_classes):
        return Classifier(
            backbone=CifarResNet(stage_sizes=(), widths=(), stem_width=4),  # conv1, bn1
            classifier=make_head(head, num_classes=num_classes),
        )

    source = tiny("softmax", 10)
    state = to_torch_state_dict(source, _variables_at(source, (8, 8, 3)))  # records softmax
    target = tiny("isomax_plus", 3)
    key = jax.random.key(7)
    loaded = convert_state_dict(target, state, image_shape=(8, 8, 3), backbone_only=True, key=key)
    init = jax.jit(target.init)(key, jnp.zeros((1, 8, 8, 3)))
    jax.tree.map(
        np.testing.assert_array_equal, loaded["params"]["classifier"], init["params"]["classifier"]
    )
    backbone = convert_state_dict(source, state, image_shape=(8, 8, 3))
    jax.tree.map(np.testing.assert_array_equal, loaded["batch_stats"], backbone["batch_stats"])
    jax.tree.map(
        np.testing.assert_array_equal, loaded["params"]["backbone"], backbone["params"]["backbone"]
    )

    with pytest.raises(ValueError, match="needs `key`"):
        convert_state_dict(target, state, image_shape=(8, 8, 3), backbone_only=True)
    broken = dict(state)
    del broken["bn1.weight"]
    broken["layer9.conv.weight"] = broken["conv1.weight"]
    with pytest.raises(ValueError) as info:
        convert_state_dict(target, broken, image_shape=(8, 8, 3), backbone_only=True, key=key)
    assert "missing keys (1): bn1.weight" in str(info.value)
    assert "unexpected keys (1): layer9.conv.weight" in str(info.value)
    with pytest.raises(ValueError, match="needs a model with a `backbone`"):
        convert_state_dict(
            _Mlp(classifier=nn.Dense(3)), {}, image_shape=(4,), backbone_only=True, key=key
        )


def test_backbone_only_torchvision_file_into_an_isomax_model(tmp_path):
    torch = pytest.importorskip("torch")
    imagenet = get_model("tv_resnet18", num_classes=1000, head="softmax")
    variables = _random_variables(imagenet)
    torch_import.save_torch_checkpoint(imagenet, variables, tmp_path / "imagenet.pth")
    model = get_model("tv_resnet18", num_classes=10, head="isomax_plus")
    with pytest.raises(ValueError, match="'softmax' head, but this model has the 'isomax_plus'"):
        load_torch_checkpoint(model, tmp_path / "imagenet.pth")
    state = torch.load(tmp_path / "imagenet.pth", weights_only=True)
    with pytest.raises(ValueError, match=r"missing keys \(2\): fc.distance_scale, fc.prototypes"):
        convert_state_dict(model, dict(state))  # the keys say so too
    loaded = load_torch_checkpoint(
        model, tmp_path / "imagenet.pth", backbone_only=True, key=jax.random.key(0)
    )
    jax.tree.map(
        np.testing.assert_array_equal, loaded["params"]["backbone"], variables["params"]["backbone"]
    )
    jax.tree.map(np.testing.assert_array_equal, loaded["batch_stats"], variables["batch_stats"])
    assert loaded["params"]["classifier"]["prototypes"].shape == (10, 512)


def test_layout_follows_the_backbone():
    class Custom(CifarResNet):
        torch_layout: ClassVar[str] = "timm"

    model = Classifier(
        backbone=Custom(stage_sizes=(1,), widths=(4,), stem_width=4),
        classifier=make_head("softmax", num_classes=3),
    )
    with pytest.raises(ValueError, match="Custom declares an unknown torch_layout 'timm'"):
        to_torch_state_dict(model, _variables_at(model, (8, 8, 3)))
