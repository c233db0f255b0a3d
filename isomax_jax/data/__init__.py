"""Input pipelines and OOD benchmark sets (the only part of isomax_jax that imports TensorFlow).

Importing this package hides GPUs from TensorFlow (it never takes accelerator memory) and
registers the OOD builders with tfds (``isomax_tiny_imagenet_resize``, ..., and the ImageNet-scale
``isomax_ssb_hard``, ... see :mod:`isomax_jax.data.builders`).

Public API:

* :func:`train_dataset` ``(name, *, batch_size, seed, data_dir=None, split="train",
  num_epochs=None, augment=True, process_index=None, process_count=None, num_devices=None,
  start_step=0, num_steps=None, prefetch=2, put=None, ...)`` -> :class:`TrainBatches`, an
  iterator of ``{"image": float32 [b, 32, 32, 3], "label": int32 [b]}`` from the split held in
  memory; ``batch_size`` is global, ``b = batch_size // process_count``; crop 32 / pad 4 + flip,
  normalised; a pure function of ``(seed, step)``, so ``start_step`` resumes without replaying.
* :func:`eval_dataset` ``(name, *, in_distribution, batch_size, data_dir=None, manual_dir=None,
  build_dir=None, download=False, process_index=None, process_count=None, ...)`` -> iterable (with
  ``len``) of ``{"image", "label", "mask"}``; the split exactly once over all processes, last
  batches padded (mask False, label -1), equal batch count on every process; label -1 for OOD.
  Names: :data:`EVAL_NAMES` = cifar10, cifar100, svhn, tiny_imagenet_resize, tiny_imagenet_crop,
  lsun_resize, lsun_crop, isun, mnist, omniglot, textures, gaussian_noise, uniform_noise.
* :class:`EvalBatches` ``(images, labels, *, batch_size, name, process_index=0,
  process_count=1)``: an in-memory split (e.g. from :func:`load_train_split`) as evaluation
  batches ``{"image", "label", "mask"}``, every example once, padded like :func:`eval_dataset`.
* 224-px (ImageNet-scale, :mod:`isomax_jax.data.imagenet`): :func:`imagenet_train_dataset`
  ``(*, batch_size, seed, normalization="torchvision", data_dir=None, manual_dir=None, ...)``
  -> batches ``{"image": float32 [b, 224, 224, 3], "label": int32 [b]}`` of tfds
  ``imagenet2012`` (random-resized crop + flip, the Flax example's); :func:`imagenet_eval_dataset`
  ``(name, *, batch_size, classes=None, resize_size=256, crop_size=224, ...)`` -> padded masked
  batches of :data:`IMAGENET_EVAL_NAMES` (imagenet2012 and the OpenOOD v1.5 / ImageNet-O sets,
  torchvision's Resize + CenterCrop); :func:`imagenet_o_protocol`, :class:`ImageNetOProtocol`;
  :func:`family_normalization_stats` (statistics per model family: ``tv_*`` -> torchvision).
* :func:`check_available` (fast: prepared, buildable offline or downloadable?),
  :func:`num_examples`, :func:`steps_per_epoch`; :data:`NORMALIZATION`,
  :func:`normalization_stats` (in-distribution mean/std, also used for every OOD set).
* :class:`DataNotFoundError` (a ``FileNotFoundError``), :class:`ArchiveError` and
  :class:`ImageError` (``ValueError`` s) for missing data, damaged archives and bad images.

Data location (:mod:`isomax_jax.data.locate`): ``data_dir`` may be one directory or a list,
searched in order (e.g. ``[writable_dir, read_only_shared_dir]``); default ``$TFDS_DATA_DIR``, else
``~/tensorflow_datasets``. Missing OOD sets are built from the archives in ``manual_dir`` into
``build_dir`` or the first writable ``data_dir``. Nothing is downloaded unless ``download=True``;
missing data fails at once with a message naming the dataset, the directories searched and the
files to provide.

Example:
  >>> from isomax_jax import data
  >>> data.normalization_stats("svhn")
  ((0.437, 0.443, 0.472), (0.198, 0.201, 0.197))
  >>> "lsun_resize" in data.EVAL_NAMES
  True
"""

import tensorflow as tf

try:  # TensorFlow must never take accelerator memory; JAX owns the devices.
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices (tensorflow-cpu has none anyway)
    pass

from isomax_jax.data.archives import ArchiveError  # noqa: E402
from isomax_jax.data.builders import (  # noqa: E402
    IMAGENET_OOD_BUILDERS,
    OOD_BUILDERS,
    ImageError,
)
from isomax_jax.data.imagenet import (  # noqa: E402
    ImageNetBatches,
    imagenet_eval_dataset,
    imagenet_train_dataset,
)
from isomax_jax.data.imagenet_sources import (  # noqa: E402
    IMAGENET_EVAL_NAMES,
    OPENOOD_FAR_OOD,
    OPENOOD_NEAR_OOD,
    ImageNetOProtocol,
    check_imagenet_available,
    imagenet_class_indices,
    imagenet_num_examples,
    imagenet_o_protocol,
)
from isomax_jax.data.locate import DataNotFoundError, resolve_data_dirs  # noqa: E402
from isomax_jax.data.normalization import (  # noqa: E402
    FAMILY_NORMALIZATION,
    IMAGENET_MEAN_STD,
    IN_DISTRIBUTION_NAMES,
    NORMALIZATION,
    family_normalization_stats,
    normalization_stats,
)
from isomax_jax.data.pipelines import (  # noqa: E402
    EVAL_NAMES,
    TRAIN_NAMES,
    check_available,
    eval_dataset,
    load_train_split,
    num_examples,
    steps_per_epoch,
    train_dataset,
)
from isomax_jax.data.training import EvalBatches, TrainBatches  # noqa: E402

__all__ = [
    "EVAL_NAMES",
    "FAMILY_NORMALIZATION",
    "IMAGENET_EVAL_NAMES",
    "IMAGENET_MEAN_STD",
    "IMAGENET_OOD_BUILDERS",
    "IN_DISTRIBUTION_NAMES",
    "NORMALIZATION",
    "OOD_BUILDERS",
    "OPENOOD_FAR_OOD",
    "OPENOOD_NEAR_OOD",
    "TRAIN_NAMES",
    "ArchiveError",
    "DataNotFoundError",
    "EvalBatches",
    "ImageError",
    "ImageNetBatches",
    "ImageNetOProtocol",
    "TrainBatches",
    "check_available",
    "check_imagenet_available",
    "eval_dataset",
    "family_normalization_stats",
    "imagenet_class_indices",
    "imagenet_eval_dataset",
    "imagenet_num_examples",
    "imagenet_o_protocol",
    "imagenet_train_dataset",
    "load_train_split",
    "normalization_stats",
    "num_examples",
    "resolve_data_dirs",
    "steps_per_epoch",
    "train_dataset",
]
