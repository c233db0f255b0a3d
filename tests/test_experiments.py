"""The experiment pipeline end to end, tiny: train 2 steps -> checkpoint -> evaluate -> report.

Plus the configs (every paper cell builds, the schedule lands on epochs 150/200/250) and the
report's IsoMax-vs-SoftMax verdict rule on hand-made numbers.
"""

import json
import math
import os
import sys

import numpy as np
import pytest

from experiments import report, train_eval
from experiments.configs import default, paper


def test_paper_configs_cover_the_tables_with_the_reference_recipe():
    keys = set(default.get_config().keys())
    for model in paper.MODELS:
        for dataset in paper.DATASETS:
            for loss in paper.LOSSES:
                config = paper.get_config(f"{model},{dataset},{loss}")
                assert set(config.keys()) == keys, (model, dataset, loss)
                assert (config.model, config.dataset, config.losses) == (model, dataset, (loss,))
                assert (config.num_epochs, config.batch_size, config.learning_rate) == (
                    300,
                    64,
                    0.1,
                )
                assert config.nesterov and config.weight_decay == 1e-4
    config = paper.get_config("densenet_bc100,cifar10,isomax")
    plan = train_eval.training_plan(config)
    spe = math.ceil(50_000 / 64)
    assert plan["steps_per_epoch"] == spe
    assert plan["lr_milestones_steps"] == [150 * spe, 200 * spe, 250 * spe]
    assert config.published.isomax.ood.svhn.tnr_at_tpr == 77.0
    assert "cifar100" in paper.get_config("resnet34,cifar10,dismax").ood_datasets
    assert paper.get_config("wrn28_10,svhn,softmax+isomax").losses == ("softmax", "isomax")


@pytest.mark.parametrize(
    "arg", ["densenet_bc100,cifar10", "vgg16,cifar10,isomax", "resnet34,mnist,isomax", "a,b,c,d"]
)
def test_paper_config_rejects_bad_arguments(arg):
    with pytest.raises(ValueError, match="config argument|unknown"):
        paper.get_config(arg)


def _run(loss, seed, metrics):
    names = ("tnr_at_tpr", "fpr_at_tpr", "auroc", "aupr_in", "aupr_out", "detection_accuracy")
    ood = {
        o: {
            s: {c: {m: v[s] if m in ("tnr_at_tpr", "auroc") else 0.5 for m in names} for c in
                ("reference", "openood")}
            for s in report.PAIRINGS[loss]
        }
        for o, v in metrics.items()
    }  # fmt: skip
    return {"loss": loss, "seed": seed, "run": seed, "accuracy": 0.9, "train": {}, "ood": ood}


def test_verdicts_follow_the_stated_rule():
    soft = {
        "a": {"mps": 0.30, "es": 0.40, "energy": 0.9},
        "b": {"mps": 0.50, "es": 0.20, "energy": 0.9},
        "c": {"mps": 0.90, "es": 0.95, "energy": 0.1},
    }
    iso = {"a": {"es": 0.41, "energy": 0.0}, "b": {"es": 0.45, "energy": 0.0}, "c": {"es": 0.9}}
    iso["c"]["energy"] = 0.0
    runs = [_run("softmax", 0, soft), _run("isomax", 0, iso)]
    v = report.verdicts(report.summarize(runs), challenger="isomax")
    # a: above both SoftMax scores on both metrics; b: below MPS (0.50); c: below both.
    assert {k: x["verdict"] for k, x in v.items()} == {"a": "yes", "b": "no", "c": "no"}
    soft["b"]["mps"] = 0.44  # now above on both ...
    runs = [_run("softmax", 0, soft), _run("isomax", 0, iso)]
    assert report.verdicts(report.summarize(runs))["b"]["verdict"] == "yes"


def _tiny_config(tfds_dir, raw_dir):
    config = default.get_config()
    config.losses = ("softmax", "isomax")
    config.ood_datasets = ("mnist",)  # prepared offline: nothing to build
    config.num_train_steps = 2
    config.train_split = "train[:256]"
    config.batch_size = 16
    config.eval_batch_size = 32
    config.max_eval_examples = 64
    config.checkpoint_every_steps = 1
    config.log_every_steps = 1
    config.data_dir = str(tfds_dir)
    config.manual_dir = str(raw_dir)
    return config


def test_pipeline_train_checkpoint_evaluate_report(
    tmp_path, monkeypatch, shared_tfds_dir, shared_raw_dir
):
    from absl import flags

    from experiments import main

    config = _tiny_config(shared_tfds_dir, shared_raw_dir)
    workdir = tmp_path / "run"
    results = train_eval.train_and_evaluate(config, str(workdir))
    assert [(r["loss"], r["seed"]) for r in results["runs"]] == [("softmax", 0), ("isomax", 0)]
    for run in results["runs"]:
        assert run["train"]["steps"] == 2
        assert run["num_test_examples"] == 64
        assert run["num_ood_examples"] == {"mnist": 64}
        assert os.listdir(workdir / f"{run['loss']}_seed0" / "checkpoints")
        assert os.listdir(workdir / "tensorboard" / f"{run['loss']}_seed0")

    # Evaluate mode through the command line: restores the checkpoints, same numbers.
    os.remove(workdir / "results.json")
    argv = [
        "main",
        f"--config={os.path.abspath(default.__file__)}",
        f"--workdir={workdir}",
        "--mode=evaluate",
        *(f"--config.{k}={v}" for k, v in [
            ("losses", "('softmax','isomax')"), ("ood_datasets", "('mnist',)"),
            ("train_split", "train[:256]"),
            ("num_train_steps", 2), ("batch_size", 16), ("eval_batch_size", 32),
            ("max_eval_examples", 64), ("checkpoint_every_steps", 1),
            ("data_dir", shared_tfds_dir), ("manual_dir", shared_raw_dir),
        ]),
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads its overrides from sys.argv
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)
    main.main(["main"])

    saved = json.loads((workdir / "results.json").read_text())
    assert saved["in_distribution"] == "cifar10" and saved["config"]["losses"] == [
        "softmax",
        "isomax",
    ]
    for before, after in zip(results["runs"], saved["runs"], strict=True):
        assert after["accuracy"] == pytest.approx(before["accuracy"], abs=0)
        es_before = before["ood"]["mnist"]["es"]
        np.testing.assert_allclose(
            [es_before[c]["auroc"] for c in ("reference", "openood")],
            [after["ood"]["mnist"]["es"][c]["auroc"] for c in ("reference", "openood")],
            rtol=1e-6,
        )
        for conv in ("reference", "openood"):
            m = after["ood"]["mnist"]["energy"][conv]
            assert all(0.0 <= m[k] <= 1.0 for k in ("tnr_at_tpr", "auroc", "aupr_in"))
    assert saved["verdicts"]["isomax"]["mnist"]["verdict"] in ("yes", "no", "mixed")

    md = (workdir / "results.md").read_text()
    assert "| OOD set (TNR@TPR95 / AUROC) | SoftMax + MPS | SoftMax + ES |" in md
    assert "## Does IsoMax beat SoftMax?" in md

    import matplotlib.image

    pngs = sorted(os.listdir(workdir / "plots"))
    assert pngs == sorted(
        ["summary.png"] + [f"{k}_{o}.png" for k in ("hist", "roc") for o in config.ood_datasets]
    )
    for name in pngs:
        image = matplotlib.image.imread(workdir / "plots" / name)
        assert image.ndim == 3 and min(image.shape[:2]) > 100
        assert f"plots/{name}" in md
    # Re-running a finished (loss, seed) restores its final checkpoint instead of training.
    from isomax_jax import parallel

    again = train_eval.train_one(
        config, str(workdir), loss="isomax", seed=0, run=0, mesh=parallel.data_mesh()
    )
    assert again["train"] == results["runs"][1]["train"]  # the recorded first training
    logits = np.load(workdir / "logits" / "isomax_seed0.npz")
    assert logits["cifar10"].shape == (64, 10) and np.isfinite(logits["mnist"]).all()
