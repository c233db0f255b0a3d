"""The detector base class: one door for every post-hoc OOD method.

A detector is a small frozen (hashable) dataclass of hyperparameters with three pure methods:

* ``fit(*, features, logits, labels, kernel, bias) -> state``: eager, on in-distribution
  *training* data; returns a pytree of arrays (``{}`` when there is nothing to fit).
* ``score(state, *, features, logits, head_fn, kernel, bias) -> [B]``: jit-able, vmap-able and
  shardable (no host callbacks); **higher = more in-distribution**.
* ``score_images(state, apply_fn, images) -> [B]``: ``apply_fn(images) -> (logits, features)``;
  input-perturbation methods take the input gradient of ``apply_fn`` in JAX.

Every method takes every input by keyword and ignores the ones it does not need, so one call
``det.score(state, **available)`` serves all detectors; a needed input that is missing raises
``ValueError`` naming it. See ``docs/detectors.md``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from isomax_jax import validation

HEADS = ("softmax", "isomax", "isomax_plus", "dismax")
"""The classification heads :meth:`Detector.applies_to` knows about."""
DISTANCE_HEADS = frozenset(("isomax", "isomax_plus", "dismax"))
INPUT_NAMES = ("features", "logits", "labels", "head_fn", "kernel", "bias")
_ARRAY_INPUTS = ("features", "logits", "kernel", "bias")

State = dict[str, Any]


def is_concrete(*xs) -> bool:
    """True when no argument is a tracer, so value checks can run eagerly."""
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(xs))


def check_finite(name: str, x: jax.Array) -> None:
    """Raises ``ValueError`` if concrete ``x`` holds NaN or inf (no-op on tracers)."""
    if is_concrete(x) and not bool(jnp.all(jnp.isfinite(x))):
        bad = int(jnp.sum(~jnp.isfinite(x)))
        raise ValueError(f"`{name}` contains {bad} NaN or inf value(s); scores would be NaN.")


def as_matrix(name: str, x: jax.typing.ArrayLike, expected: str) -> jax.Array:
    """A floating ``[rows, cols]`` array in the compute dtype (float32 or wider), checked."""
    x = jnp.asarray(x)
    validation.check_rank(name, x, 2, expected)
    validation.check_floating(name, x)
    if x.shape[0] == 0:
        raise ValueError(f"`{name}` is empty (shape {tuple(x.shape)}); need at least one row.")
    return x.astype(validation.compute_dtype(x.dtype))


def check_width(name: str, x: jax.Array, width: int, what: str) -> None:
    """Raises ``ValueError`` unless ``x.shape[-1] == width`` (a static check, fine under jit)."""
    if x.shape[-1] != width:
        raise ValueError(
            f"`{name}` has {x.shape[-1]} columns but the detector was fitted on {width} {what}; "
            f"got shape {tuple(x.shape)}."
        )


def check_labels(labels, num_rows: int, num_classes: int | None, logits) -> tuple[np.ndarray, int]:
    """Eagerly checks fit labels; returns them (NumPy) and the number of classes ``C``.

    ``C`` is ``num_classes`` if given, else the width of ``logits`` if given, else
    ``max(labels) + 1``. Every class ``0 .. C - 1`` must occur.
    """
    labels = jnp.asarray(labels)
    validation.check_rank("labels", labels, 1, "[batch]")
    validation.check_shape("labels", labels, (num_rows,), "[batch] (one per row of `features`)")
    if logits is not None:
        width = int(np.shape(logits)[-1])
        if num_classes is not None and num_classes != width:
            raise ValueError(
                f"`logits` has {width} columns but num_classes={num_classes} was given."
            )
        num_classes = width
    if num_classes is None:
        validation.check_integer("labels", labels)
        num_classes = int(jnp.max(labels)) + 1
    array = validation.validate_labels(labels, num_classes)
    counts = np.bincount(array, minlength=num_classes)
    missing = np.flatnonzero(counts == 0)
    if missing.size:
        raise ValueError(
            f"`labels` cover {num_classes - missing.size} of {num_classes} classes; class(es) "
            f"{missing[:10].tolist()} have no training example, so their mean is undefined."
        )
    return array, num_classes


@dataclasses.dataclass(frozen=True)
class Detector:
    """Base class. Subclasses set the class variables and implement ``_fit`` and ``_score``.

    Class attributes:
      name: the registry name (``detectors.get(name)``).
      title: a short display title for tables.
      fit_inputs / score_inputs: the inputs ``fit`` / ``score`` need; ``inputs`` is their union.
      heads: the heads the detector applies to (see :meth:`applies_to`).
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    fit_inputs: ClassVar[frozenset[str]] = frozenset()
    score_inputs: ClassVar[frozenset[str]] = frozenset()
    heads: ClassVar[frozenset[str]] = frozenset(HEADS)

    @property
    def inputs(self) -> frozenset[str]:
        """What ``fit`` and ``score`` need, among ``features, logits, labels, head_fn, kernel,
        bias``."""
        return self.fit_inputs | self.score_inputs

    @property
    def needs_images(self) -> bool:
        """True if scores need ``score_images`` (input perturbation); ``score`` then raises."""
        return False

    def applies_to(self, head: str) -> bool:
        """Whether the detector is meaningful for a model with this head (see the module table).

        Raises:
          ValueError: if ``head`` is not one of ``softmax, isomax, isomax_plus, dismax``.
        """
        if head not in HEADS:
            raise ValueError(f"`head` must be one of {', '.join(HEADS)}; got {head!r}.")
        return head in self.heads

    # -- public API ------------------------------------------------------------------------------

    def fit(
        self,
        *,
        features: jax.typing.ArrayLike | None = None,
        logits: jax.typing.ArrayLike | None = None,
        labels: jax.typing.ArrayLike | None = None,
        head_fn: Callable | None = None,
        kernel: jax.typing.ArrayLike | None = None,
        bias: jax.typing.ArrayLike | None = None,
    ) -> State:
        """Fits the detector on in-distribution training data; eager (call it outside ``jit``).

        Args:
          features: ``[N, D]`` penultimate features.
          logits: ``[N, C]`` logits (also fixes the number of classes for label checks).
          labels: ``[N]`` integer class labels ``0 .. C - 1``.
          head_fn, kernel, bias: the classification head, for detectors that need it.

        Returns:
          The state: a dict pytree of arrays (``{}`` for detectors with nothing to fit).

        Raises:
          ValueError: a needed input is missing, or an input is malformed (see the detector).
          TypeError: an input is a tracer (``fit`` runs eagerly) or has the wrong dtype.
        """
        given = dict(
            features=features, logits=logits, labels=labels, head_fn=head_fn, kernel=kernel,
            bias=bias,
        )  # fmt: skip
        if not self.fit_inputs:
            return {}
        self._require(self.fit_inputs, given, "fit")
        if not is_concrete(features, logits, labels, kernel, bias):
            raise TypeError(f"`{self.name}.fit` needs concrete arrays; call it outside jax.jit.")
        return self._fit(**given)

    def score(
        self,
        state: State,
        *,
        features: jax.typing.ArrayLike | None = None,
        logits: jax.typing.ArrayLike | None = None,
        head_fn: Callable | None = None,
        kernel: jax.typing.ArrayLike | None = None,
        bias: jax.typing.ArrayLike | None = None,
    ) -> jax.Array:
        """Scores a batch, ``[B]``, higher = more in-distribution.

        Pure and jit-able (``head_fn`` is a static argument of the internal ``jit``: pass the same
        function object to avoid recompiling). Inputs that the detector does not need are
        ignored. NaN/inf inputs raise ``ValueError`` when concrete; under ``jit``/``vmap`` they
        cannot be checked and give non-finite scores for the affected rows.

        Raises:
          ValueError: a needed input is missing, malformed, or its width differs from ``fit``'s;
            or the detector needs images (``needs_images``).
        """
        if self.needs_images:
            raise ValueError(
                f"`{self.name}` with these hyperparameters perturbs the inputs: call "
                "`score_images(state, apply_fn, images)` instead of `score`."
            )
        given = dict(features=features, logits=logits, head_fn=head_fn, kernel=kernel, bias=bias)
        return self._checked_score(state, given)

    def score_images(
        self,
        state: State,
        apply_fn: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
        images: jax.typing.ArrayLike,
        *,
        head_fn: Callable | None = None,
        kernel: jax.typing.ArrayLike | None = None,
        bias: jax.typing.ArrayLike | None = None,
    ) -> jax.Array:
        """Scores images through ``apply_fn(images) -> (logits [B, C], features [B, D])``.

        ``apply_fn`` must treat examples independently (a model in eval mode). Detectors
        without input perturbation simply score ``apply_fn(images)``.
        """
        logits, features = apply_fn(jnp.asarray(images))
        return self.score(
            state, features=features, logits=logits, head_fn=head_fn, kernel=kernel, bias=bias
        )

    # -- subclass hooks --------------------------------------------------------------------------

    def _checked_score(self, state: State, given: dict[str, Any]) -> jax.Array:
        """``score`` without the ``needs_images`` guard: checks, then the jitted ``_score``."""
        self._require(self.score_inputs, given, "score")
        arrays = {k: given[k] for k in _ARRAY_INPUTS if k in self.score_inputs}
        arrays = self._prepare(state, **arrays)
        head_fn = given.get("head_fn") if "head_fn" in self.score_inputs else None
        scores, bad = _score_jit(self, head_fn, state, arrays)
        if is_concrete(bad):  # eager call: the finiteness counts came with the scores
            for key in sorted(bad):
                if int(bad[key]):
                    raise ValueError(
                        f"`{key}` contains {int(bad[key])} NaN or inf value(s); scores would be "
                        "NaN."
                    )
        return scores

    def _fit(self, **inputs) -> State:  # pragma: no cover - every fitted detector overrides it
        raise NotImplementedError

    def _prepare(self, state: State, **arrays) -> dict[str, jax.Array]:
        """Static checks of the score inputs; returns them as arrays (default: as matrices)."""
        return {k: as_matrix(k, v, "[batch, " + k + "]") for k, v in arrays.items()}

    def _score(self, state: State, head_fn, **arrays) -> jax.Array:  # pragma: no cover
        raise NotImplementedError

    def _score_images(self, state: State, apply_fn, images) -> jax.Array:  # pragma: no cover
        """Traced body of ``score_images`` for input-perturbation detectors (see images_jit)."""
        raise NotImplementedError

    def _require(self, needed: frozenset[str], given: dict[str, Any], method: str) -> None:
        missing = sorted(k for k in needed if given.get(k) is None)
        if missing:
            raise ValueError(
                f"`{self.name}.{method}` needs `{missing[0]}` (it uses "
                f"{', '.join(sorted(needed))}); got {missing[0]}=None."
            )


@functools.partial(jax.jit, static_argnums=(0, 1))
def _score_jit(detector: Detector, head_fn, state: State, arrays: dict[str, jax.Array]):
    """Scores and, per input, its count of non-finite values (one dispatch; under an outer jit
    the unused counts are dead code)."""
    bad = {key: jnp.sum(~jnp.isfinite(value)) for key, value in arrays.items()}
    return detector._score(state, head_fn, **arrays), bad


@functools.partial(jax.jit, static_argnums=(0, 1))
def images_jit(detector: Detector, apply_fn, state: State, images: jax.Array):
    """``detector._score_images(state, apply_fn, images)`` under ``jit`` (``apply_fn`` static)."""
    return detector._score_images(state, apply_fn, images)
