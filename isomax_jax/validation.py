"""Trace-time argument checks and eager value checks.

The shape/dtype checks only look at static shapes and dtypes, so they run while a function is
traced (inside or outside ``jax.jit``) and raise ``ValueError``/``TypeError`` naming the argument,
its actual shape or dtype and the expected one. Value checks (out-of-range labels, NaN logits, a
non-positive temperature) cannot raise inside ``jit``: :func:`validate_labels` and
:func:`check_finite` need concrete values, and :func:`check_positive_scalar` checks a concrete
value and lets a traced one through (the caller then returns NaN for a bad one).
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


def is_concrete(*xs) -> bool:
    """True when none of ``xs`` is a JAX tracer (so its values can be read on the host)."""
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def check_positive_scalar(name: str, value) -> None:
    """Checks a scalar hyperparameter such as a temperature: finite and ``> 0``.

    Static properties (a real number, rank 0) are checked always, also while tracing; the value
    only when it is concrete (a Python number, a NumPy or a non-traced JAX scalar). A traced value
    passes: functions that accept one document what they return for a bad value (NaN).

    Raises:
      TypeError: ``value`` is a bool, a string or not a real number.
      ValueError: ``value`` is not a scalar, or a concrete value is NaN, infinite or ``<= 0``.

    Example:
      >>> check_positive_scalar("temperature", 0.5)
      >>> check_positive_scalar("temperature", 0.0)
      Traceback (most recent call last):
      ...
      ValueError: `temperature` must be a finite number > 0; got 0.0.
    """
    if isinstance(value, bool | str | bytes) or value is None:
        raise TypeError(f"`{name}` must be a real number; got {value!r}.")
    try:
        dtype = jnp.result_type(value)
    except TypeError as e:
        raise TypeError(f"`{name}` must be a real number; got {value!r}.") from e
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"`{name}` must be a real number; got dtype {dtype}.")
    if np.ndim(value) != 0:
        raise ValueError(f"`{name}` must be a scalar; got shape {tuple(np.shape(value))}.")
    if is_concrete(value):
        number = float(np.asarray(value))
        if not (np.isfinite(number) and number > 0):
            raise ValueError(f"`{name}` must be a finite number > 0; got {number!r}.")


def check_finite(name: str, x: jax.typing.ArrayLike) -> None:
    """Eagerly raises ``ValueError`` if a concrete array holds NaN or infinite values.

    The message gives the count and the index of the first one. A traced ``x`` is not checked.
    """
    if not is_concrete(x):
        return
    bad = ~np.isfinite(np.asarray(x))
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"`{name}` must be finite; got {int(bad.sum())} NaN/inf value(s), e.g. "
            f"{np.asarray(x)[index]} at index {index}."
        )


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
    if not is_concrete(labels):
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
