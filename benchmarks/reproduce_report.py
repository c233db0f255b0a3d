"""What ``benchmarks/device_reproduce.py`` records: the log, ``results.json`` and ``results.md``.

:data:`RESULTS` holds every figure of the run; :func:`write_outputs` rewrites both files from it
(after every part, and from the watchdog), so :func:`results_markdown` accepts a run stopped
anywhere: every section is written only if its part got that far.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import threading
import time

START = time.monotonic()
RESULTS: dict = {"parts": {}, "heads": {}, "log": []}
_LOCK = threading.Lock()
#: TFLOP/s of an 8192^3 bf16 matrix product on a lent H100/H200 (the device tool's KINDS.md).
MEASURED_BF16_PEAK = 790.0
#: The papers' OOD scores of each head (isomax_jax.registry.HEADS[head].paper_scores).
HEADLINE_METRICS = ("tnr_at_tpr", "auroc")


def log(message: str) -> None:
    line = f"[{time.monotonic() - START:6.1f}s] {message}"
    RESULTS["log"].append(line)
    print(line, flush=True)


def write_outputs(out: pathlib.Path) -> None:
    with _LOCK:
        out.mkdir(parents=True, exist_ok=True)
        texts = {"results.json": json.dumps(RESULTS, indent=1, default=str)}
        try:
            texts["results.md"] = results_markdown(RESULTS)
        except Exception as error:  # noqa: BLE001 - the JSON still gets written
            texts["results.md"] = f"(results.md failed: {type(error).__name__}: {error})\n"
        for name, text in texts.items():
            (out / f"{name}.tmp").write_text(text)
            os.replace(out / f"{name}.tmp", out / name)


def side_by_side(timing: dict, torch: dict, *, flops, batch: int, datasheet, head: str) -> dict:
    """JAX's and PyTorch's training images/s, TFLOP/s and fractions of the bf16 peak.

    ``flops`` (per training step) are counted from the JAX program and used for both: the same
    architecture and batch. ``datasheet``: the chip's dense bf16 peak (None: not a known chip).
    """
    measured = MEASURED_BF16_PEAK if datasheet else None

    def row(images_per_s):
        tflops = (flops or 0) * images_per_s / batch / 1e12
        return {
            "images_per_s": images_per_s,
            "tflops": tflops,
            "of_measured_peak": tflops / measured if measured else None,
            "of_datasheet_peak": tflops / datasheet if datasheet else None,
        }

    side = {"flops_per_step": flops, "jax_head": head, "jax": row(timing["images_per_s"])}
    for key in ("eager", "compiled"):
        if "images_per_s" in torch.get(key, {}):
            side[f"torch_{key}"] = row(torch[key]["images_per_s"])
    if "best_images_per_s" in torch:
        side["ratio"] = timing["images_per_s"] / torch["best_images_per_s"]
    return side


def _percent(fraction) -> str:
    return "n/a" if fraction is None or math.isnan(fraction) else f"{100 * fraction:.1f} %"


def _header(r: dict) -> list[str]:
    env, pack = r.get("env", {}), r.get("pack", {})
    smoke = (
        " **SMOKE RUN: tiny model, toy data; the numbers mean nothing.**" if r.get("smoke") else ""
    )
    lines = [
        "# CIFAR-10 in one device call: SoftMax / IsoMax / IsoMax+ with every detector",
        "",
        f"Device: {env.get('device_kind', '?')} ({env.get('backend', '?')}, jax "
        f"{env.get('jax', '?')}, PyTorch {r.get('torch', {}).get('torch', '?')}); commit "
        f"{r.get('commit') or 'unknown'}; {r.get('date', '')}; "
        f"{r.get('total_seconds', math.nan):.0f} s in all.{smoke}",
        "",
        f"Images: every image of this run was read from the pack `{pack.get('path', '?')}` "
        f"({pack.get('mib', math.nan):.1f} MiB; NumPy + Pillow, no TensorFlow); decoded pixels "
        f"identical to the writer's: {pack.get('pixels_as_written', '?')}.",
        "",
    ]
    if pack.get("sets"):
        lines += [
            "| set/split | images | codec | MAE (0-255) | max error |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {v['count']} | {v['codec']} | {v['mae']:.3f} | {v['max_error']} |"
            for k, v in pack["sets"].items()
        ]
        lines.append("")
    return lines


def _recipe(plan: dict) -> list[str]:
    if not plan:
        return []
    return [
        f"Recipe (every head): {plan['model']} in {plan['dtype']}, batch {plan['batch']}, "
        f"device-resident data (permutation, pad-4 crop and flip inside the step), "
        f"{plan['epochs']} epochs per head: the epoch ({plan['epoch_seconds']:.2f} s) measured "
        f"first, {plan['train_seconds_per_head']:.0f} s of training per head planned; "
        f"SGD-Nesterov 0.9, weight decay {plan['weight_decay']}, linear warm-up over "
        f"{100 * plan['warmup']:.0f} % of the steps to lr {plan['peak_lr']}, linear decay to 0.",
        "",
    ]


def _heads_table(heads: dict) -> list[str]:
    if not heads:
        return []
    lines = [
        "| head | epochs | train s | train img/s | compile s | last epoch loss | test acc. | "
        "eval s | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for head, h in heads.items():
        acc, losses = h.get("accuracy"), h.get("loss_by_epoch") or [math.nan]
        note = h.get("error", "")
        if "epochs_reduced_from" in h:
            note = f"epochs cut from {h['epochs_reduced_from']} (time) {note}"
        lines.append(
            f"| {head} | {h.get('epochs', '-')} | {h.get('train_seconds', math.nan):.0f} | "
            f"{h.get('images_per_s', math.nan):.0f} | {h.get('compile_seconds', math.nan):.0f} | "
            f"{losses[-1]:.3f} | {'-' if acc is None else f'{100 * acc:.2f} %'} | "
            f"{h.get('eval_seconds', math.nan):.0f} | {note} |"
        )
    return [*lines, ""]


def _headline(heads: dict) -> list[str]:
    """The papers' score of each head on each OOD set, reference convention."""
    rows, sets = [], None
    for head, h in heads.items():
        report = h.get("report")
        if not report:
            continue
        by_set = report["metrics"]["reference"]
        sets = sets or list(by_set)
        for score in h.get("paper_scores", ()):
            if score in report["detectors"]:
                cells = []
                for s in sets:
                    m = by_set.get(s, {}).get(score, {})
                    cells.append(
                        " / ".join(
                            "n/a" if m.get(k) is None else f"{100 * m[k]:.1f}"
                            for k in HEADLINE_METRICS
                        )
                    )
                rows.append(f"| {head} + {score} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [
        "## Headline: each head with its papers' score (reference convention, TNR@TPR95 / "
        "AUROC, %)",
        "",
        "| model + score | " + " | ".join(sets) + " |",
        "|---|" + "---|" * len(sets),
        *rows,
        "",
    ]


def _side_by_side(side: dict | None) -> list[str]:
    if not side:
        return []
    lines = [
        "## JAX and PyTorch: the same model and batch on the same device",
        "",
        "| framework | train img/s | TFLOP/s | of measured bf16 peak (790) | of datasheet |",
        "|---|---|---|---|---|",
    ]
    for name in ("jax", "torch_eager", "torch_compiled"):
        if name in side:
            s = side[name]
            lines.append(
                f"| {name} | {s['images_per_s']:.0f} | {s['tflops']:.2f} | "
                f"{_percent(s['of_measured_peak'])} | {_percent(s['of_datasheet_peak'])} |"
            )
    return [
        *lines,
        "",
        f"JAX / best PyTorch: **{side.get('ratio', math.nan):.2f}×** "
        f"({(side.get('flops_per_step') or 0) / 1e9:.2f} GFLOP per step, counted from the JAX "
        "program's convolutions and matrix products and used for both; JAX draws and augments "
        f"its batch inside the step ({side.get('jax_head')} head), PyTorch trains on one fixed "
        "batch).",
        "",
    ]


def results_markdown(r: dict) -> str:
    heads = r.get("heads", {})
    lines = _header(r) + _recipe(r.get("plan", {})) + _heads_table(heads)
    lines += _headline(heads) + _side_by_side(r.get("side_by_side"))
    for head, h in heads.items():
        if "markdown" in h:
            lines += [f"## {head}: every detector", "", h["markdown"]]
    failed = {k: v["error"] for k, v in r.get("parts", {}).items() if v.get("error")}
    if failed or r.get("watchdog_fired"):
        lines += ["## What did not run", ""]
        lines += [f"* {k}: {v}" for k, v in failed.items()]
        if r.get("watchdog_fired"):
            lines.append("* the watchdog stopped the run at its time limit")
    return "\n".join(lines) + "\n"
