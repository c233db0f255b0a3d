"""benchmarks/device_check.py: the ``--smoke`` run covers every part; failures stay soft."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import device_throughput  # noqa: E402


def _run(tmp_path, *flags, timeout=240):
    out = tmp_path / "device_check.json"
    script = ROOT / "benchmarks" / "device_check.sh"
    proc = subprocess.run(
        ["bash", str(script), "--smoke", "--out", str(out), *flags],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )
    results = json.loads(out.read_text()) if out.exists() else None
    return proc, results


@pytest.mark.slow
def test_smoke_run_covers_every_part(tmp_path):
    proc, results = _run(tmp_path, "--strict")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Printed as it goes, part by part.
    assert proc.stdout.index("== throughput") < proc.stdout.index("== cifar")
    assert {name: part["status"] for name, part in results["parts"].items()} == {
        "throughput": "ok",
        "cifar": "ok",
    }
    throughput = results["parts"]["throughput"]["results"]
    assert {row["dtype"] for row in throughput["rows"]} == {"float32", "bfloat16"}
    for row in throughput["rows"]:
        assert row["train_images_per_s"] > 0 and row["eval_images_per_s"] > 0
        assert row["train_tflops"] > 0 and row["train_temp_mib"] > 0
    (precision,) = throughput["mixed_precision"]
    assert 0 < precision["features_rel_diff"] < 0.05
    cifar = results["parts"]["cifar"]["results"]
    assert cifar["data"] == "mock"
    for head in ("softmax", "isomax"):
        assert cifar[f"train_{head}"]["steps"] > 0
        evaluation = cifar[f"eval_{head}"]
        assert 0.0 <= evaluation["accuracy"] <= 1.0
        assert evaluation["ood"], "no OOD set was evaluated"
        for per_score in evaluation["ood"].values():
            for m in per_score.values():
                assert 0.0 <= m["auroc"] <= 1.0
    assert "watchdog_fired" not in results and results["total_seconds"] > 0  # ended on its own


@pytest.mark.slow
def test_a_failing_configuration_does_not_stop_the_run(tmp_path):
    proc, results = _run(tmp_path, "--only", "throughput", "--models", "no_such_model,tiny")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    part = results["parts"]["throughput"]
    assert part["status"] == "partial"
    failed = [row for row in part["results"]["rows"] if "error" in row]
    assert {row["model"] for row in failed} == {"no_such_model"}
    assert "no_such_model" in proc.stdout and "lowering failed" in proc.stdout
    assert any(row["model"] == "tiny" and "error" not in row for row in part["results"]["rows"])


@pytest.mark.slow
def test_watchdog_writes_the_json_and_exits(tmp_path):
    proc, results = _run(tmp_path, "--only", "cifar", "--hard-limit", "1", timeout=120)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "WATCHDOG" in proc.stdout
    assert results["watchdog_fired"] is True and results["parts"]["cifar"]["status"] == "running"


@pytest.mark.parametrize(
    "kind, bf16",
    [("NVIDIA H200", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0),
     ("TPU v5 lite", 197.0), ("TPU v4", 275.0), ("cpu", None)],
)  # fmt: skip
def test_peak_table(kind, bf16):
    peak = device_throughput.peak_tflops(kind)
    assert (peak and peak["bfloat16"]) == bf16


def test_matmul_flops_counts_convolutions_products_and_their_gradients():
    import jax
    import jax.numpy as jnp
    from jax import lax

    x, w = jnp.ones((8, 16, 16, 4)), jnp.ones((3, 3, 4, 6))
    dims = ("NHWC", "HWIO", "NHWC")

    def conv(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims).sum()

    forward = 2 * (8 * 16 * 16 * 6) * (3 * 3 * 4)  # 2 x outputs x multiply-adds per output
    assert device_throughput.matmul_flops(jax.make_jaxpr(conv)(x, w).jaxpr) == forward
    # The two gradients are convolutions of the same size; under jit (a sub-program).
    grad = jax.jit(jax.value_and_grad(conv, argnums=(0, 1)))
    assert device_throughput.matmul_flops(jax.make_jaxpr(grad)(x, w).jaxpr) == 3 * forward

    # The costliest branch of a `cond` counts once: a product of 8x8x8 against one of 4x8x8.
    def branches(p, a, b):
        return lax.cond(p, lambda: (a @ b).sum(), lambda: (a[:4] @ b).sum())

    a8 = jnp.ones((8, 8))
    jaxpr = jax.make_jaxpr(branches)(True, a8, a8).jaxpr
    assert device_throughput.matmul_flops(jaxpr) == 2 * 8 * 8 * 8

    def scanned(a, b):  # a scan body counts `length` times
        return lax.scan(lambda c, _: (c @ b, None), a, None, length=5)[0]

    a, b = jnp.ones((4, 8)), jnp.ones((8, 8))
    assert device_throughput.matmul_flops(jax.make_jaxpr(scanned)(a, b).jaxpr) == 5 * 2 * 4 * 8 * 8
