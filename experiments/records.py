"""The records that travel between the experiment's stages, and the one place runs are named.

`train_eval` produces a :class:`TrainedRun` per (loss, seed); `evaluate` turns each into a
:class:`RunResult`; `report` writes them. Nothing here trains, evaluates or writes.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def run_name(loss: str, seed: int) -> str:
    """Directory and key of one trained model: ``<loss>_seed<seed>`` (e.g. ``isomax_seed0``)."""
    return f"{loss}_seed{seed}"


@dataclasses.dataclass
class TrainedRun:
    """A trained (or restored) model, ready to evaluate.

    Attributes:
      loss: the head/loss name (a key of :data:`isomax_jax.registry.HEADS`).
      seed: its seed.
      run: index of the seed among the experiment's runs (0 .. runs - 1).
      state: the :class:`isomax_jax.train.TrainState`, replicated on the data mesh.
      model: the Flax model (``state.apply_fn`` is its ``apply``).
      train: the training summary (`train_info.json`: steps, epochs, times, final loss...).
    """

    loss: str
    seed: int
    run: int
    state: Any
    model: Any
    train: dict[str, Any]

    @property
    def name(self) -> str:
        return run_name(self.loss, self.seed)


@dataclasses.dataclass
class RunResult:
    """Evaluation of one :class:`TrainedRun` (metric values are fractions in [0, 1]).

    Attributes:
      loss, seed, run, train: as in :class:`TrainedRun`.
      accuracy: in-distribution test accuracy.
      num_test_examples: size of the in-distribution test set evaluated.
      num_ood_examples: ``{ood_set: size}``.
      ood: ``{ood_set: {detector: {convention: {metric: value}}}}``.
      detectors: the detectors applied to this run (registry names, in report order).
    """

    loss: str
    seed: int
    run: int
    train: dict[str, Any]
    accuracy: float
    num_test_examples: int
    num_ood_examples: dict[str, int]
    ood: dict[str, dict[str, dict[str, dict[str, float]]]]
    detectors: list[str]

    @property
    def name(self) -> str:
        return run_name(self.loss, self.seed)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
