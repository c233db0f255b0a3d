"""Per OOD set: does an IsoMax-family loss beat SoftMax, and by more than the noise?

The rule (stated in every report): on the reference convention's TNR@TPR95 and AUROC (means over
runs), the challenger with its papers' score is compared with **SoftMax's best detector** for
that metric and set (chosen on the test data among every detector applied to SoftMax, energy
and the feature-based ones included: an oracle choice, so the comparison is conservative for
IsoMax). The verdict is **yes** when the challenger is higher on both metrics, **no** when on
neither, **mixed** otherwise. A difference counts as beyond the noise when, with several runs,
the two mean ± std intervals do not overlap (|difference of means| > std + std), and with one
run when the 95 % paired-bootstrap interval of the difference over test examples excludes 0.
A second comparison takes the challenger's own best detector ("IsoMax combined with a post-hoc
detector") against SoftMax's best.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from experiments.summaries import best_detector, mean
from isomax_jax import registry

METRICS = ("tnr_at_tpr", "auroc")


def _std(summary, loss, ood, det, metric) -> float:
    return summary["ood"][loss][ood][det]["reference"][metric]["std"]


def _beyond_noise(results, challenger, det, base, ood, metric) -> bool | None:
    summary = results["summary"]
    n_runs = len(summary["accuracy"][challenger]["values"])
    diff = mean(summary, challenger, ood, det, metric) - mean(summary, "softmax", ood, base, metric)
    if n_runs > 1:
        spread = _std(summary, challenger, ood, det, metric) + _std(
            summary, "softmax", ood, base, metric
        )
        return abs(diff) > spread
    interval = (
        (results.get("bootstrap") or {})
        .get("intervals", {})
        .get(challenger, {})
        .get(ood, {})
        .get(metric)
    )
    if interval is None:
        return None
    if interval["versus"] != base:  # both come from `summaries.best_detector`: a bug if not
        raise ValueError(
            f"the bootstrap interval of {challenger} on {ood} ({metric}) is against "
            f"{interval['versus']!r}, the verdict against {base!r}"
        )
    return interval["low"] > 0 or interval["high"] < 0


def _compare(results, challenger, ood, det_for_metric) -> dict[str, Any]:
    summary = results["summary"]
    detail, wins = {}, []
    for metric in METRICS:
        det = det_for_metric(metric)
        base = best_detector(summary, "softmax", ood, metric)
        mine = mean(summary, challenger, ood, det, metric)
        theirs = mean(summary, "softmax", ood, base, metric)
        wins.append(mine > theirs)
        detail[metric] = {
            "challenger": det,
            "challenger_value": mine,
            "softmax_best": base,
            "softmax_value": theirs,
            "beyond_noise": _beyond_noise(results, challenger, det, base, ood, metric),
        }
    verdict = "yes" if all(wins) else ("no" if not any(wins) else "mixed")
    return {"verdict": verdict, **detail}


def all_verdicts(results: Mapping[str, Any]) -> dict[str, Any]:
    """`{challenger: {"own_score": {ood: ...}, "best_detector": {ood: ...}}}`; empty without
    SoftMax."""
    summary = results["summary"]
    if "softmax" not in summary["ood"]:
        return {}
    out = {}
    for challenger in summary["ood"]:
        if challenger == "softmax":
            continue
        own = registry.HEADS[challenger].paper_scores[0]
        out[challenger] = {
            "own_score": own,
            "by_ood": {
                ood: _compare(results, challenger, ood, lambda m, own=own: own)
                for ood in results["ood_datasets"]
            },
            "best_detector": {
                ood: _compare(
                    results,
                    challenger,
                    ood,
                    lambda m, ood=ood, c=challenger: best_detector(summary, c, ood, m),
                )
                for ood in results["ood_datasets"]
            },  # fmt: skip
        }
    return out


def _title(results, det) -> str:
    return (results["detectors"].get(det) or {}).get("title", det)


def _noise(flag) -> str:
    return {True: " (beyond noise)", False: " (within noise)", None: ""}[flag]


def markdown_lines(results: Mapping[str, Any]) -> list[str]:
    """The verdict section of the report, with the rule."""
    n_runs = len(next(iter(results["summary"]["accuracy"].values()))["values"])
    noise = (
        "the two mean ± std intervals over runs do not overlap"
        if n_runs > 1
        else "the 95 % paired-bootstrap interval of the difference over test examples "
        f"({(results.get('bootstrap') or {}).get('samples', 0)} resamples) excludes 0"
    )
    lines = [
        "Rule: on the reference convention's TNR@TPR95 and AUROC, the IsoMax-family loss with "
        "its papers' score against **SoftMax's best detector** for that metric and set (an "
        "oracle choice among every detector applied to SoftMax, so the comparison is "
        "conservative): **yes** when higher on both, **no** when on neither, **mixed** "
        f"otherwise. A difference is *beyond noise* when {noise}.",
        "",
    ]
    for challenger, by_kind in results["verdicts"].items():
        name = f"{registry.HEADS[challenger].title} + {_title(results, by_kind['own_score'])}"
        for kind, heading in (
            ("by_ood", name),
            ("best_detector", f"{registry.HEADS[challenger].title} + its best detector"),
        ):
            by_ood = by_kind[kind]
            wins = sum(v["verdict"] == "yes" for v in by_ood.values())
            lines += [
                f"**{heading} vs SoftMax's best detector: yes on {wins} of {len(by_ood)} "
                "OOD sets.**",
                "",
            ]
            for ood, v in by_ood.items():
                parts = []
                for metric in METRICS:
                    d = v[metric]
                    parts.append(
                        f"{registry.METRICS[metric].label()} {100 * d['challenger_value']:.2f} "
                        f"({_title(results, d['challenger'])}) vs {100 * d['softmax_value']:.2f} "
                        f"({_title(results, d['softmax_best'])}){_noise(d['beyond_noise'])}"
                    )
                lines.append(f"- {ood}: **{v['verdict']}** — " + "; ".join(parts))
            lines.append("")
    return lines


def summary_lines(results: Mapping[str, Any]) -> list[str]:
    """One line per challenger for the console."""
    lines = []
    for challenger, by_kind in results["verdicts"].items():
        for kind in ("by_ood", "best_detector"):
            by_ood = by_kind[kind]
            wins = sum(v["verdict"] == "yes" for v in by_ood.values())
            sig = sum(
                v["verdict"] == "yes" and all(v[m]["beyond_noise"] for m in METRICS)
                for v in by_ood.values()
            )
            what = (
                _title(results, by_kind["own_score"]) if kind == "by_ood" else "its best detector"
            )
            lines.append(
                f"{registry.HEADS[challenger].title} + {what} beats SoftMax's best detector on "
                f"{wins} of {len(by_ood)} OOD sets (TNR@TPR95 and AUROC), {sig} beyond noise."
            )
    return lines
