"""Mean ± std over runs of every number of an experiment, and the one choice of a best detector.

`summarize` turns the runs' results into the `summary` of `results.json`; `best_detector` picks
a loss's best detector on an OOD set from it. The bootstrap (`experiments.bootstrap`), the
verdicts (`experiments.verdicts`) and the report's tables (`experiments.report`) all choose
with this one function, so the interval a verdict reads is always the one of its comparison.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from isomax_jax import registry


def stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean and population standard deviation (ddof=0, as `isomax_jax.tables`) of `values`."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std()), "values": [float(v) for v in arr]}


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean ± std over runs of accuracy and of every (loss, OOD set, detector, convention,
    metric).

    Args:
      runs: the runs' results as dicts (`RunResult.to_json()`), in any order.

    Returns:
      `{"accuracy": {loss: stats}, "ood": {loss: {ood: {detector: {convention: {metric:
      stats}}}}}}`, losses in first-seen order, each `stats` as :func:`stats` returns it.
    """
    losses = list(dict.fromkeys(run["loss"] for run in runs))
    summary: dict[str, Any] = {"accuracy": {}, "ood": {}}
    for loss in losses:
        mine = [run for run in runs if run["loss"] == loss]
        summary["accuracy"][loss] = stats([run["accuracy"] for run in mine])
        table: dict[str, Any] = {}
        for ood, by_det in mine[0]["ood"].items():
            for det, by_conv in by_det.items():
                for conv, values in by_conv.items():
                    for metric in values:
                        leaf = table.setdefault(ood, {}).setdefault(det, {}).setdefault(conv, {})
                        leaf[metric] = stats([r["ood"][ood][det][conv][metric] for r in mine])
        summary["ood"][loss] = table
    return summary


def mean(summary, loss: str, ood: str, det: str, metric: str, convention="reference") -> float:
    """The mean over runs of one number of the summary."""
    return summary["ood"][loss][ood][det][convention][metric]["mean"]


def best_detector(
    summary: Mapping[str, Any], loss: str, ood: str, metric: str, convention: str = "reference"
) -> str:
    """The detector with the best mean `metric` for `loss` on `ood` (the first one on a tie).

    Chosen on the test data: for SoftMax this is the oracle baseline of the verdicts.
    """
    sign = 1 if registry.METRICS[metric].higher_is_better else -1
    by_det = summary["ood"][loss][ood]
    return max(by_det, key=lambda d: sign * mean(summary, loss, ood, d, metric, convention))
