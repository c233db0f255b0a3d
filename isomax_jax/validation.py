"""Every argument check of the library, in one place and one message style.

Messages name the argument in backquotes and say what was expected, then what was given:
``"`temperature` must be a finite number > 0; got -1.0."``. Three kinds of checks:

* **Static checks** (rank, shape, dtype, a scalar where a scalar is needed) look only at static
  properties, so they run while a function is traced (inside or outside ``jax.jit``) and raise
  ``ValueError``/``TypeError``.
* **Value checks** (NaN inputs, out-of-range labels, a temperature ``<= 0``) need concrete values:
  they raise eagerly and let a traced value through. A function that accepts traced values states
  what it returns for a bad one; for temperatures that is always NaN
  (:func:`check_temperature`), for metrics and losses NaN as well.
* **Hyperparameter checks** (:func:`check_int`, :func:`check_real`) for the Python numbers that
  configure detectors, heads and models: ``True`` is not a positive int, ``"0.5"`` not a number.

Example:
  >>> check_int("k", 5)
  >>> check_int("chunk", True)
  Traceback (most recent call last):
  ...
  ValueError: `chunk` must be a positive int; got True.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(*xs: Any) -> bool:
    """True when no leaf of ``xs`` (pytrees allowed) is a JAX tracer, so values can be read."""
    # jax.core.Tracer exists at runtime; jax's type stubs no longer export jax.core.
    tracer = jax.core.Tracer  # pyright: ignore[reportAttributeAccessIssue]
    return not any(isinstance(x, tracer) for x in jax.tree.leaves(xs))


def as_array(name: str, x: Any) -> jax.Array:
    """``jnp.asarray(x)``, refusing a tuple or list of arrays with a message naming ``name``.

    A model's ``apply`` often returns ``(logits, features)``; passing that pair where one array
    is expected would otherwise fail deep inside NumPy ("inhomogeneous shape") or, worse, stack
    two arrays of the same shape into a wrong one.

    Example:
      >>> as_array("logits", (jnp.zeros((2, 3)), jnp.zeros((2, 4))))
      Traceback (most recent call last):
      ...
      TypeError: `logits` must be one array; got a tuple of 2 arrays (a model's (logits, ...
    """
    if isinstance(x, tuple | list) and any(np.ndim(v) >= 1 for v in x if hasattr(v, "shape")):
        raise TypeError(
            f"`{name}` must be one array; got a {type(x).__name__} of {len(x)} arrays (a model's "
            "(logits, features) pair?). Pass one of them."
        )
    if x is None:
        raise TypeError(f"`{name}` must be an array; got None.")
    return jnp.asarray(x)


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


def _check_real_scalar(name: str, value) -> None:
    """Static part of a scalar check: a real number (not bool/str), rank 0."""
    if isinstance(value, bool | str | bytes) or value is None:
        raise TypeError(f"`{name}` must be a real number; got {value!r}.")
    try:
        dtype = jnp.result_type(value)
    except TypeError as e:
        raise TypeError(f"`{name}` must be a real number; got {value!r}.") from e
    if jnp.issubdtype(dtype, jnp.bool_) or not (
        jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
    ):
        raise TypeError(f"`{name}` must be a real number; got dtype {dtype}.")
    if np.ndim(value) != 0:
        raise ValueError(f"`{name}` must be a scalar; got shape {tuple(np.shape(value))}.")


def check_positive_scalar(name: str, value: Any) -> None:
    """Checks a scalar that must be finite and ``> 0`` (a temperature, a scale).

    Static properties (a real number, rank 0) are checked always, also while tracing; the value
    only when it is concrete (a Python number, a NumPy or a non-traced JAX scalar).

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
    _check_real_scalar(name, value)
    if is_concrete(value):
        number = float(np.asarray(value))
        if not (np.isfinite(number) and number > 0):
            raise ValueError(f"`{name}` must be a finite number > 0; got {number!r}.")


def check_temperature(
    temperature: jax.typing.ArrayLike, *, name: str = "temperature"
) -> jax.typing.ArrayLike:
    """The one temperature check of the library; returns the temperature to compute with.

    Every function and module that takes a temperature (the logit maps of
    :mod:`isomax_jax.distances`, the heads, :func:`isomax_jax.scores.energy`, the energy and
    ODIN detectors, calibration) calls this. **Eager** (a Python number or a concrete array): a
    temperature that is not a finite number ``> 0`` raises ``ValueError``; a valid one is
    returned as it is (no array is made: a hyperparameter check does not start XLA). **Traced**
    (an argument of a jitted function): it cannot raise, so a bad value is replaced by NaN, and
    every logit or score computed with it is NaN, never a sign-flipped or infinite number.

    Example:
      >>> check_temperature(2.0)
      2.0
      >>> jax.jit(check_temperature)(-1.0)
      Array(nan, dtype=float32, weak_type=True)
      >>> check_temperature(-1.0)
      Traceback (most recent call last):
      ...
      ValueError: `temperature` must be a finite number > 0; got -1.0.
    """
    check_positive_scalar(name, temperature)
    if is_concrete(temperature):
        return temperature
    # A tracer here (ArrayLike's Python scalars returned above), so `>` is defined.
    positive = temperature > 0  # pyright: ignore[reportOperatorIssue]
    return jnp.where(jnp.isfinite(temperature) & positive, temperature, jnp.nan)


def check_int(name: str, value: Any, *, minimum: int = 1, allow_none: bool = False) -> None:
    """A hyperparameter that must be a Python (or NumPy) int ``>= minimum`` (bools refused).

    Example:
      >>> check_int("num_classes", 0)
      Traceback (most recent call last):
      ...
      ValueError: `num_classes` must be a positive int; got 0.
    """
    if value is None and allow_none:
        return
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)
    # `ok` guards the comparison (value is an int there); pyright cannot narrow through it.
    if not ok or value < minimum:  # pyright: ignore[reportOptionalOperand]
        what = {1: "a positive int", 0: "a non-negative int"}.get(minimum, f"an int >= {minimum}")
        none = "None or " if allow_none else ""
        raise ValueError(f"`{name}` must be {none}{what}; got {value!r}.")


def check_real(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    strict: bool = False,
    allow_none: bool = False,
) -> None:
    """A hyperparameter that must be a finite real number in a range (bools and strings refused).

    Args:
      name: the hyperparameter's name.
      value: its value.
      minimum, maximum: the bounds (None: unbounded).
      strict: ``value > minimum`` instead of ``>=``.
      allow_none: accept ``None``.

    Example:
      >>> check_real("eps", -0.1, minimum=0.0)
      Traceback (most recent call last):
      ...
      ValueError: `eps` must be a non-negative number; got -0.1.
    """
    if value is None and allow_none:
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)
    # `ok` guards each use below (value is a real number there); pyright narrows `value` to
    # numbers.Real, whose stub has no ufunc or float comparisons.
    ok = ok and bool(np.isfinite(value))  # pyright: ignore[reportArgumentType, reportCallIssue]
    if ok and minimum is not None:
        ok = value > minimum if strict else value >= minimum  # pyright: ignore[reportOperatorIssue]
    if ok and maximum is not None:
        ok = value <= maximum  # pyright: ignore[reportOptionalOperand]
    if not ok:
        if minimum == 0 and maximum is None:
            what = "a positive number" if strict else "a non-negative number"
        elif minimum is not None and maximum is not None:
            what = f"a number in {'(' if strict else '['}{minimum:g}, {maximum:g}]"
        elif minimum is not None:
            what = f"a number {'>' if strict else '>='} {minimum:g}"
        elif maximum is not None:
            what = f"a number <= {maximum:g}"
        else:
            what = "a finite number"
        none = "None or " if allow_none else ""
        raise ValueError(f"`{name}` must be {none}{what}; got {value!r}.")


@jax.jit
def _first_non_finite(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    bad = ~jnp.isfinite(x)
    return jnp.sum(bad, dtype=jnp.int32), jnp.argmax(bad.ravel())


def check_finite(name: str, x: jax.typing.ArrayLike) -> None:
    """Eagerly raises ``ValueError`` if a concrete array holds NaN or infinite values.

    The count is reduced on the array's device (two integers reach the host); the message gives
    it and the index of the first bad value. A traced ``x`` is not checked. Non-floating arrays
    are always finite.

    Example:
      >>> check_finite("features", jnp.array([[1.0, jnp.nan]]))
      Traceback (most recent call last):
      ...
      ValueError: `features` must be finite; got 1 NaN/inf value(s), e.g. nan at index (0, 1).
    """
    if not is_concrete(x):
        return
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact) or x.size == 0:
        return
    with jax.ensure_compile_time_eval():
        count, flat = (int(v) for v in _first_non_finite(x))
    if count:
        index = tuple(int(i) for i in np.unravel_index(flat, x.shape))
        raise ValueError(
            f"`{name}` must be finite; got {count} NaN/inf value(s), e.g. "
            f"{float(x[index])} at index {index}."
        )


def compute_dtype(*dtypes: jax.typing.DTypeLike) -> jnp.dtype:
    """The dtype distances, losses and scores are computed in: the inputs' common type, at least
    float32 (so bfloat16/float16 inputs give float32 results)."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def check_logits_labels(
    logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike
) -> tuple[jax.Array, jax.Array]:
    """Checks ``[batch, num_classes]`` floating logits and ``[batch]`` integer labels.

    Returns the logits in the compute dtype (float32 or wider) and the labels as arrays.
    """
    logits = as_array("logits", logits)
    labels = as_array("labels", labels)
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


__all__ = [
    "as_array",
    "check_finite",
    "check_floating",
    "check_int",
    "check_integer",
    "check_logits_labels",
    "check_positive_scalar",
    "check_rank",
    "check_real",
    "check_shape",
    "check_temperature",
    "compute_dtype",
    "is_concrete",
    "validate_labels",
]
