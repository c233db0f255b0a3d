"""benchmarks/device_reproduce.py: ``--reproduce --smoke`` trains and evaluates every head on
a toy pack, PyTorch beside it; failures stay soft; the plan and the report hold up."""

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import device_reproduce  # noqa: E402
import reproduce_report  # noqa: E402


def _run(tmp_path, *flags, timeout=420):
    out = tmp_path / "out"
    # One CPU device: the layout of the one-GPU run (each evaluation overlaps the next training).
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    script = ROOT / "benchmarks" / "device_check.sh"
    proc = subprocess.run(
        ["bash", str(script), "--reproduce", "--smoke", "--out", str(out), *flags],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
        env=env,
    )
    results = json.loads((out / "results.json").read_text()) if out.exists() else None
    markdown = (out / "results.md").read_text() if out.exists() else ""
    return proc, results, markdown


@pytest.mark.slow
def test_smoke_run_trains_and_evaluates_every_head(tmp_path):
    proc, results, markdown = _run(tmp_path, "--heads", "softmax,no_such_head,isomax_plus")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "watchdog_fired" not in results
    assert not any("error" in part for part in results["parts"].values()), results["parts"]
    pack = results["pack"]
    assert pack["pixels_as_written"] and pack["ood_sets"] == ["grey", "gaussian_noise"]
    assert {v["codec"] for v in pack["sets"].values()} == {"jpeg", "png", "generated"}
    epochs = results["plan"]["epochs"]
    assert epochs >= 1 and results["plan"]["epoch_seconds"] > 0
    assert "error" in results["heads"]["no_such_head"]  # one head fails, the others run
    for head in ("softmax", "isomax_plus"):
        entry = results["heads"][head]
        assert "error" not in entry, entry.get("error")
        assert entry["epochs"] == epochs and len(entry["loss_by_epoch"]) == epochs
        assert np.isfinite(entry["loss_by_epoch"]).all() and 0 <= entry["accuracy"] <= 1
        report = entry["report"]
        assert set(report["metrics"]) == {"reference", "openood"}
        for by_set in report["metrics"].values():
            assert set(by_set) == {"grey", "gaussian_noise"}
        assert len(report["detectors"]) > 10 and entry["paper_scores"][0] in report["detectors"]
    assert results["side_by_side"]["jax"]["images_per_s"] > 0
    if importlib.util.find_spec("torch") is not None:
        torch = results["torch"]
        assert torch["eager"]["images_per_s"] > 0 and torch["compiled"]["images_per_s"] > 0
        assert results["side_by_side"]["ratio"] > 0
    expected = (
        "every image of this run was read from the pack",
        "## Headline",
        "JAX / best PyTorch",
        "## isomax_plus: every detector",
        "Convention `openood`",
    )
    for text in expected:
        assert text in markdown, text


@pytest.mark.slow
def test_watchdog_writes_the_results_and_exits(tmp_path):
    proc, results, markdown = _run(
        tmp_path, "--hard-limit", "6", "--torch-budget", "0", timeout=120
    )
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "WATCHDOG" in proc.stdout and results["watchdog_fired"] is True
    assert "the watchdog stopped the run" in markdown


def test_the_report_holds_up_for_a_run_stopped_anywhere():
    assert "# CIFAR-10" in reproduce_report.results_markdown({})
    partial = {
        "parts": {"pack": {"error": "PackError: gone"}},
        "heads": {"softmax": {}},
        "plan": {},
        "side_by_side": {
            "jax": {
                "images_per_s": 1.0,
                "tflops": 0.1,
                "of_measured_peak": None,
                "of_datasheet_peak": None,
            }
        },
    }
    text = reproduce_report.results_markdown(partial)
    assert "pack: PackError: gone" in text and "| softmax |" in text


def test_side_by_side_counts_the_same_flops_for_both():
    timing = {"images_per_s": 1280.0}
    torch = {
        "eager": {"images_per_s": 640.0},
        "compiled": {"images_per_s": 1024.0},
        "best_images_per_s": 1024.0,
    }
    side = reproduce_report.side_by_side(
        timing, torch, flops=1e12, batch=128, datasheet=989.4, head="softmax"
    )
    assert side["ratio"] == pytest.approx(1.25)
    assert side["jax"]["tflops"] == pytest.approx(10.0)  # 1e12 flops x 10 steps/s
    assert side["torch_compiled"]["of_measured_peak"] == pytest.approx(8.0 / 790.0)
    assert side["torch_eager"]["of_datasheet_peak"] == pytest.approx(5.0 / 989.4)


def test_training_time_per_head_fits_the_compilations_and_evaluations():
    elapsed = time.monotonic() - reproduce_report.START
    args = argparse.Namespace(hard_limit=elapsed + 110.0, margin=10.0)

    def fit(*a):
        return device_reproduce.train_seconds_that_fit(args, *a)

    # 3 heads, 100 s left: 3 T + 2 compilations (10) + the last evaluation (20) = 100.
    assert fit(3, 0, 10.0, 20.0) == pytest.approx(20.0, abs=0.5)
    # The last head with 2 evaluations still queued: the chain of 3 evaluations bounds it.
    assert fit(1, 2, 10.0, 20.0) == pytest.approx(40.0, abs=0.5)


def test_learning_rate_warms_up_then_decays_linearly():
    import jax
    import reproduce_jax

    from isomax_jax import device_data

    args = argparse.Namespace(
        model="tiny", dtype="float32", weight_decay=5e-4, seed=0, peak_lr=0.2, batch=8
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 8, 8, 3), dtype=np.uint8)
    data = device_data.put(images, np.arange(32) % 10, mean=(0.5,) * 3, std=(0.25,) * 3)
    built = reproduce_jax.build_head(args, "softmax", data, None)
    assert built["flops"] > 0
    state, plan, rates = built["state"], reproduce_jax.plan_array(0.2, 4, 12), []
    for _ in range(13):
        state, _ = built["step"](state, data, plan)
        rates.append(float(jax.device_get(state.opt_state.hyperparams["learning_rate"])))
    expected = [0.2 * min(s / 4, max(12 - s, 0) / 8) for s in range(13)]
    np.testing.assert_allclose(rates, expected, rtol=1e-6, atol=1e-7)
