"""The noise of a one-run experiment: paired-bootstrap intervals of the verdicts' differences.

With one run per loss, `experiments.verdicts` calls a difference *beyond noise* when the 95 %
interval computed here excludes 0. The comparison is the verdicts' own: each IsoMax-family
loss with its papers' score against SoftMax's best detector, chosen by the same
`experiments.summaries.best_detector`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from experiments import records, summaries
from isomax_jax import metrics, registry

METRICS = ("tnr_at_tpr", "auroc")


def paired_bootstrap(
    config: Any,
    trained: Sequence[records.TrainedRun],
    scores: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]],
    results: Sequence[records.RunResult],
) -> dict[str, Any]:
    """95 % intervals of (IsoMax-family paired score - SoftMax's best detector) per OOD set.

    The two models are scored on the same test and OOD examples, so each bootstrap replicate
    resamples the example indices once and evaluates both methods on them (a paired bootstrap).

    Args:
      config: the experiment's config (`seed`, `bootstrap_samples`, `losses`, `dataset`,
        `ood_datasets`); one run per loss, SoftMax among them.
      trained: the trained runs.
      scores: `{run name: {dataset: {detector: [N] scores}}}`.
      results: the runs' results (SoftMax's best detector is chosen on them).

    Returns:
      `{"samples", "level": 0.95, "intervals": {loss: {ood: {metric: {"versus", "low",
      "high"}}}}}`.
    """
    table = summaries.summarize([r.to_json() for r in results])
    names = {t.loss: t.name for t in trained}
    rng = np.random.default_rng(config.seed)
    out: dict[str, Any] = {"samples": config.bootstrap_samples, "level": 0.95, "intervals": {}}
    for loss in config.losses:
        if loss == "softmax":
            continue
        mine = registry.HEADS[loss].paper_scores[0]
        for ood in config.ood_datasets:
            for metric in METRICS:
                base = summaries.best_detector(table, "softmax", ood, metric)
                # A set with its own protocol (ImageNet-O) has its own test scores.
                key = f"{config.dataset}:{ood}"
                a_in = scores[names[loss]].get(key, scores[names[loss]][config.dataset])[mine]
                a_out = scores[names[loss]][ood][mine]
                b_in = scores[names["softmax"]].get(key, scores[names["softmax"]][config.dataset])
                b_in = b_in[base]
                b_out = scores[names["softmax"]][ood][base]
                n_in, n_out = min(len(a_in), len(b_in)), min(len(a_out), len(b_out))
                i_idx = rng.integers(0, n_in, size=(config.bootstrap_samples, n_in))
                o_idx = rng.integers(0, n_out, size=(config.bootstrap_samples, n_out))
                diff = _bootstrap_diff(a_in, a_out, b_in, b_out, i_idx, o_idx, metric=metric)
                lo, hi = np.percentile(np.asarray(diff), [2.5, 97.5])
                out["intervals"].setdefault(loss, {}).setdefault(ood, {})[metric] = {
                    "versus": base,
                    "low": float(lo),
                    "high": float(hi),
                }
    return out


@functools.partial(jax.jit, static_argnames=("metric",))
def _bootstrap_diff(a_in, a_out, b_in, b_out, i_idx, o_idx, *, metric):
    def one(ii, oi):
        a = metrics.ood_metrics(a_in[ii], a_out[oi])[metric]
        b = metrics.ood_metrics(b_in[ii], b_out[oi])[metric]
        return a - b

    return jax.lax.map(lambda io: one(*io), (i_idx, o_idx))
