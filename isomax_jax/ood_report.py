"""The report of :func:`isomax_jax.evaluation.evaluate`: every metric, the scores, tables.

:class:`Report` holds what an evaluation measured (accuracy, ``metrics[convention][set][detector]``,
the scores, the OOD set groups) and writes it as Markdown tables (OpenOOD-style group means
included) and JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence

import numpy as np

from isomax_jax import detectors as _detectors
from isomax_jax import registry, tables


@dataclasses.dataclass
class Report:
    """What :func:`evaluate` measured.

    Attributes:
      head: the model's head (a name of :data:`isomax_jax.registry.HEADS`).
      accuracy: top-1 accuracy on the in-distribution test set (None without labels).
      metrics: ``metrics[convention][ood_set][detector]``: the dict of
        :func:`isomax_jax.metrics.ood_metrics`, as Python floats.
      scores: ``scores[set][detector]``: ``[N]`` scores (float32, or float64 with x64) of every
        set, ``"in"`` being the in-distribution test set (input-perturbation detectors: the
        first ``perturbation_max_examples`` of each set).
      groups: OOD set groups (``{"near": ("ssb_hard", ...), ...}``); one group ``"ood"`` when
        the OOD sets were not grouped.
      num_examples: examples per set (``"in"`` and each OOD set).
      detectors: the detectors evaluated, in registry order.
      skipped: detector -> why it was not evaluated (its inputs are not available, or its fit
        failed on this data: ``"not fitted: ..."``).
      tpr: the TPR of the operating-point metrics.
      logits: ``logits[set]`` ``[N, C]`` when asked for (``keep_logits=True``), else empty.
    """

    head: str
    accuracy: float | None
    metrics: dict[str, dict[str, dict[str, dict[str, float]]]]
    scores: dict[str, dict[str, np.ndarray]]
    groups: dict[str, tuple[str, ...]]
    num_examples: dict[str, int]
    detectors: tuple[str, ...]
    skipped: dict[str, str]
    tpr: float = 0.95
    logits: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def group_means(self, convention: str) -> dict[str, dict[str, dict[str, float]]]:
        """``{group: {detector: {metric: mean over the group's sets}}}`` (OpenOOD's "near" /
        "far" rows)."""
        by_set = self.metrics[convention]
        return {
            group: {
                det: {
                    m: float(np.mean([by_set[s][det][m] for s in sets]))
                    for m in registry.METRIC_NAMES
                }
                for det in self.detectors
            }
            for group, sets in self.groups.items()
        }

    def to_markdown(
        self,
        conventions: Sequence[str] | None = None,
        metrics: Sequence[str] = ("fpr_at_tpr", "auroc"),
    ) -> str:
        """One table per convention: a row per OOD set (and per group mean), a column per
        detector, cells ``metric1 / metric2`` in percent."""
        labels = " / ".join(tables.metric_label(m, tpr=self.tpr) for m in metrics)
        out = []
        if self.accuracy is not None:
            out.append(f"Test accuracy: {100 * self.accuracy:.2f} % ({self.head} head).\n")
        for conv in conventions or list(self.metrics):
            header = [f"OOD set ({labels}, %)", *(_title(d) for d in self.detectors)]
            rows = [[s, *(self._cell(self.metrics[conv][s][d], metrics) for d in self.detectors)]
                    for s in self.metrics[conv]]  # fmt: skip
            if len(self.groups) > 1 or any(len(s) > 1 for s in self.groups.values()):
                for group, by_det in self.group_means(conv).items():
                    cells = (self._cell(by_det[d], metrics) for d in self.detectors)
                    rows.append([f"**{group} (mean)**", *cells])
            out.append(f"Convention `{conv}`:\n\n{tables.markdown_table(header, rows)}")
        if self.skipped:
            out.append("Not evaluated: " + "; ".join(f"{d}: {w}" for d, w in self.skipped.items()))
        return "\n\n".join(out) + "\n"

    @staticmethod
    def _cell(values: Mapping[str, float], names: Sequence[str]) -> str:
        return " / ".join(
            "n/a" if math.isnan(values[m]) else f"{100 * values[m]:.2f}" for m in names
        )

    def to_json(self) -> str:
        """Everything but the scores, as JSON (NaN metrics as ``null``)."""
        data = dataclasses.asdict(self)
        data.pop("scores")
        data.pop("logits")
        data["group_means"] = {c: self.group_means(c) for c in self.metrics}
        return json.dumps(_nan_to_none(data), indent=1, sort_keys=True)


def _nan_to_none(value):
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _title(name: str) -> str:
    return _detectors.get(name).title


__all__ = ["Report"]
