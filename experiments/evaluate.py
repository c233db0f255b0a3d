"""Evaluation of trained models through the library's evaluator, plus what is about experiments.

Each model is evaluated by :func:`isomax_jax.evaluation.evaluate`, the same path a user's own
model takes: its outputs on the training split (no augmentation, no OOD data) fit every
applicable detector with its papers' default hyperparameters in one streamed pass; every
detector scores the in-distribution test set and each OOD set; `ood_metrics` gives the metrics
in each configured convention. What stays here is about experiments: which detectors a run
gets (`applicable_detectors`), the evaluation caps of the config, the runs' records, the
logits kept for the report, the scores for the plots and, with one run per loss,
`experiments.bootstrap`'s noise intervals for the verdicts.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from experiments import bootstrap, inputs, records
from isomax_jax import data, detectors, evaluation, parallel, registry


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


def _head_inputs(run: records.TrainedRun, columns: np.ndarray | None = None) -> dict[str, Any]:
    """`head_fn`, and `kernel`/`bias` of a linear head, for the detectors that need them
    (restricted to the logits' `columns` when given)."""
    params = run.state.params["classifier"]
    head = run.model.classifier

    def head_fn(features):
        logits = head.apply({"params": params}, features)
        return logits if columns is None else logits[:, columns]

    out: dict[str, Any] = {"head_fn": head_fn}
    if "kernel" in params:
        kernel, bias = params["kernel"], params["bias"]
        if columns is not None:
            kernel, bias = kernel[:, columns], bias[columns]
        out.update(kernel=kernel, bias=bias)
    return out


def _columns(outputs: Mapping[str, Any], columns: np.ndarray | None) -> Mapping[str, Any]:
    if columns is None:
        return outputs
    return {**outputs, "logits": outputs["logits"][:, columns]}


def _forward(step, run: records.TrainedRun, mesh, columns: np.ndarray | None = None):
    """The run's forward pass through the training loop's compiled, sharded eval step (BatchNorm
    in inference mode): the same program that gave the logits before the library's evaluator
    took over the evaluation, so the numbers stay the same to the bit."""

    def forward(images):
        n = images.shape[0]
        batch = {"image": images, "label": np.zeros(n, np.int32), "mask": np.ones(n, bool)}
        _, outputs = step(run.state, parallel.shard_batch(batch, mesh))
        return _columns(outputs, columns)

    return forward


def _outputs_fn(run: records.TrainedRun, columns: np.ndarray | None = None):
    """The run's model in inference mode: images -> {"logits", "features"}."""
    variables = run.state.variables

    def outputs(images):
        logits, features = run.model.apply(variables, images, train=False, return_features=True)
        return _columns({"logits": logits, "features": features}, columns)

    return outputs


def _detectors(config: Any, head: str) -> list[detectors.Detector]:
    """The applicable detectors with `config.detector_hyperparameters` (if any) applied."""
    hyper = inputs.option(config, "detector_hyperparameters")
    return [detectors.get(n, **dict(hyper.get(n, {}))) for n in applicable_detectors(config, head)]


def _imagenet_o(config: Any) -> Any:
    """ImageNet-O's protocol when it is evaluated with the dataset's own (200-class) protocol."""
    if not inputs.is_imagenet(config) or "imagenet_o" not in config.ood_datasets:
        return None
    if inputs.option(config, "imagenet_o_protocol") != "hendrycks":
        return None
    return data.imagenet_o_protocol(
        "hendrycks",
        data_dir=config.data_dir or None,
        manual_dir=config.manual_dir or None,
        build_dir=config.build_dir or None,
    )


def evaluate_runs(
    config: Any, trained: Sequence[records.TrainedRun], *, mesh: Any, workdir: str
) -> Evaluation:
    """Evaluates trained models on the test set and every OOD set with every detector."""
    config = _with_build_dir(config, config.build_dir or os.path.join(workdir, "data"))
    fits = any(d.fit_inputs for t in trained for d in _detectors(config, t.loss))
    fit = inputs.FitSplit(config, _cap(config)) if fits else None
    protocol = _imagenet_o(config)
    step = parallel.sharded_eval_step(mesh, return_outputs=True)
    set_names = {"in": config.dataset, "in:imagenet_o": f"{config.dataset}:imagenet_o"}
    rename = lambda d: set_names.get(d, d)  # noqa: E731
    results, logits, scores, skipped = [], {}, {}, {}
    for t in trained:
        sets = [d for d in config.ood_datasets if protocol is None or d != "imagenet_o"]
        report = _evaluate(config, t, step, mesh, fit, sets or ["imagenet_o"])
        if protocol is not None:  # ImageNet-O against the validation images of its 200 classes
            columns = protocol.class_indices
            own = _evaluate(config, t, step, mesh, fit, ["imagenet_o"], columns=columns)
            report = _merge_imagenet_o(report, own)
        logits[t.name] = {rename(d): v for d, v in report.logits.items()}
        scores[t.name] = {rename(d): v for d, v in report.scores.items()}
        skipped[t.name] = {
            n: why.removeprefix("not fitted: ")
            for n, why in report.skipped.items()
            if why.startswith("not fitted: ")
        }
        results.append(_run_result(config, t, report))
    intervals = {}
    if config.bootstrap_samples > 0 and config.runs == 1 and "softmax" in config.losses:
        intervals = bootstrap.paired_bootstrap(config, trained, scores, results)
    names = {r.name: r.detectors for r in results}
    hyper = inputs.option(config, "detector_hyperparameters")
    info = _detector_info(names, skipped, hyper)
    return Evaluation(results, _plot_scores(trained, scores), logits, intervals, info)


def _evaluate(
    config: Any,
    t: records.TrainedRun,
    step,
    mesh,
    fit: inputs.FitSplit | None,
    sets: Sequence[str],
    *,
    columns: np.ndarray | None = None,
) -> evaluation.Report:
    """One model through the library's evaluator against `sets`; with `columns`, the model's
    logits restricted to those classes, and the fit and test images to theirs (labels renumbered
    to the columns' order)."""
    cap = _cap(config)

    def labelled(batches):
        return batches if columns is None else inputs.remap_labels(batches, columns)

    fit_batches = None if fit is None else labelled(fit.batches(classes=columns))
    return evaluation.evaluate(
        _outputs_fn(t, columns),
        forward=_forward(step, t, mesh, columns),
        fit_batches=fit_batches,
        id_batches=inputs.capped(
            labelled(inputs.eval_batches(config, config.dataset, classes=columns)), cap
        ),
        ood_batches={d: inputs.capped(inputs.eval_batches(config, d), cap) for d in sets},
        head=t.loss,
        detectors=_detectors(config, t.loss),
        conventions=config.conventions,
        perturbation_max_examples=config.perturbation_max_examples
        if config.perturbation_max_examples > 0 else None,
        keep_logits=True,
        progress=True,
        **_head_inputs(t, columns),
    )  # fmt: skip


def _merge_imagenet_o(report: evaluation.Report, own: evaluation.Report) -> evaluation.Report:
    """`report` with ImageNet-O's metrics, scores, logits and counts from `own` (its protocol's
    evaluation); the accuracy and the other sets stay `report`'s (all 1000 classes)."""
    metrics = {
        c: {**{d: v for d, v in by_set.items()}, "imagenet_o": own.metrics[c]["imagenet_o"]}
        for c, by_set in report.metrics.items()
    }
    groups = {g: sets for g, sets in report.groups.items()}
    if not any("imagenet_o" in sets for sets in groups.values()):
        groups["ood"] = (*groups.get("ood", ()), "imagenet_o")
    scores = {**report.scores, "imagenet_o": own.scores["imagenet_o"]}
    scores["in:imagenet_o"] = own.scores["in"]  # the test images ImageNet-O is measured against
    return dataclasses.replace(
        report,
        metrics=metrics,
        groups=groups,
        scores=scores,
        logits={**report.logits, "imagenet_o": own.logits["imagenet_o"]},
        num_examples={**report.num_examples, "imagenet_o": own.num_examples["imagenet_o"]},
    )


def _cap(config: Any) -> int | None:
    return config.max_eval_examples if config.max_eval_examples > 0 else None


def _run_result(config, t: records.TrainedRun, report: evaluation.Report) -> records.RunResult:
    """One run's accuracy and `{ood: {detector: {convention: {metric: value}}}}`."""
    ood = {
        d: {n: {c: report.metrics[c][d][n] for c in config.conventions} for n in report.detectors}
        for d in config.ood_datasets
    }
    return records.RunResult(
        loss=t.loss, seed=t.seed, run=t.run, train=dict(t.train),
        accuracy=float(report.accuracy), num_test_examples=report.num_examples["in"],
        num_ood_examples={d: report.num_examples[d] for d in config.ood_datasets}, ood=ood,
        detectors=list(report.detectors),
    )  # fmt: skip


def _plot_scores(trained, scores) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """`{loss: {set: {detector: [N]}}}` of the papers' scores of the first seed's models."""
    first_seed = min(t.seed for t in trained)
    return {
        t.loss: {
            dataset: {n: s for n, s in by_det.items() if n in registry.HEADS[t.loss].paper_scores}
            for dataset, by_det in scores[t.name].items()
            if ":" not in dataset  # a protocol's own test scores (bootstrap only)
        }
        for t in trained
        if t.seed == first_seed
    }


def _detector_info(names, skipped, hyper: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Title and hyperparameters (the papers' defaults, updated by `hyper`) of every detector
    applied, and for which runs one could not be fitted (and why)."""
    info = {
        n: {
            "title": detectors.get(n).title,
            "hyperparameters": _jsonable(
                {**detectors.hyperparameters(n), **(hyper or {}).get(n, {})}
            ),
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
