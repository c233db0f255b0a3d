"""Tests for isomax_jax.torch_import: key mapping, round trips, clear errors, safe loading."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isomax_jax.models import get_model
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
    state = to_torch_state_dict(model, variables)  # softmax head
    isomax = get_model("small_resnet", num_classes=10, head="isomax")
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
