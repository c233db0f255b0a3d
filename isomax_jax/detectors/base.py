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
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import chex
import jax
import jax.numpy as jnp
import numpy as np

from isomax_jax import registry, validation
from isomax_jax.detectors import streaming

HEADS = registry.HEAD_NAMES
"""The classification heads :meth:`Detector.applies_to` knows about (:data:`registry.HEADS`)."""
DISTANCE_HEADS = registry.DISTANCE_HEADS
INPUT_NAMES = ("features", "logits", "labels", "head_fn", "kernel", "bias")
_ARRAY_INPUTS = ("features", "logits", "kernel", "bias")

State = chex.ArrayTree


def model_outputs(outputs: Any, name: str = "apply_fn") -> tuple[jax.Array, jax.Array | None]:
    """``(logits, features or None)`` of what a model's apply function returned.

    Accepted: logits ``[B, C]`` alone, a ``(logits, features)`` pair, or a mapping with
    ``"logits"`` (and ``"features"``). Anything else raises one ``TypeError`` naming ``name``.
    """
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"], outputs.get("features")
    if isinstance(outputs, tuple | list) and len(outputs) == 2:
        return outputs[0], outputs[1]
    if hasattr(outputs, "shape") and hasattr(outputs, "dtype"):
        # An array (hasattr does not narrow the type of `outputs` for pyright).
        return outputs, None  # pyright: ignore[reportReturnType]
    what = f"a {type(outputs).__name__}"
    if isinstance(outputs, tuple | list):
        what += f" of {len(outputs)} items"
    raise TypeError(
        f"`{name}` must return logits [batch, num_classes], a (logits, features) pair or a dict "
        f"with 'logits' (and 'features'); it returned {what}."
    )


def as_matrix(name: str, x: jax.typing.ArrayLike, expected: str) -> jax.Array:
    """A floating ``[rows, cols]`` array in the compute dtype (float32 or wider), checked."""
    x = validation.as_array(name, x)
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
    labels = validation.as_array("labels", labels)
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
      state_keys: the keys of the state ``fit`` returns (checked by ``score``).
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    fit_inputs: ClassVar[frozenset[str]] = frozenset()
    score_inputs: ClassVar[frozenset[str]] = frozenset()
    heads: ClassVar[frozenset[str]] = frozenset(HEADS)
    state_keys: ClassVar[frozenset[str]] = frozenset()

    @property
    def inputs(self) -> frozenset[str]:
        """What ``fit`` and ``score`` need, among ``features, logits, labels, head_fn, kernel,
        bias``."""
        return self.fit_inputs | self.score_inputs

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """This detector's hyperparameters and their values (``detectors.get(name, **them)``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def needs_images(self) -> bool:
        """True if scores need ``score_images`` (input perturbation); ``score`` then raises."""
        return False

    def applies_to(self, head: str) -> bool:
        """Whether the detector is meaningful for a model with this head (see the module table).

        Raises:
          ValueError: if ``head`` is not a head of :data:`isomax_jax.registry.HEADS`.
        """
        return registry.head(head).name in self.heads

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
        if not validation.is_concrete(features, logits, labels, kernel, bias):
            raise TypeError(f"`{self.name}.fit` needs concrete arrays; call it outside jax.jit.")
        return self._fit(**given)

    def fit_from(
        self,
        batches: Iterable[Mapping[str, Any]],
        *,
        kernel: jax.typing.ArrayLike | None = None,
        bias: jax.typing.ArrayLike | None = None,
        head_fn: Callable | None = None,
    ) -> State:
        """Fits the detector from batches of training data, consumed once (streamed fitting).

        Args:
          batches: an iterable (a generator, a ``tfds.as_numpy`` dataset, a list) of dicts with
            the per-example inputs of :meth:`fit` (``features [n, D]``, ``labels [n]``,
            ``logits [n, C]``) in chunks of any size.
          kernel, bias, head_fn: the fixed inputs of :meth:`fit`.

        Returns:
          The state :meth:`fit` gives on all the rows (to float32 precision for Mahalanobis, RMD
          and ViM, whose statistics accumulate in float64; exactly for KNN and ReAct). Memory is
          ``O(state)`` (one batch at a time), except KNN and NNGuide, whose state is the data (the
          bank); ViM and ReAct read the data twice (a list twice, anything else through a disk
          spool: :mod:`isomax_jax.detectors.streaming`). Without ``num_classes``, Mahalanobis,
          RMD and GMM take ``max(label) + 1`` classes.

        Raises:
          ValueError, TypeError: as :meth:`fit`, for the first bad batch.
        """
        if not self.fit_inputs:
            return {}
        head = dict(kernel=kernel, bias=bias, head_fn=head_fn)
        self._require(self.fit_inputs - frozenset(streaming.BATCH_INPUTS), head, "fit_from")
        accumulator = self.accumulator(**head)
        streaming.drive([accumulator], batches, self.name)
        return accumulator.finalize()

    def accumulator(self, *, kernel=None, bias=None, head_fn=None) -> streaming.Accumulator:
        """The streamed fit of this detector (:mod:`isomax_jax.detectors.streaming`); by
        default the batches are kept and :meth:`fit` runs on their concatenation."""
        inputs = self.fit_inputs & frozenset(streaming.BATCH_INPUTS)
        return streaming.Collect(self, inputs, dict(kernel=kernel, bias=bias, head_fn=head_fn))

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
        apply_fn: Callable[[jax.Array], Any],
        images: jax.typing.ArrayLike,
        *,
        head_fn: Callable | None = None,
        kernel: jax.typing.ArrayLike | None = None,
        bias: jax.typing.ArrayLike | None = None,
    ) -> jax.Array:
        """Scores images through a model's ``apply_fn(images)``.

        ``apply_fn`` returns logits ``[B, C]``, a ``(logits [B, C], features [B, D])`` pair or a
        dict with ``"logits"`` (and ``"features"``); a detector that needs features raises
        ``ValueError`` when it gets logits only. It must treat examples independently (a model in
        eval mode). Detectors without input perturbation simply score ``apply_fn(images)``.
        """
        logits, features = model_outputs(apply_fn(validation.as_array("images", images)))
        return self.score(
            state, features=features, logits=logits, head_fn=head_fn, kernel=kernel, bias=bias
        )

    # -- subclass hooks --------------------------------------------------------------------------

    def _checked_score(self, state: State, given: dict[str, Any]) -> jax.Array:
        """``score`` without the ``needs_images`` guard: checks, then the jitted ``_score``."""
        self._require(self.score_inputs, given, "score")
        self.check_state(state)
        arrays = {k: given[k] for k in _ARRAY_INPUTS if k in self.score_inputs}
        arrays = self._prepare(state, **arrays)
        head_fn = given.get("head_fn") if "head_fn" in self.score_inputs else None
        scores, bad = _score_jit(self, head_fn, state, arrays)
        if validation.is_concrete(bad):  # eager call: the finiteness counts came with the scores
            for key in sorted(bad):
                if int(bad[key]):
                    validation.check_finite(key, arrays[key])  # raises, naming the first one
        return scores

    def check_state(self, state: State) -> None:
        """Raises ``ValueError`` unless ``state`` has the keys this detector's ``fit`` returns.

        Catches a state fitted by another detector (a KNN bank passed to Mahalanobis) before it
        fails with a bare ``KeyError`` inside the score.
        """
        if not self.state_keys:
            return
        # A state is a dict with string keys (pyright sees any Mapping of pytrees).
        keys = sorted(state) if isinstance(state, Mapping) else None  # pyright: ignore[reportArgumentType]
        if keys is None or not self.state_keys <= set(keys):
            got = f"keys {keys}" if keys is not None else f"a {type(state).__name__}"
            raise ValueError(
                f"`state` was not fitted by `{self.name}`: expected keys "
                f"{sorted(self.state_keys)}, got {got}; fit it with "
                f"detectors.get({self.name!r}).fit(...)."
            )

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
        for k in needed:
            if k != "head_fn" and isinstance(given.get(k), tuple | list):
                validation.as_array(k, given[k])  # names the argument


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
