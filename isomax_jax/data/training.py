"""Batches from an in-memory split: training (deterministic, restartable, prefetched), evaluation.

The training sets of the papers (CIFAR-10/100: 150 MB of uint8 pixels, SVHN: 220 MB) fit in host
memory, so the split is decoded once with tfds and kept as NumPy arrays; batches are then cut from
it with NumPy on a background thread. This beats a tf.data graph on a small CPU machine (no
TensorFlow thread pool competing with XLA for the cores) and makes the stream a pure function of
``(seed, step)``:

* epoch ``e`` visits the examples in the order ``numpy.random.default_rng([seed, e])
  .permutation(n)``; an epoch is ``n // batch_size`` steps (the incomplete last batch is dropped,
  so each epoch leaves out a different ``n mod batch_size`` examples);
* the random crop offsets (32 from 4-pixel zero padding) and horizontal flips of step ``s`` come
  from ``numpy.random.default_rng([seed, e, s mod steps_per_epoch])`` and are drawn for the whole
  global batch;
* process ``i`` of ``P`` keeps rows ``[i * b, (i + 1) * b)`` of every global batch
  (``b = batch_size // P``).

So resuming at step ``s`` needs no replay (``start_step=s`` gives exactly the batches an
uninterrupted stream yields from ``s`` on), and the global batch is the same for every process
count. Batches are normalised with the set's mean/std (:mod:`isomax_jax.data.normalization`).

:class:`EvalBatches` cuts the same split into evaluation batches with the same process layout:
every example once, in order, no augmentation, the last batch padded and masked as
:func:`isomax_jax.data.eval_dataset` pads (e.g. to fit detectors on the training split).
"""

from __future__ import annotations

import functools
import math
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from isomax_jax.data import locate
from isomax_jax.data.locate import DataDir
from isomax_jax.data.normalization import normalization_stats

__all__ = ["EvalBatches", "TrainBatches", "load_split"]

PAD = 4


@functools.lru_cache(maxsize=4)
def _load_split_cached(name: str, tfds_name: str, split: str, data_dirs: tuple, download: bool):
    builder = locate.load_builder(
        name, (tfds_name,), data_dir=list(data_dirs) or None, download=download
    )
    # tfds's logging decorator hides as_dataset's signature (split=...) from type checkers.
    ds = builder.as_dataset(split=split, shuffle_files=False).batch(4096)  # pyright: ignore[reportCallIssue]
    chunks = list(tfds.as_numpy(ds))
    if not chunks:
        raise ValueError(f"split {split!r} of {name!r} is empty")
    images = np.ascontiguousarray(np.concatenate([c["image"] for c in chunks]), dtype=np.uint8)
    labels = np.concatenate([c["label"] for c in chunks]).astype(np.int32)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_split(
    name: str, tfds_name: str, *, split: str, data_dir: DataDir = None, download: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Decoded ``(images uint8 [n, H, W, C], labels int32 [n])`` of a split, cached in memory.

    The arrays are read-only and shared between calls with the same arguments (the default
    experiment trains three models on one copy).
    """
    if data_dir is None:
        dirs: tuple = ()
    elif isinstance(data_dir, str | bytes) or hasattr(data_dir, "__fspath__"):
        dirs = (str(data_dir),)
    else:
        # A sequence of paths here (str and os.PathLike were handled above).
        dirs = tuple(str(d) for d in data_dir)  # pyright: ignore[reportGeneralTypeIssues]
    return _load_split_cached(name, tfds_name, split, dirs, bool(download))


def _normalisation(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, 1 / std)`` of the set ``name`` on the uint8 scale: ``(x - mean) * inv_std``."""
    mean, std = normalization_stats(name)
    return np.asarray(mean, np.float32) * 255, 1 / (np.asarray(std, np.float32) * 255)


class TrainBatches:
    """Augmented, normalised training batches of one process, from step ``start_step`` on.

    Iterate it (or call :meth:`batch` for any step); batches are prepared ``prefetch`` steps ahead
    on a background thread and, if ``put`` is given, passed through it there (e.g. a sharded
    ``jax.device_put``, so the device never waits for the host). Use it as a context manager or
    call :meth:`close` to stop the thread early.

    Args:
      images: uint8 ``[n, H, W, C]`` training images.
      labels: int ``[n]`` labels.
      batch_size: the GLOBAL batch size.
      seed: seed of the permutations and augmentations.
      name: the in-distribution set name (for its normalisation statistics).
      process_index, process_count: this process and the number of processes.
      augment: random crop (4-pixel zero padding) + horizontal flip.
      start_step: first step to yield.
      num_steps: steps to yield (``None``: endless).
      prefetch: batches prepared ahead (0: prepare on demand, no thread).
      put: optional function applied to each batch on the prefetch thread.

    Yields:
      ``{"image": float32 [b, H, W, C], "label": int32 [b]}``, ``b = batch_size // process_count``
      (or what ``put`` returns).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        batch_size: int,
        seed: int,
        name: str,
        process_index: int = 0,
        process_count: int = 1,
        augment: bool = True,
        start_step: int = 0,
        num_steps: int | None = None,
        prefetch: int = 2,
        put: Callable[[dict[str, np.ndarray]], Any] | None = None,
    ):
        n = int(images.shape[0])
        if labels.shape != (n,):
            raise ValueError(f"labels must be [{n}] to match images, got shape {labels.shape}")
        if batch_size > n:
            raise ValueError(f"batch_size={batch_size} exceeds the {n} training examples")
        if start_step < 0:
            raise ValueError(f"start_step={start_step} must be >= 0")
        self.images, self.labels = images, labels
        self.batch_size, self.seed, self.augment = int(batch_size), int(seed), bool(augment)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.per_process = self.batch_size // self.process_count
        self.steps_per_epoch = n // self.batch_size
        self._mean, self._inv_std = _normalisation(name)
        self.start_step = int(start_step)
        self.end_step = None if num_steps is None else self.start_step + int(num_steps)
        self._put = put
        self._prefetch = int(prefetch)
        self._next = self.start_step
        # Created with the prefetch thread, on the first __next__ (None until then).
        self._queue: queue.Queue = None  # pyright: ignore[reportAttributeAccessIssue]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._permutation_cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        if self.end_step is None:
            raise TypeError("an endless TrainBatches (num_steps=None) has no length")
        return self.end_step - self.start_step

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._permutation_cache is None or self._permutation_cache[0] != epoch:
            n = self.images.shape[0]
            perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._permutation_cache = (epoch, perm)
        return self._permutation_cache[1]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's batch of global step ``step`` (a pure function of seed and step)."""
        epoch, i = divmod(int(step), self.steps_per_epoch)
        first = self.process_index * self.per_process
        rows = slice(first, first + self.per_process)
        index = self._permutation(epoch)[i * self.batch_size : (i + 1) * self.batch_size][rows]
        images = self.images[index]
        if self.augment:
            rng = np.random.default_rng([self.seed, epoch, i])
            offsets = rng.integers(0, 2 * PAD + 1, size=(self.batch_size, 2))[rows]
            flips = (rng.random(self.batch_size) < 0.5)[rows]
            height, width = images.shape[1:3]
            padded = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
            out = np.empty_like(images)
            for k, ((dy, dx), flip) in enumerate(zip(offsets, flips, strict=True)):
                window = padded[k, dy : dy + height, dx : dx + width]
                out[k] = window[:, ::-1] if flip else window
            images = out
        normalised = (images.astype(np.float32) - self._mean) * self._inv_std
        return {"image": normalised, "label": np.asarray(self.labels[index], np.int32)}

    def _produce(self) -> None:
        step = self._next
        try:
            while not self._stop.is_set() and (self.end_step is None or step < self.end_step):
                item = self.batch(step)
                if self._put is not None:
                    item = self._put(item)
                while not self._stop.is_set():
                    try:
                        self._queue.put((step, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                step += 1
        except BaseException as err:  # handed to the consumer, raised there
            self._queue.put((step, err))

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        if self.end_step is not None and self._next >= self.end_step:
            self.close()
            raise StopIteration
        if self._prefetch <= 0:
            item = self.batch(self._next)
            item = item if self._put is None else self._put(item)
        else:
            if self._thread is None:
                self._queue = queue.Queue(maxsize=self._prefetch)
                self._thread = threading.Thread(
                    target=self._produce, name="isomax-train-batches", daemon=True
                )
                self._thread.start()
            step, item = self._queue.get()
            if isinstance(item, BaseException):
                self.close()
                raise item
            assert step == self._next, (step, self._next)
        self._next += 1
        return item

    def close(self) -> None:
        """Stops the prefetch thread (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> TrainBatches:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self._stop.set()


class EvalBatches:
    """Normalised evaluation batches of an in-memory split: every example once, in order.

    The layout of :class:`TrainBatches` without shuffling or augmentation: global batch ``k``
    holds examples ``[k * batch_size, (k + 1) * batch_size)`` and process ``i`` of ``P`` keeps
    its rows ``[i * b, (i + 1) * b)`` (``b = batch_size // P``). Every process yields
    ``ceil(n / batch_size)`` batches; rows past the end of the split are padding, as in
    :func:`isomax_jax.data.eval_dataset`: zero images, ``label`` -1, ``mask`` False.

    Args:
      images: uint8 ``[n, H, W, C]`` images.
      labels: int ``[n]`` labels.
      batch_size: the GLOBAL batch size; must divide by ``process_count``.
      name: the in-distribution set name (for its normalisation statistics).
      process_index, process_count: this process and the number of processes.

    Yields:
      ``{"image": float32 [b, H, W, C], "label": int32 [b], "mask": bool [b]}``.

    Example:
      >>> images = np.zeros((5, 32, 32, 3), np.uint8)
      >>> batches = EvalBatches(images, np.arange(5), batch_size=4, name="cifar10")
      >>> len(batches), [int(b["mask"].sum()) for b in batches], list(batches)[1]["label"]
      (2, [4, 1], array([ 4, -1, -1, -1], dtype=int32))
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        batch_size: int,
        name: str,
        process_index: int = 0,
        process_count: int = 1,
    ):
        n = int(images.shape[0])
        if labels.shape != (n,):
            raise ValueError(f"labels must be [{n}] to match images, got shape {labels.shape}")
        if batch_size < 1 or batch_size % process_count:
            raise ValueError(
                f"batch_size={batch_size} must be a positive multiple of the process count "
                f"{process_count}"
            )
        self.images, self.labels = images, labels
        self.batch_size = int(batch_size)
        self.per_process = self.batch_size // int(process_count)
        self.first_row = int(process_index) * self.per_process
        self._mean, self._inv_std = _normalisation(name)

    def __len__(self) -> int:
        return math.ceil(self.images.shape[0] / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        n = self.images.shape[0]
        for start in range(0, n, self.batch_size):
            index = np.arange(start + self.first_row, start + self.first_row + self.per_process)
            mask = index < n
            index = np.where(mask, index, 0)
            images = self.images[index].astype(np.float32)
            normalised = (images - self._mean) * self._inv_std * mask[:, None, None, None]
            labels = np.where(mask, self.labels[index], -1).astype(np.int32)
            yield {"image": normalised, "label": labels, "mask": mask}
