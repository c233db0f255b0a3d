"""Evaluation of trained models: outputs, every applicable detector, metrics, bootstrap.

The evaluation is the same for every loss. Each model runs once over each data set through the
library's sharded eval step (`isomax_jax.parallel.sharded_eval_step(..., return_outputs=True)`:
BatchNorm in inference mode, the in-distribution normalisation for every set), which gives the
test accuracy and the logits and features of every example. Detectors that fit something
(Mahalanobis, KNN, ViM, ReAct, ...) are fitted on the outputs of the training split (no
augmentation, no OOD data) with their papers' default hyperparameters; every detector that
applies to the model's head scores every set; `isomax_jax.metrics.ood_metrics` gives the
metrics under each configured convention. Data sets are the outer loop, so each is read once for
all the models of an experiment. With one run per loss, `experiments.bootstrap` gives the
verdicts' noise intervals.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import bootstrap, records
from isomax_jax import data, detectors, metrics, parallel, registry
from isomax_jax.progress import Progress

_Outputs = dict[str, np.ndarray]  # {"logits": [N, C], "features": [N, D]}


@dataclasses.dataclass
class Evaluation:
    """What `evaluate_runs` returns to `train_eval` for the report."""

    runs: list[records.RunResult]
    plot_scores: dict[str, dict[str, dict[str, np.ndarray]]]  # loss -> set -> detector -> [N]
    logits: dict[str, dict[str, np.ndarray]]  # run name -> set -> [N, C]
    bootstrap: dict[str, Any]
    detector_info: dict[str, dict[str, Any]]

    def save_logits(self, directory: str) -> None:
        """`<directory>/<run name>.npz` with the logits of every evaluated set."""
        os.makedirs(directory, exist_ok=True)
        for name, by_set in self.logits.items():
            np.savez_compressed(os.path.join(directory, f"{name}.npz"), **by_set)


def applicable_detectors(config: Any, head: str) -> list[str]:
    """The detectors scored for a model with `head`: `config.detectors` (all if empty) plus the
    head's paper scores (the report's headline always needs them), those that apply to the
    head, in registry order."""
    names = set(config.detectors or detectors.NAMES) | set(registry.HEADS[head].paper_scores)
    return [n for n in detectors.NAMES if n in names and detectors.get(n).applies_to(head)]


def _head_inputs(run: records.TrainedRun) -> dict[str, Any]:
    """`head_fn`, and `kernel`/`bias` of a linear head, for the detectors that need them."""
    params = run.state.params["classifier"]
    head = run.model.classifier

    def head_fn(features):
        return head.apply({"params": params}, features)

    inputs: dict[str, Any] = {"head_fn": head_fn}
    if "kernel" in params:
        inputs.update(kernel=params["kernel"], bias=params["bias"])
    return inputs


def _apply_fn(run: records.TrainedRun):
    variables = run.state.variables

    def apply(images):
        return run.model.apply(variables, images, train=False, return_features=True)

    return apply


class _Forward:
    """The sharded eval step of every model, and a pass over a batch stream."""

    def __init__(self, trained: Sequence[records.TrainedRun], mesh: Any):
        self.trained, self.mesh = trained, mesh
        step = parallel.sharded_eval_step(mesh, return_outputs=True)
        self._step = step

    def run(
        self,
        batches: Iterable[Mapping[str, np.ndarray]],
        total: int,
        desc: str,
        cap: int | None,
        keep_images: int = 0,
    ) -> tuple[dict[str, _Outputs], np.ndarray, dict[str, float], np.ndarray]:
        """Outputs of every model on the real (masked) examples, labels, accuracy per model,
        and this process's first `keep_images` real images (for input-perturbation detectors)."""
        outs: dict[str, dict[str, list]] = {
            t.name: {"logits": [], "features": []} for t in self.trained
        }
        sums = {t.name: np.zeros(2) for t in self.trained}
        labels, seen, kept, num_kept = [], 0, [], 0
        gather = jax.jit(lambda x: x, out_shardings=parallel.replicated(self.mesh))
        with Progress(desc, total, unit="batch", enabled=jax.process_index() == 0) as bar:
            for batch in batches:
                device_batch = parallel.shard_batch(
                    {"image": batch["image"], "label": batch["label"], "mask": batch["mask"]},
                    self.mesh,
                )
                meta = jax.device_get(
                    gather({"m": device_batch["mask"], "y": device_batch["label"]})
                )
                mask = np.asarray(meta["m"], bool)
                for t in self.trained:
                    s, o = self._step(t.state, device_batch)
                    s, o = jax.device_get((s, o))
                    sums[t.name] += [float(s["correct"]), float(s["count"])]
                    for key in ("logits", "features"):
                        outs[t.name][key].append(np.asarray(o[key], np.float32)[mask])
                labels.append(np.asarray(meta["y"])[mask])
                if num_kept < keep_images:
                    local = np.asarray(batch["image"])[np.asarray(batch["mask"], bool)]
                    kept.append(local[: keep_images - num_kept])
                    num_kept += len(kept[-1])
                seen += int(mask.sum())
                bar.update(1)
                if cap is not None and seen >= cap:
                    break
        result = {
            name: {k: np.concatenate(v)[:cap] for k, v in by_key.items()}
            for name, by_key in outs.items()
        }
        accuracy = {name: c / n if n else float("nan") for name, (c, n) in sums.items()}
        images = np.concatenate(kept) if kept else np.zeros((0,), np.float32)
        return result, np.concatenate(labels)[:cap], accuracy, images


def _score_all(
    run: records.TrainedRun,
    names: Sequence[str],
    states: Mapping[str, Any],
    outputs: _Outputs,
    head_inputs: Mapping[str, Any],
) -> dict[str, np.ndarray]:
    scores = {}
    for name in names:
        det = detectors.get(name)
        if det.needs_images:
            continue
        value = det.score(
            states.get(name, {}),
            features=outputs["features"],
            logits=outputs["logits"],
            **head_inputs,
        )
        scores[name] = np.asarray(value, np.float32)
    return scores


def _image_scores(state, name, apply, images, head_inputs, batch_size) -> np.ndarray:
    """Scores of an input-perturbation detector (ODIN) on `images` (this process's rows).

    `apply` is the run's one `_apply_fn` (a static argument of the detector's jit: the same
    object for every set, so the forward and backward pass compile once per model)."""
    det = detectors.get(name)
    out = [
        np.asarray(det.score_images(state, apply, jnp.asarray(chunk), **head_inputs))
        for chunk in np.array_split(images, max(1, -(-len(images) // batch_size)))
        if len(chunk)
    ]
    return np.concatenate(out).astype(np.float32)


def _eval_batches(config: Any, dataset: str):
    return data.eval_dataset(
        dataset,
        in_distribution=config.dataset,
        batch_size=config.eval_batch_size,
        data_dir=config.data_dir or None,
        manual_dir=config.manual_dir or None,
        build_dir=config.build_dir or None,
        download=config.download,
    )


@functools.partial(jax.jit, static_argnames=("convention",))
def _metrics(in_scores, out_scores, out_mask, *, convention):
    return metrics.ood_metrics(in_scores, out_scores, out_mask=out_mask, convention=convention)


def metric_table(in_scores, out_scores, conventions) -> dict[str, dict[str, float]]:
    """`{convention: {metric: value}}` for one (detector, OOD set); OOD scores padded to a
    power-of-two length with a mask so that every set shares one compilation."""
    n = len(out_scores)
    size = 1 << max(n - 1, 1).bit_length()
    padded = np.zeros(size, np.float32)
    padded[:n] = out_scores
    mask = np.arange(size) < n
    table = {}
    for conv in conventions:
        m = jax.device_get(_metrics(in_scores, padded, mask, convention=conv))
        table[conv] = {k: float(m[k]) for k in registry.METRIC_NAMES}
    return table


@dataclasses.dataclass
class _Scored:
    """Every set's outputs through every model, scored by each of its detectors."""

    logits: dict[str, dict[str, np.ndarray]]  # run name -> set -> [N, C]
    scores: dict[str, dict[str, dict[str, np.ndarray]]]  # run name -> set -> detector -> [N]
    accuracy: dict[str, float]  # run name -> in-distribution test accuracy
    sizes: dict[str, dict[str, int]]  # run name -> set -> examples evaluated


def evaluate_runs(
    config: Any, trained: Sequence[records.TrainedRun], *, mesh: Any, workdir: str
) -> Evaluation:
    """Evaluates trained models on the test set and every OOD set with every detector."""
    config = _with_build_dir(config, config.build_dir or os.path.join(workdir, "data"))
    forward = _Forward(trained, mesh)
    names = {t.name: applicable_detectors(config, t.loss) for t in trained}
    head_inputs = {t.name: _head_inputs(t) for t in trained}
    states, skipped = _fit_detectors(config, trained, forward, names, head_inputs)
    scored = _score_sets(config, trained, forward, names, states, head_inputs)
    results = [_run_result(config, t, names[t.name], scored) for t in trained]
    intervals = {}
    if config.bootstrap_samples > 0 and config.runs == 1 and "softmax" in config.losses:
        intervals = bootstrap.paired_bootstrap(config, trained, scored.scores, results)
    return Evaluation(
        results,
        _plot_scores(trained, scored.scores),
        scored.logits,
        intervals,
        _detector_info(names, skipped),
    )


def _cap(config: Any) -> int | None:
    return config.max_eval_examples if config.max_eval_examples > 0 else None


def _fit_detectors(config, trained, forward, names, head_inputs):
    """Fits every detector that fits something on the training split's outputs (no
    augmentation, no OOD data): `({run: {detector: state}}, {run: {detector: why not}})`.

    A detector that cannot be fitted (e.g. a singular feature covariance) is reported and
    removed from `names`."""
    states: dict[str, dict[str, Any]] = {t.name: {} for t in trained}
    skipped: dict[str, dict[str, str]] = {}
    if not any(detectors.get(n).fit_inputs for ns in names.values() for n in ns):
        return states, skipped
    images, labels = data.load_train_split(
        config.dataset, split=config.train_split, data_dir=config.data_dir or None,
        download=config.download,
    )  # fmt: skip
    n_fit = len(images) if _cap(config) is None else min(len(images), _cap(config))
    batches = data.EvalBatches(
        images[:n_fit], labels[:n_fit], batch_size=config.eval_batch_size, name=config.dataset,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )  # fmt: skip
    fit_out, fit_labels, _, _ = forward.run(
        batches, len(batches), "features of the training split", None
    )
    total = sum(len(ns) for ns in names.values())
    with Progress("fit detectors", total, unit="detector", enabled=jax.process_index() == 0) as bar:
        for t in trained:
            for name in list(names[t.name]):
                try:
                    states[t.name][name] = detectors.get(name).fit(
                        features=fit_out[t.name]["features"], logits=fit_out[t.name]["logits"],
                        labels=fit_labels, **head_inputs[t.name],
                    )  # fmt: skip
                except ValueError as err:  # e.g. a singular feature covariance: report it
                    names[t.name].remove(name)
                    skipped.setdefault(t.name, {})[name] = str(err)
                    logging.warning("%s: detector %s not fitted: %s", t.name, name, err)
                bar.update(1, run=t.name, detector=name)
    return states, skipped


def _score_sets(config, trained, forward, names, states, head_inputs) -> _Scored:
    """Each set (in-distribution test set first, then the OOD sets) read once: every model's
    outputs, then every applicable detector's scores (input-perturbation ones on the images)."""
    perturb_cap = config.perturbation_max_examples
    perturb = any(detectors.get(n).needs_images for ns in names.values() for n in ns)
    keep_images = (perturb_cap if perturb_cap > 0 else 1 << 62) if perturb else 0
    apply_fns = {t.name: _apply_fn(t) for t in trained}
    scored = _Scored({t.name: {} for t in trained}, {t.name: {} for t in trained}, {}, {})
    for dataset in (config.dataset, *config.ood_datasets):
        batches = _eval_batches(config, dataset)
        outputs, _, acc, images = forward.run(
            batches, len(batches), f"evaluate {dataset}", _cap(config), keep_images=keep_images
        )
        if dataset == config.dataset:
            scored.accuracy = acc
        total = sum(len(names[t.name]) for t in trained)
        with Progress(
            f"score {dataset}", total, unit="detector", enabled=jax.process_index() == 0
        ) as bar:
            for t in trained:
                out = outputs[t.name]
                scored.sizes.setdefault(t.name, {})[dataset] = len(out["logits"])
                scored.logits[t.name][dataset] = out["logits"]
                by_det = _score_all(t, names[t.name], states[t.name], out, head_inputs[t.name])
                scored.scores[t.name][dataset] = by_det
                bar.update(len(by_det), run=t.name)
                for name in names[t.name]:
                    if detectors.get(name).needs_images:
                        by_det[name] = _image_scores(
                            states[t.name][name], name, apply_fns[t.name], images,
                            head_inputs[t.name], config.eval_batch_size,
                        )  # fmt: skip
                        bar.update(1, run=t.name, detector=name)
    return scored


def _run_result(config, t: records.TrainedRun, names, scored: _Scored) -> records.RunResult:
    """One run's accuracy and `{ood: {detector: {convention: {metric: value}}}}`."""
    in_scores = scored.scores[t.name][config.dataset]
    ood = {
        dataset: {
            name: metric_table(
                in_scores[name], scored.scores[t.name][dataset][name], config.conventions
            )
            for name in names
        }
        for dataset in config.ood_datasets
    }
    sizes = scored.sizes[t.name]
    return records.RunResult(
        loss=t.loss, seed=t.seed, run=t.run, train=dict(t.train),
        accuracy=float(scored.accuracy[t.name]), num_test_examples=sizes[config.dataset],
        num_ood_examples={d: sizes[d] for d in config.ood_datasets}, ood=ood,
        detectors=list(names),
    )  # fmt: skip


def _plot_scores(trained, scores) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """`{loss: {set: {detector: [N]}}}` of the papers' scores of the first seed's models."""
    first_seed = min(t.seed for t in trained)
    return {
        t.loss: {
            dataset: {n: s for n, s in by_det.items() if n in registry.HEADS[t.loss].paper_scores}
            for dataset, by_det in scores[t.name].items()
        }
        for t in trained
        if t.seed == first_seed
    }


def _detector_info(names, skipped) -> dict[str, dict[str, Any]]:
    """Title and hyperparameters of every detector applied, and for which runs one could not
    be fitted (and why)."""
    info = {
        n: {
            "title": detectors.get(n).title,
            "hyperparameters": _jsonable(detectors.hyperparameters(n)),
        }
        for n in detectors.NAMES
        if any(n in ns for ns in names.values())
    }
    for t_name, reasons in skipped.items():
        for name, why in reasons.items():
            info.setdefault(name, {"title": detectors.get(name).title})
            info[name].setdefault("not_fitted", {})[t_name] = why
    return info


def _jsonable(values: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: v if isinstance(v, int | float | str | bool | None) else str(v)
        for k, v in values.items()
    }


def _with_build_dir(config: Any, build_dir: str) -> Any:
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.build_dir = build_dir
    return config
