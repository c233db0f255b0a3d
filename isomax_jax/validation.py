"""Trace-time argument checks and an eager label validator.

The checks here only look at static shapes and dtypes, so they run while a function is traced
(inside or outside ``jax.jit``) and raise ``ValueError``/``TypeError`` naming the argument, its
actual shape or dtype and the expected one. Value checks (such as out-of-range labels) cannot run
inside ``jit``; :func:`validate_labels` does them eagerly.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def check_rank(name: str, x: jax.typing.ArrayLike, rank: int, expected: str) -> None:
    """Raises ``ValueError`` unless ``x`` has ``rank`` dimensions.

    Args:
      name: the argument's name, used in the message.
      x: the argument.
      rank: the required number of dimensions.
      expected: a readable form of the expected shape, e.g. ``"[batch, features]"``.
    """
    shape = np.shape(x)
    if len(shape) != rank:
        raise ValueError(
            f"`{name}` must have rank {rank} with shape {expected}; got shape {tuple(shape)}."
        )


def check_floating(name: str, x: jax.typing.ArrayLike) -> None:
    """Raises ``TypeError`` unless ``x`` has a floating-point dtype."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"`{name}` must have a floating-point dtype; got {dtype}.")


def check_integer(name: str, x: jax.typing.ArrayLike) -> None:
    """Raises ``TypeError`` unless ``x`` has an integer dtype."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"`{name}` must have an integer dtype; got {dtype}.")


def check_shape(name: str, x: jax.typing.ArrayLike, shape: Sequence[int], expected: str) -> None:
    """Raises ``ValueError`` unless ``x.shape == shape``."""
    actual = tuple(np.shape(x))
    if actual != tuple(shape):
        raise ValueError(f"`{name}` must have shape {expected} = {tuple(shape)}; got {actual}.")


def compute_dtype(*dtypes) -> jnp.dtype:
    """The dtype distances, losses and scores are computed in: the inputs' common type, at least
    float32 (so bfloat16/float16 inputs give float32 results)."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def check_logits_labels(logits, labels) -> tuple[jax.Array, jax.Array]:
    """Checks ``[batch, num_classes]`` floating logits and ``[batch]`` integer labels.

    Returns the logits in the compute dtype (float32 or wider) and the labels as arrays.
    """
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    check_rank("logits", logits, 2, "[batch, num_classes]")
    check_floating("logits", logits)
    check_integer("labels", labels)
    check_shape("labels", labels, logits.shape[:1], "[batch]")
    return logits.astype(compute_dtype(logits.dtype)), labels


def validate_labels(labels: jax.typing.ArrayLike, num_classes: int) -> np.ndarray:
    """Eagerly checks integer class labels; use it outside ``jit`` on data you do not trust.

    Inside ``jit`` the losses cannot raise on values: an out-of-range label (negative or
    ``>= num_classes``) gives a NaN loss for that example. Call this helper on concrete labels to
    get an error instead.

    Args:
      labels: concrete integer labels, any shape.
      num_classes: the number of classes ``C``; valid labels are ``0 .. C - 1``.

    Returns:
      The labels as a NumPy array.

    Raises:
      TypeError: if the labels are not integers.
      ValueError: if a label is out of range.

    Example:
      >>> validate_labels([0, 2, 1], num_classes=3)
      array([0, 2, 1])
      >>> validate_labels([0, 3], num_classes=3)
      Traceback (most recent call last):
      ...
      ValueError: `labels` must lie in [0, 3); got 1 out-of-range value(s), e.g. 3 at index (1,).
    """
    if isinstance(labels, jax.core.Tracer):
        raise TypeError("`validate_labels` needs concrete labels; call it outside `jax.jit`.")
    array = np.asarray(labels)
    check_integer("labels", array)
    bad = (array < 0) | (array >= num_classes)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"`labels` must lie in [0, {num_classes}); got {int(bad.sum())} out-of-range "
            f"value(s), e.g. {array[index]} at index {index}."
        )
    return array
