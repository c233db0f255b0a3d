"""`run(config, workdir, mode=...)`: every side effect of an experiment lives here.

For each seed (`config.seed + run`, `run < config.runs`) and each loss in `config.losses`, a model
is trained with the same data order and schedule into `workdir/<loss>_seed<seed>/`
(`experiments.training`: Orbax checkpoints, `run.json`, `train_info.json`; an interrupted run
resumes from its latest intact checkpoint without replaying its input). Then all models are
evaluated together (`experiments.evaluate`) and the report is written (`experiments.report`).
With `mode="evaluate"` the final checkpoints are restored instead of trained. The flow is one
way: main -> train_eval -> training / evaluate / report.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax

from experiments import evaluate, records, report, training, validate
from isomax_jax import data, distributed, locking, parallel, run_metadata


def code_version() -> dict[str, Any]:
    """The git commit of the code that ran and whether the tree had uncommitted changes."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", root, *args], capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": "unknown (not a git checkout)", "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status)}


def run(config: Any, workdir: str, *, mode: str = "train_and_evaluate") -> dict[str, Any]:
    """Validates `config`, trains (or restores) every model, evaluates them, writes the report.

    Returns:
      The results document (also written to `workdir/results.json`).
    """
    start = time.time()
    validate.check(
        config,
        workdir,
        mode=mode,
        device_count=jax.device_count(),
        process_count=jax.process_count(),
    )
    os.makedirs(workdir, exist_ok=True)
    mesh = parallel.data_mesh()
    timings: dict[str, float] = {"validation_s": time.time() - start}
    with locking.workdir_lock(workdir):
        trained = _models(config, workdir, mode=mode, mesh=mesh, timings=timings)
        t0 = time.time()
        evaluation = evaluate.evaluate_runs(config, trained, mesh=mesh, workdir=workdir)
        timings["evaluation_s"] = time.time() - t0
        return _report(config, workdir, evaluation, timings, start=start)


def _models(
    config: Any, workdir: str, *, mode: str, mesh: Any, timings: dict[str, float]
) -> list[records.TrainedRun]:
    """Every (seed, loss) model, in that order: trained (timed into `timings`) or, with
    `mode="evaluate"`, restored."""
    runs = [(index, loss) for index in range(config.runs) for loss in config.losses]
    if mode != "train_and_evaluate":
        return [
            training.restore_one(
                config, workdir, loss=loss, seed=config.seed + index, run=index, mesh=mesh
            )
            for index, loss in runs
        ]
    t0 = time.time()
    split = data.load_train_split(
        config.dataset,
        split=config.train_split,
        data_dir=config.data_dir or None,
        download=config.download,
    )
    timings["data_load_s"] = time.time() - t0
    t0 = time.time()
    trained = [
        training.train_one(
            config, workdir, loss=loss, seed=config.seed + index, run=index, mesh=mesh, split=split
        )
        for index, loss in runs
    ]
    timings["training_s"] = time.time() - t0
    timings["compile_s"] = sum(t.train.get("compile_s") or 0.0 for t in trained)
    return trained


def _report(
    config: Any,
    workdir: str,
    evaluation: evaluate.Evaluation,
    timings: dict[str, float],
    *,
    start: float,
) -> dict[str, Any]:
    """The results document; process 0 writes it with the report, logits and summaries."""
    t0 = time.time()
    results = report.build_results(
        config.to_dict(),
        evaluation.runs,
        devices=distributed.device_layout(),
        code=code_version(),
        versions=run_metadata.versions(),
        timings=timings,
        bootstrap=evaluation.bootstrap,
        detectors=evaluation.detector_info,
    )
    if jax.process_index() == 0:
        paths = report.write_report(results, evaluation.plot_scores, workdir)
        evaluation.save_logits(os.path.join(workdir, "logits"))
        report.write_summaries(results, workdir)
        results["timings"]["report_s"] = time.time() - t0
        results["wall_time_s"] = time.time() - start
        report.write_json(results, paths["json"])
        print(report.console_summary(results, paths), flush=True)
    return results
