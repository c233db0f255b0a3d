"""Checks a whole experiment before its first step, in seconds: keys, names, data, devices, workdir.

Every problem found is collected and raised together as one :class:`ConfigError` that names the
config key, the value given and what is accepted, so a typo never costs a training run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

from experiments import records


class ConfigError(ValueError):
    """The experiment's config (or its workdir) cannot run; the message lists every problem."""


_SCHEDULES = ("multistep", "warmup_linear", "warmup_cosine")
_DTYPES = ("float32", "bfloat16")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _names(v) -> bool:
    return isinstance(v, tuple | list) and all(isinstance(x, str) for x in v)


# key -> (check, what is accepted). Checks see the value only; cross-key checks follow below.
_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": (lambda v: isinstance(v, str), "a model name"),
    "dataset": (lambda v: isinstance(v, str), "a dataset name"),
    "train_split": (lambda v: isinstance(v, str) and bool(v), "a tfds split, e.g. 'train'"),
    "losses": (lambda v: _names(v) and len(v) > 0, "a non-empty tuple of loss names"),
    "entropic_scale": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "dismax_fpr": (lambda v: isinstance(v, bool), "True or False"),
    "dtype": (lambda v: v in _DTYPES, f"one of {list(_DTYPES)}"),
    "num_epochs": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "num_train_steps": (lambda v: _is_int(v) and (v > 0 or v == -1), "-1 or an int > 0"),
    "batch_size": (lambda v: _is_int(v) and v > 0, "an int > 0"),
    "schedule": (lambda v: v in _SCHEDULES, f"one of {list(_SCHEDULES)}"),
    "learning_rate": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "warmup_epochs": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "early_image_size": (lambda v: _is_int(v) and (v == 0 or v >= 8), "0 (off) or an int >= 8"),
    "early_fraction": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "lr_boundaries": (
        lambda v: (
            isinstance(v, tuple | list)
            and all(_is_number(x) and 0 < x < 1 for x in v)
            and list(v) == sorted(v)
        ),
        "an ascending tuple of fractions in (0, 1)",
    ),
    "lr_decay_factor": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "momentum": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "nesterov": (lambda v: isinstance(v, bool), "True or False"),
    "weight_decay": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "seed": (lambda v: _is_int(v) and 0 <= v < 2**31, "an int in [0, 2**31)"),
    "runs": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "ood_datasets": (lambda v: _names(v) and len(v) > 0, "a non-empty tuple of OOD set names"),
    "conventions": (lambda v: _names(v) and len(v) > 0, "a non-empty tuple of conventions"),
    "detectors": (lambda v: _names(v), "a tuple of detector names (empty: every applicable one)"),
    "bootstrap_samples": (lambda v: _is_int(v) and v >= 0, "an int >= 0 (0: no bootstrap)"),
    "perturbation_max_examples": (lambda v: _is_int(v) and (v > 0 or v == -1), "-1 or an int > 0"),
    "eval_batch_size": (lambda v: _is_int(v) and v > 0, "an int > 0"),
    "max_eval_examples": (lambda v: _is_int(v) and (v > 0 or v == -1), "-1 or an int > 0"),
    "data_dir": (lambda v: isinstance(v, str), "a directory ('' for the default)"),
    "manual_dir": (lambda v: isinstance(v, str), "a directory ('' for none)"),
    "build_dir": (lambda v: isinstance(v, str), "a directory ('' for <workdir>/data)"),
    "download": (lambda v: isinstance(v, bool), "True or False"),
    "log_every_steps": (lambda v: _is_int(v) and v > 0, "an int > 0"),
    "checkpoint_every_steps": (lambda v: _is_int(v) and v > 0, "an int > 0"),
}


def _problem(key: str, value: Any, accepted: str) -> str:
    return f"config.{key}={value!r}: expected {accepted}"


def _check_names(key: str, values: Sequence[str], allowed: Sequence[str]) -> list[str]:
    problems = []
    unknown = [v for v in values if v not in allowed]
    if unknown:
        problems.append(_problem(key, tuple(values), f"names among {list(allowed)}"))
    duplicates = sorted({v for v in values if list(values).count(v) > 1})
    if duplicates:
        problems.append(f"config.{key}={tuple(values)!r}: {duplicates} listed more than once")
    return problems


def _dataset_problems(config, workdir: str, mode: str) -> list[str]:
    """Every training, fitting and evaluation set is prepared, buildable offline, or
    downloadable."""
    from experiments import inputs

    return inputs.availability_problems(config, workdir, mode)


# Optional keys (experiments/inputs.py: OPTIONAL) -> (check, what is accepted).
_OPTIONAL_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "image_size": (lambda v: _is_int(v) and v >= 32, "an int >= 32"),
    "eval_resize_size": (lambda v: _is_int(v) and v >= 32, "an int >= 32"),
    "shuffle_buffer": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "fit_split": (lambda v: isinstance(v, str), "a tfds split ('' for train_split)"),
    "pretrained": (lambda v: isinstance(v, str), "a PyTorch state-dict file ('' for none)"),
    "evaluate_as_imported": (lambda v: _names(v), "a tuple of loss names"),
    "imagenet_o_protocol": (lambda v: v in ("hendrycks", "dismax"), "'hendrycks' or 'dismax'"),
    "ood_groups": (lambda v: hasattr(v, "items"), "a dict {group: (OOD set names)}"),
    "detector_hyperparameters": (
        lambda v: hasattr(v, "items"),
        "a dict {detector: {hyperparameter: value}}",
    ),
    "pack": (lambda v: isinstance(v, str), "a pack directory ('' for tfds)"),
    "input": (lambda v: v in ("auto", "host", "device"), "'auto', 'host' or 'device'"),
}


def _optional_problems(config) -> list[str]:
    """The ImageNet-scale keys, where the config has them."""
    from isomax_jax import detectors

    problems = []
    for key, (ok, accepted) in _OPTIONAL_KEYS.items():
        if key in config and not ok(config[key]):
            problems.append(_problem(key, config[key], accepted))
    if problems:
        return problems
    get = lambda key: config[key] if key in config else None  # noqa: E731
    size, resize = get("image_size"), get("eval_resize_size")
    if size is not None and resize is not None and resize < size:
        problems.append(_problem("eval_resize_size", resize, f">= image_size={size}"))
    if get("pack") and config.dataset == "imagenet2012":
        problems.append(_problem("pack", get("pack"), "'' for ImageNet (a pack holds 32-px sets)"))
    pretrained = get("pretrained") or ""
    if pretrained and not os.path.isfile(pretrained):
        problems.append(_problem("pretrained", pretrained, "an existing file"))
    imported = tuple(get("evaluate_as_imported") or ())
    for loss in imported:
        if loss != "softmax":
            problems.append(
                _problem("evaluate_as_imported", imported, "('softmax',) or (): only a SoftMax "
                         "head is imported whole (torchvision's fc); other heads are fine-tuned")
            )  # fmt: skip
        elif loss not in config.losses:
            problems.append(f"config.evaluate_as_imported includes {loss!r}, not in config.losses")
    if imported and not pretrained:
        problems.append("config.evaluate_as_imported needs config.pretrained (the weights file)")
    for group, sets in (get("ood_groups") or {}).items():
        extra = [s for s in sets if s not in config.ood_datasets]
        if not _names(tuple(sets)) or extra:
            problems.append(
                f"config.ood_groups[{group!r}]={tuple(sets)!r}: expected names among "
                f"config.ood_datasets {tuple(config.ood_datasets)}"
            )
    for name, values in (get("detector_hyperparameters") or {}).items():
        try:
            detectors.get(name, **dict(values))
        except (ValueError, TypeError) as err:
            problems.append(f"config.detector_hyperparameters[{name!r}]: {err}")
    return problems


def _workdir_problems(config, workdir: str, mode: str) -> list[str]:
    problems = []
    probe = os.path.abspath(workdir)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return [f"--workdir={workdir}: {probe} is not a directory"]
    if not os.access(probe, os.W_OK | os.X_OK):
        problems.append(f"--workdir={workdir}: {probe} is not writable (reports and checkpoints)")
    imported = config.evaluate_as_imported if "evaluate_as_imported" in config else ()
    for run in range(config.runs):
        for loss in config.losses:
            if loss in imported:
                continue  # the imported model: nothing trained, nothing in the workdir
            run_dir = os.path.join(workdir, records.run_name(loss, config.seed + run))
            meta = os.path.join(run_dir, "run.json")
            if mode == "evaluate" and not os.path.isdir(os.path.join(run_dir, "checkpoints")):
                problems.append(
                    f"--mode=evaluate: {run_dir} has no checkpoints; train it first "
                    "(--mode=train_and_evaluate)"
                )
            elif mode == "evaluate" and not os.path.exists(os.path.join(run_dir, TRAIN_INFO)):
                problems.append(
                    f"--mode=evaluate: {run_dir} has not finished training (no {TRAIN_INFO}: it "
                    "was preempted or killed); finish it with --mode=train_and_evaluate, which "
                    "resumes from its latest checkpoint"
                )
            if os.path.exists(meta):
                problems += _recorded_config_problems(meta, config)
    return problems


# Written by experiments.training when a run's training is finished (its TRAIN_INFO).
TRAIN_INFO = "train_info.json"

# Keys that do not change a run's trained weights: a finished run may be re-evaluated with other
# values (e.g. more detectors or OOD sets) in the same workdir.
EVALUATION_ONLY_KEYS = frozenset({
    "bootstrap_samples", "build_dir", "checkpoint_every_steps", "conventions", "data_dir",
    "detectors", "download", "eval_batch_size", "log_every_steps", "losses", "manual_dir",
    "max_eval_examples", "ood_datasets", "perturbation_max_examples", "published", "runs",
    # ImageNet scale (experiments/inputs.py)
    "fit_split", "detector_hyperparameters", "ood_groups", "imagenet_o_protocol",
    "eval_resize_size", "evaluate_as_imported",
})  # fmt: skip


def _recorded_config_problems(path: str, config) -> list[str]:
    """The differences between a run's recorded config and this one in keys that shape training."""
    from isomax_jax import run_metadata  # the comparison write_run_metadata makes when it starts

    try:
        with open(path) as f:
            recorded = json.load(f).get("config") or {}
    except (OSError, ValueError) as err:
        return [f"{path} cannot be read ({err}); move it away or use a fresh --workdir"]
    diffs = [
        f"{key}: recorded {old!r}, now {new!r}"
        for key, old, new in run_metadata.config_differences(
            recorded, config, ignore_keys=EVALUATION_ONLY_KEYS
        )
    ]
    if not diffs:
        return []
    return [
        f"{path} was trained with a different config ({'; '.join(diffs)}). Use a fresh "
        "--workdir for a different experiment, or rerun with the recorded values to resume it."
    ]


def check(config, workdir: str, *, mode: str, device_count: int, process_count: int = 1) -> None:
    """Raises :class:`ConfigError` listing every problem of ``config`` for this run.

    Args:
      config: the experiment's ``ml_collections.ConfigDict``.
      workdir: the run's directory (created later if missing; its parent must be writable).
      mode: ``"train_and_evaluate"`` or ``"evaluate"``.
      device_count: the number of devices the batches are split over (all processes).
      process_count: the number of processes.
    """
    from experiments import inputs
    from isomax_jax import detectors, metrics, models, registry

    problems = []
    missing = [k for k in _KEYS if k not in config]
    if missing:
        problems.append(f"config lacks keys {missing} (start from experiments/configs/default.py)")
    for key, (ok, accepted) in _KEYS.items():
        if key in config and not ok(config[key]):
            problems.append(_problem(key, config[key], accepted))
    if problems:
        raise ConfigError(_message(problems))

    if config.model not in models.BACKBONES:
        problems.append(_problem("model", config.model, f"one of {sorted(models.BACKBONES)}"))
    if config.dataset not in inputs.train_names():
        problems.append(_problem("dataset", config.dataset, f"one of {list(inputs.train_names())}"))
        raise ConfigError(_message(problems))
    problems += _check_names("losses", config.losses, registry.HEAD_NAMES)
    problems += _check_names("ood_datasets", config.ood_datasets, inputs.eval_names(config))
    problems += _optional_problems(config)
    if config.dataset in config.ood_datasets:
        problems.append(f"config.ood_datasets includes the in-distribution set {config.dataset!r}")
    problems += _check_names("conventions", config.conventions, metrics.CONVENTIONS)
    problems += _check_names("detectors", config.detectors, detectors.NAMES)
    if config.dismax_fpr and "dismax" not in config.losses:
        problems.append("config.dismax_fpr=True needs 'dismax' in config.losses")
    for key in ("batch_size", "eval_batch_size"):
        if config[key] % device_count:
            problems.append(
                _problem(
                    key,
                    config[key],
                    f"a multiple of the {device_count} devices the batch is split over"
                    + (f" ({process_count} processes)" if process_count > 1 else ""),
                )
            )
    if config.schedule == "warmup_linear" or config.schedule == "warmup_cosine":
        if config.num_train_steps == -1 and config.warmup_epochs >= config.num_epochs:
            problems.append(
                _problem("warmup_epochs", config.warmup_epochs, f"< num_epochs={config.num_epochs}")
            )
    try:
        image_size = inputs.image_size(config)
    except (TypeError, ValueError):  # a bad image_size, reported above
        image_size = 2**31
    if config.early_image_size >= image_size:
        problems.append(
            _problem("early_image_size", config.early_image_size, f"< the image size {image_size}")
        )
    if problems:
        raise ConfigError(_message(problems))
    problems += _workdir_problems(config, workdir, mode)
    problems += _dataset_problems(config, workdir, mode)
    if problems:
        raise ConfigError(_message(problems))


def _message(problems: Sequence[str]) -> str:
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"the experiment cannot run ({len(problems)} problem(s)):\n{lines}"
