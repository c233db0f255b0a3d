"""Data for the examples: CIFAR-10 (in-distribution) and MNIST (OOD) as NumPy arrays.

With the tfds data prepared in ``data_dir`` (or ``$TFDS_DATA_DIR``) and the ``data`` extra
installed (``pip install "isomax_jax[data]"``: TensorFlow reads the tfrecords), the arrays are
real images, read with :mod:`isomax_jax.data` and normalised with CIFAR-10's statistics (OOD
sets too, as the papers do). Otherwise a small generated stand-in of the same shapes (10 classes
of noisy 32x32 patterns, and 10 other patterns as the OOD set) keeps every example runnable.

Copy this file next to an example, or replace :func:`load` by your own input pipeline: the
training loops only need ``[n, 32, 32, 3]`` float32 images and ``[n]`` int32 labels.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

import numpy as np


class Data(NamedTuple):
    """In-distribution train/validation/test arrays and one OOD set, images normalised."""

    train_images: np.ndarray  # float32 [n_train, 32, 32, 3]
    train_labels: np.ndarray  # int32 [n_train]
    val_images: np.ndarray  # held out from the training examples: for thresholds
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    ood_images: np.ndarray  # float32 [n_ood, 32, 32, 3], no labels
    in_name: str  # "cifar10", or "generated" for the stand-in
    ood_name: str  # "mnist", or "generated_ood"


def load(
    data_dir: str | None = None,
    *,
    num_train: int,
    num_val: int = 1000,
    num_test: int,
    num_ood: int,
    seed: int = 0,
) -> Data:
    """The first ``num_*`` examples of each split: real data when it can be read, else generated.

    ``data_dir``: a tfds data directory holding ``cifar10`` and ``mnist`` (default
    ``$TFDS_DATA_DIR``). Validation examples are the ``num_val`` training examples after the
    first ``num_train`` (never trained on).
    """
    start = time.perf_counter()
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR")
    try:
        data = _tfds(data_dir, num_train, num_val, num_test, num_ood)
    except (ImportError, FileNotFoundError) as err:  # no TensorFlow, or the data is not there
        print(f"CIFAR-10/MNIST not readable ({type(err).__name__}: {str(err)[:120]}...)")
        data = _generated(num_train, num_val, num_test, num_ood, seed)
    print(
        f"data: {data.in_name} train {len(data.train_labels)}, val {len(data.val_labels)}, "
        f"test {len(data.test_labels)}; OOD {data.ood_name} {len(data.ood_images)} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return data


def _tfds(data_dir, num_train, num_val, num_test, num_ood) -> Data:
    if data_dir is None:
        raise FileNotFoundError("no data_dir and no $TFDS_DATA_DIR")
    from isomax_jax import data  # imports TensorFlow (the `data` extra)

    mean, std = (np.asarray(v, np.float32) for v in data.normalization_stats("cifar10"))

    def normalise(images: np.ndarray) -> np.ndarray:
        return (images.astype(np.float32) / 255.0 - mean) / std

    images, labels = data.load_train_split("cifar10", data_dir=data_dir)
    test_images, test_labels = data.load_train_split("cifar10", split="test", data_dir=data_dir)
    train = slice(0, num_train)
    val = slice(num_train, num_train + num_val)
    # OOD: MNIST test digits as 32x32 RGB, normalised with CIFAR-10's statistics (the pipeline
    # does both); batches padded at the end carry mask False.
    ood = []
    for batch in data.eval_dataset("mnist", in_distribution="cifar10", batch_size=500,
                                   data_dir=data_dir):  # fmt: skip
        ood.append(batch["image"][batch["mask"]])
        if sum(len(x) for x in ood) >= num_ood:
            break
    return Data(
        normalise(images[train]), labels[train].astype(np.int32),
        normalise(images[val]), labels[val].astype(np.int32),
        normalise(test_images[:num_test]), test_labels[:num_test].astype(np.int32),
        np.concatenate(ood)[:num_ood].astype(np.float32), "cifar10", "mnist",
    )  # fmt: skip


def _generated(num_train, num_val, num_test, num_ood, seed) -> Data:
    """10 in-distribution classes and 10 OOD classes: a colour and a blocky pattern each, noisy."""
    rng = np.random.default_rng(seed)
    colours = rng.normal(size=(20, 1, 1, 3))
    patterns = colours + rng.normal(size=(20, 4, 4, 3)).repeat(8, axis=1).repeat(8, axis=2)

    def draw(n: int, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.choice(classes, n)
        images = patterns[labels] + rng.normal(size=(n, 32, 32, 3))
        return images.astype(np.float32), (labels % 10).astype(np.int32)

    in_classes, ood_classes = np.arange(10), np.arange(10, 20)
    train, val, test = (draw(n, in_classes) for n in (num_train, num_val, num_test))
    ood_images, _ = draw(num_ood, ood_classes)
    return Data(*train, *val, *test, ood_images, "generated", "generated_ood")
