"""Orbax checkpoints of a run (latest every N steps + best by a metric) and run metadata.

A run directory looks like::

    workdir/run.json            config, seed, versions, device layout (one entry per start)
    workdir/checkpoints/<step>  the latest checkpoints (every ``save_every_steps`` and at the end)
    workdir/best/<step>         the best checkpoint(s) by ``best_metric``

Every process of a multi-host run calls the same methods (Orbax coordinates the writes); only
process 0 writes ``run.json``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
import platform
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from isomax_jax import distributed

RUN_METADATA = "run.json"

_STATE_FIELDS = ("step", "params", "batch_stats", "opt_state", "rng")


def _config_to_dict(config: Any) -> Any:
    if config is None:
        return None
    if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
        return config.to_dict()
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"config must be a ConfigDict, dataclass or mapping, got {type(config)}")


def versions() -> dict[str, str]:
    """Versions of Python and of the libraries a run depends on."""
    import flax
    import jaxlib
    import optax

    import isomax_jax

    return {
        "isomax_jax": isomax_jax.__version__,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax_checkpoint": getattr(ocp, "__version__", "unknown"),
        "python": platform.python_version(),
    }


def write_run_metadata(workdir: str | pathlib.Path, *, config: Any, seed: int) -> dict[str, Any]:
    """Records config, seed, versions and device layout in ``workdir/run.json``.

    A resumed run appends a new entry to ``starts`` (versions and layout may change between
    starts); a different ``config`` or ``seed`` than the recorded one raises ``ValueError``.

    Args:
      workdir: the run directory (created if needed).
      config: ``ml_collections.ConfigDict``, dataclass or mapping (stored as JSON; values that are
        not JSON types are stored as their ``str``).
      seed: the run's seed.

    Returns:
      The metadata dict (as written by process 0).

    Example:
      >>> import tempfile
      >>> meta = write_run_metadata(tempfile.mkdtemp(), config={"lr": 0.1}, seed=0)
      >>> meta["config"], meta["seed"], len(meta["starts"])
      ({'lr': 0.1}, 0, 1)
    """
    workdir = pathlib.Path(workdir)
    path = workdir / RUN_METADATA
    config_dict = json.loads(json.dumps(_config_to_dict(config), default=str))
    start = {
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "versions": versions(),
        "device_layout": distributed.device_layout(),
        "host": platform.node(),
    }
    if path.exists():
        meta = json.loads(path.read_text())
        if meta.get("config") != config_dict or meta.get("seed") != seed:
            raise ValueError(
                f"{path} records a different config/seed (seed {meta.get('seed')} vs {seed}); "
                "use a fresh workdir for a different run"
            )
        meta["starts"].append(start)
    else:
        meta = {"config": config_dict, "seed": seed, "starts": [start]}
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
        tmp.replace(path)
    return meta


def _state_items(state: Any) -> dict[str, Any]:
    return {name: getattr(state, name) for name in _STATE_FIELDS}


class RunCheckpointer:
    """Latest-every-N-steps and best-by-metric Orbax checkpoints of a :class:`TrainState`.

    Args:
      workdir: the run directory.
      save_every_steps: :meth:`save` writes at steps that are multiples of this (and with
        ``force=True``, e.g. at the end of training).
      keep: how many latest checkpoints to keep.
      best_metric: name of the metric :meth:`save_best` ranks by (``None``: no best checkpoint).
      best_mode: ``"max"`` (e.g. accuracy) or ``"min"`` (e.g. loss).
      keep_best: how many best checkpoints to keep.
      async_save: write in a background thread (call :meth:`close` or :meth:`wait` at the end).

    Example:
      >>> import tempfile
      >>> ckpt = RunCheckpointer(tempfile.mkdtemp(), save_every_steps=10)
      >>> ckpt.latest_step() is None
      True
      >>> ckpt.close()
    """

    def __init__(
        self,
        workdir: str | pathlib.Path,
        *,
        save_every_steps: int,
        keep: int = 2,
        best_metric: str | None = None,
        best_mode: str = "max",
        keep_best: int = 1,
        async_save: bool = True,
    ):
        if save_every_steps <= 0:
            raise ValueError(f"save_every_steps must be positive, got {save_every_steps}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        workdir = pathlib.Path(workdir).absolute()
        self.save_every_steps = save_every_steps
        self.best_metric = best_metric
        self._latest = ocp.CheckpointManager(
            workdir / "checkpoints",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
            ),
        )
        self._best = None
        if best_metric is not None:
            self._best = ocp.CheckpointManager(
                workdir / "best",
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=keep_best,
                    best_fn=lambda metrics: float(metrics[best_metric]),
                    best_mode=best_mode,
                    keep_checkpoints_without_metrics=False,
                    enable_async_checkpointing=async_save,
                ),
            )

    def latest_step(self) -> int | None:
        """Step of the newest complete latest-checkpoint, or ``None``."""
        return self._latest.latest_step()

    def best_step(self) -> int | None:
        """Step of the best checkpoint by ``best_metric``, or ``None``."""
        return None if self._best is None else self._best.best_step()

    def save(self, state: Any, *, force: bool = False) -> bool:
        """Saves ``state`` at ``int(state.step)`` if it is a multiple of N (or ``force``)."""
        step = int(state.step)
        if not force and step % self.save_every_steps:
            return False
        if step in self._latest.all_steps():
            return False
        return self._latest.save(step, args=ocp.args.StandardSave(_state_items(state)), force=True)

    def save_best(self, state: Any, metrics: Mapping[str, Any]) -> bool:
        """Offers ``state`` with its evaluation ``metrics``; keeps it if among the best."""
        if self._best is None:
            raise ValueError("save_best needs a RunCheckpointer built with best_metric")
        if self.best_metric not in metrics:
            raise ValueError(f"metrics must contain {self.best_metric!r}, got {sorted(metrics)}")
        metrics = {k: float(v) for k, v in metrics.items()}
        return self._best.save(
            int(state.step),
            args=ocp.args.StandardSave(_state_items(state)),
            metrics=metrics,
            force=True,
        )

    @staticmethod
    def _restore(manager: ocp.CheckpointManager, step: int, state: Any) -> Any:
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_items(state))
        items = manager.restore(step, args=ocp.args.StandardRestore(target))
        return state.replace(**items)

    def restore_latest(self, state: Any) -> Any:
        """``state`` with the arrays of the latest checkpoint (``state`` itself if none).

        ``state`` is the freshly initialised state: it supplies the structure, the static fields
        (model, optimiser, loss) and the shardings of the restored arrays.
        """
        step = self.latest_step()
        return state if step is None else self._restore(self._latest, step, state)

    def restore_best(self, state: Any) -> Any:
        """``state`` with the arrays of the best checkpoint (raises if there is none)."""
        step = self.best_step()
        if step is None:
            raise FileNotFoundError("no best checkpoint in this run directory")
        return self._restore(self._best, step, state)

    def wait(self) -> None:
        """Blocks until background saves are written."""
        self._latest.wait_until_finished()
        if self._best is not None:
            self._best.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the managers."""
        self._latest.close()
        if self._best is not None:
            self._best.close()
