"""tf.data input pipelines: augmented training batches and exact, padded evaluation batches.

Both yield NumPy dicts ready for ``jax.make_array_from_process_local_data`` (flat per-process
batches) or, reshaped to ``[num_devices, -1, ...]``, for ``pmap``. Data location, offline
behaviour and building of the OOD sets: see :mod:`isomax_jax.data.locate`.

Example (generated data; with real data drop the ``mock_data`` context):
  >>> import tensorflow_datasets as tfds
  >>> with tfds.testing.mock_data(num_examples=20):
  ...     batch = next(iter(train_dataset("cifar10", batch_size=8, seed=0, num_devices=1)))
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

from isomax_jax.data.locate import DataDir, load_builder
from isomax_jax.data.normalization import IN_DISTRIBUTION_NAMES, normalization_stats

__all__ = [
    "EVAL_NAMES",
    "TRAIN_NAMES",
    "eval_dataset",
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

PAD = 4
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


def _per_process_batch(batch_size, process_count: int, num_devices) -> int:
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


def _random_crop_flip(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Batched random crop 32 from 4-pixel zero padding, then random horizontal flip."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    b = tf.shape(images)[0]
    padded = tf.pad(images, [[0, 0], [PAD, PAD], [PAD, PAD], [0, 0]])
    offsets = tf.random.stateless_uniform(
        [b, 2], seed=crop_seed, minval=0, maxval=2 * PAD + 1, dtype=tf.int32
    )
    grid = tf.range(IMAGE_SIZE)[None, :]
    rows, cols = offsets[:, :1] + grid, offsets[:, 1:] + grid
    out = tf.gather(padded, rows, axis=1, batch_dims=1)
    out = tf.gather(out, cols, axis=2, batch_dims=1)
    flip = tf.random.stateless_uniform([b], seed=flip_seed) < 0.5
    return tf.where(flip[:, None, None, None], tf.reverse(out, axis=[2]), out)


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
    shuffle_buffer_size: int | None = None,
    cache: bool = True,
    prefetch: int = 2,
    download: bool = False,
):
    """Shuffled, augmented, normalised training batches of an in-distribution set.

    Each process reads only its share ``tfds.split_for_jax_process(split, drop_remainder=True)``
    (equal shares, so every process yields the same number of batches), caches the decoded images,
    shuffles with ``seed`` (reshuffled each epoch), repeats ``num_epochs`` times (``None``:
    forever), batches ``batch_size // process_count`` examples (incomplete last batch dropped),
    applies random crop 32 from 4-pixel zero padding + horizontal flip (stateless, seeded by
    ``(seed, process_index, step)``) and normalises with the set's mean/std (REFERENCE §4).
    The stream is a deterministic function of ``seed`` and the process layout.

    Args:
      name: ``"cifar10"``, ``"cifar100"`` or ``"svhn"`` (tfds ``svhn_cropped``).
      batch_size: GLOBAL batch size; must divide by ``process_count * num_devices``.
      seed: shuffling and augmentation seed.
      data_dir: directory or directories searched for the prepared data (``locate`` module).
      split: tfds split expression, e.g. ``"train"`` or ``"train[:45000]"``.
      num_epochs: number of passes, ``None`` for an infinite stream.
      augment: apply crop + flip (``False``: only normalise).
      process_index, process_count: default ``jax.process_index()`` / ``jax.process_count()``.
      num_devices: local devices the per-process batch is split over (default
        ``jax.local_device_count()``); only checked for divisibility.
      shuffle_buffer_size: default the whole per-process share (a full shuffle).
      cache: keep the decoded share in memory (about 150 MB for CIFAR-10).
      prefetch: batches prepared ahead.
      download: let tfds download a missing set (connected machines only).

    Returns:
      An iterable of dicts ``{"image": float32 [b, 32, 32, 3], "label": int32 [b]}`` with
      ``b = batch_size // process_count``.

    Raises:
      ValueError: unknown name, batch size not divisible, bad process layout.
      DataNotFoundError: the data is not available offline (the message says where it looked).
    """
    _check_name("name", name, TRAIN_NAMES)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**63:
        raise ValueError(f"seed={seed!r} must be an int in [0, 2**63)")
    index, count = _process_layout(process_index, process_count)
    per_process = _per_process_batch(batch_size, count, num_devices)
    builder = load_builder(name, (TRAIN_SOURCES[name],), data_dir=data_dir, download=download)
    shard = tfds.split_for_jax_process(
        split, process_index=index, process_count=count, drop_remainder=True
    )
    ds = builder.as_dataset(split=shard, shuffle_files=False)
    ds = ds.map(
        lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32)), num_parallel_calls=AUTOTUNE
    )
    if cache:
        ds = ds.cache()
    size = int(ds.cardinality())
    buffer = shuffle_buffer_size or (size if size > 0 else 10_000)
    ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.repeat(num_epochs)
    ds = ds.batch(per_process, drop_remainder=True)
    base = tf.constant([seed, index << 32], tf.int64)

    def transform(step, images, labels):
        if augment:
            images = _random_crop_flip(images, base + tf.stack([tf.constant(0, tf.int64), step]))
        return {"image": _normalise(images, name), "label": labels}

    ds = ds.enumerate().map(lambda step, b: transform(step, *b), num_parallel_calls=AUTOTUNE)
    return tfds.as_numpy(ds.prefetch(prefetch))


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
    builder = load_builder(
        name,
        EVAL_SOURCES[name],
        data_dir=data_dir,
        manual_dir=manual_dir,
        build_dir=build_dir,
        download=download,
    )
    full = builder.as_dataset(split=split, shuffle_files=False)
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
    builder = load_builder(
        name, sources, data_dir=data_dir, manual_dir=manual_dir, build_dir=build_dir
    )
    return int(builder.info.splits[split].num_examples)


def steps_per_epoch(
    name: str,
    *,
    batch_size: int,
    split: str = "train",
    data_dir: DataDir = None,
    process_count: int | None = None,
) -> int:
    """Batches per epoch of :func:`train_dataset` (equal on every process)."""
    _check_name("name", name, TRAIN_NAMES)
    _, count = _process_layout(0, process_count)
    per_process = _per_process_batch(batch_size, count, 1)
    n = num_examples(name, split=split, data_dir=data_dir)
    return (n // count) // per_process
