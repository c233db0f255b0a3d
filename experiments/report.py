"""The experiment report: `results.json`, `results.md` and PNG plots, from a results dict.

`build_results` turns the per-run numbers into the JSON document (config, versions, every
metric of every run, mean ± std over runs, the IsoMax-vs-SoftMax verdicts); `write_report`
writes it with the markdown report and the plots. Nothing here trains or evaluates.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from experiments import report_plots
from isomax_jax import tables

METRICS = ("tnr_at_tpr", "auroc", "aupr_in", "aupr_out", "detection_accuracy")
METRIC_TITLES = {
    "tnr_at_tpr": "TNR@TPR95",
    "fpr_at_tpr": "FPR@TPR95",
    "auroc": "AUROC",
    "aupr_in": "AUPR-in",
    "aupr_out": "AUPR-out",
    "detection_accuracy": "Det. acc.",
}
SCORE_TITLES = {"mps": "MPS", "es": "ES", "mds": "MDS", "mmles": "MMLES", "energy": "energy"}
LOSS_TITLES = {
    "softmax": "SoftMax",
    "isomax": "IsoMax",
    "isomax_plus": "IsoMax+",
    "dismax": "DisMax",
}
# The papers' pairings of loss and score (plus energy, a baseline from the literature).
PAIRINGS = {
    "softmax": ("mps", "es", "energy"),
    "isomax": ("es", "energy"),
    "isomax_plus": ("mds", "energy"),
    "dismax": ("mmles", "energy"),
}
CONVENTION_NOTES = {
    "reference": (
        "the IsoMax papers' `calculate_log.py`: in-distribution is the positive class; "
        "TNR@TPR95 is the fraction of OOD inputs rejected when 95 % of in-distribution inputs "
        "are kept; ties remove the in-distribution sample first"
    ),
    "openood": (
        "OpenOOD v1.5: OOD is the positive class (score negated, scikit-learn curves); "
        "FPR@95 is the fraction of in-distribution inputs flagged when 95 % of OOD inputs are "
        "caught (a different operating point); TNR@TPR95 here is 1 - that FPR"
    ),
}


def _stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean and population standard deviation (ddof=0, as `isomax_jax.tables`) of `values`."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std()), "values": [float(v) for v in arr]}


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean ± std over runs of accuracy and of every (loss, OOD set, score, convention, metric)."""
    losses = list(dict.fromkeys(run["loss"] for run in runs))
    summary: dict[str, Any] = {"accuracy": {}, "ood": {}}
    for loss in losses:
        mine = [run for run in runs if run["loss"] == loss]
        summary["accuracy"][loss] = _stats([run["accuracy"] for run in mine])
        table: dict[str, Any] = {}
        for ood, by_score in mine[0]["ood"].items():
            for score, by_conv in by_score.items():
                for conv, metrics in by_conv.items():
                    for metric in metrics:
                        values = [run["ood"][ood][score][conv][metric] for run in mine]
                        leaf = table.setdefault(ood, {}).setdefault(score, {})
                        leaf.setdefault(conv, {})[metric] = _stats(values)
        summary["ood"][loss] = table
    return summary


def _mean(summary: Mapping[str, Any], loss: str, ood: str, score: str, metric: str) -> float:
    return summary["ood"][loss][ood][score]["reference"][metric]["mean"]


def verdicts(summary: Mapping[str, Any], challenger: str = "isomax") -> dict[str, Any]:
    """Per OOD set: does `challenger` (with its paired score) beat SoftMax (MPS and ES)?

    The rule, stated in the report: on the reference convention's TNR@TPR95 and AUROC (means
    over runs), "yes" when the challenger's paired score is higher than the better of SoftMax's
    MPS and ES on both metrics, "no" when it is not higher on either, "mixed" otherwise.
    """
    ood_table = summary["ood"]
    if "softmax" not in ood_table or challenger not in ood_table:
        return {}
    score = PAIRINGS[challenger][0]
    out = {}
    for ood in ood_table[challenger]:
        wins, detail = [], {}
        for metric in ("tnr_at_tpr", "auroc"):
            mine = _mean(summary, challenger, ood, score, metric)
            base = {s: _mean(summary, "softmax", ood, s, metric) for s in ("mps", "es")}
            wins.append(mine > max(base.values()))
            detail[metric] = {
                f"{challenger}_{score}": mine,
                **{f"softmax_{s}": v for s, v in base.items()},
            }
        verdict = "yes" if all(wins) else ("no" if not any(wins) else "mixed")
        out[ood] = {"verdict": verdict, **detail}
    return out


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("isomax_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def build_results(
    config: Mapping[str, Any],
    runs: Sequence[Mapping[str, Any]],
    *,
    devices: Mapping[str, Any] | None = None,
    wall_time_s: float | None = None,
) -> dict[str, Any]:
    """The `results.json` document: config, versions, every run's numbers, summary, verdicts."""
    summary = summarize(runs)
    return {
        "schema_version": 1,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": dict(config),
        "versions": _versions(),
        "devices": dict(devices or {}),
        "wall_time_s": wall_time_s,
        "model": config["model"],
        "in_distribution": config["dataset"],
        "ood_datasets": list(config["ood_datasets"]),
        "conventions": {c: CONVENTION_NOTES[c] for c in config["conventions"]},
        "metric_units": "fractions in [0, 1]; the markdown report shows x100",
        "runs": [dict(run) for run in runs],
        "summary": summary,
        "verdicts": {
            c: v for c in ("isomax", "isomax_plus") if (v := verdicts(summary, challenger=c))
        },
    }


def _pct(stats: Mapping[str, Any]) -> str:
    return tables.format_cell(stats["values"])


def _method(loss: str, score: str) -> str:
    return f"{LOSS_TITLES.get(loss, loss)} + {SCORE_TITLES.get(score, score)}"


def paper_layout_table(results: Mapping[str, Any], convention: str = "reference") -> str:
    """The papers' layout via `isomax_jax.tables`: rows = OOD sets, columns = metric x method
    (the papers' loss/score pairings), mean ± std over runs."""
    metrics = (
        ("tnr_at_tpr", "auroc", "detection_accuracy")
        if convention == "reference"
        else ("fpr_at_tpr", "auroc", "aupr_in", "aupr_out")
    )
    table: dict[str, dict[str, list]] = {}
    for ood in results["ood_datasets"]:
        for run in results["runs"]:
            for score in PAIRINGS.get(run["loss"], ()):
                if score == "energy":
                    continue
                method = _method(run["loss"], score).replace(" + ", "/")
                by_method = table.setdefault(ood, {})
                by_method.setdefault(method, []).append(run["ood"][ood][score][convention])
    return tables.format_results_table(table, metrics=metrics, convention=convention)


def published_table(results: Mapping[str, Any]) -> str:
    """Measured vs published TNR@TPR95 / AUROC (reference convention) where REFERENCE §5 has
    a number for the configured cell; empty string otherwise."""
    published = results["config"].get("published") or {}
    lines = []
    for loss, cell in published.items():
        for ood, pub in (cell.get("ood") or {}).items():
            if loss not in results["summary"]["ood"] or ood not in results["ood_datasets"]:
                continue
            stats = results["summary"]["ood"][loss][ood][pub["score"]]["reference"]
            lines.append(
                f"| {ood} | {_method(loss, pub['score'])} | {_pct(stats['tnr_at_tpr'])} / "
                f"{_pct(stats['auroc'])} | {pub['tnr_at_tpr']:.1f} / {pub['auroc']:.1f} | "
                f"{pub['source']} |"
            )
    if not lines:
        return ""
    header = "| OOD set | method | measured TNR@TPR95 / AUROC | published | source |"
    return "\n".join([header, "|---|---|---|---|---|", *lines])


def compact_table(results: Mapping[str, Any]) -> str:
    """One row per OOD set, one column per (loss, paired score): "TNR@TPR95 / AUROC" (%)."""
    summary = results["summary"]
    methods = [(loss, s) for loss in summary["ood"] for s in PAIRINGS.get(loss, ())]
    header = ["OOD set (TNR@TPR95 / AUROC)", *(_method(loss, s) for loss, s in methods)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for ood in results["ood_datasets"]:
        cells = [ood]
        for loss, score in methods:
            stats = summary["ood"][loss][ood][score]["reference"]
            cells.append(f"{_pct(stats['tnr_at_tpr'])} / {_pct(stats['auroc'])}")
        lines.append("| " + " | ".join(cells) + " |")
    acc = [f"{_pct(summary['accuracy'][loss])}" for loss, _ in methods]
    lines.append("| " + " | ".join(["test accuracy", *acc]) + " |")
    return "\n".join(lines)


def _all_scores_table(results: Mapping[str, Any], loss: str) -> str:
    convs = list(results["conventions"])
    header = ["OOD set", "score"]
    for conv in convs:
        header += [f"{conv} {METRIC_TITLES[m]}" for m in ("tnr_at_tpr", "fpr_at_tpr", "auroc")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for ood, by_score in results["summary"]["ood"][loss].items():
        for score, by_conv in by_score.items():
            cells = [ood, SCORE_TITLES.get(score, score)]
            for conv in convs:
                cells += [_pct(by_conv[conv][m]) for m in ("tnr_at_tpr", "fpr_at_tpr", "auroc")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict_lines(results: Mapping[str, Any]) -> list[str]:
    """Per challenger and OOD set: "yes"/"no"/"mixed" with the numbers behind it."""
    lines = []
    for challenger, by_ood in results["verdicts"].items():
        score = PAIRINGS[challenger][0]
        name = _method(challenger, score)
        wins = sum(v["verdict"] == "yes" for v in by_ood.values())
        lines.append(
            f"**{name} vs SoftMax (better of MPS and ES): beats it on {wins} of "
            f"{len(by_ood)} OOD sets.**"
        )
        lines.append("")
        for ood, v in by_ood.items():
            t, a = v["tnr_at_tpr"], v["auroc"]
            mine = f"{challenger}_{score}"
            lines.append(
                f"- {ood}: **{v['verdict']}** — TNR@TPR95 {100 * t[mine]:.2f} vs "
                f"{100 * t['softmax_mps']:.2f} (MPS) / {100 * t['softmax_es']:.2f} (ES); "
                f"AUROC {100 * a[mine]:.2f} vs {100 * a['softmax_mps']:.2f} / "
                f"{100 * a['softmax_es']:.2f}"
            )
        lines.append("")
    return lines


def _mean_of(dicts: Sequence[Mapping[str, Any]], key: str, scale: float, fmt: str) -> str:
    values = [d[key] for d in dicts if d.get(key) is not None]
    return format(scale * float(np.mean(values)), fmt) if values else ""


def markdown(results: Mapping[str, Any], plots: Sequence[str] = ()) -> str:
    """The human-readable report (`results.md`)."""
    config = results["config"]
    runs = results["runs"]
    seeds = sorted({run["seed"] for run in runs})
    epochs = runs[0]["train"].get("epochs", float("nan")) if runs else float("nan")
    acc = results["summary"]["accuracy"]
    lines = [
        f"# OOD detection: {config['model']} on {config['dataset']}",
        "",
        f"Losses: {', '.join(LOSS_TITLES.get(x, x) for x in config['losses'])}; "
        f"{len(seeds)} run(s), seeds {seeds}; {epochs:.3g} epochs "
        f"({runs[0]['train'].get('steps', '?') if runs else '?'} steps of batch "
        f"{config['batch_size']}) per model. Created {results['created_utc']}"
        + (
            f"; wall time {results['wall_time_s'] / 60:.1f} min."
            if results.get("wall_time_s")
            else "."
        ),
        "",
        "Numbers are percentages, mean ± std (population std, ddof=0) over runs when there "
        "are several.",
        "",
    ]
    if not math.isnan(epochs) and epochs < 100:
        lines += [
            f"**Expect smaller effects than the papers.** These models trained for {epochs:.3g} "
            "epochs; the papers train a DenseNet-BC-100 for 300 epochs. The evaluation is not "
            "tuned: every score and metric is computed the same way for every loss.",
            "",
        ]
    lines += [
        "## Accuracy and training",
        "",
        "| loss | test accuracy (%) | published | train wall time (min) | s/step | "
        "final train loss |",
        "|---|---|---|---|---|---|",
    ]
    published = config.get("published", {}) or {}
    for loss, stats in acc.items():
        pub = (published.get(loss) or {}).get("accuracy")
        pub_text = f"~{pub:.0f}" if pub else ""
        trains = [run["train"] for run in runs if run["loss"] == loss]
        wall = _mean_of(trains, "wall_time_s", 1 / 60, ".1f")
        sps = _mean_of(trains, "seconds_per_step", 1, ".3f")
        final = _mean_of(trains, "final_train_loss", 1, ".3f")
        lines.append(
            f"| {LOSS_TITLES.get(loss, loss)} | {_pct(stats)} | {pub_text} | {wall} | {sps} | "
            f"{final} |"
        )
    lines += [
        "",
        "## The papers' pairings (reference convention)",
        "",
        "TNR@TPR95 / AUROC in %, higher is better:",
        "",
        compact_table(results),
        "",
        "In the papers' layout:",
        "",
        paper_layout_table(results, "reference"),
    ]
    pub = published_table(results)
    if pub:
        lines += ["### Published numbers (REFERENCE.md §5)", "", pub, ""]
    if results["verdicts"]:
        lines += ["## Does IsoMax beat SoftMax?", ""]
        lines += [
            "Rule: on the reference convention's TNR@TPR95 and AUROC (means over runs), "
            "**yes** when the IsoMax-family loss with its paired score is higher than the "
            "better of SoftMax + MPS and SoftMax + ES on both, **no** when higher on neither, "
            "**mixed** otherwise.",
            "",
            *verdict_lines(results),
        ]
    lines += ["## Every applicable score, both metric conventions", ""]
    for conv, note in results["conventions"].items():
        lines.append(f"- `{conv}`: {note}.")
    lines.append("")
    if "openood" in results["conventions"]:
        lines += [
            "The papers' pairings under the OpenOOD convention (FPR@95: lower is better):",
            "",
            paper_layout_table(results, "openood"),
        ]
    for loss in results["summary"]["ood"]:
        lines += [f"### {LOSS_TITLES.get(loss, loss)}", "", _all_scores_table(results, loss), ""]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{os.path.basename(p)}]({p})" for p in plots]
        lines.append("")
    return "\n".join(lines)


def write_report(
    results: Mapping[str, Any],
    scores: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]],
    workdir: str,
) -> dict[str, str]:
    """Writes `results.json`, `results.md` and `plots/*.png` into `workdir`.

    Args:
      results: the document from `build_results`.
      scores: `{loss: {dataset: {score: [N] array}}}` of one run (the first seed), with the
        in-distribution test set under `results["in_distribution"]`; used for the plots.
      workdir: the output directory.

    Returns:
      `{"json": path, "markdown": path, "plots": [paths...]}`.
    """
    os.makedirs(workdir, exist_ok=True)
    plot_dir = os.path.join(workdir, "plots")
    plots = report_plots.plot_all(results, scores, plot_dir, pairings=PAIRINGS)
    json_path = os.path.join(workdir, "results.json")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1, default=_jsonable)
    md_path = os.path.join(workdir, "results.md")
    with open(md_path, "w") as f:
        f.write(markdown(results, [os.path.relpath(p, workdir) for p in plots]))
    return {"json": json_path, "markdown": md_path, "plots": plots}


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)
