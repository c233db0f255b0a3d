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

import functools
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from isomax_jax import detectors as _detectors
from isomax_jax import metrics, parallel, registry, validation
from isomax_jax.detectors import streaming
from isomax_jax.detectors.base import model_outputs
from isomax_jax.ood_report import Report
from isomax_jax.progress import Progress

Batches = Iterable[Mapping[str, Any]]
_log = logging.getLogger(__name__)
#: Rows per chunk of the fit pass's statistics (the detectors' own ``chunk`` default): the
#: float64 sums then run in the same order as ``Detector.fit`` on the whole split.
FIT_CHUNK = 4096


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
    forward: Callable[[np.ndarray], Any] | None = None,
    keep_logits: bool = False,
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
      forward: an already compiled forward pass to run instead of ``jax.jit(outputs_fn)``, e.g.
        your loop's jitted, sharded eval step: ``images [B, ...] -> {"logits", "features"}``
        (or a pair), ``B`` padded to a multiple of ``mesh``'s local devices; called by every
        process the same number of times per set when the sets are padded alike.
        ``outputs_fn`` is then only traced (for the input-gradient detectors and to see what
        the model returns).
      keep_logits: also return every set's logits (``Report.logits``).
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
    forward = _Forward(outputs_fn, mesh, compiled=forward)
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
            outputs = streaming.rebatch(forward.fit_batches(fit_batches, bar), FIT_CHUNK)
            try:
                streaming.drive(list(accumulators.values()), outputs, "evaluate")
            except ValueError as err:
                raise ValueError(f"the training split (`fit_batches`): {err}") from err
        for name, accumulator in accumulators.items():
            try:
                states[name] = accumulator.finalize()
            except ValueError as err:  # a property of the data (e.g. all features equal)
                skipped[name] = f"not fitted: {err}"
                _log.warning("detector %s not fitted: %s", name, err)
        chosen = [d for d in chosen if d.name not in skipped]

    scorer = functools.partial(
        forward.score_set, detectors=chosen, states=states, head_inputs=head_inputs,
        perturbation_max_examples=perturbation_max_examples, show=show,
    )  # fmt: skip
    scores, counts, logits = {}, {}, {}
    for name, batches in (("in", id_batches), *ood.items()):
        scores[name], logits[name], counts[name] = scorer(name, batches)
    scores = {s: {d: _gather(v) for d, v in by_det.items()} for s, by_det in scores.items()}
    logits = {s: _gather(v) for s, v in logits.items()} if keep_logits else {}
    counts = {s: [int(x) for x in _gather(np.asarray(c, np.int64), sum_=True)]
              for s, c in counts.items()}  # fmt: skip
    correct, labelled = counts["in"][1:]

    results = _metric_tables(scores, list(ood), [d.name for d in chosen], conventions, tpr)
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
        logits=logits,
    )


class _Forward:
    """``outputs_fn`` jitted over this process's devices, batch padded to a fixed size."""

    def __init__(self, outputs_fn: Callable, mesh: jax.sharding.Mesh | None, compiled=None):
        self.mesh = mesh or parallel.data_mesh(jax.local_devices())
        self.devices = len(self.mesh.local_devices)
        self.outputs_fn = outputs_fn
        self.compiled = compiled
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
        if self.compiled is None:
            out = self._jitted(images)
        else:  # the caller's own compiled forward pass
            logits, features = model_outputs(self.compiled(images), "forward")
            out = {"logits": logits, "features": features}
        out = jax.device_get(out)
        return {k: np.asarray(v, validation.compute_dtype(v.dtype)) for k, v in out.items()}

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
                  show):  # fmt: skip
        """Scores of every detector on one set (this process's rows), its logits, and
        ``(examples, correct, labelled)``.

        The set's outputs are collected, then each detector scores all of them in one call (one
        compilation per set size); input-perturbation detectors score the first
        ``perturbation_max_examples`` images in chunks of at most one batch."""
        logits, features, images = [], [], []
        cap = math.inf if perturbation_max_examples is None else perturbation_max_examples
        kept = correct = labelled = 0
        perturb = any(d.needs_images for d in detectors)
        with Progress(f"evaluate {name}", None, unit="batch", enabled=show) as bar:
            for batch in batches:
                padded, mask, labels = self.pad(batch)
                out = self(padded)
                logits.append(out["logits"][mask])
                features.append(out["features"][mask])
                if labels is not None:
                    correct += int(np.sum((out["logits"].argmax(axis=1) == labels) & mask))
                    labelled += int(np.sum(mask & (labels >= 0)))
                if perturb and kept < cap:
                    images.append(padded[mask][: int(min(cap - kept, mask.sum()))])
                    kept += len(images[-1])
                bar.update(1)
        outputs = {"logits": np.concatenate(logits), "features": np.concatenate(features)}
        _check_outputs(name, outputs)
        scores = {}
        for det in detectors:
            if det.needs_images:
                scores[det.name] = self._image_scores(det, states[det.name], images, head_inputs)
            else:
                value = det.score(states[det.name], **outputs, **head_inputs)
                scores[det.name] = np.asarray(value)
        n = len(outputs["logits"])
        return scores, outputs["logits"], (n, correct, labelled)

    def _image_scores(self, det, state, images, head_inputs) -> np.ndarray:
        """An input-perturbation detector's scores of ``images``, in chunks of at most one
        (padded) batch; ``self._outputs`` is one object, so the detector compiles once."""
        images = np.concatenate(images) if images else np.zeros((0,), np.float32)
        if not len(images):
            return np.zeros(0, np.float32)
        # self.size is set by the first padded batch, before any image is scored.
        chunks = np.array_split(images, -(-len(images) // self.size))  # pyright: ignore[reportOperatorIssue]
        return np.concatenate(
            [
                np.asarray(det.score_images(state, self._outputs, jnp.asarray(c), **head_inputs))
                for c in chunks
            ]  # fmt: skip
        )


def _check_outputs(name: str, outputs: Mapping[str, np.ndarray]) -> None:
    """A clear error before any score or metric when a set's outputs hold NaN/inf (NaN images
    from a pipeline, a diverged model), naming the set."""
    for key, values in outputs.items():
        bad = ~np.isfinite(values).all(axis=1) if values.size else np.zeros(0, bool)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"set {name!r}: {int(bad.sum())} of {bad.size} examples give non-finite {key} "
                f"(NaN/inf), the first at index {first} of this process's examples: NaN or inf "
                "images from the input pipeline, or a diverged model."
            )


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


def _metrics_of(scores, ood: str, name: str, **kwargs) -> dict[str, Any]:
    """``ood_metrics`` of one detector on one set; an error names both."""
    try:
        return metrics.ood_metrics(scores["in"][name], scores[ood][name], **kwargs)
    except ValueError as err:
        raise ValueError(f"detector {name!r}, OOD set {ood!r}: {err}") from err


def _metric_tables(scores, sets, names, conventions, tpr):
    """``{convention: {set: {detector: metrics}}}``; unresolvable-TPR warnings summarised in one
    log line instead of one warning per pair."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", metrics.TPRResolutionWarning)
        tables_ = {
            conv: {
                s: {n: _floats(_metrics_of(scores, s, n, convention=conv, tpr=tpr)) for n in names}
                for s in sets
            }
            for conv in conventions
        }
    unresolved = [w for w in caught if issubclass(w.category, metrics.TPRResolutionWarning)]
    for w in caught:
        if w not in unresolved:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if unresolved:
        _log.warning(
            "%d metric pair(s) have NaN tnr_at_tpr/fpr_at_tpr, too few scores to resolve "
            "tpr=%g; e.g.: %s", len(unresolved), tpr, unresolved[0].message,
        )  # fmt: skip
    return tables_


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


__all__ = ["Report", "evaluate"]
