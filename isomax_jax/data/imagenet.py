"""224-px pipelines: ImageNet-1K training and evaluation, the ImageNet-scale OOD sets.

Training (:func:`imagenet_train_dataset`) and evaluation (:func:`imagenet_eval_dataset`) read
tfds's ``imagenet2012`` and the OOD sets of :data:`isomax_jax.data.builders.IMAGENET_OOD_BUILDERS`
(found or built as :mod:`isomax_jax.data.imagenet_sources` says). Images stay encoded until the
``tf.data`` map decodes and crops them (:mod:`isomax_jax.data.imagenet_preprocessing`), then are
normalised with the statistics of the model family
(:func:`isomax_jax.data.normalization.family_normalization_stats`).

Layout over processes: training process ``i`` of ``P`` reads the ``i``-th of ``P`` equal
contiguous parts of the split (``tfds.even_splits``, ``n mod P`` examples dropped), as the Flax
ImageNet example does; evaluation reads every example exactly once over all processes, the last
batches padded (``mask`` False, ``label`` -1) so that every process yields the same number of
batches, as :func:`isomax_jax.data.eval_dataset` does. Batches are NumPy dicts, or global
``jax.Array`` s on a mesh (``mesh=``, via :func:`isomax_jax.parallel.prefetch_to_mesh`).

Example (generated data, :func:`isomax_jax.data.testing.mock_data`; with real data drop it):
  >>> from isomax_jax.data import testing
  >>> with testing.mock_data(num_examples=6):
  ...     batches = imagenet_eval_dataset("ninco", batch_size=4, num_devices=1)
  ...     sizes = [(b["image"].shape, int(b["mask"].sum())) for b in batches]
  >>> sizes
  [((4, 224, 224, 3), 4), ((4, 224, 224, 3), 2)]
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from isomax_jax.data import pipelines
from isomax_jax.data.imagenet_preprocessing import (
    INTERPOLATIONS,
    preprocess_for_eval,
    preprocess_for_train,
)
from isomax_jax.data.imagenet_sources import (
    IMAGENET_EVAL_NAMES,
    _check_name,
    _default_split,
    imagenet_builder,
)
from isomax_jax.data.locate import DataDir
from isomax_jax.data.normalization import family_normalization_stats

__all__ = ["ImageNetBatches", "imagenet_eval_dataset", "imagenet_train_dataset"]

AUTOTUNE = tf.data.AUTOTUNE
Normalization = str | tuple[Sequence[float], Sequence[float]]


# -------------------------------------------------------------------------------- batches


class ImageNetBatches:
    """Batches of a ``tf.data`` pipeline as NumPy dicts, or on a mesh.

    Iterating starts a new pass. With ``mesh``, batches go through
    :func:`isomax_jax.parallel.prefetch_to_mesh` (global ``jax.Array`` s sharded on ``"data"``,
    ``device_prefetch`` batches ahead).

    Attributes:
      dataset: the ``tf.data.Dataset`` of batches.
      num_examples: examples this process reads per pass (training: per epoch).
      steps_per_epoch: training only: ``num_examples // per_process_batch``.
    """

    def __init__(
        self, dataset: tf.data.Dataset, *, length: int | None, num_examples: int, mesh=None,
        device_prefetch: int = 2, steps_per_epoch: int | None = None,
    ):  # fmt: skip
        self.dataset = dataset
        self.num_examples, self.steps_per_epoch = num_examples, steps_per_epoch
        self._length, self._mesh, self._device_prefetch = length, mesh, device_prefetch

    def __len__(self) -> int:
        if self._length is None:
            raise TypeError("an endless stream (num_steps and num_epochs None) has no length")
        return self._length

    def __iter__(self) -> Iterator[Any]:
        batches = iter(tfds.as_numpy(self.dataset))
        if self._mesh is None:
            return batches
        from isomax_jax import parallel  # imported when asked for: it builds on jit + sharding

        return parallel.prefetch_to_mesh(batches, self._mesh, size=self._device_prefetch)


def _stats(normalization: Normalization) -> tuple[tf.Tensor, tf.Tensor]:
    """``(mean, 1 / std)`` on the 0-255 scale."""
    if isinstance(normalization, str):
        mean, std = family_normalization_stats(normalization)
    else:
        mean, std = normalization
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if mean.shape != (3,) or std.shape != (3,) or (std <= 0).any():
        raise ValueError(f"normalization={normalization!r}: expected (mean[3], std[3] > 0)")
    return tf.constant(mean * 255), tf.constant(1 / (std * 255))


def _options(threads: int | None) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    if threads is not None:
        options.threading.private_threadpool_size = int(threads)
        options.threading.max_intra_op_parallelism = 1
    return options


def _layout(batch_size, process_index, process_count, num_devices, mesh) -> tuple[int, int, int]:
    index, count = pipelines._process_layout(process_index, process_count)
    if mesh is not None and num_devices is None:
        num_devices = len(mesh.local_devices)
    return index, count, pipelines._per_process_batch(batch_size, count, num_devices)


def _check_interpolation(interpolation: str) -> None:
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r}; expected one of {list(INTERPOLATIONS)}")


def _read(builder, split) -> tf.data.Dataset:
    """``(encoded image, label)`` pairs of ``split``, in the split's order, images undecoded."""
    has_label = "label" in builder.info.features.keys()
    no_label = tf.constant(-1, tf.int32)
    ds = builder.as_dataset(
        split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(try_autocache=False),
    )  # fmt: skip
    return ds.map(
        lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32) if has_label else no_label),
        num_parallel_calls=AUTOTUNE,
    )


# ------------------------------------------------------------------------------- training


def imagenet_train_dataset(
    *,
    batch_size: int,
    seed: int,
    normalization: Normalization = "torchvision",
    data_dir: DataDir = None,
    manual_dir: str | os.PathLike | None = None,
    build_dir: str | os.PathLike | None = None,
    split: str = "train",
    image_size: int = 224,
    area_range: tuple[float, float] = (0.08, 1.0),
    aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
    interpolation: str = "bilinear",
    antialias: bool = False,
    num_epochs: int | None = None,
    num_steps: int | None = None,
    start_step: int = 0,
    shuffle_buffer: int = 10_000,
    cache: bool | str = False,
    process_index: int | None = None,
    process_count: int | None = None,
    num_devices: int | None = None,
    prefetch: int = 2,
    threads: int | None = None,
    mesh=None,
    device_prefetch: int = 2,
) -> ImageNetBatches:
    """Shuffled, augmented, normalised ImageNet-1K training batches (the Flax example's input).

    Process ``i`` of ``P`` reads its ``n // P`` examples (``tfds.even_splits``); epoch ``e``
    visits them in the order of a ``shuffle_buffer`` shuffle seeded by ``(seed, i, e)``;
    example ``k`` of epoch ``e`` is cropped and flipped with the stateless seed
    ``(seed, i, e, k)`` (:func:`~isomax_jax.data.imagenet_preprocessing.preprocess_for_train`).
    The stream is a pure function of the seed and the process layout: ``start_step=s`` gives
    what an uninterrupted stream yields from step ``s`` on, reading (not decoding) the skipped
    part of the current epoch. Batches cross epoch boundaries (as ``repeat`` then ``batch``).

    Args:
      batch_size: GLOBAL batch size; must divide by ``process_count * num_devices``.
      seed: an int in [0, 2**63).
      normalization: model family (``"torchvision"``, ``"inception"``), a model name
        (``"tv_resnet50"``) or an explicit ``(mean, std)`` (RGB, [0, 1] scale).
      data_dir, manual_dir, build_dir: where the prepared set is, the ILSVRC tars, where to build
        (see :mod:`isomax_jax.data.locate`); a missing ``imagenet2012`` is prepared by tfds from
        ``manual_dir`` (hours for the real set).
      split: a tfds split expression of ``imagenet2012``.
      image_size, area_range, aspect_ratio_range, interpolation, antialias: the random-resized
        crop (:func:`~isomax_jax.data.imagenet_preprocessing.preprocess_for_train`; antialiasing
        as PIL costs about half the throughput).
      num_epochs: passes from step 0 (``None``: endless); ``num_steps`` overrides it.
      num_steps: steps to yield from ``start_step``.
      start_step: first global step to yield (resuming).
      shuffle_buffer: examples (encoded, ~110 KB each for ImageNet) in the shuffle buffer.
      cache: keep the encoded examples of this process in memory after the first epoch
        (``True``, about 140 GB / P for ImageNet) or in files with this path prefix.
      process_index, process_count: default ``jax.process_index()`` / ``jax.process_count()``.
      num_devices: local devices (default ``jax.local_device_count()``, or the mesh's).
      prefetch: batches prepared ahead by ``tf.data``.
      threads: size of ``tf.data``'s private thread pool (default: TensorFlow's).
      mesh: place batches on this mesh (:func:`isomax_jax.parallel.prefetch_to_mesh`).
      device_prefetch: batches held on the devices ahead of the step.

    Returns:
      :class:`ImageNetBatches` of ``{"image": float32 [b, image_size, image_size, 3],
      "label": int32 [b]}``, ``b = batch_size // process_count``.

    Raises:
      ValueError: bad batch size, seed, process layout, interpolation or normalisation.
      DataNotFoundError: not prepared, and no ``ILSVRC2012_img_val.tar`` in ``manual_dir``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**63:
        raise ValueError(f"seed={seed!r} must be an int in [0, 2**63)")
    if start_step < 0:
        raise ValueError(f"start_step={start_step} must be >= 0")
    _check_interpolation(interpolation)
    mean, inv_std = _stats(normalization)
    index, count, per_process = _layout(batch_size, process_index, process_count, num_devices, mesh)
    builder = imagenet_builder(
        "imagenet2012", data_dir=data_dir, manual_dir=manual_dir, build_dir=build_dir
    )
    per_epoch = pipelines._split_size(builder, split) // count
    if per_epoch < per_process:
        raise ValueError(f"{per_epoch} examples per process, fewer than the batch {per_process}")
    steps_per_epoch = per_epoch // per_process
    if num_steps is None and num_epochs is not None:
        num_steps = max(0, int(num_epochs) * steps_per_epoch - int(start_step))
    part = tfds.even_splits(split, n=count, drop_remainder=True)[index]
    source = _read(builder, part).take(per_epoch)
    if cache:
        source = source.cache("" if cache is True else os.fspath(cache))
    key = tf.constant([int(seed), index], tf.int64)
    first = int(start_step) * per_process

    # tf.random.experimental exists at runtime; TensorFlow's stubs do not declare it. The
    # stubs also type shuffle's seed as a Python int (a scalar int64 tensor works).
    def epoch(e):
        epoch_key = tf.random.experimental.stateless_fold_in(key, e)  # pyright: ignore[reportAttributeAccessIssue]
        shuffle_seed = tf.random.stateless_uniform(
            [], seed=epoch_key, minval=0, maxval=2**62, dtype=tf.int64
        )
        shuffled = source.shuffle(
            shuffle_buffer,
            seed=shuffle_seed,  # pyright: ignore[reportArgumentType]
            reshuffle_each_iteration=False,
        )
        return shuffled.enumerate().map(
            lambda k, ex: (tf.random.experimental.stateless_fold_in(epoch_key, k), *ex)  # pyright: ignore[reportAttributeAccessIssue]
        )

    def augment(example_seed, image, label):
        image = preprocess_for_train(
            image, example_seed, image_size=image_size, area_range=area_range,
            aspect_ratio_range=aspect_ratio_range, interpolation=interpolation,
            antialias=antialias,
        )  # fmt: skip
        return image, label

    ds = tf.data.Dataset.range(first // per_epoch, 2**62).flat_map(epoch).skip(first % per_epoch)
    ds = ds.map(augment, num_parallel_calls=AUTOTUNE).batch(per_process, drop_remainder=True)
    ds = ds.map(
        lambda images, labels: {"image": (images - mean) * inv_std, "label": labels},
        num_parallel_calls=AUTOTUNE,
    )
    if num_steps is not None:
        ds = ds.take(num_steps)
    ds = ds.prefetch(prefetch).with_options(_options(threads))
    return ImageNetBatches(
        ds, length=num_steps, num_examples=per_epoch, mesh=mesh, device_prefetch=device_prefetch,
        steps_per_epoch=steps_per_epoch,
    )  # fmt: skip


# ----------------------------------------------------------------------------- evaluation


def imagenet_eval_dataset(
    name: str,
    *,
    batch_size: int,
    normalization: Normalization = "torchvision",
    data_dir: DataDir = None,
    manual_dir: str | os.PathLike | None = None,
    build_dir: str | os.PathLike | None = None,
    split: str | None = None,
    classes: Sequence[int] | None = None,
    resize_size: int = 256,
    crop_size: int = 224,
    interpolation: str = "bilinear",
    cache: bool | str = False,
    process_index: int | None = None,
    process_count: int | None = None,
    num_devices: int | None = None,
    prefetch: int = 2,
    threads: int | None = None,
    mesh=None,
    device_prefetch: int = 2,
) -> ImageNetBatches:
    """A 224-px evaluation set, every example exactly once over all processes, padded.

    Images: torchvision's ``Resize(resize_size)`` (bilinear, antialiased) +
    ``CenterCrop(crop_size)``
    (:func:`~isomax_jax.data.imagenet_preprocessing.preprocess_for_eval`), normalised with the
    model family's statistics. Process ``i`` of ``P`` reads a contiguous part of the (selected)
    examples; every process yields ``ceil(ceil(n / P) / b)`` batches of ``b = batch_size // P``,
    the last ones padded with zero images (``mask`` False, ``label`` -1).

    Args:
      name: one of :data:`IMAGENET_EVAL_NAMES`. ``imagenet2012`` is the in-distribution set
        (true labels, ImageNet class indices 0-999); every other set is OOD (``label`` -1).
      batch_size: GLOBAL batch size; must divide by ``process_count * num_devices``.
      normalization: as in :func:`imagenet_train_dataset`.
      data_dir, manual_dir, build_dir: where prepared sets are, the user's files (ILSVRC tars,
        OOD folders), where to build a missing set (see :mod:`isomax_jax.data.locate`).
      split: default ``"validation"`` for ``imagenet2012``, ``"test"`` for the OOD sets.
      classes: ``imagenet2012`` only: keep the examples whose label is one of these class
        indices (ImageNet-O's protocol: :attr:`ImageNetOProtocol.in_distribution_classes`);
        labels stay 1000-way indices. Costs one extra pass over the split's labels.
      resize_size, crop_size, interpolation: the evaluation transform of the model's weights
        (torchvision ``IMAGENET1K_V1``: 256, 224, bilinear).
      cache: keep this process's cropped uint8 images in memory (``True``; 150 KB each) or in
        files with this path prefix, for repeated passes.
      process_index, process_count, num_devices, prefetch, threads, mesh, device_prefetch: as
        in :func:`imagenet_train_dataset`.

    Returns:
      :class:`ImageNetBatches` (with ``len``) of ``{"image": float32 [b, crop_size, crop_size,
      3], "label": int32 [b], "mask": bool [b]}``.

    Raises:
      ValueError: unknown name, ``classes`` for an OOD set, bad sizes or batch size.
      DataNotFoundError: not prepared and not buildable from ``manual_dir``.
      ImageError: building an OOD set met a file that is not a decodable image (named).
    """
    _check_name("name", name, IMAGENET_EVAL_NAMES)
    _check_interpolation(interpolation)
    if not 0 < crop_size <= resize_size:
        raise ValueError(f"crop_size={crop_size} must be in (0, resize_size={resize_size}]")
    if classes is not None and name != "imagenet2012":
        raise ValueError(f"classes= selects imagenet2012 classes; {name!r} is an OOD set")
    mean, inv_std = _stats(normalization)
    index, count, per_process = _layout(batch_size, process_index, process_count, num_devices, mesh)
    builder = imagenet_builder(name, data_dir=data_dir, manual_dir=manual_dir, build_dir=build_dir)
    split = _default_split(name, split)
    in_distribution = name == "imagenet2012"
    if classes is None:
        n = pipelines._split_size(builder, split)
        mine = n // count + (index < n % count)  # tfds.even_splits gives the first ones more
        part = tfds.even_splits(split, n=count)[index] if mine else split  # (none: take(0))
        ds = _read(builder, part).take(mine)
    else:
        wanted = tf.constant(np.unique(np.asarray(classes, np.int32)))
        keep = lambda image, label: tf.reduce_any(tf.equal(label, wanted))  # noqa: E731
        # filter() unpacks (image, label); TensorFlow's stubs type a one-argument predicate.
        kept = _read(builder, split).filter(keep)  # pyright: ignore[reportArgumentType]
        n = int(kept.reduce(np.int64(0), lambda c, _: c + 1))
        start, stop = index * n // count, (index + 1) * n // count
        mine = stop - start
        ds = _read(builder, split).filter(keep).skip(start).take(mine)  # pyright: ignore[reportArgumentType]
    num_batches = math.ceil(math.ceil(n / count) / per_process)

    def crop(image, label):
        image = preprocess_for_eval(
            image, resize_size=resize_size, crop_size=crop_size, interpolation=interpolation
        )
        return image, label if in_distribution else tf.constant(-1, tf.int32), tf.constant(True)

    ds = ds.map(crop, num_parallel_calls=AUTOTUNE)
    if cache:
        ds = ds.cache("" if cache is True else os.fspath(cache))
    padding = tf.data.Dataset.from_tensors(
        (tf.zeros([crop_size, crop_size, 3], tf.uint8), tf.constant(-1), tf.constant(False))
    ).repeat(num_batches * per_process - mine)
    ds = ds.concatenate(padding).batch(per_process, drop_remainder=True)

    def finish(images, labels, mask):
        images = (tf.cast(images, tf.float32) - mean) * inv_std
        return {"image": images * tf.cast(mask, tf.float32)[:, None, None, None],
                "label": labels, "mask": mask}  # fmt: skip

    ds = ds.map(finish, num_parallel_calls=AUTOTUNE).prefetch(prefetch)
    return ImageNetBatches(
        ds.with_options(_options(threads)), length=num_batches, num_examples=mine, mesh=mesh,
        device_prefetch=device_prefetch,
    )  # fmt: skip
