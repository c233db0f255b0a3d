"""The OOD evaluator: any model, every detector, both metric conventions, one report.

:func:`evaluate` turns a model into an OOD benchmark: it runs ``outputs_fn`` over the training
split (fitting every requested detector in one streamed pass,
:meth:`isomax_jax.detectors.Detector.fit_from`), the in-distribution test set and each OOD set;
scores every set with every detector; and computes :func:`isomax_jax.metrics.ood_metrics` in
each convention. ``outputs_fn(images)`` is any JAX callable returning ``{"logits": [B, C],
"features": [B, D]}`` (or a ``(logits, features)`` pair): a closure over a Flax ``apply``, an NNX
module, a model imported from PyTorch (:mod:`isomax_jax.torch_import`).

Example (a tiny linear model on random data, to show the calls):

  >>> import jax, numpy as np
  >>> from isomax_jax import evaluation
  >>> w = jax.random.normal(jax.random.key(0), (12, 3))
  >>> def outputs_fn(images):
  ...     features = jax.nn.relu(images.reshape(images.shape[0], -1))
  ...     return {"logits": features @ w, "features": features}
  >>> rng = np.random.default_rng(0)
  >>> def batches(n, seed, labels=True):
  ...     rng = np.random.default_rng(seed)
  ...     for _ in range(n):
  ...         yield {"image": rng.normal(size=(32, 2, 2, 3)).astype(np.float32),
  ...                "label": rng.integers(0, 3, 32)}
  >>> report = evaluation.evaluate(
  ...     outputs_fn, head="softmax", fit_batches=batches(4, 0), id_batches=batches(2, 1),
  ...     ood_batches={"noise": batches(2, 2)}, detectors=["msp", "knn"], progress=False)
  >>> sorted(report.metrics["openood"]["noise"]), report.num_examples["noise"]
  (['knn', 'msp'], 64)

Memory: one batch of outputs at a time for the detectors' fit (O(state), except KNN's bank and
the disk spool of two-pass detectors; see :mod:`isomax_jax.detectors.streaming`) and the scores
of every set (``N`` floats per detector). Each process of a multi-host run passes its own shard
of every set; the scores are gathered across processes before the metrics, so each example
counts once. ``docs/evaluation.md`` walks through evaluating your own model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from isomax_jax import detectors as _detectors
from isomax_jax import metrics, parallel, registry, tables, validation
from isomax_jax.detectors import streaming
from isomax_jax.detectors.base import model_outputs
from isomax_jax.progress import Progress

Batches = Iterable[Mapping[str, Any]]


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
      skipped: detector -> why it was not evaluated.
      tpr: the TPR of the operating-point metrics.
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
        data["group_means"] = {c: self.group_means(c) for c in self.metrics}
        return json.dumps(_nan_to_none(data), indent=1, sort_keys=True)


def evaluate(
    outputs_fn: Callable[[jax.Array], Any],
    *,
    fit_batches: Batches | None,
    id_batches: Batches,
    ood_batches: Mapping[str, Batches | Mapping[str, Batches]],
    head: str,
    detectors: Sequence[str | _detectors.Detector] | None = None,
    conventions: Sequence[str] = ("reference", "openood"),
    kernel: jax.typing.ArrayLike | None = None,
    bias: jax.typing.ArrayLike | None = None,
    head_fn: Callable | None = None,
    tpr: float = 0.95,
    perturbation_max_examples: int | None = 1000,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
) -> Report:
    """Evaluates a model as an OOD detector with every requested detector.

    Args:
      outputs_fn: ``images [B, H, W, C] -> {"logits": [B, C], "features": [B, D]}`` (or a
        ``(logits, features)`` pair), a JAX function of the images alone (close over the
        parameters); jitted here with the batch sharded over this process's devices.
      fit_batches: the training split (no augmentation), ``{"image", "label"}`` batches: the
        detectors that fit something are fitted on it in one streamed pass. None is allowed
        when no requested detector fits anything.
      id_batches: the in-distribution test set, ``{"image", "label"}`` batches.
      ood_batches: ``{name: batches}``, or grouped ``{"near": {name: batches}, "far": {...}}``;
        OOD batches need only ``"image"``.
      head: the model's head (``"softmax"``, ``"isomax"``, ``"isomax_plus"``, ``"dismax"``):
        which detectors apply.
      detectors: names or :class:`~isomax_jax.detectors.Detector` objects; None = every detector
        that applies to ``head`` and has its inputs (a linear head's ``kernel``/``bias`` for ViM,
        ``head_fn`` for ReAct, ASH, ...), the others listed in ``Report.skipped``.
      conventions: metric conventions to report.
      kernel, bias, head_fn: the classification head, for the detectors that use it.
      tpr: the TPR of ``tnr_at_tpr`` / ``fpr_at_tpr``.
      perturbation_max_examples: input-perturbation detectors (ODIN, Mahalanobis with ``eps``)
        score the first this many examples of each set (they need an input gradient per
        example); None = all. They are skipped, with the reason, when ``outputs_fn`` cannot be
        differentiated with respect to the images.
      mesh: a 1-D mesh named ``"data"`` over this process's devices (default: all of them).
      progress: show a progress bar per pass.

    Every batch may carry a boolean ``"mask"`` (False = padding, left out everywhere).

    Returns:
      A :class:`Report`.

    Raises:
      ValueError: an unknown head or detector, a requested detector that does not apply to the
        head or lacks its inputs, no OOD set, batches without images, or (via the detectors and
        metrics) non-finite outputs.
    """
    spec = registry.head(head)
    groups, ood = _flatten_sets(ood_batches)
    head_inputs = {k: v for k, v in dict(kernel=kernel, bias=bias, head_fn=head_fn).items()
                   if v is not None}  # fmt: skip
    forward = _Forward(outputs_fn, mesh)
    id_batches = forward.probe(id_batches)  # what outputs_fn returns, and its input gradient
    chosen, skipped = _choose(detectors, spec.name, head_inputs, forward)
    show = progress and jax.process_index() == 0

    fitting = [d for d in chosen if d.fit_inputs]
    states: dict[str, Any] = {d.name: {} for d in chosen}
    if fitting:
        if fit_batches is None:
            raise ValueError(
                f"`fit_batches` is needed: {', '.join(d.name for d in fitting)} fit on the "
                "training split."
            )
        accumulators = {d.name: d.accumulator(**head_inputs) for d in fitting}
        with Progress("outputs of the training split", None, unit="batch", enabled=show) as bar:
            outputs = forward.fit_batches(fit_batches, bar)
            streaming.drive(list(accumulators.values()), outputs, "evaluate")
        states.update({name: acc.finalize() for name, acc in accumulators.items()})

    scorer = functools.partial(
        forward.score_set, detectors=chosen, states=states, head_inputs=head_inputs,
        perturbation_max_examples=perturbation_max_examples, show=show,
    )  # fmt: skip
    scores, counts = {}, {}
    scores["in"], counts["in"] = scorer("in", id_batches, want_accuracy=True)
    for name, batches in ood.items():
        scores[name], counts[name] = scorer(name, batches, want_accuracy=False)
    scores = {s: {d: _gather(v) for d, v in by_det.items()} for s, by_det in scores.items()}
    counts = {s: [int(x) for x in _gather(np.asarray(c, np.int64), sum_=True)]
              for s, c in counts.items()}  # fmt: skip
    correct, labelled = counts["in"][1:]

    results = {
        conv: {
            name: {
                d.name: _floats(
                    metrics.ood_metrics(
                        scores["in"][d.name], scores[name][d.name], convention=conv, tpr=tpr
                    )
                )  # fmt: skip
                for d in chosen
            }
            for name in ood
        }
        for conv in conventions
    }
    return Report(
        head=spec.name,
        accuracy=correct / labelled if labelled else None,
        metrics=results,
        scores=scores,
        groups=groups,
        num_examples={s: c[0] for s, c in counts.items()},
        detectors=tuple(d.name for d in chosen),
        skipped=skipped,
        tpr=tpr,
    )


class _Forward:
    """``outputs_fn`` jitted over this process's devices, batch padded to a fixed size."""

    def __init__(self, outputs_fn: Callable, mesh: jax.sharding.Mesh | None):
        self.mesh = mesh or parallel.data_mesh(jax.local_devices())
        self.devices = self.mesh.devices.size
        self.outputs_fn = outputs_fn
        self.size: int | None = None  # padded batch size: the largest batch so far
        sharding = parallel.batch_sharded(self.mesh)
        self._jitted = jax.jit(self._outputs, in_shardings=sharding, out_shardings=sharding)
        self.has_features = self.differentiable = True

    def _outputs(self, images):
        logits, features = model_outputs(self.outputs_fn(images), "outputs_fn")
        if features is None:
            features = jnp.zeros((logits.shape[0], 0), logits.dtype)
        up = lambda x: x.astype(validation.compute_dtype(x.dtype))  # noqa: E731 (bf16 -> f32)
        return {"logits": up(logits), "features": up(features)}

    def pad(self, batch: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(images padded to the fixed size, mask, labels or None)``."""
        if "image" not in batch:
            raise ValueError(f"every batch needs an 'image' entry; got keys {sorted(batch)}.")
        images = np.asarray(batch["image"])
        n = images.shape[0]
        mask = np.ones(n, bool) if batch.get("mask") is None else np.asarray(batch["mask"], bool)
        labels = None if batch.get("label") is None else np.asarray(batch["label"])
        if self.size is None or n > self.size:  # the largest batch so far: one compilation
            self.size = -(-max(n, 1) // self.devices) * self.devices
        extra = self.size - n
        if extra:
            images = np.concatenate([images, np.zeros((extra, *images.shape[1:]), images.dtype)])
            mask = np.concatenate([mask, np.zeros(extra, bool)])
            if labels is not None:
                labels = np.concatenate([labels, np.full(extra, -1, labels.dtype)])
        return images, mask, labels

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        out = self._jitted(images)
        return {k: np.asarray(v) for k, v in jax.device_get(out).items()}

    def fit_batches(self, batches: Batches, bar: Progress):
        """The outputs of the training split, masked rows dropped, as fit batches."""
        for batch in batches:
            images, mask, labels = self.pad(batch)
            if labels is None:
                raise ValueError(
                    "`fit_batches` need a 'label' entry (the detectors fit per class)."
                )
            out = self(images)
            bar.update(1)
            yield {"features": out["features"][mask], "logits": out["logits"][mask],
                   "labels": labels[mask].astype(np.int64)}  # fmt: skip

    def probe(self, batches: Batches) -> Batches:
        """Traces ``outputs_fn`` on the first batch (no computation): whether it returns features
        and can be differentiated with respect to the images. Returns the batches, the first
        one included again."""
        iterator = iter(batches)
        first = next(iterator, None)
        if first is None:
            raise ValueError("`id_batches` is empty.")
        images, _, _ = self.pad(first)
        shapes = jax.eval_shape(lambda x: model_outputs(self.outputs_fn(x), "outputs_fn"), images)
        self.has_features = shapes[1] is not None
        try:
            jax.eval_shape(jax.grad(lambda x: jnp.sum(self._outputs(x)["logits"])), images)
        except Exception:  # noqa: BLE001 - any failure to trace the gradient: not differentiable
            self.differentiable = False
        return _Chain([first], iterator)

    def score_set(self, name, batches, *, detectors, states, head_inputs, perturbation_max_examples,
                  show, want_accuracy):  # fmt: skip
        """Scores of every detector on one set (this process's rows), and (correct, counted)."""
        out = {d.name: [] for d in detectors}
        examples = correct = counted = 0
        cap = math.inf if perturbation_max_examples is None else perturbation_max_examples
        apply = self._outputs  # one object: the image detectors' jit is compiled once
        with Progress(f"score {name}", None, unit="batch", enabled=show) as bar:
            for batch in batches:
                images, mask, labels = self.pad(batch)
                outputs = self(images)
                if want_accuracy and labels is not None:
                    predicted = outputs["logits"].argmax(axis=1)
                    correct += int(np.sum((predicted == labels) & mask))
                    counted += int(mask.sum())
                for det in detectors:
                    if det.needs_images:  # the first `cap` examples only
                        if examples < cap:
                            value = det.score_images(states[det.name], apply, images, **head_inputs)
                            out[det.name].append(np.asarray(value)[mask])
                        continue
                    value = det.score(states[det.name], **outputs, **head_inputs)
                    out[det.name].append(np.asarray(value)[mask])
                examples += int(mask.sum())
                bar.update(1)
        scores = {}
        for det in detectors:
            values = np.concatenate(out[det.name]) if out[det.name] else np.zeros(0, np.float32)
            scores[det.name] = values[: cap if det.needs_images else None]
        return scores, (examples, correct, counted)


class _Chain:
    """The first batches (already read) followed by the rest of an iterator, iterated once."""

    def __init__(self, head: list, rest):
        self.head, self.rest = head, rest

    def __iter__(self):
        yield from self.head
        yield from self.rest


def _choose(requested, head: str, head_inputs: Mapping[str, Any], forward: _Forward):
    """The detectors to evaluate and, for the default set, those skipped with the reason."""
    skipped: dict[str, str] = {}
    default = requested is None
    chosen = []
    for item in _detectors.NAMES if default else requested:
        det = item if isinstance(item, _detectors.Detector) else _detectors.get(item)
        if not det.applies_to(head):
            if default:
                continue
            raise ValueError(f"detector `{det.name}` does not apply to the {head!r} head.")
        why = _lacking(det, head_inputs, forward)
        if why and not default:
            raise ValueError(f"detector `{det.name}` {why}.")
        if why:
            skipped[det.name] = why
        else:
            chosen.append(det)
    return chosen, skipped


def _lacking(det: _detectors.Detector, head_inputs: Mapping[str, Any], forward: _Forward):
    """Why ``det`` cannot run here (None if it can)."""
    lacking = sorted((det.inputs & {"kernel", "bias", "head_fn"}) - set(head_inputs))
    if lacking:
        return f"needs {', '.join(lacking)} (pass them to evaluate)"
    if "features" in det.inputs and not forward.has_features:
        return "needs features: `outputs_fn` returns logits only"
    if det.needs_images and not forward.differentiable:
        return "needs the images' gradient: `outputs_fn` cannot be differentiated"
    return None


def _flatten_sets(ood_batches) -> tuple[dict[str, tuple[str, ...]], dict[str, Batches]]:
    if not isinstance(ood_batches, Mapping) or not ood_batches:
        raise ValueError("`ood_batches` must be a non-empty mapping {name: batches}.")
    grouped = all(isinstance(v, Mapping) for v in ood_batches.values())
    if not grouped:
        return {"ood": tuple(ood_batches)}, dict(ood_batches)
    sets: dict[str, Batches] = {}
    groups = {}
    for group, members in ood_batches.items():
        groups[group] = tuple(members)
        for name, batches in members.items():
            if name in sets or name == "in":
                raise ValueError(f"OOD set name {name!r} is used twice (or is reserved).")
            sets[name] = batches
    return groups, sets


def _gather(values: np.ndarray, *, sum_: bool = False) -> np.ndarray:
    """This process's rows of every process, concatenated in process order (or summed)."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    if sum_:
        return np.asarray(multihost_utils.process_allgather(values)).sum(axis=0)
    counts = np.asarray(multihost_utils.process_allgather(np.asarray([len(values)])))[:, 0]
    padded = np.zeros(int(counts.max()), values.dtype)
    padded[: len(values)] = values
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return np.concatenate([rows[i, :c] for i, c in enumerate(counts)])


def _floats(values: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(dict(values)).items()}


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


__all__ = ["Report", "evaluate"]
