"""Checkpoints you can trust: Orbax checkpoints of a train state, fingerprinted and verified.

A run directory looks like::

    workdir/run.json                         config, seed, versions, device layout (per start)
    workdir/.lock                            held while a process works in the directory
    workdir/checkpoints/<step>/state         the TrainState arrays (Orbax ``StandardSave``)
    workdir/checkpoints/<step>/fingerprint   sha256 of every array (JSON), saved with them
    workdir/corrupted_checkpoints/<step>     checkpoints found damaged, moved aside (never deleted)

This module owns ``checkpoints/`` and ``corrupted_checkpoints/``; ``run.json`` is written by
:mod:`isomax_jax.run_metadata` and ``.lock`` held by :mod:`isomax_jax.locking`. What is
guaranteed (see ``docs/reliability.md``):

* **Fingerprints.** :meth:`RunCheckpointer.save` hashes every array (bytes, dtype and shape,
  :mod:`isomax_jax.fingerprints`) and writes the digests as a second item of the same Orbax
  step, committed atomically with the arrays. :meth:`RunCheckpointer.restore_latest` recomputes
  them on the restored arrays: a truncated or zero-length file, a deleted ``_METADATA``, a
  missing item or a few bytes overwritten inside an array file (which Orbax itself restores
  without a word) are all caught.
* **Fallback, never a silent fresh start.** A damaged checkpoint is reported with
  ``logging.warning`` (step and reason), moved to ``corrupted_checkpoints/`` so the resumed run
  can save that step again, and the newest intact one is restored. If checkpoints exist but none
  is intact, :class:`CheckpointCorruptedError` is raised.
* **One cadence.** The checkpointer alone decides which steps are saved
  (:meth:`RunCheckpointer.due`): multiples of ``save_every_steps``, a preemption (JAX's sync point
  of a multi-host run, or a :class:`~isomax_jax.distributed.PreemptionNotice`), and the final
  step; after a preemption :attr:`RunCheckpointer.preempted_step` tells the loop to stop.
* **Failed saves stop the run.** A save that fails (no space, a quota, permissions, a read-only
  or vanished run directory) raises :class:`CheckpointSaveError` naming the step, the path, the
  error and the free space, at the save or, for a background save, at the first step after it
  failed. Orbax writes a step into a temporary folder and renames it only when complete, so the
  checkpoints saved before are untouched and the partial folder is never taken for a checkpoint
  (the next start removes it); the next start restores the newest intact one.

Every process of a multi-host run calls the same :class:`RunCheckpointer` methods (Orbax
coordinates the writes); only process 0 moves damaged checkpoints.
"""

from __future__ import annotations

import datetime
import logging
import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from isomax_jax.distributed import PreemptionNotice
from isomax_jax.fingerprints import fingerprint, host_array, mismatches
from isomax_jax.run_metadata import RunDirectoryWriteError, write_failure

CHECKPOINTS = "checkpoints"
CORRUPTED = "corrupted_checkpoints"

_STATE_FIELDS = ("step", "params", "batch_stats", "opt_state", "rng")

log = logging.getLogger(__name__)


class CheckpointCorruptedError(RuntimeError):
    """Checkpoints exist in a run directory but none of them is intact."""


class CheckpointSaveError(RunDirectoryWriteError):
    """A checkpoint could not be written; the checkpoints saved before it are untouched."""


def _state_items(state: Any) -> dict[str, Any]:
    return {name: getattr(state, name) for name in _STATE_FIELDS}


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


class RunCheckpointer:
    """Orbax checkpoints of a :class:`isomax_jax.train.TrainState`, fingerprinted and verified.

    Saving every N steps and keeping the last K are Orbax's own ``CheckpointManager`` options
    (``save_decision_policy`` with ``FixedIntervalPolicy``, rather than ``save_interval_steps``,
    which adds an unrequested save at the first step of a fresh run; ``max_to_keep``). A
    training loop asks :meth:`due` after every step and calls :meth:`save` when it says so. See
    the module docstring for what :meth:`save` and :meth:`restore_latest` guarantee. Wrap the
    run in :func:`isomax_jax.locking.workdir_lock` so that no second process uses the same
    directory.

    Args:
      workdir: the run directory; checkpoints go to ``workdir/checkpoints``.
      save_every_steps: :meth:`save` writes at steps that are multiples of this (and with
        ``force=True``, e.g. at the end of training).
      keep: how many checkpoints to keep (the oldest are deleted by Orbax, only once a newer
        one is complete).
      async_save: write in a background thread (call :meth:`close` or :meth:`wait` at the end).
      preemption: the run's :class:`~isomax_jax.distributed.PreemptionNotice`, if any: a signal
        makes the next step :meth:`due` and sets :attr:`preempted_step`. Without one, only JAX's
        preemption sync of a multi-host run (Orbax's ``PreemptionCheckpointingPolicy``) counts.

    Attributes:
      preempted_step: the step at which a preemption was reached (saved by the loop when
        :meth:`due` said so), or None. The loop stops after saving it.

    Example:
      >>> import tempfile
      >>> ckpt = RunCheckpointer(tempfile.mkdtemp(), save_every_steps=10)
      >>> ckpt.latest_step() is None, ckpt.due(9), ckpt.due(10), ckpt.due(11, final=True)
      (True, False, True, True)
      >>> ckpt.close()
    """

    def __init__(
        self,
        workdir: str | pathlib.Path,
        *,
        save_every_steps: int,
        keep: int = 2,
        async_save: bool = True,
        preemption: PreemptionNotice | None = None,
    ):
        for name, value in (("save_every_steps", save_every_steps), ("keep", keep)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.workdir = pathlib.Path(workdir).absolute()
        self.directory = self.workdir / CHECKPOINTS
        self.save_every_steps = save_every_steps
        self.preempted_step: int | None = None
        self._preemption = preemption
        self._pending: int | None = None  # the step of a background save not yet waited for
        self._failed = False  # a failed save was reported (Orbax re-raises it at every wait)
        policy = checkpoint_managers.AnySavePolicy(
            [
                checkpoint_managers.FixedIntervalPolicy(save_every_steps),
                checkpoint_managers.PreemptionCheckpointingPolicy(),
            ]
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                save_decision_policy=policy,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,  # partial saves of an earlier start
                # The step's folder is made before the background writes start: if that fails
                # (a full or read-only disk) save() raises, instead of writes waiting minutes
                # for a folder that never comes (keeping the process from exiting).
                async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
            ),
        )
        self._identity = self._directory_identity()

    def latest_step(self) -> int | None:
        """Step of the newest checkpoint on disk, or ``None``.

        Its integrity is checked only by :meth:`restore_latest`, which may fall back to an older
        step: read the restored ``state.step`` for the step actually restored.
        """
        return self._manager.latest_step()

    def due(self, step: int, *, final: bool = False) -> bool:
        """Whether a state at ``step`` is to be saved now: a multiple of ``save_every_steps``, a
        preemption (then :attr:`preempted_step` is set), or the ``final`` step of the run; never
        a step that is already saved.

        Ask after every step (all processes of a multi-host run alike: the preemption check is
        a collective), then call :meth:`save` with ``force=True`` when it is due.

        Raises:
          CheckpointSaveError: a background save has failed since the last call.
        """
        step = int(step)
        if self._pending is not None and not self._manager.is_saving_in_progress():
            self.wait()  # a background save ended: raise now if it failed
        if self._preemption is not None:
            preempted = self._preemption.reached(step)
        else:
            preempted = self._manager.reached_preemption(step)
        if preempted and self.preempted_step is None:
            self.preempted_step = step
        if step in self._manager.all_steps():
            return False
        return final or preempted or self._manager.should_save(step)

    def save(self, state: Any, *, force: bool = False) -> bool:
        """Saves ``state`` at ``int(state.step)`` if it is :meth:`due` (or ``force``).

        The arrays may live on devices or be host copies (``jax.device_get(state)``: the
        fastest asynchronous save). Their fingerprint is computed here, before the (possibly
        asynchronous) write.

        Returns:
          Whether a checkpoint was started (never for a step that is already saved).

        Raises:
          CheckpointSaveError: this save, or an earlier background one, failed (see the module
            docstring); the run directory vanished or was replaced since this checkpointer was
            created (deleted, or its filesystem unmounted).
        """
        step = int(state.step)
        self.wait()  # an earlier background save: done, or its error raised
        if step in self._manager.all_steps():
            return False
        if not force and not self._manager.should_save(step):
            return False
        self._check_directory(step)
        items = _state_items(state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(items),
            fingerprint=ocp.args.JsonSave({**fingerprint(items), "step": step}),
        )
        try:
            started = self._manager.save(step, args=args, force=True)
        except Exception as e:
            self._failed = True
            raise self._save_failed(step, e) from e
        self._pending = step if started else None
        return started

    def _directory_identity(self) -> tuple[int, int] | None:
        try:
            info = os.stat(self.directory)
        except OSError:
            return None
        return info.st_dev, info.st_ino

    def _check_directory(self, step: int) -> None:
        """Refuses to save into a run directory that vanished or was replaced since the start
        (Orbax would silently create it again, e.g. on the disk under an unmounted one): the
        folder is another one (its inode), or checkpoints saved in it are gone (an inode number
        can be reused at once)."""
        if self._identity is None:
            return
        identity = self._directory_identity()
        gone = [s for s in self._manager.all_steps() if not (self.directory / str(s)).is_dir()]
        if identity != self._identity or gone:
            state = "no longer exists" if identity is None else "was replaced"
            raise CheckpointSaveError(
                write_failure(
                    f"the checkpoint of step {step}",
                    self.directory / str(step),
                    FileNotFoundError(
                        f"{self.directory} {state} since this run started (deleted, moved, or "
                        "its filesystem unmounted?); not saving there"
                    ),
                )
            )

    def _save_failed(self, step: int | None, error: BaseException) -> CheckpointSaveError:
        """The error of a failed save. Its partial folder (``<step>.orbax-checkpoint-tmp``, which
        Orbax never lists) is left to the next start to remove: background writes may still be
        running."""
        what = "a checkpoint" if step is None else f"the checkpoint of step {step}"
        kept = sorted(s for s in self._steps_on_disk() if s != step)
        return CheckpointSaveError(
            write_failure(what, self.directory / str(step or ""), error)
            + f". Checkpoints saved before it are untouched (steps {kept}): the next start "
            "restores the newest intact one. Free some space (or fix the permissions) and rerun "
            "the same command."
        )

    def _restore_verified(self, step: int, state: Any) -> Any:
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_items(state))
        step_dir = self.directory / str(step)
        if (step_dir / "default").is_dir() and not (step_dir / "state").exists():
            items = ocp.StandardCheckpointer().restore(step_dir / "default", target)
            log.warning(
                "checkpoint %s was written before checkpoints carried fingerprints: restored "
                "without verification",
                step_dir,
            )
            return state.replace(**items)
        if not (step_dir / "fingerprint").is_dir():
            raise FileNotFoundError(f"its fingerprint item {step_dir / 'fingerprint'} is missing")
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), fingerprint=ocp.args.JsonRestore()
            ),
        )
        items, saved = restored["state"], restored["fingerprint"]
        problems = mismatches(saved, fingerprint(items))
        if not problems and int(np.asarray(host_array(items["step"]))) != step:
            problems = [f"it holds step {int(np.asarray(host_array(items['step'])))}"]
        if problems:
            shown = "; ".join(problems[:5])
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ValueError(f"fingerprint mismatch: {shown}{more}")
        return state.replace(**items)

    def _steps_on_disk(self) -> list[int]:
        """Orbax's steps and any other integer-named folder (a checkpoint Orbax cannot list)."""
        steps = set(self._manager.all_steps())
        if self.directory.is_dir():
            steps |= {int(p.name) for p in self.directory.iterdir() if p.name.isdigit()}
        return sorted(steps, reverse=True)

    def _set_aside(self, steps: list[int]) -> None:
        """Moves damaged checkpoints to ``corrupted_checkpoints/`` so their steps can be saved
        again (process 0; the others wait)."""
        if jax.process_index() == 0:
            target = self.workdir / CORRUPTED
            for step in steps:
                stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
                try:
                    target.mkdir(exist_ok=True)
                    (self.directory / str(step)).rename(target / f"{step}.{stamp}")
                except OSError as e:
                    log.warning("could not move damaged checkpoint %d aside: %s", step, e)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("isomax_jax.checkpointing.set_aside")
        self._manager.reload()

    def restore_latest(self, state: Any) -> Any:
        """``state`` with the arrays of the newest intact checkpoint (``state`` itself if none).

        ``state`` supplies the structure, the static fields (model, optimiser, loss) and the
        shardings of the restored arrays; it may be abstract (``jax.ShapeDtypeStruct`` leaves with
        shardings), e.g. for an evaluation that restores without initialising. Each candidate,
        newest first, is restored and its fingerprint verified; a damaged one is reported with
        ``logging.warning`` and moved aside (see the module doc).

        Raises:
          CheckpointCorruptedError: checkpoints exist but none is intact (the run must not
            silently start again from scratch).
        """
        steps = self._steps_on_disk()
        failures: list[tuple[int, str]] = []
        for step in steps:
            try:
                restored = self._restore_verified(step, state)
            except Exception as e:  # any damage: reported, then the previous checkpoint
                failures.append((step, _reason(e)))
                log.warning(
                    "checkpoint at step %d in %s is not intact (%s); trying the one before it",
                    step, self.directory, failures[-1][1],
                )  # fmt: skip
                continue
            if failures:
                log.warning(
                    "resuming from step %d, the newest intact checkpoint in %s; damaged ones "
                    "(steps %s) are moved to %s",
                    step, self.directory, [s for s, _ in failures], self.workdir / CORRUPTED,
                )  # fmt: skip
                self._set_aside([s for s, _ in failures])
            return restored
        if failures:
            listed = "\n  ".join(f"step {s}: {r}" for s, r in failures)
            raise CheckpointCorruptedError(
                f"none of the {len(failures)} checkpoint(s) in {self.directory} is intact:\n  "
                f"{listed}\nRefusing to start from scratch over them. Restore them from a backup, "
                f"or move {self.directory} away to train again from step 0."
            )
        return state

    def wait(self) -> None:
        """Blocks until background saves are written.

        Raises:
          CheckpointSaveError: a background save failed.
        """
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            if self._failed:
                return  # reported already
            self._failed = True
            raise self._save_failed(step, e) from e

    def close(self) -> None:
        """Waits for pending saves and releases the manager.

        Raises:
          CheckpointSaveError: a background save failed that was not reported yet (the manager
            is released all the same).
        """
        try:
            self.wait()
        finally:
            try:
                self._manager.close()
            except Exception:
                if not self._failed:
                    raise
