"""The experiment report: `results.json`, `results.md`, PNG plots and TensorBoard summaries.

`build_results` turns the per-run numbers into the JSON document (config, code version, library
versions, timings, every metric of every run and detector, mean ± std over runs, the verdicts);
`write_report` writes it with the markdown report and the plots. Nothing here trains or
evaluates. Titles come from `isomax_jax.registry` (heads, metrics) and the detector registry.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from experiments import report_plots, summaries, verdicts
from experiments.records import RunResult, run_name
from isomax_jax import registry, tables

CONVENTION_NOTES = {
    "reference": (
        "the IsoMax papers' convention: in-distribution is the positive class; TNR@TPR95 is the "
        "fraction of OOD inputs rejected when 95 % of in-distribution inputs are kept; ties "
        "remove the in-distribution sample first (docs/metrics.md)"
    ),
    "openood": (
        "OpenOOD v1.5: OOD is the positive class (score negated, scikit-learn curves); FPR@95 is "
        "the fraction of in-distribution inputs flagged when 95 % of OOD inputs are caught (a "
        "different operating point); TNR@TPR95 here is 1 - that FPR (docs/metrics.md)"
    ),
}


def loss_title(loss: str) -> str:
    return registry.HEADS[loss].title if loss in registry.HEADS else loss


def build_results(
    config: Mapping[str, Any],
    runs: Sequence[RunResult | Mapping[str, Any]],
    *,
    devices: Mapping[str, Any] | None = None,
    code: Mapping[str, Any] | None = None,
    versions: Mapping[str, Any] | None = None,
    timings: Mapping[str, float] | None = None,
    bootstrap: Mapping[str, Any] | None = None,
    detectors: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The `results.json` document."""
    runs = [r.to_json() if isinstance(r, RunResult) else dict(r) for r in runs]
    summary = summaries.summarize(runs)
    results = {
        "schema_version": 2,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "code_version": dict(code or {}),
        "versions": dict(versions or {}),
        "config": dict(config),
        "devices": dict(devices or {}),
        "timings": dict(timings or {}),
        "wall_time_s": None,
        "model": config["model"],
        "in_distribution": config["dataset"],
        "ood_datasets": list(config["ood_datasets"]),
        "conventions": {c: CONVENTION_NOTES[c] for c in config["conventions"]},
        "metric_units": "fractions in [0, 1]; the markdown report shows x100",
        "detectors": dict(detectors or {}),
        "runs": runs,
        "summary": summary,
        "bootstrap": dict(bootstrap or {}),
    }
    results["verdicts"] = verdicts.all_verdicts(results)
    return results


def _pct(stats: Mapping[str, Any]) -> str:
    return tables.format_cell(stats["values"])


def det_title(results: Mapping[str, Any], name: str) -> str:
    return (results["detectors"].get(name) or {}).get("title", name)


def method(results: Mapping[str, Any], loss: str, det: str) -> str:
    return f"{loss_title(loss)} + {det_title(results, det)}"


def _cell(results, loss, ood, det, conv="reference") -> str:
    stats = results["summary"]["ood"][loss][ood][det][conv]
    first = "tnr_at_tpr" if conv == "reference" else "fpr_at_tpr"
    return f"{_pct(stats[first])} / {_pct(stats['auroc'])}"


def headline_methods(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(loss, detector) columns of the headline table: the papers' pairings plus energy."""
    cols = []
    for loss in results["summary"]["ood"]:
        for det in (*registry.HEADS[loss].paper_scores, "energy"):
            if det in results["summary"]["ood"][loss][results["ood_datasets"][0]]:
                cols.append((loss, det))
    return cols


def compact_table(results: Mapping[str, Any], convention: str = "reference") -> str:
    """One row per OOD set: the papers' pairings, energy and SoftMax's best detector."""
    cols = headline_methods(results)
    summary = results["summary"]
    best = "softmax" in summary["ood"]
    first = "TNR@TPR95" if convention == "reference" else "FPR@95"
    header = [f"OOD set ({first} / AUROC, %)", *(method(results, lo, d) for lo, d in cols)]
    if best:
        header.append("SoftMax's best detector (by AUROC)")
    rows = []
    for ood in results["ood_datasets"]:
        cells = [ood] + [_cell(results, lo, ood, d, convention) for lo, d in cols]
        if best:
            d = summaries.best_detector(summary, "softmax", ood, "auroc")
            cells.append(
                f"{det_title(results, d)}: {_cell(results, 'softmax', ood, d, convention)}"
            )
        rows.append(cells)
    acc = [_pct(summary["accuracy"][lo]) for lo, _ in cols]
    rows.append(["test accuracy", *acc] + ([""] if best else []))
    return tables.markdown_table(header, rows)


def detector_table(results: Mapping[str, Any], ood: str, convention: str) -> str:
    """Rows = detectors, columns = losses; the best detector of each loss in bold."""
    summary = results["summary"]["ood"]
    losses = list(summary)
    names = [n for n in results["detectors"] if any(n in summary[lo][ood] for lo in losses)]
    first = "tnr_at_tpr" if convention == "reference" else "fpr_at_tpr"
    best = {
        lo: summaries.best_detector(results["summary"], lo, ood, "auroc", convention)
        for lo in losses
    }
    label = registry.METRICS[first].label()
    header = ["detector", *(f"{loss_title(lo)} {label} / AUROC" for lo in losses)]
    rows = []
    for name in names:
        cells = [det_title(results, name)]
        for lo in losses:
            if name not in summary[lo][ood]:
                cells.append("–")
                continue
            text = _cell(results, lo, ood, name, convention)
            cells.append(f"**{text}**" if best[lo] == name else text)
        rows.append(cells)
    return tables.markdown_table(header, rows)


def published_table(results: Mapping[str, Any]) -> str:
    """Measured vs published TNR@TPR95 / AUROC (reference convention), where a paper has it."""
    published = results["config"].get("published") or {}
    rows = []
    for loss, cell in published.items():
        for ood, pub in (cell.get("ood") or {}).items():
            if loss not in results["summary"]["ood"] or ood not in results["ood_datasets"]:
                continue
            measured = _cell(results, loss, ood, pub["score"])
            tnr = "–" if pub.get("tnr_at_tpr") is None else f"{pub['tnr_at_tpr']:.1f}"
            published_cell = f"{tnr} / {pub['auroc']:.1f}"
            rows.append(
                [ood, method(results, loss, pub["score"]), measured, published_cell, pub["source"]]
            )
    if not rows:
        return ""
    header = ["OOD set", "method", "measured TNR@TPR95 / AUROC", "published", "source"]
    return tables.markdown_table(header, rows)


def group_table(results: Mapping[str, Any]) -> str:
    """Mean AUROC over each group of OOD sets (`config.ood_groups`, OpenOOD's near / far) per
    detector and loss, beside the published group means where the config has them."""
    groups = {g: list(sets) for g, sets in (results["config"].get("ood_groups") or {}).items()
              if sets}  # fmt: skip
    if not groups:
        return ""
    summary = results["summary"]
    conv = "openood" if "openood" in results["conventions"] else "reference"
    published = results["config"].get("published") or {}
    header, columns = ["detector"], []
    for loss in summary["ood"]:
        pub_groups = (published.get(loss) or {}).get("groups") or {}
        for g in groups:
            header.append(f"{loss_title(loss)} {g}: measured / published")
            columns.append((loss, g, (pub_groups.get(g) or {}).get("auroc") or {}))
    rows = []
    for name in results["detectors"]:
        cells, any_value = [det_title(results, name)], False
        for loss, g, pub in columns:
            by_set = summary["ood"][loss]
            if not all(name in by_set[ood] for ood in groups[g]):
                cells.append("–")
                continue
            value = np.mean([summaries.mean(summary, loss, ood, name, "auroc", conv)
                             for ood in groups[g]])  # fmt: skip
            cells.append(f"{100 * value:.2f} / " + (f"{pub[name]:.2f}" if name in pub else "–"))
            any_value = True
        if any_value:
            rows.append(cells)
    sources = sorted({
        src for loss in summary["ood"]
        for grp in ((published.get(loss) or {}).get("groups") or {}).values()
        if (src := grp.get("source"))
    })  # fmt: skip
    note = f"AUROC (%), {conv} convention, mean over " + "; ".join(
        f"{g} = {', '.join(sets)}" for g, sets in groups.items()
    )
    if sources:
        note += f". Published: {'; '.join(sources)}"
    return note + ".\n\n" + tables.markdown_table(header, rows)


def _pack_lines(pack: Mapping[str, Any]) -> list[str]:
    """The report's note that the images came from a pack, with the stored pixels' errors."""
    splits = pack.get("splits") or {}
    worst = max((s["mae"] for s in splits.values()), default=0.0)
    each = ", ".join(f"{k} {v['mae']:.2f}" for k, v in splits.items())
    return [
        f"Images read from the pack `{pack['path']}` (isomax_jax.pack; JPEG/PNG mosaics), not "
        f"from tfds: mean absolute pixel error at most {worst:.2f}/255 per split "
        f"({each}).",
        "",
    ]


def _hyperparameter_note(results: Mapping[str, Any]) -> str:
    changed = results["config"].get("detector_hyperparameters") or {}
    if not changed:
        return "Every detector uses its paper's default hyperparameters"
    text = "; ".join(
        f"{det_title(results, n)} " + ", ".join(f"{k}={v}" for k, v in dict(hp).items())
        for n, hp in changed.items()
    )
    return f"Every detector uses its paper's default hyperparameters, except {text}"


def _mean_of(dicts: Sequence[Mapping[str, Any]], key: str, scale: float, fmt: str) -> str:
    values = [d[key] for d in dicts if d.get(key) is not None]
    return format(scale * float(np.mean(values)), fmt) if values else ""


def _training_table(results: Mapping[str, Any]) -> str:
    header = ["loss", "test accuracy (%)", "published", "train wall time (min)", "s/step",
              "final train loss"]  # fmt: skip
    published = results["config"].get("published") or {}
    rows = []
    for loss, stats in results["summary"]["accuracy"].items():
        pub = (published.get(loss) or {}).get("accuracy")
        trains = [run["train"] for run in results["runs"] if run["loss"] == loss]
        rows.append([
            loss_title(loss),
            _pct(stats),
            f"~{pub:g}" if pub else "",
            "imported" if all(t.get("imported_from") for t in trains)
            else _mean_of(trains, "wall_time_s", 1 / 60, ".1f"),
            _mean_of(trains, "seconds_per_step", 1, ".3f"),
            _mean_of(trains, "final_train_loss", 1, ".3f"),
        ])  # fmt: skip
    return tables.markdown_table(header, rows)


def markdown(results: Mapping[str, Any], plots: Sequence[str] = ()) -> str:
    """The human-readable report (`results.md`)."""
    config, runs = results["config"], results["runs"]
    seeds = sorted({run["seed"] for run in runs})
    trained = [run for run in runs if not run["train"].get("imported_from")]
    train = trained[0]["train"] if trained else {}
    imported = sorted({(run["loss"], run["train"]["imported_from"]) for run in runs
                       if run["train"].get("imported_from")})  # fmt: skip
    code = results.get("code_version") or {}
    wall = results.get("wall_time_s")
    lines = [
        f"# OOD detection: {config['model']} on {config['dataset']}",
        "",
        f"Losses: {', '.join(loss_title(x) for x in config['losses'])}; {len(seeds)} run(s), "
        f"seeds {seeds}; "
        + "".join(
            f"{loss_title(lo)}: the imported model {path} (not trained); " for lo, path in imported
        )  # fmt: skip
        + (
            f"{train.get('epochs', float('nan')):.3g} epochs "
            f"({train.get('steps', '?')} steps of batch {config['batch_size']}, schedule "
            f"{config.get('schedule', 'multistep')}"
            + (
                f"; the first {train['early_steps']} on images downscaled to "
                f"{train['early_image_size']} px"
                if train.get("early_steps")
                else ""
            )
            + ") per trained model. "
            if trained
            else ""
        )
        + f"Created {results['created_utc']}"
        + (f"; wall time {wall / 60:.1f} min" if wall else "")
        + f"; code {code.get('commit', 'unknown')}"
        + (" (uncommitted changes)" if code.get("dirty") else "")
        + ".",
        "",
        *(_pack_lines(results["pack"]) if results.get("pack") else []),
        "Numbers are percentages; mean ± std (population std, ddof=0) over runs when there are "
        f"several. {_hyperparameter_note(results)}; each is fitted on the training split only; "
        "nothing is tuned on OOD data.",
        "",
        "## Accuracy and training",
        "",
        _training_table(results),
        "",
        "## Headline (reference convention)",
        "",
        compact_table(results),
        "",
    ]
    if results["verdicts"]:
        lines += ["## Does IsoMax beat SoftMax?", "", *verdicts.markdown_lines(results), ""]
    pub = published_table(results)
    if pub:
        lines += ["### Published numbers", "", pub, ""]
    grouped = group_table(results)
    if grouped:
        lines += ["## Near and far OOD (group means)", "", grouped, ""]
    lines += ["## Every detector, per OOD set", ""]
    for conv, note in results["conventions"].items():
        lines.append(f"- `{conv}`: {note}.")
    lines.append("")
    for name, info in results["detectors"].items():
        for run, why in (info.get("not_fitted") or {}).items():
            lines.append(f"- {info.get('title', name)} not fitted for {run}: {why}")
    if any(info.get("not_fitted") for info in results["detectors"].values()):
        lines.append("")
    for ood in results["ood_datasets"]:
        lines += [f"### {ood}", ""]
        for conv in results["conventions"]:
            lines += [f"{conv} convention (best detector of each loss in bold, by AUROC):", ""]
            lines += [detector_table(results, ood, conv), ""]
    if plots:
        lines += ["## Plots", "", *(f"![{os.path.basename(p)}]({p})" for p in plots), ""]
    timings = results.get("timings") or {}
    if timings:
        lines += ["## Wall time per phase", ""]
        lines += [f"- {k.removesuffix('_s')}: {v:.1f} s" for k, v in timings.items()]
        lines.append("")
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)


def write_json(results: Mapping[str, Any], path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=_jsonable)
    os.replace(tmp, path)


def write_report(
    results: Mapping[str, Any],
    scores: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]],
    workdir: str,
) -> dict[str, Any]:
    """Writes `results.json`, `results.md` and `plots/*.png` into `workdir`.

    Args:
      results: the document from `build_results`.
      scores: `{loss: {dataset: {detector: [N] array}}}` of one run (the first seed), with the
        in-distribution test set under `results["in_distribution"]`; used for the plots.
      workdir: the output directory.
    """
    os.makedirs(workdir, exist_ok=True)
    pairings = {loss: registry.HEADS[loss].paper_scores for loss in results["summary"]["ood"]}
    titles = {n: det_title(results, n) for n in results["detectors"]}
    plots = report_plots.plot_all(
        results, scores, os.path.join(workdir, "plots"), pairings=pairings, titles=titles
    )
    json_path = os.path.join(workdir, "results.json")
    write_json(results, json_path)
    md_path = os.path.join(workdir, "results.md")
    with open(md_path, "w") as f:
        f.write(markdown(results, [os.path.relpath(p, workdir) for p in plots]))
    return {"json": json_path, "markdown": md_path, "plots": plots}


def write_summaries(results: Mapping[str, Any], workdir: str) -> None:
    """Test accuracy and the paired scores' OOD metrics as TensorBoard scalars, one dir per run."""
    from experiments.tensorboard_log import Summaries

    for run in results["runs"]:
        writer = Summaries(os.path.join(workdir, "tensorboard", run_name(run["loss"], run["seed"])))
        step = int(run["train"].get("steps", 0))
        writer.scalar("eval/accuracy", run["accuracy"], step)
        for ood, by_det in run["ood"].items():
            for det in registry.HEADS[run["loss"]].paper_scores:
                for metric in ("tnr_at_tpr", "auroc"):
                    value = by_det[det]["reference"][metric]
                    writer.scalar(f"ood_{ood}/{det}_{metric}", value, step)
        writer.close()


def console_summary(results: Mapping[str, Any], paths: Mapping[str, Any]) -> str:
    """The end-of-run console text: the compact table, the verdicts, where the report is."""
    lines = ["", compact_table(results), ""]
    lines += verdicts.summary_lines(results)
    wall = results.get("wall_time_s")
    if wall:
        lines.append(f"Wall time {wall / 60:.1f} min.")
    lines.append(f"Report: {paths['markdown']} (+ results.json, plots/)")
    return "\n".join(lines)
