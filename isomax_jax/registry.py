"""One source of truth for the names the library, the experiments and the reports share.

* :data:`HEADS`: the classification heads (``softmax``, ``isomax``, ``isomax_plus``, ``dismax``)
  with their display titles, whether their logits are negative distances, their training loss,
  their Linen module and the OOD scores the papers pair them with (docs/isomax.md). The models
  (:func:`isomax_jax.models.get_model`), the training step
  (:func:`isomax_jax.train.per_example_loss`), the detectors (``applies_to``) and the
  experiments all read it; none keeps a table of its own.
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
from typing import Any

__all__ = [
    "DISTANCE_HEADS",
    "HEADS",
    "HEAD_NAMES",
    "METRICS",
    "METRIC_NAMES",
    "HeadSpec",
    "MetricSpec",
    "head",
]


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """A classification head: what every layer of the library needs to know about it.

    Attributes:
      name: registry name (``get_model(..., head=name)``, ``LossConfig(head)``, the experiments'
        ``losses``).
      title: display title in reports.
      distance_logits: whether the logits are negative (scaled) distances to prototypes, which
        the distance-based scores (minimum distance, MMLS, MMLES) need; the detectors that apply
        only to such heads read it (:meth:`isomax_jax.detectors.Detector.applies_to`).
      entropic_loss: trained with the entropic cross-entropy (scale 10) rather than plain
        cross-entropy (:meth:`loss`).
      paper_scores: the OOD scores the papers use with this head, best-known first (names of
        :mod:`isomax_jax.detectors`).
      linen_class: the name of its Flax Linen module in :mod:`isomax_jax.heads`
        (:meth:`linen`).
    """

    name: str
    title: str
    distance_logits: bool
    entropic_loss: bool
    paper_scores: tuple[str, ...]
    linen_class: str

    def linen(self, num_classes: int, **kwargs: Any) -> Any:
        """A new Linen head module, e.g. ``HEADS["isomax_plus"].linen(10, name="classifier")``.

        Keyword arguments go to the module (``temperature``, ``name``, ``param_dtype``, ...).
        """
        from isomax_jax import heads  # above this module in the layers: imported when used

        return getattr(heads, self.linen_class)(num_classes, **kwargs)

    def loss(self, logits: Any, labels: Any, *, entropic_scale: float = 10.0) -> Any:
        """The per-example training loss of this head, ``[B, C], [B] -> [B]``.

        Plain softmax cross-entropy (``optax.softmax_cross_entropy_with_integer_labels``) for the
        linear head; the entropic cross-entropy :func:`isomax_jax.losses.isomax_loss` (scale
        ``entropic_scale``) for the IsoMax family.
        """
        if self.entropic_loss:
            from isomax_jax import losses

            return losses.isomax_loss(logits, labels, entropic_scale=entropic_scale)
        import optax

        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


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
        HeadSpec("softmax", "SoftMax", False, False, ("msp", "entropic"), "SoftMaxHead"),
        HeadSpec("isomax", "IsoMax", True, True, ("entropic",), "IsoMaxHead"),
        HeadSpec("isomax_plus", "IsoMax+", True, True, ("min_distance",), "IsoMaxPlusHead"),
        HeadSpec("dismax", "DisMax", True, True, ("mmles",), "DisMaxHead"),
    )
}
HEAD_NAMES: tuple[str, ...] = tuple(HEADS)
#: The heads whose logits are negative distances (:attr:`HeadSpec.distance_logits`).
DISTANCE_HEADS: frozenset[str] = frozenset(n for n, spec in HEADS.items() if spec.distance_logits)

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
    """The :class:`HeadSpec` called ``name``: the one check of a head name in the library.

    Raises:
      ValueError: ``name`` is not a head; the message lists the heads.

    Example:
      >>> head("isomax_plus").entropic_loss
      True
      >>> head("isomax+")
      Traceback (most recent call last):
      ...
      ValueError: `head` must be one of softmax, isomax, isomax_plus, dismax; got 'isomax+'.
    """
    if not isinstance(name, str) or name not in HEADS:
        raise ValueError(f"`head` must be one of {', '.join(HEAD_NAMES)}; got {name!r}.")
    return HEADS[name]
