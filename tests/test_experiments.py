"""The experiment layer on generated data (`isomax_jax.data.testing.mock_data`: no ../shared).

Tiny runs: train a few steps -> checkpoint -> evaluate with every detector -> report; the CLI's
evaluate mode; two runs of the same config give identical numbers and logits; the multi-device
default equals one device; the config is validated before any training; a diverging run stops
naming the step. The SIGKILL-and-resume test through the experiment's own loop is in
`test_experiments_resume.py`.
"""

import json
import math
import os
import sys

import jax
import numpy as np
import pytest

from experiments import evaluate, inputs, records, report, summaries, train_eval, training, validate
from experiments.configs import default, paper
from isomax_jax import data, parallel
from isomax_jax.data import testing

MOCK_EXAMPLES = 64
# Metrics at the 95 % TPR operating point: NaN when a set is too small to resolve it.
OPERATING_POINT = ("tnr_at_tpr", "fpr_at_tpr")


def same(a, b) -> bool:
    """Equal, NaN included (as `results.json` writes them)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def tiny_config(**overrides):
    config = default.get_config()
    config.losses = ("softmax", "isomax")
    config.ood_datasets = ("mnist", "gaussian_noise")
    config.num_train_steps = 3
    config.batch_size = 16
    config.eval_batch_size = 32
    config.max_eval_examples = 64
    config.perturbation_max_examples = 8
    config.bootstrap_samples = 10
    config.checkpoint_every_steps = 2
    config.log_every_steps = 1
    config.warmup_epochs = 0.0
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.fixture
def mock_data():
    with testing.mock_data(num_examples=MOCK_EXAMPLES):
        yield


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One tiny experiment, run to the end (shared by several tests)."""
    workdir = tmp_path_factory.mktemp("tiny")
    with testing.mock_data(num_examples=MOCK_EXAMPLES):
        results = train_eval.run(tiny_config(), str(workdir))
    return workdir, results


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
                assert config.schedule == "multistep" and config.weight_decay == 1e-4
                assert config.nesterov
    config = paper.get_config("densenet_bc100,cifar10,isomax")
    plan = training.training_plan(config, 50_000)
    spe = 50_000 // 64
    assert plan["steps_per_epoch"] == spe and plan["total_steps"] == 300 * spe
    assert plan["lr_milestones_steps"] == [150 * spe, 200 * spe, 250 * spe]
    assert config.published.isomax.ood.svhn.tnr_at_tpr == 77.0
    assert config.published.isomax.ood.svhn.score == "entropic"
    assert "cifar100" in paper.get_config("resnet34,cifar10,dismax").ood_datasets


@pytest.mark.parametrize(
    "arg", ["densenet_bc100,cifar10", "vgg16,cifar10,isomax", "resnet34,mnist,isomax", "a,b,c,d"]
)
def test_paper_config_rejects_bad_arguments(arg):
    with pytest.raises(ValueError, match="config argument|unknown"):
        paper.get_config(arg)


def test_default_schedule_warms_up_then_decays_to_zero():
    config = default.get_config()
    plan = training.training_plan(config, 50_000)
    schedule = training.make_schedule(config, plan)
    assert plan["steps_per_epoch"] == 390 and plan["total_steps"] == round(6 * 390)
    warm = plan["warmup_steps"]
    assert warm == round(0.9 * 390)
    assert float(schedule(0)) == 0.0
    assert float(schedule(warm)) == pytest.approx(0.2)
    assert float(schedule(plan["total_steps"])) == pytest.approx(0.0, abs=1e-7)
    # Progressive resizing: the first 2/3 of the steps (4 of 6 epochs) at 24 px.
    assert plan["early_steps"] == round(2 / 3 * plan["total_steps"]) == 1560
    assert plan["early_image_size"] == 24
    config.early_image_size = 0
    off = training.training_plan(config, 50_000)
    assert off["early_steps"] == 0 and off["early_image_size"] is None


def test_downscale_keeps_the_batch_and_its_content():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
    small = np.asarray(training.downscale(images, 24))
    assert small.shape == (4, 24, 24, 3)
    # Antialiased: each output pixel averages its input neighbourhood, so the per-image,
    # per-channel means are kept up to the border weights; a constant image stays constant.
    np.testing.assert_allclose(small.mean((1, 2)), images.mean((1, 2)), atol=0.05)
    np.testing.assert_allclose(training.downscale(np.full((1, 32, 32, 3), 0.7), 24), 0.7, 1e-6)
    # Each image is resized on its own: a batch of one gives the same result.
    np.testing.assert_allclose(training.downscale(images[1:2], 24)[0], small[1], atol=1e-6)


def _result(loss, seed, values):
    """A RunResult-like dict with TNR/AUROC per (OOD set, detector) from `values`."""
    names = ("tnr_at_tpr", "fpr_at_tpr", "auroc", "aupr_in", "aupr_out", "detection_accuracy")
    ood = {
        o: {
            d: {c: {m: v[d] if m in ("tnr_at_tpr", "auroc") else 0.5 for m in names}
                for c in ("reference", "openood")}
            for d in v
        }
        for o, v in values.items()
    }  # fmt: skip
    return {"loss": loss, "seed": seed, "run": seed, "accuracy": 0.9, "train": {}, "ood": ood}


def test_verdicts_compare_with_softmax_best_detector():
    soft = {
        "a": {"msp": 0.30, "entropic": 0.40, "energy": 0.2},
        "b": {"msp": 0.50, "entropic": 0.20, "energy": 0.2},
        "c": {"msp": 0.90, "entropic": 0.95, "energy": 0.1},
    }
    iso = {
        "a": {"entropic": 0.41, "knn": 0.1},
        "b": {"entropic": 0.45, "knn": 0.6},
        "c": {"entropic": 0.9, "knn": 0.1},
    }
    config = {"model": "m", "dataset": "cifar10", "ood_datasets": ["a", "b", "c"]}
    config["conventions"] = ["reference"]
    results = report.build_results(config, [_result("softmax", 0, soft), _result("isomax", 0, iso)])
    v = results["verdicts"]["isomax"]
    # a: above SoftMax's best (ES 0.40) on both; b: below MPS 0.50; c: below ES 0.95.
    assert {k: x["verdict"] for k, x in v["by_ood"].items()} == {"a": "yes", "b": "no", "c": "no"}
    assert v["by_ood"]["b"]["auroc"]["softmax_best"] == "msp"
    # IsoMax + its best detector: KNN 0.6 beats SoftMax's best 0.50 on b.
    assert v["best_detector"]["b"]["verdict"] == "yes"
    assert v["best_detector"]["b"]["auroc"]["challenger"] == "knn"
    # one run without bootstrap intervals: noise unknown
    assert v["by_ood"]["a"]["auroc"]["beyond_noise"] is None
    # several runs: beyond noise iff the mean ± std intervals do not overlap
    for (a, b), beyond in (((0.41, 0.61), True), ((0.31, 0.71), False)):
        runs = [_result("softmax", s, soft) for s in (0, 1)]  # ES 0.40 ± 0
        first, second = ({o: dict(d) for o, d in iso.items()} for _ in range(2))
        first["a"]["entropic"], second["a"]["entropic"] = a, b  # 0.51 ± 0.10, 0.51 ± 0.20
        runs += [_result("isomax", 0, first), _result("isomax", 1, second)]
        multi = report.build_results(config, runs)["verdicts"]["isomax"]["by_ood"]["a"]["auroc"]
        assert multi["beyond_noise"] is beyond
    assert summaries.best_detector(summaries.summarize(runs), "softmax", "c", "auroc") == "entropic"


def test_a_detector_that_cannot_be_fitted_is_reported():
    info = evaluate._detector_info({"isomax_seed0": ["msp"]}, {"isomax_seed0": {"knn": "why"}})
    assert info["knn"] == {"title": "KNN", "not_fitted": {"isomax_seed0": "why"}}
    assert "hyperparameters" in info["msp"] and "not_fitted" not in info["msp"]
    config = {"model": "m", "dataset": "cifar10", "ood_datasets": ["a"], "batch_size": 8}
    config["losses"], config["conventions"] = ["isomax"], ["reference"]
    run = _result("isomax", 0, {"a": {"msp": 0.5}})
    results = report.build_results(config, [run], detectors=info)
    assert "- KNN not fitted for isomax_seed0: why" in report.markdown(results)


@pytest.mark.slow
def test_tiny_experiment_end_to_end(finished):
    workdir, results = finished
    assert [(r["loss"], r["seed"]) for r in results["runs"]] == [("softmax", 0), ("isomax", 0)]
    for run in results["runs"]:
        assert run["train"]["steps"] == 3 and run["num_test_examples"] == 64
        # progressive resizing (the default config's): 2 of the 3 steps at 24 px
        assert (run["train"]["early_steps"], run["train"]["early_image_size"]) == (2, 24)
        assert run["num_ood_examples"] == {"mnist": 64, "gaussian_noise": 64}
        assert os.listdir(workdir / records.run_name(run["loss"], 0) / "checkpoints")
        # every applicable detector was scored, ViM only for the linear head
        dets = set(run["ood"]["mnist"])
        assert {"msp", "energy", "entropic", "knn", "react", "ash", "odin"} <= dets
        assert ("vim" in dets) == (run["loss"] == "softmax")
        assert ("min_distance" in dets) == (run["loss"] != "softmax")
        for by_conv in run["ood"]["mnist"].values():
            assert set(by_conv) == {"reference", "openood"}
            for metric, v in by_conv["reference"].items():  # ODIN's 8 images cannot resolve
                assert 0 <= v <= 1 or (metric in OPERATING_POINT and math.isnan(v))  # TPR 95 %
    assert results["code_version"]["commit"]
    assert set(results["timings"]) >= {"training_s", "evaluation_s", "report_s"}
    assert results["verdicts"]["isomax"]["by_ood"]["mnist"]["verdict"] in ("yes", "no", "mixed")
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(results["runs"]))
    md = (workdir / "results.md").read_text()
    for part in ("## Headline", "## Does IsoMax beat SoftMax?", "### mnist", "SoftMax's best",
                 "the first 2 on images downscaled to 24 px"):  # fmt: skip
        assert part in md, part
    pngs = sorted(os.listdir(workdir / "plots"))
    assert "summary.png" in pngs and "roc_mnist.png" in pngs
    logits = np.load(workdir / "logits" / "isomax_seed0.npz")
    assert logits["cifar10"].shape == (64, 10) and np.isfinite(logits["mnist"]).all()
    # 64 examples of 128 features: a singular covariance, fitted over its resolvable directions
    # (dead units work), so Mahalanobis is scored for every run. After 3 steps most classes have
    # no correctly classified training example: SHE's patterns are undefined, and the report
    # says so instead of scoring it.
    assert all("mahalanobis" in run["ood"]["mnist"] for run in results["runs"])
    assert "not_fitted" not in results["detectors"]["mahalanobis"]
    assert "Mahalanobis not fitted" not in md
    she = results["detectors"].get("she", {}).get("not_fitted", {})
    for run in results["runs"]:
        name = records.run_name(run["loss"], run["seed"])
        assert ("she" in run["detectors"]) == (name not in she)
    assert ("SHE not fitted for" in md) == bool(she)


@pytest.mark.slow
def test_same_config_twice_gives_identical_numbers_and_logits(finished, tmp_path, mock_data):
    workdir, first = finished
    again = train_eval.run(tiny_config(), str(tmp_path / "again"))
    timing = ("wall_time_s", "compile_s", "seconds_per_step")

    def numbers(run):
        return {**run, "train": {k: v for k, v in run["train"].items() if k not in timing}}

    assert same([numbers(r) for r in again["runs"]], [numbers(r) for r in first["runs"]])
    for name in ("softmax_seed0", "isomax_seed0"):
        a = np.load(workdir / "logits" / f"{name}.npz")
        b = np.load(tmp_path / "again" / "logits" / f"{name}.npz")
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.slow
def test_finished_runs_are_restored_and_evaluate_mode_rewrites_the_report(
    finished, monkeypatch, mock_data
):
    from absl import flags

    from experiments import main

    workdir, results = finished
    mtimes = {p: p.stat().st_mtime for p in (workdir / "softmax_seed0" / "checkpoints").iterdir()}
    again = train_eval.run(tiny_config(), str(workdir))  # resumes: nothing left to train
    assert [r["train"] for r in again["runs"]] == [r["train"] for r in results["runs"]]
    assert {p: p.stat().st_mtime for p in mtimes} == mtimes
    os.remove(workdir / "results.json")
    argv = [
        "main",
        f"--config={os.path.abspath(default.__file__)}",
        f"--workdir={workdir}",
        "--mode=evaluate",
        *(f"--config.{k}={v}" for k, v in [
            ("losses", "('softmax','isomax')"), ("ood_datasets", "('mnist','gaussian_noise')"),
            ("num_train_steps", 3), ("batch_size", 16), ("eval_batch_size", 32),
            ("max_eval_examples", 64), ("perturbation_max_examples", 8),
            ("bootstrap_samples", 10), ("checkpoint_every_steps", 2), ("log_every_steps", 1),
            ("warmup_epochs", 0.0),
        ]),
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads its overrides from sys.argv
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)
    main.main(["main"])
    saved = json.loads((workdir / "results.json").read_text())
    for before, after in zip(results["runs"], saved["runs"], strict=True):
        assert after["accuracy"] == before["accuracy"]
        assert same(after["ood"], before["ood"])


@pytest.mark.slow
def test_multi_device_default_equals_one_device(tmp_path, mock_data):
    config = tiny_config(num_train_steps=4, losses=("isomax",), learning_rate=0.05)
    source = inputs.TrainSource(config, str(tmp_path))
    params = []
    for n in (1, 2, 8):
        mesh = parallel.data_mesh(jax.devices()[:n])
        run = training.train_one(
            config, str(tmp_path / f"d{n}"), loss="isomax", seed=0, run=0, mesh=mesh, source=source
        )
        params.append(jax.tree.leaves(jax.device_get(run.state.params)))
    for other in params[1:]:
        for a, b in zip(params[0], other, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # float32 summation order


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ({"ood_datasets": ("mnist", "svhnn")}, r"config.ood_datasets=.*'svhnn'.*names among"),
        ({"conventions": ("reference", "sklearn")}, r"config.conventions=.*'sklearn'"),
        ({"eval_batch_size": 100}, r"config.eval_batch_size=100: expected a multiple of the 8"),
        ({"losses": ("softmax", "isomaxx")}, r"config.losses=.*'isomaxx'"),
        ({"num_epochs": -2.0}, r"config.num_epochs=-2.0: expected a number > 0"),
        ({"learning_rate": -0.1}, r"config.learning_rate=-0.1: expected a number > 0"),
        ({"dataset": "cifar11"}, r"config.dataset='cifar11': expected one of"),
        ({"batch_size": 0}, r"config.batch_size=0: expected an int > 0"),
        ({"early_image_size": 32}, r"config.early_image_size=32: expected < the image size 32"),
        ({"early_image_size": 4}, r"config.early_image_size=4: expected 0 \(off\) or an int"),
        ({"early_fraction": 1.0}, r"config.early_fraction=1.0: expected a number in \[0, 1\)"),
        ({"runs": 0}, r"config.runs=0: expected an int >= 1"),
        ({"detectors": ("knn", "mahalanobiss")}, r"config.detectors=.*'mahalanobiss'"),
        ({"dismax_fpr": True}, r"dismax_fpr=True needs 'dismax'"),
    ],
)
def test_bad_configs_fail_before_training(tmp_path, overrides, expected, monkeypatch):
    def never(*args, **kwargs):
        pytest.fail("data was loaded or a model trained for a config that cannot run")

    monkeypatch.setattr(training, "train_one", never)
    monkeypatch.setattr(data, "load_train_split", never)
    config = tiny_config(**overrides)
    with pytest.raises(validate.ConfigError, match=expected):
        train_eval.run(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()  # nothing trained, nothing written


def test_missing_data_fails_before_training(tmp_path):
    config = tiny_config(
        ood_datasets=("mnist", "svhn"), data_dir=str(tmp_path / "empty"), download=False
    )
    os.makedirs(tmp_path / "empty")
    with pytest.raises(validate.ConfigError) as info:
        train_eval.run(config, str(tmp_path / "w"))
    message = str(info.value)
    assert "'svhn'" in message and "'mnist'" in message and "cifar10" in message
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_changed_config_in_an_existing_workdir_names_the_keys(finished, mock_data):
    workdir, _ = finished
    config = tiny_config(learning_rate=0.05, weight_decay=1e-4, detectors=("msp",))
    with pytest.raises(validate.ConfigError) as info:
        train_eval.run(config, str(workdir))
    message = str(info.value)
    assert "learning_rate: recorded 0.2, now 0.05" in message
    assert "weight_decay: recorded 0.0005, now 0.0001" in message
    assert "detectors" not in message  # evaluation-only keys may change on a finished run
    # ... and a finished run is re-evaluated with them, training nothing.
    again = train_eval.run(tiny_config(detectors=("msp", "energy")), str(workdir))
    assert again["runs"][0]["loss"] == "softmax"  # + its paper scores, always scored
    assert set(again["runs"][0]["ood"]["mnist"]) == {"msp", "energy", "entropic"}
    assert "fresh --workdir" in message


@pytest.mark.slow
def test_diverging_training_stops_naming_the_step(tmp_path, mock_data):
    config = tiny_config(learning_rate=1e12, num_train_steps=6, losses=("softmax",))
    with pytest.raises(training.TrainingDivergedError, match=r"at step \d+ of 6"):
        train_eval.run(config, str(tmp_path / "w"))


def test_bad_labels_stop_at_the_first_batch(tmp_path, mock_data, monkeypatch):
    images, labels = data.load_train_split("cifar10")
    bad = np.full_like(labels, 10)  # out of range for 10 classes
    monkeypatch.setattr(data, "load_train_split", lambda *a, **k: (images, bad))
    config = tiny_config(losses=("isomax",))
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 10\)"):
        train_eval.run(config, str(tmp_path / "w"))


def test_plan_rejects_a_batch_larger_than_the_split():
    config = tiny_config(batch_size=128)
    with pytest.raises(validate.ConfigError, match="exceeds the 64 training examples"):
        training.training_plan(config, 64)
    assert math.isclose(training.training_plan(tiny_config(), 64)["epochs"], 3 / 4)
