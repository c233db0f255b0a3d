"""The ImageNet-1K experiment configs (experiments/configs/imagenet.py) end to end, generated data.

Each config runs through `experiments.train_eval.run` as a user would run it, on tfds's mocked
`imagenet2012` and OOD sets (`isomax_jax.data.testing.mock_data`) at 32 px, with a weights file
written by the library's own exporter in torchvision's layout: the SoftMax model evaluated as
imported must give exactly the logits of those weights, the fine-tuned heads start from its
backbone, and ImageNet-O's own protocol restricts the logits, the fit and the test images to its
classes. torchvision's ResNet-50 is replaced by its ResNet-18 here (the same code path; the
50-layer model's compile alone would take minutes on this CPU).
"""

import json
import os

import jax
import numpy as np
import pytest

from experiments import inputs, report, train_eval, validate
from experiments.configs import imagenet
from isomax_jax import data, models, torch_import
from isomax_jax.data import imagenet_sources, testing

SMALL = dict(
    image_size=32, eval_resize_size=36, batch_size=8, eval_batch_size=8, num_train_steps=2,
    max_eval_examples=16, perturbation_max_examples=4, bootstrap_samples=10, log_every_steps=1,
    checkpoint_every_steps=2, shuffle_buffer=16,
)  # fmt: skip


def small_config(name: str, **overrides):
    config = imagenet.get_config(name)
    for key, value in {**SMALL, **overrides}.items():
        config[key] = value
    if config.model == "tv_resnet50":
        config.model = "tv_resnet18"
    return config


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A torchvision-layout ResNet-18 file (random weights, non-trivial BatchNorm statistics)."""
    model = models.get_model("tv_resnet18", num_classes=1000, head="softmax")
    variables = model.init(jax.random.key(7), np.zeros((1, 32, 32, 3), np.float32))
    variables = jax.tree.map(np.asarray, dict(variables))
    rng = np.random.default_rng(0)
    variables["batch_stats"] = jax.tree.map(  # means ~0, variances ~1 (not exactly)
        lambda x: (x + rng.normal(0, 0.02, x.shape) if x.mean() < 0.5
                   else rng.uniform(0.8, 1.2, x.shape)).astype(np.float32),
        variables["batch_stats"],
    )  # fmt: skip
    path = str(tmp_path_factory.mktemp("weights") / "resnet18.pth")
    torch_import.save_torch_checkpoint(model, variables, path)
    return path, model, variables


def test_recipes_are_the_papers():
    r18 = imagenet.get_config("dismax_resnet18")
    assert (r18.model, r18.losses, r18.num_epochs, r18.batch_size) == (
        "tv_resnet18", ("softmax", "dismax"), 90.0, 256)  # fmt: skip
    assert (r18.learning_rate, r18.schedule, tuple(r18.lr_boundaries)) == (
        0.1, "multistep", (1 / 3, 2 / 3))  # fmt: skip
    assert (r18.momentum, r18.nesterov, r18.weight_decay) == (0.9, True, 1e-4)
    assert (r18.image_size, r18.eval_resize_size, r18.ood_datasets) == (224, 256, ("imagenet_o",))
    assert r18.published.dismax.ood.imagenet_o.auroc == 75.8
    r50 = imagenet.get_config("openood_resnet50")
    assert r50.evaluate_as_imported == ("softmax",) and r50.losses == ("softmax",)
    assert set(r50.ood_datasets) == {"ssb_hard", "ninco", "inaturalist", "openood_textures",
                                     "openimage_o"}  # fmt: skip
    assert r50.published.softmax.groups.far.auroc.ash == 95.74
    ft = imagenet.get_config("finetune_resnet50")
    assert ft.losses == ("softmax", "isomax_plus", "dismax") and ft.num_epochs == 3.0
    with pytest.raises(ValueError, match="unknown ImageNet config"):
        imagenet.get_config("resnet50")


def _logits(workdir, run):
    with np.load(os.path.join(workdir, "logits", f"{run}.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.slow
def test_openood_and_finetune_configs_end_to_end(tmp_path, weights):
    path, model, variables = weights
    workdir = str(tmp_path / "ft")
    config = small_config("finetune_resnet50", pretrained=path, ood_datasets=("ssb_hard", "ninco",
                          "openood_textures"), ood_groups={"near": ("ssb_hard", "ninco"),
                          "far": ("openood_textures",)})  # fmt: skip
    with testing.mock_data(num_examples=16):
        results = train_eval.run(config, workdir)
        # The SoftMax model is the file's, untouched: its logits are those of the weights.
        imported = _logits(workdir, "softmax_seed0")
        batches = inputs.capped(inputs.eval_batches(config, "imagenet2012"), 16)
        images = np.concatenate([b["image"][b["mask"]] for b in batches])
    expected = model.apply(variables, images, train=False)
    np.testing.assert_allclose(imported["imagenet2012"], expected, rtol=1e-4, atol=1e-4)
    runs = {r["loss"]: r for r in results["runs"]}
    assert runs["softmax"]["train"]["steps"] == 0 and runs["softmax"]["train"]["imported_from"]
    assert runs["isomax_plus"]["train"]["steps"] == 2 and runs["dismax"]["train"]["steps"] == 2
    assert not os.path.exists(os.path.join(workdir, "softmax_seed0"))  # nothing trained
    for loss in ("isomax_plus", "dismax"):  # fine-tuned from the file's backbone
        assert os.path.isdir(os.path.join(workdir, f"{loss}_seed0", "checkpoints"))
        assert set(runs[loss]["ood"]) == {"ssb_hard", "ninco", "openood_textures"}
    # The config's ImageNet k: KNN cannot fit 16 examples, and says so with k=1000.
    assert (
        "k=1000 needs at least 1000" in results["detectors"]["knn"]["not_fitted"]["softmax_seed0"]
    )
    text = open(os.path.join(workdir, "results.md")).read()
    assert "## Near and far OOD (group means)" in text
    assert "SoftMax: the imported model" in text and "KNN k=1000" in text
    msp = next(line for line in text.splitlines() if line.startswith("| MPS |"))
    assert "/ 76.02" in msp and "/ 85.23" in msp  # OpenOOD's published near / far beside ours

    # --mode=evaluate: the imported model is imported again, the others restored.
    with testing.mock_data(num_examples=16):
        again = train_eval.run(config, workdir, mode="evaluate")
    assert [r["accuracy"] for r in again["runs"]] == [r["accuracy"] for r in results["runs"]]


@pytest.mark.slow
def test_openood_config_end_to_end(tmp_path, weights):
    path, _, _ = weights
    config = small_config("openood_resnet50", pretrained=path, detectors=("msp", "energy",
                          "react", "ash"), ood_datasets=("ssb_hard", "inaturalist"),
                          ood_groups={"near": ("ssb_hard",), "far": ("inaturalist",)})  # fmt: skip
    with testing.mock_data(num_examples=16):
        results = train_eval.run(config, str(tmp_path / "w"))
    (run,) = results["runs"]
    assert run["loss"] == "softmax" and run["train"]["steps"] == 0
    assert set(run["ood"]) == {"ssb_hard", "inaturalist"} and set(run["detectors"]) == {
        "msp", "energy", "react", "ash", "entropic"}  # + SoftMax's paper scores  # fmt: skip
    assert not any(p.name.endswith("_seed0") for p in (tmp_path / "w").iterdir())
    text = (tmp_path / "w" / "results.md").read_text()
    assert "| ASH | " in text and "/ 95.74" in text  # OpenOOD's far-OOD ASH beside ours


@pytest.mark.slow
def test_dismax_config_with_both_imagenet_o_protocols(tmp_path, monkeypatch):
    config = small_config("dismax_resnet18", detectors=("msp", "energy", "mahalanobis"))
    with testing.mock_data(num_examples=16):
        dismax = train_eval.run(config, str(tmp_path / "dismax"))
    assert {r["loss"] for r in dismax["runs"]} == {"softmax", "dismax"}
    text = open(tmp_path / "dismax" / "results.md").read()
    assert "– / 75.8" in text and "– / 52.4" in text  # published, no TNR given

    # The dataset's own protocol: ImageNet-O's classes (here every other class) only.
    classes = np.arange(0, 1000, 2, dtype=np.int32)
    protocol = imagenet_sources.ImageNetOProtocol("hendrycks", ("n0",) * 500, classes)
    monkeypatch.setattr(data, "imagenet_o_protocol", lambda *a, **k: protocol)
    seen = []
    eval_batches = inputs.eval_batches

    def spy(config, name, *, classes=None):
        seen.append((name, None if classes is None else len(classes)))
        return eval_batches(config, name, classes=classes)

    monkeypatch.setattr(inputs, "eval_batches", spy)
    config = small_config("dismax_resnet18", imagenet_o_protocol="hendrycks",
                          detectors=("msp", "energy", "mahalanobis"))  # fmt: skip
    with testing.mock_data(num_examples=16):
        own = train_eval.run(config, str(tmp_path / "dismax"), mode="evaluate")
        logits = _logits(str(tmp_path / "dismax"), "dismax_seed0")
    assert ("imagenet2012", 500) in seen and ("imagenet2012", None) in seen
    assert logits["imagenet_o"].shape[1] == 500 and logits["imagenet2012"].shape[1] == 1000
    # The accuracy is ImageNet's (all classes) in both protocols; ImageNet-O's metrics differ.
    assert [r["accuracy"] for r in own["runs"]] == [r["accuracy"] for r in dismax["runs"]]
    mine = own["runs"][1]["ood"]["imagenet_o"]["msp"]["reference"]["auroc"]
    theirs = dismax["runs"][1]["ood"]["imagenet_o"]["msp"]["reference"]["auroc"]
    assert mine != theirs
    saved = json.loads((tmp_path / "dismax" / "results.json").read_text())
    assert saved["config"]["imagenet_o_protocol"] == "hendrycks"


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ({"evaluate_as_imported": ("softmax",)}, r"evaluate_as_imported needs config.pretrained"),
        ({"pretrained": "/nonexistent.pth"}, r"config.pretrained='/nonexistent.pth': expected an"),
        ({"evaluate_as_imported": ("dismax",), "pretrained": __file__}, r"only a SoftMax"),
        ({"imagenet_o_protocol": "openood"}, r"'hendrycks' or 'dismax'"),
        ({"ood_groups": {"near": ("ninco",)}}, r"config.ood_groups\['near'\]"),
        ({"ood_datasets": ("mnist",)}, r"config.ood_datasets=.*'mnist'.*names among"),
        ({"detector_hyperparameters": {"knn": {"kk": 3}}}, r"detector_hyperparameters\['knn'\]"),
        ({"eval_resize_size": 200}, r"eval_resize_size=200: expected >= image_size=224"),
        ({"image_size": 16}, r"config.image_size=16: expected an int >= 32"),
    ],
)
def test_bad_imagenet_configs_fail_before_anything_runs(tmp_path, overrides, expected):
    config = imagenet.get_config("dismax_resnet18")
    for key, value in overrides.items():
        config[key] = value
    with pytest.raises(validate.ConfigError, match=expected):
        validate.check(config, str(tmp_path / "w"), mode="train_and_evaluate", device_count=8)


def test_missing_imagenet_names_the_sets(tmp_path):
    config = imagenet.get_config("openood_resnet50")
    config.pretrained = __file__  # exists; never read: validation stops first
    config.data_dir = str(tmp_path / "empty")
    os.makedirs(config.data_dir)
    with pytest.raises(validate.ConfigError) as info:
        validate.check(config, str(tmp_path / "w"), mode="train_and_evaluate", device_count=8)
    message = str(info.value)
    for name in ("imagenet2012", "ssb_hard", "ninco", "inaturalist", "openimage_o"):
        assert repr(name) in message, name
    assert "config.fit_split" in message  # the detectors' fit split, though nothing is trained


def test_group_table_without_published_numbers():
    results = {
        "config": {"ood_groups": {"far": ["a", "b"]}, "published": {}},
        "conventions": {"reference": ""},
        "detectors": {"msp": {"title": "MSP"}},
        "summary": {"ood": {"softmax": {"a": {"msp": {"reference": {"auroc": {"mean": 0.5,
                    "values": [0.5]}}}}, "b": {"msp": {"reference": {"auroc": {"mean": 0.7,
                    "values": [0.7]}}}}}}},
    }  # fmt: skip
    table = report.group_table(results)
    assert "| MSP | 60.00 / – |" in table
