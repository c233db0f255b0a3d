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
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from experiments import bootstrap, records
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


def _forward(step, run: records.TrainedRun, mesh):
    """The run's forward pass through the training loop's compiled, sharded eval step (BatchNorm
    in inference mode): the same program that gave the logits before the library's evaluator
    took over the evaluation, so the numbers stay the same to the bit."""

    def forward(images):
        n = images.shape[0]
        batch = {"image": images, "label": np.zeros(n, np.int32), "mask": np.ones(n, bool)}
        _, outputs = step(run.state, parallel.shard_batch(batch, mesh))
        return outputs

    return forward


def _outputs_fn(run: records.TrainedRun):
    """The run's model in inference mode: images -> {"logits", "features"}."""
    variables = run.state.variables

    def outputs(images):
        logits, features = run.model.apply(variables, images, train=False, return_features=True)
        return {"logits": logits, "features": features}

    return outputs


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


def evaluate_runs(
    config: Any, trained: Sequence[records.TrainedRun], *, mesh: Any, workdir: str
) -> Evaluation:
    """Evaluates trained models on the test set and every OOD set with every detector."""
    config = _with_build_dir(config, config.build_dir or os.path.join(workdir, "data"))
    fit_images, fit_labels = _fit_split(config, trained)
    step = parallel.sharded_eval_step(mesh, return_outputs=True)
    results, logits, scores, skipped = [], {}, {}, {}
    for t in trained:
        report = evaluation.evaluate(
            _outputs_fn(t),
            forward=_forward(step, t, mesh),
            fit_batches=_fit_batches(config, fit_images, fit_labels),
            id_batches=_capped(_eval_batches(config, config.dataset), _cap(config)),
            ood_batches={d: _capped(_eval_batches(config, d), _cap(config))
                         for d in config.ood_datasets},  # fmt: skip
            head=t.loss,
            detectors=applicable_detectors(config, t.loss),
            conventions=config.conventions,
            perturbation_max_examples=config.perturbation_max_examples
            if config.perturbation_max_examples > 0 else None,
            keep_logits=True,
            progress=True,
            **_head_inputs(t),
        )  # fmt: skip
        rename = lambda d: config.dataset if d == "in" else d  # noqa: E731
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
    return Evaluation(
        results, _plot_scores(trained, scores), logits, intervals, _detector_info(names, skipped)
    )


def _cap(config: Any) -> int | None:
    return config.max_eval_examples if config.max_eval_examples > 0 else None


def _fit_split(config: Any, trained) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The training split (capped), read once for every model, if any detector fits on it."""
    if not any(detectors.get(n).fit_inputs for t in trained
               for n in applicable_detectors(config, t.loss)):  # fmt: skip
        return None, None
    images, labels = data.load_train_split(
        config.dataset, split=config.train_split, data_dir=config.data_dir or None,
        download=config.download,
    )  # fmt: skip
    n_fit = len(images) if _cap(config) is None else min(len(images), _cap(config))
    return images[:n_fit], labels[:n_fit]


def _fit_batches(config: Any, images, labels):
    if images is None:
        return None
    return data.EvalBatches(
        images, labels, batch_size=config.eval_batch_size, name=config.dataset,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )  # fmt: skip


def _capped(batches, cap: int | None) -> Iterator[Mapping[str, np.ndarray]]:
    """The batches up to ``cap`` real examples (this process's), the rest masked out."""
    seen = 0
    for batch in batches:
        if cap is not None and seen >= cap:
            return
        mask = np.asarray(batch["mask"], bool)
        if cap is not None:
            mask = mask & (np.cumsum(mask) + seen <= cap)
        seen += int(mask.sum())
        yield {**batch, "mask": mask}


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
