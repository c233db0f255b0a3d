"""Generated data for tests and smoke runs: ``tfds.testing.mock_data`` for this package.

``tfds.testing.mock_data`` makes a tfds builder yield generated examples, but this package reads
a set only once it has found it prepared on disk (:mod:`isomax_jax.data.locate`), so under tfds's
mock alone every set is reported missing. :func:`mock_data` enters tfds's context and, for its
duration, stands in for the package's data lookup: a set is always found (tfds's mocked builder
of its first tfds name), :func:`~isomax_jax.data.check_available` accepts every set, split
sizes are counted from the generated split (it has no metadata), and decoded training splits
are not cached (the generated examples differ between contexts). Nothing of this is used
outside the ``with`` block; the library itself never asks whether it runs under a mock.

Example:
  >>> from isomax_jax import data
  >>> with mock_data(num_examples=20):
  ...     images, labels = data.load_train_split("cifar10")
  ...     n = data.num_examples("mnist")
  >>> images.shape, labels.dtype, n
  ((20, 32, 32, 3), dtype('int32'), 20)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from unittest import mock

import numpy as np
import tensorflow_datasets as tfds

from isomax_jax.data import locate, pipelines, training

__all__ = ["mock_data"]


def _mocked_builder(display_name: str, candidates, **_: Any):
    del display_name
    return tfds.builder(candidates[0])


def _counted_split_size(builder, split: str) -> int:
    ds = builder.as_dataset(split=split)
    n = int(ds.cardinality())
    return n if n >= 0 else int(ds.reduce(np.int64(0), lambda c, _: c + 1))


def _always_available(*_: Any, **__: Any) -> None:
    return None


@contextlib.contextmanager
def mock_data(*, num_examples: int = 1, **mock_kwargs: Any) -> Iterator[None]:
    """Every dataset of :mod:`isomax_jax.data` generated, ``num_examples`` examples per split.

    Patches are process-wide (every thread sees them) and undone on exit.

    Args:
      num_examples: examples in every split.
      **mock_kwargs: further arguments of ``tfds.testing.mock_data`` (e.g. ``policy``).
    """
    uncached = training._load_split_cached.__wrapped__
    with contextlib.ExitStack() as stack:
        stack.enter_context(tfds.testing.mock_data(num_examples=num_examples, **mock_kwargs))
        stack.enter_context(mock.patch.object(locate, "load_builder", _mocked_builder))
        stack.enter_context(mock.patch.object(pipelines, "_split_size", _counted_split_size))
        stack.enter_context(
            mock.patch.object(pipelines, "_check_prepared_or_buildable", _always_available)
        )
        stack.enter_context(mock.patch.object(training, "_load_split_cached", uncached))
        yield
