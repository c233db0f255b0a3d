"""Evaluation of trained models: logits on the test and OOD sets, scores, metrics, report.

The evaluation is the same for every loss: one forward pass per model and data set (BatchNorm
in inference mode, the in-distribution normalisation for every set), every applicable score from
`isomax_jax.scores`, and `isomax_jax.metrics.ood_metrics` under each configured convention.
Data sets are the outer loop, so each is read once for all the models of an experiment.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import report

METRIC_KEYS = ("tnr_at_tpr", "fpr_at_tpr", "auroc", "aupr_in", "aupr_out", "detection_accuracy")

# Scores that apply to each head: the softmax head's logits are not distances, so the
# distance-based scores (MDS = max logit as minus the smallest distance, MMLES) are left out.
APPLICABLE_SCORES = {
    "softmax": ("mps", "es", "energy"),
    "isomax": ("mps", "es", "mds", "mmles", "energy"),
    "isomax_plus": ("mps", "es", "mds", "mmles", "energy"),
    "dismax": ("mps", "es", "mds", "mmles", "energy"),
}


def compute_scores(logits: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """OOD scores (higher = more in-distribution) of `logits` [N, C], in float32 -> [N] each."""
    from isomax_jax import scores as S

    fns = {
        "mps": S.max_probability,
        "es": S.entropic,
        "mds": S.min_distance,
        "mmles": S.mmles,
        "energy": S.energy,
    }
    x = jnp.asarray(logits, jnp.float32)
    return {name: np.asarray(jax.jit(fns[name])(x), np.float32) for name in names}


def ood_table(
    in_scores: Mapping[str, np.ndarray],
    out_scores: Mapping[str, np.ndarray],
    conventions: Sequence[str],
) -> dict[str, dict[str, dict[str, float]]]:
    """`{score: {convention: {metric: value}}}` for one OOD set (values are fractions)."""
    from isomax_jax.metrics import ood_metrics

    table: dict[str, dict[str, dict[str, float]]] = {}
    for score, ins in in_scores.items():
        for conv in conventions:
            metrics = ood_metrics(jnp.asarray(ins), jnp.asarray(out_scores[score]), convention=conv)
            table.setdefault(score, {})[conv] = {k: float(metrics[k]) for k in METRIC_KEYS}
    return table


def forward_fns(models: Mapping[str, tuple[Any, Any]], mesh: Any) -> dict[str, Any]:
    """Per model, `jit(apply)(variables, images) -> logits` in inference mode, batch split on
    the mesh's data axis and logits replicated (so every process gets the whole batch)."""
    from isomax_jax import parallel

    rep = parallel.replicated(mesh)

    def make(apply_fn):
        return jax.jit(
            lambda variables, images: apply_fn(variables, images, train=False),
            in_shardings=(rep, parallel.batch_sharded(mesh)),
            out_shardings=rep,
        )

    return {key: make(apply_fn) for key, (apply_fn, _) in models.items()}


def collect_logits(
    models: Mapping[str, tuple[Any, Any]],
    dataset: str,
    config: Any,
    mesh: Any,
    *,
    build_dir: str | None = None,
    forwards: Mapping[str, Any] | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Logits of every model on `dataset` (real examples only) and the labels.

    Args:
      models: `{key: (apply_fn, variables)}`, variables replicated on `mesh`.
      dataset: a name accepted by `isomax_jax.data.eval_dataset`.
      config: the experiment config (dataset, eval_batch_size, max_eval_examples, data dirs).
      mesh: the data mesh (`isomax_jax.parallel.data_mesh()`).
      build_dir: where a missing OOD set is built (default `config.build_dir`, else the first
        writable data directory).
      forwards: the compiled forward passes from `forward_fns` (built if not given).

    Returns:
      `({key: float32 [N, C]}, int [N] labels)`, N capped by `config.max_eval_examples` > 0.
    """
    from isomax_jax import data, parallel

    if forwards is None:
        forwards = forward_fns(models, mesh)
    # Masks and labels of all processes, replicated, so every process sees the whole set.
    gather = jax.jit(lambda tree: tree, out_shardings=parallel.replicated(mesh))
    cap = config.max_eval_examples if config.max_eval_examples > 0 else None
    batches = data.eval_dataset(
        dataset,
        in_distribution=config.dataset,
        batch_size=config.eval_batch_size,
        data_dir=config.data_dir or None,
        manual_dir=config.manual_dir or None,
        build_dir=build_dir or config.build_dir or None,
        download=config.download,
    )
    outs: dict[str, list[np.ndarray]] = {key: [] for key in models}
    labels, n_real, start = [], 0, time.time()
    last_log = start
    for i, batch in enumerate(batches):
        if time.time() - last_log > 30:  # progress on long sets / slow models
            logging.info("eval %s: batch %d/%d", dataset, i, len(batches))
            last_log = time.time()
        images = parallel.shard_batch(np.asarray(batch["image"], np.float32), mesh)
        meta = {"mask": np.asarray(batch["mask"]).astype(bool), "label": batch["label"]}
        meta = jax.tree.map(np.asarray, gather(parallel.shard_batch(meta, mesh)))
        mask = meta["mask"]
        for key, (_, variables) in models.items():
            outs[key].append(np.asarray(forwards[key](variables, images))[mask])
        labels.append(meta["label"][mask])
        n_real += int(mask.sum())
        if cap is not None and n_real >= cap:
            break
    logits = {key: np.concatenate(v)[:cap] for key, v in outs.items()}
    label_arr = np.concatenate(labels)[:cap]
    logging.info(
        "eval %-22s %6d examples x %d models in %.1f s",
        dataset,
        len(label_arr),
        len(models),
        time.time() - start,
    )
    return logits, label_arr


def _run_key(loss: str, seed: int) -> str:
    return f"{loss}_seed{seed}"


def _log_ood(ood: str, runs: Sequence[Mapping[str, Any]]) -> None:
    parts = []
    for run in runs:
        for score in report.PAIRINGS.get(run["loss"], ())[:2]:
            m = run["ood"][ood][score]["reference"]
            tnr, auroc = 100 * m["tnr_at_tpr"], 100 * m["auroc"]
            parts.append(f"{run['loss']}/{score} TNR {tnr:.1f} AUROC {auroc:.1f}")
    logging.info("ood %-22s %s", ood, " | ".join(parts))


def evaluate_models(
    config: Any,
    trained: Sequence[Mapping[str, Any]],
    workdir: str,
    *,
    mesh: Any = None,
    wall_start: float | None = None,
) -> dict[str, Any]:
    """Evaluates trained models, writes `results.json`, `results.md`, plots, logits, summaries.

    Args:
      config: the experiment config.
      trained: one entry per (loss, seed): `{"loss", "seed", "run", "apply_fn", "variables",
        "train"}` with `variables` replicated on `mesh` and `train` the training summary.
      workdir: where the report goes.
      mesh: the data mesh (default: every device).
      wall_start: `time.time()` at the start of the experiment, for the reported wall time.

    Returns:
      The results document (see `experiments.report.build_results`).
    """
    from isomax_jax import distributed, parallel

    mesh = parallel.data_mesh() if mesh is None else mesh
    # Never let a missing OOD set be built into the (possibly shared, read-only) data_dir.
    build_dir = config.build_dir or os.path.join(workdir, "data")
    models = {_run_key(t["loss"], t["seed"]): (t["apply_fn"], t["variables"]) for t in trained}
    forwards = forward_fns(models, mesh)
    runs = {
        _run_key(t["loss"], t["seed"]): {
            "loss": t["loss"],
            "run": t["run"],
            "seed": t["seed"],
            "train": dict(t["train"]),
            "ood": {},
        }
        for t in trained
    }
    first_seed = min(t["seed"] for t in trained)
    plot_scores: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    all_logits: dict[str, dict[str, np.ndarray]] = {key: {} for key in models}

    in_logits, labels = collect_logits(
        models, config.dataset, config, mesh, build_dir=build_dir, forwards=forwards
    )
    in_scores = {}
    for key, run in runs.items():
        logits = in_logits[key]
        all_logits[key][config.dataset] = logits
        run["accuracy"] = float(np.mean(np.argmax(logits, axis=-1) == labels))
        run["num_test_examples"] = len(labels)
        in_scores[key] = compute_scores(logits, APPLICABLE_SCORES[run["loss"]])
        if run["seed"] == first_seed:
            plot_scores.setdefault(run["loss"], {})[config.dataset] = in_scores[key]
        logging.info("test accuracy %-14s %.2f %%", key, 100 * run["accuracy"])
    for ood in config.ood_datasets:
        out_logits, _ = collect_logits(
            models, ood, config, mesh, build_dir=build_dir, forwards=forwards
        )
        for key, run in runs.items():
            all_logits[key][ood] = out_logits[key]
            out_scores = compute_scores(out_logits[key], APPLICABLE_SCORES[run["loss"]])
            run["ood"][ood] = ood_table(in_scores[key], out_scores, config.conventions)
            run.setdefault("num_ood_examples", {})[ood] = len(out_logits[key])
            if run["seed"] == first_seed:
                plot_scores[run["loss"]][ood] = out_scores
        _log_ood(ood, list(runs.values()))

    results = report.build_results(
        config.to_dict(),
        list(runs.values()),
        devices=distributed.device_layout(),
        wall_time_s=None if wall_start is None else time.time() - wall_start,
    )
    if jax.process_index() == 0:
        os.makedirs(os.path.join(workdir, "logits"), exist_ok=True)
        for key, by_set in all_logits.items():
            np.savez_compressed(os.path.join(workdir, "logits", f"{key}.npz"), **by_set)
        paths = report.write_report(results, plot_scores, workdir)
        _write_summaries(results, workdir)
        print(report.compact_table(results), flush=True)
        for line in report.verdict_lines(results):
            print(line, flush=True)
        print(f"Report: {paths['markdown']} (+ results.json, plots/)", flush=True)
    return results


def _write_summaries(results: Mapping[str, Any], workdir: str) -> None:
    """Test accuracy and the paired scores' OOD metrics as TensorBoard scalars, one dir per run."""
    from tensorboardX import SummaryWriter

    for run in results["runs"]:
        key = _run_key(run["loss"], run["seed"])
        writer = SummaryWriter(os.path.join(workdir, "tensorboard", key))
        step = int(run["train"].get("steps", 0))
        writer.add_scalar("eval/accuracy", run["accuracy"], step)
        for ood, by_score in run["ood"].items():
            for score, by_conv in by_score.items():
                for metric in ("tnr_at_tpr", "auroc"):
                    value = by_conv["reference"][metric]
                    writer.add_scalar(f"ood_{ood}/{score}_{metric}", value, step)
        writer.close()


def evaluate_workdir(config: Any, workdir: str) -> dict[str, Any]:
    """Restores the final checkpoint of every (loss, seed) of `workdir` and evaluates them."""
    from experiments import train_eval

    start = time.time()
    mesh = None
    trained = []
    for run in range(config.runs):
        seed = config.seed + run
        for loss in config.losses:
            entry = train_eval.restore_trained(config, workdir, loss=loss, seed=seed, run=run)
            mesh = entry.pop("mesh")
            trained.append(entry)
    return evaluate_models(config, trained, workdir, mesh=mesh, wall_start=start)
