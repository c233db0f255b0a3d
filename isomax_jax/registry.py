"""One source of truth for the names the library, the experiments and the reports share.

* :data:`HEADS`: the classification heads (``softmax``, ``isomax``, ``isomax_plus``, ``dismax``)
  with their display titles, whether their logits are negative distances, and the OOD scores
  the papers pair them with (docs/isomax.md).
* :data:`METRICS`: the OOD metrics of :func:`isomax_jax.metrics.ood_metrics`, with titles and
  whether higher is better.

OOD scores and post-hoc detectors are registered in :mod:`isomax_jax.detectors` (each entry
carries its own title and the heads it applies to); the paper pairings below name entries of it.
Adding a score is one entry there; adding a head or a metric is one entry here.

Example:
  >>> from isomax_jax import registry
  >>> registry.HEADS["isomax_plus"].title, registry.HEADS["isomax_plus"].paper_scores
  ('IsoMax+', ('min_distance',))
  >>> registry.METRICS["fpr_at_tpr"].higher_is_better
  False
"""

from __future__ import annotations

import dataclasses

__all__ = ["HEADS", "HEAD_NAMES", "METRICS", "METRIC_NAMES", "HeadSpec", "MetricSpec", "head"]


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """A classification head.

    Attributes:
      name: registry name (``get_model(..., head=name)``, the experiments' ``losses``).
      title: display title in reports.
      distance_logits: whether the logits are negative (scaled) distances to prototypes, which
        distance-based scores (minimum distance, MMLES) need.
      entropic_loss: trained with the entropic cross-entropy (scale 10) rather than plain
        cross-entropy.
      paper_scores: the OOD scores the papers use with this head, best-known first (names of
        :mod:`isomax_jax.detectors`).
    """

    name: str
    title: str
    distance_logits: bool
    entropic_loss: bool
    paper_scores: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """An OOD metric of :func:`isomax_jax.metrics.ood_metrics` (values are fractions in [0, 1]).

    Attributes:
      name: key in the metrics dict.
      title: display title (``{tpr}`` is replaced by the TPR in percent, e.g. ``TNR@TPR95``).
      higher_is_better: direction of improvement.
    """

    name: str
    title: str
    higher_is_better: bool

    def label(self, tpr: float = 0.95) -> str:
        """The title with the TPR filled in, e.g. ``"TNR@TPR95"``."""
        return self.title.format(tpr=f"{100 * tpr:g}")


HEADS: dict[str, HeadSpec] = {
    spec.name: spec
    for spec in (
        HeadSpec("softmax", "SoftMax", False, False, ("msp", "entropic")),
        HeadSpec("isomax", "IsoMax", True, True, ("entropic",)),
        HeadSpec("isomax_plus", "IsoMax+", True, True, ("min_distance",)),
        HeadSpec("dismax", "DisMax", True, True, ("mmles",)),
    )
}
HEAD_NAMES: tuple[str, ...] = tuple(HEADS)

METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec("tnr_at_tpr", "TNR@TPR{tpr}", True),
        MetricSpec("fpr_at_tpr", "FPR@TPR{tpr}", False),
        MetricSpec("auroc", "AUROC", True),
        MetricSpec("aupr_in", "AUPR-in", True),
        MetricSpec("aupr_out", "AUPR-out", True),
        MetricSpec("detection_accuracy", "Det. acc.", True),
    )
}
METRIC_NAMES: tuple[str, ...] = tuple(METRICS)


def head(name: str) -> HeadSpec:
    """The :class:`HeadSpec` called ``name``; ``ValueError`` listing the names otherwise."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; expected one of {list(HEAD_NAMES)}")
    return HEADS[name]
