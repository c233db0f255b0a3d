"""Deployment: a fitted detector and its threshold, classifying single inputs or batches.

The most frequent question from users of the reference code is how to turn a score into a
decision for one input. The answer (``docs/metrics.md``): fit a threshold on *in-distribution
validation* scores at a target true-positive rate, and store it with the model.
:func:`fit_threshold` does the first; :class:`OODDetector` is the one deployable object for
**any** detector of :mod:`isomax_jax.detectors`: the detector (name and hyperparameters), its
fitted state (KNN's bank, Mahalanobis' means and whitening, ...), the threshold, the target TPR
and the metric convention. It is saved to one ``.npz`` file and loaded back (:meth:`save`,
:meth:`load`); one that needs nothing but logits also has a small JSON form (:meth:`to_json`).

Names: a :class:`isomax_jax.detectors.Detector` is a *method* (hyperparameters, ``fit``,
``score``); an :class:`OODDetector` is a *deployed* detector (method + fitted state +
threshold). The maximum softmax probability is the detector ``msp``; ``max_probability`` (the
name of its function in :mod:`isomax_jax.scores`) is accepted everywhere as an alias, and
reports title it "MPS" as the IsoMax papers do.

Example:
  >>> import numpy as np
  >>> from isomax_jax.thresholds import OODDetector
  >>> rng = np.random.default_rng(0)
  >>> train = np.abs(rng.normal(size=(200, 8))).astype(np.float32)
  >>> val = np.abs(rng.normal(size=(100, 8))).astype(np.float32)
  >>> det = OODDetector.fit("knn", features=val, train={"features": train}, tpr=0.95)
  >>> det.name, det.detector.k, det.tpr
  ('knn', 50, 0.95)
  >>> bool(det.is_in_distribution(features=val[0])), det.is_in_distribution(features=val).shape
  (True, (100,))
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from isomax_jax import detector_format, validation
from isomax_jax import detectors as _detectors
from isomax_jax import metrics as _metrics
from isomax_jax.metrics import fit_threshold as fit_threshold

#: Every detector a threshold can be fitted on from logits alone, with nothing to fit first (so a
#: new logit detector is available here with no change), plus the aliases of
#: :data:`isomax_jax.detectors.ALIASES`. Any other detector deploys with :meth:`OODDetector.fit`.
SCORE_NAMES: tuple[str, ...] = tuple(
    name
    for name in _detectors.NAMES
    if _detectors.get(name).inputs == {"logits"}
    and not (_detectors.get(name).needs_images or _detectors.get(name).fit_inputs)
) + tuple(_detectors.ALIASES)
_INPUTS = ("logits", "features")  # the per-example score inputs (1-D: one input)


class OODDetector:
    """A deployed OOD detector: a detector, its fitted state and a threshold.

    ``is_in_distribution(...)`` is ``detector.score(state, ...) >= threshold``, for one input
    (``[C]`` logits, ``[D]`` features: a scalar) or a batch (``[B, C]`` / ``[B, D]``: ``[B]``).
    Create it with :meth:`fit` (fits the detector on training data if it has something to fit,
    then the threshold on in-distribution validation data), or from a fitted state and a
    threshold. Inputs the detector uses at scoring time but that are not data (``head_fn``,
    ``kernel``, ``bias``: the classification head) are passed to every scoring call, as to
    :meth:`isomax_jax.detectors.Detector.score`.

    Args:
      detector: a detector name or alias (``"knn"``, ``"max_probability"``) with default
        hyperparameters, or a :class:`isomax_jax.detectors.Detector` (``detectors.get("knn",
        k=10)``).
      threshold: scores ``>=`` this are in-distribution; a finite real number.
      tpr: the in-distribution acceptance rate the threshold was fitted for, in (0, 1).
      convention: the metric convention (``"reference"`` or ``"openood"``) :meth:`evaluate`
        reports in.
      state: the detector's fitted state (``detector.fit(...)``); ``{}`` for logit scores.
      score: the name of the field in the first (logit-only) version; same as ``detector``.

    Raises:
      TypeError: a threshold, tpr or name of the wrong type.
      ValueError: an unknown detector, a threshold that is not finite, a tpr outside (0, 1), an
        unknown convention, a state the detector did not fit (or none where it needs one), or a
        detector that perturbs images (ODIN or Mahalanobis with ``eps > 0``: it needs the model,
        not its outputs).
    """

    __slots__ = ("detector", "threshold", "tpr", "convention", "state")

    def __init__(
        self,
        detector: str | _detectors.Detector | None = None,
        threshold: float | None = None,
        tpr: float = 0.95,
        convention: str = "reference",
        *,
        state: chex.ArrayTree | None = None,
        score: str | None = None,
    ):
        if detector is None:
            detector = score
        elif score is not None:
            raise TypeError("pass `detector` or its older name `score`, not both.")
        set_ = functools.partial(object.__setattr__, self)
        set_("detector", _as_detector(detector))
        set_("threshold", _real("threshold", threshold))
        set_("tpr", _real("tpr", tpr))
        if not isinstance(convention, str) or convention not in _metrics.CONVENTIONS:
            raise ValueError(
                f"`convention` must be one of {_metrics.CONVENTIONS}; got {convention!r}."
            )
        set_("convention", convention)
        if not math.isfinite(self.threshold):
            raise ValueError(f"`threshold` must be finite; got {self.threshold}.")
        if not 0.0 < self.tpr < 1.0:
            raise ValueError(f"`tpr` must be in (0, 1); got {self.tpr}.")
        state = {} if state is None else state
        if not isinstance(state, Mapping):
            raise TypeError(f"`state` must be a mapping (a detector's fit); got {type(state)}.")
        if self.detector.fit_inputs and not state:
            raise ValueError(
                f"`{self.name}` needs its fitted state: pass state=detector.fit(...), or use "
                f"OODDetector.fit({self.name!r}, ..., train={{...}})."
            )
        self.detector.check_state(state)
        set_("state", dict(state))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"OODDetector is immutable; cannot set {name!r}.")

    @property
    def name(self) -> str:
        """The detector's registry name (``"knn"``, ``"msp"``, ...)."""
        return self.detector.name

    @property
    def score(self) -> str:
        """The detector's name (the field's name in the first, logit-only version)."""
        return self.detector.name

    # -- fitting -----------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        detector: str | _detectors.Detector,
        logits: jax.typing.ArrayLike | None = None,
        *,
        features: jax.typing.ArrayLike | None = None,
        head_fn: Callable | None = None,
        kernel: jax.typing.ArrayLike | None = None,
        bias: jax.typing.ArrayLike | None = None,
        mask: jax.typing.ArrayLike | None = None,
        train: Mapping[str, Any] | None = None,
        state: chex.ArrayTree | None = None,
        tpr: float = 0.95,
        convention: str = "reference",
    ) -> OODDetector:
        """Fits the detector (if needed) and the threshold.

        Args:
          detector: a name, alias or :class:`~isomax_jax.detectors.Detector`.
          logits, features: the **in-distribution validation** outputs the threshold is fitted
            on (what the detector scores; ``[n, C]`` / ``[n, D]``).
          head_fn, kernel, bias: the classification head, for detectors that use it (ReAct,
            ASH, ViM), used for fitting and scoring.
          mask: optional ``[n]`` boolean mask of the validation rows (False = padding).
          train: the detector's fit inputs on **training** data (``{"features": ...,
            "labels": ..., "logits": ...}``), for detectors with something to fit; or
          state: an already fitted state (then ``train`` is not needed).
          tpr: fraction of validation inputs to accept.
          convention: recorded for :meth:`evaluate`.

        Example:
          >>> import jax.numpy as jnp
          >>> det = OODDetector.fit("entropic", jnp.array([[2.0, 0.0], [0.0, 3.0]] * 10))
          >>> det.name, round(det.threshold, 4)
          ('entropic', -0.3653)
        """
        det = _as_detector(detector)
        if state is None:
            state = {}
            if det.fit_inputs:
                if train is None:
                    raise ValueError(
                        f"`{det.name}` has something to fit: pass train={{...}} (its fit "
                        f"inputs on training data: {', '.join(sorted(det.fit_inputs))}) or a "
                        "fitted state=."
                    )
                if not isinstance(train, Mapping):
                    raise TypeError(f"`train` must be a mapping of fit inputs; got {type(train)}.")
                state = det.fit(**train, head_fn=head_fn, kernel=kernel, bias=bias)
        unfitted = cls(det, 0.0, tpr, convention, state=state)
        values = unfitted.scores(logits, features=features, head_fn=head_fn, kernel=kernel,
                                 bias=bias)  # fmt: skip
        threshold = fit_threshold(values, tpr=tpr, in_mask=mask)
        return cls(det, float(threshold), tpr, convention, state=state)

    # -- scoring -----------------------------------------------------------------------------

    def scores(
        self,
        logits: jax.typing.ArrayLike | None = None,
        *,
        features: jax.typing.ArrayLike | None = None,
        head_fn: Callable | None = None,
        kernel: jax.typing.ArrayLike | None = None,
        bias: jax.typing.ArrayLike | None = None,
    ) -> jax.Array:
        """Scores of one input (``[C]`` logits, ``[D]`` features: a scalar) or a batch (``[B]``).

        Higher = more in-distribution. ``logits`` may be passed positionally (logit scores).
        """
        inputs = {"logits": logits, "features": features}
        single = None
        for key in _INPUTS:
            if inputs[key] is None:
                continue
            value = validation.as_array(key, inputs[key])
            if value.ndim not in (1, 2):
                width = "num_classes" if key == "logits" else "features"
                raise ValueError(
                    f"`{key}` must be [{width}] (one input) or [batch, {width}]; got shape "
                    f"{tuple(value.shape)}."
                )
            inputs[key] = value[None] if value.ndim == 1 else value
            single = value.ndim == 1 if single is None else single and value.ndim == 1
        out = self.detector.score(self.state, head_fn=head_fn, kernel=kernel, bias=bias, **inputs)
        return out[0] if single else out

    def is_in_distribution(
        self, logits: jax.typing.ArrayLike | None = None, **inputs: Any
    ) -> jax.Array:
        """Bool, a scalar for one input or ``[B]`` for a batch: ``score >= threshold``.

        Takes the inputs of :meth:`scores`.

        Example:
          >>> import jax.numpy as jnp
          >>> from isomax_jax.thresholds import OODDetector
          >>> det = OODDetector("max_probability", threshold=0.9)
          >>> det.is_in_distribution(jnp.array([5.0, 0.0, 0.0]))  # p_max = 0.987
          Array(True, dtype=bool)
          >>> det.is_in_distribution(jnp.array([[5.0, 0.0], [0.1, 0.0]])).tolist()
          [True, False]
        """
        return self.scores(logits, **inputs) >= self.threshold

    def is_ood(self, logits: jax.typing.ArrayLike | None = None, **inputs: Any) -> jax.Array:
        """Bool: ``score < threshold`` (the negation of :meth:`is_in_distribution`)."""
        return jnp.logical_not(self.is_in_distribution(logits, **inputs))

    def evaluate(self, in_data: Any, out_data: Any, **head: Any) -> dict[str, jax.Array]:
        """:func:`isomax_jax.metrics.ood_metrics` of this detector, convention and tpr.

        ``in_data`` / ``out_data``: logits ``[n, C]``, or a mapping of score inputs
        (``{"features": ...}``); ``head`` holds ``head_fn``/``kernel``/``bias`` where needed.
        """
        as_inputs = lambda d: dict(d) if isinstance(d, Mapping) else {"logits": d}  # noqa: E731
        return _metrics.ood_metrics(
            self.scores(**as_inputs(in_data), **head),
            self.scores(**as_inputs(out_data), **head),
            convention=self.convention,
            tpr=self.tpr,
        )

    # -- saving ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict of a detector **without** fitted arrays (logit scores).

        Raises:
          ValueError: the detector has a fitted state (use :meth:`save`).
        """
        if self.state:
            raise ValueError(
                f"`{self.name}` has fitted arrays ({', '.join(sorted(self.state))}): save it with "
                "OODDetector.save(path), which writes them with the threshold."
            )
        return self._meta()

    def _meta(self) -> dict[str, Any]:
        return {
            "format": detector_format.FORMAT,
            "detector": self.name,
            "hyperparameters": detector_format.jsonable(self.detector.hyperparameters),
            "threshold": self.threshold,
            "tpr": self.tpr,
            "convention": self.convention,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], state: chex.ArrayTree | None = None) -> OODDetector:
        """The detector of a :meth:`to_dict` dict (this version's or the first), checked field by
        field (:func:`isomax_jax.detector_format.read_fields`): ``detector`` (or the first
        version's ``score``) and ``threshold`` are required; ``hyperparameters``, ``tpr``,
        ``convention`` and ``format`` may be left out. Strings must be strings and numbers JSON
        numbers: ``"threshold": "0.5"`` or ``true`` is refused.

        Raises:
          ValueError: ``data`` is not a mapping; a required field is missing; a field is
            unknown, of the wrong type or out of range; an unknown ``format``.
        """
        detector, fields = detector_format.read_fields(data)
        return cls(detector, state=state, **fields)

    def to_json(self) -> str:
        """JSON text of a detector without fitted arrays (see :meth:`to_dict`).

        Example:
          >>> from isomax_jax.thresholds import OODDetector
          >>> det = OODDetector("entropic", threshold=-0.25, tpr=0.95)
          >>> OODDetector.from_json(det.to_json()) == det
          True
        """
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> OODDetector:
        """The detector of a :meth:`to_json` text (see :meth:`from_dict` for the checks).

        Raises:
          ValueError: the text is not JSON, or not a valid detector.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"detector JSON cannot be parsed: {e}") from e
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the detector, its fitted arrays and the threshold to one ``.npz`` file.

        The arrays are stored as they are (no pickle); the rest as JSON inside the file
        (:func:`isomax_jax.detector_format.write`). The file is written next to ``path`` and
        renamed into place, so a crash never leaves a partial file under that name.
        """
        detector_format.write(path, self._meta(), self.state)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> OODDetector:
        """The detector a :meth:`save` wrote (``ValueError`` naming the file if it is not one).

        Example:
          >>> import os, tempfile
          >>> import numpy as np
          >>> train = np.abs(np.random.default_rng(0).normal(size=(200, 8))).astype(np.float32)
          >>> det = OODDetector.fit("knn", features=train[:50], train={"features": train})
          >>> path = os.path.join(tempfile.mkdtemp(), "detector.npz")
          >>> det.save(path)
          >>> OODDetector.load(path) == det
          True
        """
        meta, state = detector_format.read(path)
        return cls.from_dict(meta, state=state)

    # -- value semantics ---------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OODDetector):
            return NotImplemented
        same = (self.detector, self.threshold, self.tpr, self.convention) == (
            other.detector, other.threshold, other.tpr, other.convention,
        )  # fmt: skip
        flat = detector_format.flatten
        if not same or set(flat(self.state)) != set(flat(other.state)):
            return False
        try:
            chex.assert_trees_all_equal(self.state, other.state)
        except AssertionError:
            return False
        return True

    # Unhashable (holds arrays): the data model's `__hash__ = None`, which typeshed's
    # `object.__hash__` signature does not admit.
    __hash__ = None  # pyright: ignore[reportAssignmentType]

    def __repr__(self) -> str:
        state = {k: f"{tuple(np.shape(v))} {np.asarray(v).dtype}" for k, v in self.state.items()}
        return (
            f"OODDetector(detector={self.detector!r}, threshold={self.threshold!r}, "
            f"tpr={self.tpr!r}, convention={self.convention!r}, state={state})"
        )


def _as_detector(detector: Any) -> _detectors.Detector:
    if isinstance(detector, _detectors.Detector):
        det = detector
    elif isinstance(detector, str):
        det = _detectors.get(detector)
    else:
        raise TypeError(
            f"`detector` must be a detector name (one of {', '.join(_detectors.NAMES)}) or a "
            f"detectors.Detector; got {detector!r}."
        )
    if det.needs_images:
        raise ValueError(
            f"`{det.name}` with eps > 0 perturbs images through the model's gradient; an "
            "OODDetector scores model outputs. Deploy it with eps=0, or score images with "
            f"detectors.get({det.name!r}, ...).score_images."
        )
    return det


def _real(name: str, value: Any) -> float:
    """``float(value)`` for real numbers (also NumPy/JAX scalars); TypeError for str/bool."""
    if isinstance(value, str | bytes | bool) or value is None:
        raise TypeError(f"`{name}` must be a real number; got {value!r}.")
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"`{name}` must be a real number; got {value!r}.") from e


__all__ = ["SCORE_NAMES", "OODDetector", "fit_threshold"]
