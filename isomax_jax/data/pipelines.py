"""Input pipelines: augmented training batches and exact, padded evaluation batches.

Training batches come from the split held in host memory (:mod:`isomax_jax.data.training`);
evaluation batches from a tf.data graph. Both yield NumPy dicts ready for
``jax.make_array_from_process_local_data`` (flat per-process batches, see
:func:`isomax_jax.parallel.shard_batch`) or, reshaped to ``[num_devices, -1, ...]``, for
``pmap``. Data location, offline behaviour and building of the OOD sets: see
:mod:`isomax_jax.data.locate`.

Example (generated data, :func:`isomax_jax.data.testing.mock_data`; with real data drop it):
  >>> from isomax_jax.data import testing
  >>> with testing.mock_data(num_examples=20):
  ...     with train_dataset("cifar10", batch_size=8, seed=0, num_devices=1) as batches:
  ...         batch = next(batches)
  >>> batch["image"].shape, batch["image"].dtype, batch["label"].dtype
  ((8, 32, 32, 3), dtype('float32'), dtype('int32'))
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from isomax_jax.data import locate
from isomax_jax.data.builders import OOD_BUILDERS
from isomax_jax.data.locate import DataDir, DataNotFoundError
from isomax_jax.data.normalization import IN_DISTRIBUTION_NAMES, normalization_stats
from isomax_jax.data.training import TrainBatches, load_split

__all__ = [
    "EVAL_NAMES",
    "TRAIN_NAMES",
    "check_available",
    "eval_dataset",
    "load_train_split",
    "num_examples",
    "steps_per_epoch",
    "train_dataset",
]

#: Training sets: user name -> tfds name.
TRAIN_SOURCES: dict[str, str] = {
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "svhn": "svhn_cropped",
}
TRAIN_NAMES: tuple[str, ...] = tuple(TRAIN_SOURCES)

#: Evaluation sets: user name -> tfds names that can provide it (first prepared one wins).
EVAL_SOURCES: dict[str, tuple[str, ...]] = {
    "cifar10": ("cifar10",),
    "cifar100": ("cifar100",),
    "svhn": ("svhn_cropped",),
    "tiny_imagenet_resize": ("isomax_tiny_imagenet_resize",),
    "tiny_imagenet_crop": ("isomax_tiny_imagenet_crop",),
    "lsun_resize": ("isomax_lsun_resize",),
    "lsun_crop": ("isomax_lsun_crop",),
    "isun": ("isomax_isun",),
    "mnist": ("mnist", "isomax_mnist"),
    "omniglot": ("isomax_omniglot",),
    "textures": ("isomax_textures",),
    "gaussian_noise": ("isomax_gaussian_noise",),
    "uniform_noise": ("isomax_uniform_noise",),
}
EVAL_NAMES: tuple[str, ...] = tuple(EVAL_SOURCES)

IMAGE_SIZE = 32
AUTOTUNE = tf.data.AUTOTUNE


def _check_name(argument: str, name, allowed) -> None:
    if name not in allowed:
        raise ValueError(
            f"{argument}={name!r} is not a known dataset; expected one of {list(allowed)}"
        )


def _process_layout(process_index, process_count) -> tuple[int, int]:
    count = jax.process_count() if process_count is None else int(process_count)
    index = jax.process_index() if process_index is None else int(process_index)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process_index={index} must be in [0, process_count={count})")
    return index, count


def _per_process_batch(batch_size: int, process_count: int, num_devices: int | None) -> int:
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int | np.integer)
        or batch_size < 1
    ):
        raise ValueError(f"batch_size={batch_size!r} must be a positive int (the global batch)")
    devices = jax.local_device_count() if num_devices is None else int(num_devices)
    if batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by the process count {process_count}"
        )
    per_process = batch_size // process_count
    if per_process % devices:
        raise ValueError(
            f"batch_size={batch_size} gives {per_process} examples per process, not divisible by "
            f"the {devices} local devices (num_devices); use a multiple of "
            f"{devices * process_count}"
        )
    return per_process


def _normalise(images: tf.Tensor, in_distribution: str) -> tf.Tensor:
    mean, std = normalization_stats(in_distribution)
    x = tf.cast(images, tf.float32) / 255.0
    return (x - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def _to_rgb32(image: tf.Tensor, name: str) -> tf.Tensor:
    """uint8 [H, W, C] -> [32, 32, 3]: grey copied to 3 channels, 28x28 (MNIST) zero-padded."""
    shape = tuple(image.shape)
    if shape[-1] == 1:
        image = tf.tile(image, [1, 1, 3])
    if shape[:2] == (28, 28):
        image = tf.pad(image, [[2, 2], [2, 2], [0, 0]])
    if tuple(image.shape) != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"dataset {name!r} has images of shape {shape}, expected (32, 32, 3)")
    return image


def train_dataset(
    name: str,
    *,
    batch_size: int,
    seed: int,
    data_dir: DataDir = None,
    split: str = "train",
    num_epochs: int | None = None,
    augment: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    num_devices: int | None = None,
    start_step: int = 0,
    num_steps: int | None = None,
    prefetch: int = 2,
    put=None,
    download: bool = False,
) -> TrainBatches:
    """Shuffled, augmented, normalised training batches of an in-distribution set.

    The split is decoded once into host memory (cached across calls) and batches are cut from it
    on a background thread (:class:`isomax_jax.data.training.TrainBatches`): epoch ``e`` is the
    permutation ``default_rng([seed, e])`` of the split, ``len(split) // batch_size`` steps; random
    crop 32 from 4-pixel zero padding + horizontal flip, seeded by ``(seed, epoch, step)``; the
    set's mean/std normalisation (docs/isomax.md, training recipe). The stream is a pure function
    of ``seed`` and the step: ``start_step=s`` resumes exactly where step ``s`` of an
    uninterrupted stream is, without replaying, and every process count sees the same global
    batches (process ``i`` keeps its contiguous rows).

    Args:
      name: ``"cifar10"``, ``"cifar100"`` or ``"svhn"`` (tfds ``svhn_cropped``).
      batch_size: GLOBAL batch size; must divide by ``process_count * num_devices``.
      seed: shuffling and augmentation seed, an int in [0, 2**63).
      data_dir: directory or directories searched for the prepared data (``locate`` module).
      split: tfds split expression, e.g. ``"train"`` or ``"train[:45000]"``.
      num_epochs: number of passes from step 0 (``None``: endless); ``num_steps`` overrides it.
      augment: apply crop + flip (``False``: only normalise).
      process_index, process_count: default ``jax.process_index()`` / ``jax.process_count()``.
      num_devices: local devices the per-process batch is split over (default
        ``jax.local_device_count()``); only checked for divisibility.
      start_step: first global step to yield (resuming a run).
      num_steps: number of steps to yield from ``start_step`` (``None``: see ``num_epochs``).
      prefetch: batches prepared ahead on a background thread (0: none).
      put: optional function applied to each batch on that thread, e.g.
        ``lambda b: isomax_jax.parallel.shard_batch(b, mesh)`` to place batches on the devices
        ahead of the step.
      download: let tfds download a missing set (connected machines only).

    Returns:
      A :class:`~isomax_jax.data.training.TrainBatches` iterator of dicts
      ``{"image": float32 [b, 32, 32, 3], "label": int32 [b]}`` with
      ``b = batch_size // process_count``; ``len()`` is defined when the stream is finite. Call
      ``close()`` (or use it as a context manager) to stop its thread early.

    Raises:
      ValueError: unknown name, batch size not divisible, bad process layout or seed.
      DataNotFoundError: the data is not available offline (the message says where it looked).
    """
    _check_name("name", name, TRAIN_NAMES)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**63:
        raise ValueError(f"seed={seed!r} must be an int in [0, 2**63)")
    index, count = _process_layout(process_index, process_count)
    _per_process_batch(batch_size, count, num_devices)
    images, labels = load_train_split(name, split=split, data_dir=data_dir, download=download)
    if num_steps is None and num_epochs is not None:
        num_steps = max(0, int(num_epochs) * (images.shape[0] // batch_size) - int(start_step))
    return TrainBatches(
        images,
        labels,
        batch_size=batch_size,
        seed=int(seed),
        name=name,
        process_index=index,
        process_count=count,
        augment=augment,
        start_step=start_step,
        num_steps=num_steps,
        prefetch=prefetch,
        put=put,
    )


def load_train_split(
    name: str, *, split: str = "train", data_dir: DataDir = None, download: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The decoded ``(images uint8 [n, 32, 32, 3], labels int32 [n])`` of a training set's split.

    Decoded once per process and cached (read-only arrays); :func:`train_dataset` and the
    experiments' detector fitting share the copy.
    """
    _check_name("name", name, TRAIN_NAMES)
    return load_split(name, TRAIN_SOURCES[name], split=split, data_dir=data_dir, download=download)


def eval_dataset(
    name: str,
    *,
    in_distribution: str,
    batch_size: int,
    data_dir: DataDir = None,
    manual_dir: str | os.PathLike | None = None,
    build_dir: str | os.PathLike | None = None,
    download: bool = False,
    split: str = "test",
    process_index: int | None = None,
    process_count: int | None = None,
    num_devices: int | None = None,
    prefetch: int = 2,
):
    """The full test split of an in-distribution set or an OOD set, exactly once, padded.

    Process ``i`` of ``P`` reads the contiguous slice ``[i*n//P, (i+1)*n//P)`` of the ``n``
    examples; every process yields ``ceil(ceil(n/P) / b)`` batches of ``b = batch_size // P``
    examples, the last ones padded with zero images (``mask`` False, ``label`` -1). Images are
    normalised with the statistics of ``in_distribution``. ``label`` is the true label when
    ``name == in_distribution`` and -1 otherwise (OOD). A missing OOD set is built first
    (from ``manual_dir``; see :mod:`isomax_jax.data.locate` for where it goes).

    Args:
      name: one of :data:`EVAL_NAMES`.
      in_distribution: the training set of the model: ``"cifar10"``, ``"cifar100"``, ``"svhn"``.
      batch_size: GLOBAL batch size; must divide by ``process_count * num_devices``.
      data_dir: directory or directories searched for prepared data.
      manual_dir: folder with the source archives of the OOD builders.
      build_dir: where missing OOD sets are built (default: first writable ``data_dir``).
      download: let tfds download a missing set (connected machines only).
      split: tfds split expression; the OOD builders only have ``"test"``.
      process_index, process_count, num_devices: as in :func:`train_dataset`.
      prefetch: batches prepared ahead.

    Returns:
      An iterable (with ``len`` = number of batches, equal on every process) of dicts
      ``{"image": float32 [b, 32, 32, 3], "label": int32 [b], "mask": bool [b]}``.

    Raises:
      ValueError: unknown name or in_distribution, batch size not divisible.
      DataNotFoundError: the data is not available offline.
    """
    _check_name("name", name, EVAL_NAMES)
    _check_name("in_distribution", in_distribution, IN_DISTRIBUTION_NAMES)
    index, count = _process_layout(process_index, process_count)
    per_process = _per_process_batch(batch_size, count, num_devices)
    builder = locate.load_builder(
        name,
        EVAL_SOURCES[name],
        data_dir=data_dir,
        manual_dir=manual_dir,
        build_dir=build_dir,
        download=download,
    )
    # No tfds auto-cache: a pass may stop early (capped evaluation), which makes TF warn.
    read_config = tfds.ReadConfig(try_autocache=False)
    # tfds's logging decorator hides as_dataset's signature (split=...) from type checkers.
    full = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config)  # pyright: ignore[reportCallIssue]
    n = int(full.cardinality())
    if n < 0:
        n = int(full.reduce(np.int64(0), lambda c, _: c + 1))
    start, stop = index * n // count, (index + 1) * n // count
    num_batches = math.ceil(math.ceil(n / count) / per_process)
    in_dist = name == in_distribution

    def example(ex):
        label = tf.cast(ex["label"], tf.int32) if in_dist else tf.constant(-1, tf.int32)
        return _to_rgb32(ex["image"], name), label, tf.constant(True)

    ds = full.skip(start).take(stop - start).map(example, num_parallel_calls=AUTOTUNE)
    padding = tf.data.Dataset.from_tensors(
        (tf.zeros([IMAGE_SIZE, IMAGE_SIZE, 3], tf.uint8), tf.constant(-1), tf.constant(False))
    ).repeat(num_batches * per_process - (stop - start))
    ds = ds.concatenate(padding).batch(per_process, drop_remainder=True)

    def finish(images, labels, mask):
        images = (
            _normalise(images, in_distribution) * tf.cast(mask, tf.float32)[:, None, None, None]
        )
        return {"image": images, "label": labels, "mask": mask}

    ds = ds.map(finish, num_parallel_calls=AUTOTUNE).prefetch(prefetch)
    return tfds.as_numpy(ds)


def num_examples(
    name: str,
    *,
    split: str | None = None,
    data_dir: DataDir = None,
    manual_dir: str | os.PathLike | None = None,
    build_dir: str | os.PathLike | None = None,
) -> int:
    """Number of examples of ``split`` (default ``"train"`` for training sets, else ``"test"``)."""
    _check_name("name", name, EVAL_NAMES)
    if split is None:
        split = "train" if name in TRAIN_NAMES else "test"
    sources = (TRAIN_SOURCES[name],) if name in TRAIN_NAMES else EVAL_SOURCES[name]
    builder = locate.load_builder(
        name, sources, data_dir=data_dir, manual_dir=manual_dir, build_dir=build_dir
    )
    return _split_size(builder, split)


def _split_size(builder, split: str) -> int:
    """Examples in ``split`` of a prepared builder, read from its metadata."""
    return int(builder.info.splits[split].num_examples)


def steps_per_epoch(
    name: str,
    *,
    batch_size: int,
    split: str = "train",
    data_dir: DataDir = None,
    process_count: int | None = None,
) -> int:
    """Steps per epoch of :func:`train_dataset`: ``num_examples(split) // batch_size`` (global).

    Read from the tfds metadata (no decoding); ``batch_size`` must divide by ``process_count``.
    """
    _check_name("name", name, TRAIN_NAMES)
    _, count = _process_layout(0, process_count)
    _per_process_batch(batch_size, count, 1)
    return num_examples(name, split=split, data_dir=data_dir) // batch_size


def check_available(
    name: str,
    *,
    split: str | None = None,
    data_dir: DataDir = None,
    manual_dir: str | os.PathLike | None = None,
    build_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> None:
    """Raises unless ``name`` can be read: prepared, buildable offline, or downloadable.

    Fast (no decoding, no building): experiments call it for every set before training. A set
    that is prepared must also have ``split`` (default ``"train"`` for training sets, else
    ``"test"``; a malformed split expression raises ``ValueError``). A set that is not prepared
    passes if ``download`` is set, or if it is one of the OOD builders and its source archive is
    in ``manual_dir`` (or it is generated) and there is a writable directory to build into.

    Raises:
      ValueError: unknown name or bad split.
      DataNotFoundError: the set cannot be had offline (the message says where it looked).
    """
    _check_name("name", name, EVAL_NAMES)
    if split is None:
        split = "train" if name in TRAIN_NAMES else "test"
    candidates = (TRAIN_SOURCES[name],) if split.startswith("train") else EVAL_SOURCES[name]
    _check_prepared_or_buildable(
        name, candidates, split, data_dir=data_dir, manual_dir=manual_dir, build_dir=build_dir,
        download=download,
    )  # fmt: skip


def _check_prepared_or_buildable(
    name: str, candidates, split: str, *, data_dir, manual_dir, build_dir, download: bool
) -> None:
    """The search of :func:`check_available` for the tfds names ``candidates`` of ``name``."""
    dirs = locate.resolve_data_dirs(data_dir)
    target = locate.build_target(dirs, build_dir)
    search = dirs + [target] if target is not None and target not in dirs else dirs
    for candidate in candidates:
        builder = locate._prepared(candidate, search)
        if builder is not None:
            try:
                builder.info.splits[split]
            except (KeyError, ValueError) as err:
                raise ValueError(f"split {split!r} of {name!r}: {err}") from err
            return
    if download:
        return
    writable = target is not None and locate._is_writable(target)
    for candidate in candidates:
        cls = OOD_BUILDERS.get(candidate)
        if cls is not None and writable and (not cls.SOURCES or cls.find_source(manual_dir)):
            return
    raise DataNotFoundError(
        f"{name!r} (tfds {' or '.join(repr(c) for c in candidates)}) is not prepared in "
        f"[{', '.join(str(d) for d in search)}] and cannot be built offline "
        f"(manual_dir={manual_dir}; build directory "
        f"{target if writable else 'none writable'}); provide it or pass download=True"
    )
