"""Streamed fitting: a detector's statistics accumulated from batches of any size.

:meth:`isomax_jax.detectors.Detector.fit_from` consumes an iterable of batches once (a
generator, a ``tfds.as_numpy`` dataset, a list): dicts holding the per-example fit inputs
(``features [n, D]``, ``labels [n]``, ``logits [n, C]``) in chunks of any size. Each detector
with something to fit has an :class:`Accumulator`:

* **one pass, O(state) memory**: Mahalanobis and RMD (float64 class moments);
* **two passes, O(state) memory**: ViM (the null space first, then ``alpha``) and ReAct (the
  exact percentile by a two-pass radix selection). A list or tuple of batches is read twice; any
  other iterable is read once and its fit inputs are spooled to a temporary directory (``TMPDIR``:
  ``N x D`` values on disk, one batch in memory) for the second pass;
* **the data itself**: KNN, whose state is the training bank.

The evaluator (:mod:`isomax_jax.evaluation`) drives the accumulators of several detectors with
one pass over the model's outputs (:func:`drive`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from isomax_jax import validation

#: The per-example inputs a batch may hold, and their ranks.
BATCH_INPUTS = {"features": 2, "logits": 2, "labels": 1}


class Accumulator:
    """Statistics of one detector's fit, updated batch by batch.

    Subclasses set :attr:`passes` and :attr:`inputs` and implement :meth:`update` and
    :meth:`finalize`. ``update(batch, pass_index)`` receives checked NumPy arrays.
    """

    passes: int = 1
    inputs: frozenset[str] = frozenset()

    def update(self, batch: Mapping[str, np.ndarray], pass_index: int) -> None:
        raise NotImplementedError  # pragma: no cover

    def finalize(self) -> dict[str, Any]:
        raise NotImplementedError  # pragma: no cover


class LabelledAccumulator(Accumulator):
    """Base of the accumulators of ``(features, labels)`` batches: the state's dtype from the
    first batch, and the labels below ``num_classes`` when it is fixed (``drive`` has checked
    the widths and that the labels are ``>= 0``)."""

    inputs = frozenset({"features", "labels"})

    def __init__(self, detector, num_classes: int | None):
        self.detector, self.num_classes, self.dtype = detector, num_classes, None

    def labelled(self, batch: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``(features, labels)`` of a batch, checked."""
        x, y = batch["features"], batch["labels"]
        if self.dtype is None:
            self.dtype = state_dtype(x.dtype)
        if self.num_classes is not None:
            validation.validate_labels(y, self.num_classes)
        return x, y


class Collect(Accumulator):
    """Keeps every batch's inputs and fits on their concatenation (O(N) memory: for the detectors
    whose state is the data, e.g. KNN's bank)."""

    def __init__(self, detector, inputs: frozenset[str], head: Mapping[str, Any]):
        self.detector, self.inputs, self.head = detector, inputs, dict(head)
        self.parts: dict[str, list[np.ndarray]] = {k: [] for k in inputs}

    def update(self, batch, pass_index):
        for key in self.inputs:
            self.parts[key].append(batch[key])

    def finalize(self):
        if not any(self.parts.values()):
            raise ValueError(f"`{self.detector.name}.fit_from` got no batches to fit on.")
        arrays = {k: np.concatenate(v) for k, v in self.parts.items()}
        return self.detector.fit(**arrays, **self.head)


def check_batch(
    batch: Any, needed: frozenset[str], name: str, widths: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
    """The needed inputs of one batch as NumPy arrays, checked: rank, rows, dtype, finiteness,
    labels ``>= 0``, and (with ``widths``, filled by the first batch) the same number of columns
    as the batches before."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"`{name}.fit_from` needs batches that are dicts of "
            f"{', '.join(sorted(needed))}; got a {type(batch).__name__}."
        )
    missing = sorted(k for k in needed if batch.get(k) is None)
    if missing:
        raise ValueError(
            f"`{name}.fit_from` needs `{missing[0]}` in every batch (it uses "
            f"{', '.join(sorted(needed))}); a batch has keys {sorted(batch)}."
        )
    out = {}
    for key in sorted(needed):
        array = np.asarray(validation.as_array(key, batch[key]))
        rank = BATCH_INPUTS[key]
        if array.ndim != rank:
            shape = "[batch, features]" if rank == 2 else "[batch]"
            raise ValueError(
                f"`{key}` of a batch must have rank {rank} ({shape}); got shape {array.shape}."
            )
        if key == "labels":
            validation.check_integer("labels", array)
            if array.size and array.min() < 0:
                raise ValueError(f"`labels` must be >= 0; got {int(array.min())}.")
        else:
            validation.check_floating(key, array)
            if not np.isfinite(array).all():  # on the host: no copy to a device
                validation.check_finite(key, array)
        if widths is not None and rank == 2:
            width = widths.setdefault(key, array.shape[1])
            if array.shape[1] != width:
                raise ValueError(
                    f"`{key}` of a batch has {array.shape[1]} columns; the batches before had "
                    f"{width}."
                )
        out[key] = array
    rows = {k: v.shape[0] for k, v in out.items()}
    if len(set(rows.values())) > 1:
        raise ValueError(f"the inputs of a batch must have the same number of rows; got {rows}.")
    return out


class _Spool:
    """A one-shot stream's batches written to a temporary directory, read back in order."""

    def __init__(self):
        self._dir = tempfile.TemporaryDirectory(prefix="isomax_fit_")
        self.count = 0

    def write(self, batch: Mapping[str, np.ndarray]) -> None:
        path = os.path.join(self._dir.name, f"{self.count:08d}.npz")
        np.savez(path, **batch)  # pyright: ignore[reportArgumentType]  # numpy's stub matches **arrays to allow_pickle
        self.count += 1

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(self.count):
            with np.load(os.path.join(self._dir.name, f"{i:08d}.npz")) as data:
                yield {k: data[k] for k in data.files}

    def close(self) -> None:
        self._dir.cleanup()


def drive(
    accumulators: Sequence[Accumulator], batches: Iterable[Any], name: str = "detector"
) -> None:
    """Feeds ``batches`` to every accumulator: pass 0 while reading them once, then the further
    passes of those that need them (from the batches again if they are a list or tuple, else
    from a disk spool written during pass 0). Batches are checked for the union of the inputs.

    Raises:
      ValueError: no batch, or a batch without a needed input or with malformed/NaN values.
      TypeError: a batch that is not a dict.
    """
    needed = frozenset().union(*(a.inputs for a in accumulators))
    later = [a for a in accumulators if a.passes > 1]
    replayable = isinstance(batches, Sequence)
    spool = _Spool() if later and not replayable else None
    spooled = frozenset().union(*(a.inputs for a in later)) if later else frozenset()
    widths: dict[str, int] = {}
    try:
        seen = 0
        for batch in batches:
            checked = check_batch(batch, needed, name, widths)
            for accumulator in accumulators:
                accumulator.update(checked, 0)
            if spool is not None:
                spool.write({k: checked[k] for k in spooled})
            seen += 1
        if not seen:
            raise ValueError(f"`{name}.fit_from` got no batches to fit on.")
        for pass_index in range(1, max((a.passes for a in accumulators), default=1)):
            active = [a for a in later if a.passes > pass_index]
            again = (check_batch(b, spooled, name) for b in batches) if replayable else spool
            # A spool exists whenever the batches cannot be replayed.
            for batch in again:  # pyright: ignore[reportOptionalIterable]
                for accumulator in active:
                    accumulator.update(batch, pass_index)
    finally:
        if spool is not None:
            spool.close()


def rebatch(batches: Iterable[Mapping[str, np.ndarray]], rows: int):
    """The same rows in batches of exactly ``rows`` (the last one shorter), concatenating across
    the incoming batches: accumulators then sum in the same order whatever the batch size.

    Example:
      >>> sizes = [3, 5, 1, 4]
      >>> parts = ({"x": np.arange(n)} for n in sizes)
      >>> [len(b["x"]) for b in rebatch(parts, 4)]
      [4, 4, 4, 1]
    """
    pending: list[Mapping[str, np.ndarray]] = []
    count = 0
    for batch in batches:
        pending.append(batch)
        count += len(next(iter(batch.values())))
        while count >= rows:
            joined = {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}
            yield {k: v[:rows] for k, v in joined.items()}
            rest = {k: v[rows:] for k, v in joined.items()}
            count -= rows
            pending = [rest] if count else []
    if count:
        yield {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}


def row_chunks(arrays: Mapping[str, Any], chunk: int) -> list[dict[str, Any]]:
    """``arrays`` (same leading size) cut into a list of batches of ``chunk`` rows (views)."""
    arrays = {k: v for k, v in arrays.items() if v is not None}
    n = next(iter(arrays.values())).shape[0]
    starts = range(0, n, chunk)
    return [{k: v[start : start + chunk] for k, v in arrays.items()} for start in starts]


def state_dtype(dtype) -> np.dtype:
    """The dtype a state is stored in for features of ``dtype``: float32 or wider, float64 only
    with ``jax_enable_x64`` (as :meth:`Detector.fit` casts)."""
    return np.dtype(jax.dtypes.canonicalize_dtype(validation.compute_dtype(dtype)))


__all__ = [
    "BATCH_INPUTS",
    "Accumulator",
    "Collect",
    "LabelledAccumulator",
    "check_batch",
    "drive",
    "rebatch",
    "row_chunks",
    "state_dtype",
]
