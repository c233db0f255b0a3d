"""`run(config, workdir, mode=...)`: every side effect of an experiment lives here.

For each seed (`config.seed + run`, `run < config.runs`) and each loss in `config.losses`, a model
is trained with the same data order and schedule into `workdir/<loss>_seed<seed>/`
(`experiments.training`: Orbax checkpoints, `run.json`, `train_info.json`; an interrupted run
resumes from its latest intact checkpoint without replaying its input). Then all models are
evaluated together (`experiments.evaluate`) and the report is written (`experiments.report`).
With `mode="evaluate"` the final checkpoints are restored instead of trained. The flow is one
way: main -> train_eval -> training / evaluate / report.

Signals (SIGTERM, SIGINT; docs/reliability.md): during training, the step in flight is finished
and saved, then `isomax_jax.distributed.Preempted` (the same command resumes). During the
evaluation, which is not checkpointed, `Preempted` at once: no report is written and the rerun
evaluates again. While the report is written (seconds), a signal waits until it is complete, so
a report is always the whole of one evaluation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax

from experiments import evaluate, inputs, records, report, training, validate
from isomax_jax import distributed, locking, parallel, run_metadata


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
        with distributed.PreemptionNotice() as notice:
            trained = _models(
                config, workdir, mode=mode, mesh=mesh, timings=timings, preemption=notice
            )
        t0 = time.time()
        with _stop_evaluation_on_signal(already=notice.signal_name):
            evaluation = evaluate.evaluate_runs(config, trained, mesh=mesh, workdir=workdir)
        timings["evaluation_s"] = time.time() - t0
        with _signals_wait():
            return _report(config, workdir, evaluation, timings, start=start)


def _set_handlers(handler) -> dict[int, Any]:
    """Installs `handler` for SIGTERM and SIGINT (main thread only); the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}


def _restore_handlers(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _stop_evaluation_on_signal(already: str | None) -> Iterator[None]:
    """A signal stops the evaluation at once with `Preempted` (nothing is reported from part of
    the data; the rerun evaluates again), as does one received after the last training step."""

    def stop(name: str):
        return distributed.Preempted(
            f"{name} before the evaluation finished: stopped, no report written (every model is "
            "trained and saved); rerun the same command to evaluate again"
        )

    if already is not None:
        raise stop(already)

    def handler(signum, frame):
        del frame
        raise stop(signal.Signals(signum).name)

    previous = _set_handlers(handler)
    try:
        yield
    finally:
        _restore_handlers(previous)


@contextlib.contextmanager
def _signals_wait() -> Iterator[None]:
    """Signals wait until the block ends (the report's files, written in seconds): a report is
    never left half-written."""
    received = []
    previous = _set_handlers(lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        _restore_handlers(previous)
        if received:
            logging.getLogger(__name__).warning(
                "%s received while the report was written; the report is complete",
                signal.Signals(received[0]).name,
            )


def _models(
    config: Any,
    workdir: str,
    *,
    mode: str,
    mesh: Any,
    timings: dict[str, float],
    preemption: distributed.PreemptionNotice | None = None,
) -> list[records.TrainedRun]:
    """Every (seed, loss) model, in that order: trained (timed into `timings`; stopped and saved
    on a `preemption` notice) or, with `mode="evaluate"`, restored; the losses of
    `evaluate_as_imported` are the imported model in both modes."""
    runs = [(index, loss) for index in range(config.runs) for loss in config.losses]
    as_imported = inputs.option(config, "evaluate_as_imported")

    def imported(index: int, loss: str) -> records.TrainedRun:
        seed = config.seed + index
        return training.imported_one(config, loss=loss, seed=seed, run=index, mesh=mesh)

    if mode != "train_and_evaluate":
        return [
            imported(index, loss)
            if loss in as_imported
            else training.restore_one(
                config, workdir, loss=loss, seed=config.seed + index, run=index, mesh=mesh
            )
            for index, loss in runs
        ]
    t0 = time.time()
    source = inputs.TrainSource(config, workdir) if inputs.trains_any(config) else None
    timings["data_load_s"] = time.time() - t0
    t0 = time.time()
    trained = [
        imported(index, loss)
        if loss in as_imported or source is None
        else training.train_one(
            config,
            workdir,
            loss=loss,
            seed=config.seed + index,
            run=index,
            mesh=mesh,
            source=source,
            preemption=preemption,
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
    pack = inputs.pack_summary(config)
    if pack is not None:
        results["pack"] = pack
    if jax.process_index() == 0:
        paths = report.write_report(results, evaluation.plot_scores, workdir)
        evaluation.save_logits(os.path.join(workdir, "logits"))
        report.write_summaries(results, workdir)
        results["timings"]["report_s"] = time.time() - t0
        results["wall_time_s"] = time.time() - start
        report.write_json(results, paths["json"])
        print(report.console_summary(results, paths), flush=True)
    return results
