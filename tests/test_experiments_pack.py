"""`--config.pack`: an experiment reads its 32-px sets from a pack (isomax_jax.pack), not tfds."""

import json
import os

import pytest
import test_experiments

from experiments import train_eval, validate
from isomax_jax import data
from isomax_jax.data import testing
from isomax_jax.pack_tfds import write_from_tfds


def tiny_config(**overrides):
    return test_experiments.tiny_config(**{
        "losses": ("softmax",), "ood_datasets": ("mnist",), "detectors": ("msp", "energy", "react"),
        "num_train_steps": 2, "eval_batch_size": 16, "max_eval_examples": 32,
        "bootstrap_samples": 0, **overrides,
    })  # fmt: skip


@pytest.fixture(scope="module")
def pack_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pack") / "p"
    with testing.mock_data(num_examples=48):
        write_from_tfds(path, ["cifar10", "mnist"], codec="png")  # lossless: tfds's exact pixels
        reference = train_eval.run(tiny_config(), str(tmp_path_factory.mktemp("tfds")))
    return str(path), reference


@pytest.mark.slow
def test_experiment_reads_the_pack_and_not_tfds(pack_dir, tmp_path, monkeypatch):
    path, reference = pack_dir

    def never(*args, **kwargs):
        pytest.fail("tfds was read although the config names a pack")

    for name in ("load_train_split", "eval_dataset", "check_available"):
        monkeypatch.setattr(data, name, never)
    results = train_eval.run(tiny_config(pack=path), str(tmp_path / "w"))
    # The same pixels and order as tfds's: the same model and numbers (the normalisation is
    # NumPy's here and TensorFlow's there: equal to float32 rounding).
    assert results["runs"][0]["accuracy"] == reference["runs"][0]["accuracy"]
    for det in ("msp", "energy", "react"):
        mine = results["runs"][0]["ood"]["mnist"][det]["reference"]["auroc"]
        theirs = reference["runs"][0]["ood"]["mnist"][det]["reference"]["auroc"]
        assert mine == pytest.approx(theirs, abs=1e-3), det
    saved = json.loads((tmp_path / "w" / "results.json").read_text())
    assert saved["pack"]["path"] == os.path.abspath(path)
    assert saved["pack"]["splits"]["cifar10/train"]["mae"] == 0.0
    text = (tmp_path / "w" / "results.md").read_text()
    assert f"Images read from the pack `{os.path.abspath(path)}`" in text


def test_a_set_missing_from_the_pack_fails_before_training(pack_dir, tmp_path):
    path, _ = pack_dir
    config = tiny_config(pack=path, ood_datasets=("mnist", "svhn"))
    with pytest.raises(validate.ConfigError, match=r"'svhn' is not in the pack"):
        train_eval.run(config, str(tmp_path / "w"))
    with pytest.raises(validate.ConfigError, match=r"config.pack=.*not a readable pack"):
        train_eval.run(tiny_config(pack=str(tmp_path)), str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()
