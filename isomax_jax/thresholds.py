"""Deployment thresholds: classify single inputs as in-distribution or OOD.

The most frequent question from users of the reference code is how to turn a score into a
decision for one input. The answer (``docs/metrics.md``): fit a threshold on *in-distribution
validation* scores at a target true-positive rate, and store it with the model.
:func:`fit_threshold` does the first; :class:`OODDetector` is the small serialisable object
(score name + threshold + target TPR + metric convention) that classifies single inputs or batches
from logits and can be saved next to a checkpoint as JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from isomax_jax import detectors as _detectors
from isomax_jax import metrics as _metrics

#: Older names of the same scores (the function names of :mod:`isomax_jax.scores`).
_ALIASES = {"max_probability": "msp"}
#: Every score a threshold can be fitted on: the detectors of :mod:`isomax_jax.detectors` that
#: need nothing but logits (so a new logit detector is available here with no change), plus
#: the aliases above.
SCORE_NAMES: tuple[str, ...] = tuple(
    name
    for name in _detectors.NAMES
    if _detectors.get(name).inputs == {"logits"} and not _detectors.get(name).needs_images
) + tuple(_ALIASES)
_FORMAT = "isomax_jax.OODDetector/1"


@functools.partial(jax.jit, static_argnames="score")
def _apply_score(logits, *, score):
    return _detectors.get(_ALIASES.get(score, score)).score({}, logits=logits)


@jax.jit
def _fit(scores, mask, tpr):
    dtype = scores.dtype
    tpr = jnp.asarray(tpr, dtype)
    scores, mask, tpr = lax.optimization_barrier((scores, mask, tpr))  # see metrics._ood_metrics
    n = jnp.sum(mask, dtype=jnp.int32)
    ok = jnp.all(jnp.isfinite(scores) | ~mask) & (n > 0) & (tpr > 0) & (tpr < 1)
    m = _metrics._first_count_reaching(jnp.maximum(n, 1), tpr, dtype)  # accept >= m of n
    ascending = jnp.sort(jnp.where(mask, scores, -jnp.inf))  # padding first
    threshold = ascending[jnp.clip(scores.shape[0] - m, 0, scores.shape[0] - 1)]
    return jnp.where(ok, threshold, jnp.nan)


def fit_threshold(
    in_scores: jax.typing.ArrayLike,
    *,
    tpr: float | jax.typing.ArrayLike = 0.95,
    in_mask: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """Threshold that accepts a fraction ``tpr`` of in-distribution validation inputs.

    An input is classified in-distribution when ``score >= threshold``. The threshold is the
    ``m``-th largest validation score, with ``m`` the smallest count such that ``m / n >= tpr``:
    the largest threshold that accepts at least ``tpr`` of the ``n`` validation scores (exactly
    ``m`` of them without ties; ties at the threshold are all accepted).

    Args:
      in_scores: [n] float in-distribution validation scores (higher = more in-distribution).
      tpr: target fraction of in-distribution inputs to accept, in (0, 1).
      in_mask: optional [n] boolean mask; False marks padding.

    Returns:
      A float scalar (float32, or float64 for float64 input with x64). Under ``jit``, NaN for
      NaN/inf unmasked scores, an all-masked set or ``tpr`` outside (0, 1).

    Raises:
      TypeError, ValueError: as :func:`isomax_jax.metrics.ood_metrics` for the same inputs.

    Example:
      >>> import jax.numpy as jnp
      >>> from isomax_jax.thresholds import fit_threshold
      >>> fit_threshold(jnp.arange(20.0), tpr=0.95)  # 19 of 20 scores are >= 1
      Array(1., dtype=float32)
    """
    scores, mask = _metrics._prepare(in_scores, in_mask, "in_scores", "in_mask")
    _metrics._check_tpr(tpr)
    if _metrics._is_concrete(scores, mask):
        _metrics._check_values(scores, mask, "in_scores", "in_mask")
    return _fit(scores, mask, tpr)


@dataclasses.dataclass(frozen=True)
class OODDetector:
    """A fitted OOD detector: one score function and one threshold.

    ``is_in_distribution(logits)`` is ``score(logits) >= threshold``. Create it with
    :meth:`fit` on in-distribution validation logits, save it with :meth:`to_json` (or
    :meth:`to_dict` inside a checkpoint's metadata) and restore it with :meth:`from_json`.

    Attributes:
      score: name of a function of :mod:`isomax_jax.scores` (``"entropic"``, ``"mmles"``, ...).
      threshold: scores ``>=`` this are in-distribution.
      tpr: the in-distribution acceptance rate the threshold was fitted for.
      convention: metric convention (``"reference"`` or ``"openood"``) that :meth:`evaluate`
        uses to report this detector's numbers on labelled data.
    """

    score: str
    threshold: float
    tpr: float = 0.95
    convention: str = "reference"

    def __post_init__(self):
        for name in ("score", "convention"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str, got {getattr(self, name)!r}")
        if self.score not in SCORE_NAMES:
            raise ValueError(f"score must be one of {SCORE_NAMES}, got {self.score!r}")
        if self.convention not in _metrics.CONVENTIONS:
            raise ValueError(
                f"convention must be one of {_metrics.CONVENTIONS}, got {self.convention!r}"
            )
        object.__setattr__(self, "threshold", _real("threshold", self.threshold))
        object.__setattr__(self, "tpr", _real("tpr", self.tpr))
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be finite, got {self.threshold}")
        if not 0.0 < self.tpr < 1.0:
            raise ValueError(f"tpr must be in (0, 1), got {self.tpr}")

    @classmethod
    def fit(
        cls,
        score: str,
        logits: jax.typing.ArrayLike,
        *,
        tpr: float = 0.95,
        convention: str = "reference",
        mask: jax.typing.ArrayLike | None = None,
    ) -> OODDetector:
        """Fits the threshold on in-distribution validation logits [n, num_classes]."""
        if score not in SCORE_NAMES:
            raise ValueError(f"score must be one of {SCORE_NAMES}, got {score!r}")
        values = _apply_score(jnp.asarray(logits), score=score)
        threshold = fit_threshold(values, tpr=tpr, in_mask=mask)
        return cls(score=score, threshold=float(threshold), tpr=tpr, convention=convention)

    def scores(self, logits: jax.typing.ArrayLike) -> jax.Array:
        """Scores of one input ([num_classes] -> scalar) or a batch ([B, C] -> [B])."""
        logits = jnp.asarray(logits)
        if logits.ndim == 1:
            return _apply_score(logits[None], score=self.score)[0]
        if logits.ndim != 2:
            raise ValueError(
                f"logits must be [num_classes] or [batch, num_classes], got shape {logits.shape}"
            )
        return _apply_score(logits, score=self.score)

    def is_in_distribution(self, logits: jax.typing.ArrayLike) -> jax.Array:
        """Bool, scalar for one input ([C]) or [B] for a batch: ``score >= threshold``.

        Example:
          >>> import jax.numpy as jnp
          >>> from isomax_jax.thresholds import OODDetector
          >>> det = OODDetector(score="max_probability", threshold=0.9)
          >>> det.is_in_distribution(jnp.array([5.0, 0.0, 0.0]))  # p_max = 0.987
          Array(True, dtype=bool)
          >>> det.is_in_distribution(jnp.array([[5.0, 0.0], [0.1, 0.0]])).tolist()
          [True, False]
        """
        return self.scores(logits) >= self.threshold

    def is_ood(self, logits: jax.typing.ArrayLike) -> jax.Array:
        """Bool: ``score < threshold`` (the negation of :meth:`is_in_distribution`)."""
        return jnp.logical_not(self.is_in_distribution(logits))

    def evaluate(
        self, in_logits: jax.typing.ArrayLike, out_logits: jax.typing.ArrayLike
    ) -> dict[str, jax.Array]:
        """:func:`isomax_jax.metrics.ood_metrics` of this score, convention and tpr."""
        return _metrics.ood_metrics(
            self.scores(in_logits),
            self.scores(out_logits),
            convention=self.convention,
            tpr=self.tpr,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict (the threshold is a Python float: exact round trip)."""
        return {"format": _FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OODDetector:
        """The detector of a :meth:`to_dict` dict, validated field by field.

        ``score`` and ``threshold`` are required; ``tpr``, ``convention`` and ``format`` may be
        left out (defaults ``0.95``, ``"reference"`` and the current format). Strings must be
        strings and numbers JSON numbers: ``"threshold": "0.5"`` or ``true`` is refused.

        Raises:
          ValueError: ``data`` is not a mapping; a required field is missing; a field is unknown,
            of the wrong type or out of range; an unknown ``format``.
        """
        if not isinstance(data, Mapping):
            raise ValueError(
                f"a detector must be a JSON object / mapping of its fields, got "
                f"{type(data).__name__}"
            )
        data = dict(data)
        fmt = data.pop("format", _FORMAT)
        if fmt != _FORMAT:
            raise ValueError(f"unknown detector format {fmt!r}, expected {_FORMAT!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(data) - set(fields)
        if unknown:
            raise ValueError(
                f"unknown detector fields {sorted(unknown)}; expected {sorted(fields)}"
            )
        missing = [
            name
            for name, field in fields.items()
            if name not in data and field.default is dataclasses.MISSING
        ]
        if missing:
            raise ValueError(f"detector field(s) {missing} missing; got fields {sorted(data)}")
        for name, value in data.items():
            kind = str if name in ("score", "convention") else float
            ok = isinstance(value, str) if kind is str else _is_json_number(value)
            if not ok:
                expected = "a string" if kind is str else "a number"
                raise ValueError(
                    f"detector field {name!r} must be {expected}, got {value!r} "
                    f"({type(value).__name__})"
                )
        return cls(**data)

    def to_json(self) -> str:
        """JSON text, e.g. to store next to a checkpoint.

        Example:
          >>> from isomax_jax.thresholds import OODDetector
          >>> det = OODDetector(score="entropic", threshold=-0.25, tpr=0.95)
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


def _is_json_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _real(name: str, value: Any) -> float:
    """``float(value)`` for real numbers (also NumPy/JAX scalars); TypeError for str/bool."""
    if isinstance(value, str | bytes | bool) or value is None:
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a real number, got {value!r}") from e
