"""PNG plots of the report: a summary bar chart, score histograms and ROC curves per OOD set."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from isomax_jax import registry  # noqa: E402

_TITLES: dict[str, str] = {}  # detector name -> title, set by plot_all


def _label(loss: str, score: str) -> str:
    head = registry.HEADS[loss].title if loss in registry.HEADS else loss
    return f"{head} + {_TITLES.get(score, score)}"


def roc_points(in_scores: np.ndarray, out_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve with in-distribution positive: (FPR of OOD, TPR of in-distribution) points.

    For plotting only (the reported numbers come from `isomax_jax.metrics.ood_metrics`); tied
    scores form one point.
    """
    s = np.concatenate([in_scores, out_scores]).astype(np.float64)
    is_in = np.concatenate([np.ones(len(in_scores)), np.zeros(len(out_scores))])
    order = np.argsort(-s, kind="mergesort")
    s, is_in = s[order], is_in[order]
    last_of_tie = np.r_[np.diff(s) != 0, True]
    tp = np.cumsum(is_in)[last_of_tie]
    fp = np.cumsum(1 - is_in)[last_of_tie]
    tpr = np.r_[0.0, tp / max(len(in_scores), 1)]
    fpr = np.r_[0.0, fp / max(len(out_scores), 1)]
    return fpr, tpr


def _methods(results: Mapping[str, Any], pairings: Mapping[str, Sequence[str]]):
    return [(loss, score) for loss in results["summary"]["ood"] for score in pairings.get(loss, ())]


def plot_summary(results, path: str, pairings) -> str:
    """Grouped bars: TNR@TPR95 and AUROC (reference convention) per OOD set and method."""
    oods = list(results["ood_datasets"])
    methods = _methods(results, pairings)
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.4 * len(oods)), 7), sharex=True)
    width = 0.8 / max(len(methods), 1)
    x = np.arange(len(oods))
    for ax, metric, title in zip(
        axes, ("tnr_at_tpr", "auroc"), ("TNR at TPR 95% (%)", "AUROC (%)"), strict=True
    ):
        for i, (loss, score) in enumerate(methods):
            stats = [results["summary"]["ood"][loss][o][score]["reference"][metric] for o in oods]
            means = [100 * s["mean"] for s in stats]
            stds = [100 * s["std"] for s in stats]
            ax.bar(
                x + (i - (len(methods) - 1) / 2) * width,
                means,
                width,
                yerr=stds,
                label=_label(loss, score),
            )
        ax.set_ylabel(title)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, ncol=min(len(methods), 4))
    axes[0].set_title(
        f"{results['model']} on {results['in_distribution']}: OOD detection "
        "(reference convention, higher is better)"
    )
    axes[1].set_xticks(x, oods, rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_histograms(results, scores, ood: str, path: str, pairings) -> str:
    """Score histograms, in-distribution vs `ood`, one panel per (loss, paired score)."""
    in_name = results["in_distribution"]
    methods = [(loss, s) for loss in scores for s in pairings.get(loss, ())]
    cols = min(len(methods), 3)
    rows = int(np.ceil(len(methods) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(methods) :]:
        ax.axis("off")
    for ax, (loss, score) in zip(axes.flat, methods, strict=False):
        a, b = scores[loss][in_name][score], scores[loss][ood][score]
        both = np.concatenate([a, b])
        lo, hi = np.percentile(both, 0.5), np.percentile(both, 99.5)
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 50)
        for values, label in ((a, f"{in_name} (in)"), (b, f"{ood} (out)")):
            # np.histogram + stairs: one artist per histogram (ax.hist draws a patch per bin).
            counts, _ = np.histogram(np.clip(values, lo, hi), bins=bins, density=True)
            ax.stairs(counts, bins, fill=True, alpha=0.6, label=label)
        ax.set_title(_label(loss, score), fontsize=10)
        ax.set_xlabel("score (higher = more in-distribution)", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(f"Scores: {in_name} vs {ood}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_roc(results, scores, ood: str, path: str, pairings) -> str:
    """ROC curves (in-distribution positive) of every (loss, paired score) against `ood`."""
    in_name = results["in_distribution"]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for i, loss in enumerate(scores):
        for j, score in enumerate(pairings.get(loss, ())):
            fpr, tpr = roc_points(scores[loss][in_name][score], scores[loss][ood][score])
            style = ("-", "-.")[j % 2]  # one colour per loss; its paired scores solid/dash-dot
            ax.plot(fpr, tpr, label=_label(loss, score), lw=1.5, color=f"C{i}", ls=style)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.axhline(0.95, color="grey", lw=0.6, ls="--")
    ax.set_xlabel(f"FPR: fraction of {ood} accepted")
    ax.set_ylabel(f"TPR: fraction of {in_name} accepted")
    ax.set_title(f"ROC: {in_name} vs {ood}")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_all(results, scores, plot_dir: str, *, pairings, titles=None) -> list[str]:
    """Writes every plot into `plot_dir`; returns their paths (summary first).

    `pairings` maps each loss to the detectors plotted for it; `titles` maps detector names to
    display titles.
    """
    _TITLES.clear()
    _TITLES.update(titles or {})
    os.makedirs(plot_dir, exist_ok=True)
    paths = [plot_summary(results, os.path.join(plot_dir, "summary.png"), pairings)]
    for ood in results["ood_datasets"]:
        paths.append(
            plot_histograms(
                results, scores, ood, os.path.join(plot_dir, f"hist_{ood}.png"), pairings
            )
        )
        paths.append(
            plot_roc(results, scores, ood, os.path.join(plot_dir, f"roc_{ood}.png"), pairings)
        )
    return paths
