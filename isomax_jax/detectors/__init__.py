"""Post-hoc OOD detectors with one pure API: ``get(name) -> fit -> score``.

Example:
  >>> import numpy as np
  >>> from isomax_jax import detectors
  >>> rng = np.random.default_rng(0)
  >>> train = rng.normal(size=(200, 8)).astype(np.float32)
  >>> labels = np.arange(200) % 4
  >>> det = detectors.get("mahalanobis")
  >>> det.name, det.title, sorted(det.inputs), det.needs_images, det.applies_to("isomax_plus")
  ('mahalanobis', 'Mahalanobis', ['features', 'labels'], False, True)
  >>> state = det.fit(features=train, labels=labels)  # a pytree of arrays
  >>> det.score(state, features=train[:3]).shape  # [B], higher = more in-distribution
  (3,)
  >>> detectors.get("knn", k=5).score(detectors.get("knn", k=5).fit(features=train),
  ...                                 features=train[:2]).dtype
  dtype('float32')

Every detector (see ``docs/detectors.md`` for formulas, papers, defaults and the deviations from
pytorch-ood 0.4.0):

=======================  ===========  ==============================  =========================
name                     title        inputs (fit + score)            applies to heads
=======================  ===========  ==============================  =========================
msp                      MPS          logits                          all
max_logit                MaxLogit     logits                          softmax
energy                   energy       logits                          all
gen                      GEN          logits                          all
entropic                 ES           logits                          all
min_distance             MDS          logits                          isomax, isomax_plus, dismax
mmls                     MMLS         logits                          isomax, isomax_plus, dismax
mmles                    MMLES        logits                          isomax, isomax_plus, dismax
odin                     ODIN         images (logits when eps=0)      all
mahalanobis              Mahalanobis  features, labels                all
relative_mahalanobis     RMD          features, labels                all
knn                      KNN          features                        all
vim                      ViM          features, kernel, bias          softmax
react                    ReAct        features, head_fn               all
ash                      ASH          features, head_fn               all
scale                    SCALE        features, head_fn               softmax, isomax
dice                     DICE         features, kernel, bias          softmax
fdbd                     fDBD         features, kernel, logits        softmax
gradnorm                 GradNorm     features, logits                softmax
weighted_ebo             WeightedEBO  logits                          all
kl_matching              KL-Matching  logits                          all
she                      SHE          features, logits, labels        all
nnguide                  NNGuide      features, logits                softmax
gmm                      GMM          features, labels                all
=======================  ===========  ==============================  =========================
"""

from __future__ import annotations

import dataclasses
from typing import Any

from isomax_jax.detectors import (
    activation,
    feature,
    knn,
    logit,
    mixture,
    patterns,
    perturbation,
    vim,
    weights,
)
from isomax_jax.detectors.base import HEADS as HEADS
from isomax_jax.detectors.base import INPUT_NAMES as INPUT_NAMES
from isomax_jax.detectors.base import Detector as Detector

_CLASSES = (
    logit.DETECTORS
    + perturbation.DETECTORS
    + feature.DETECTORS
    + knn.DETECTORS
    + vim.DETECTORS
    + activation.DETECTORS
    + weights.DETECTORS
    + patterns.DETECTORS
    + mixture.DETECTORS
)
_REGISTRY: dict[str, type[Detector]] = {cls.name: cls for cls in _CLASSES}

NAMES: tuple[str, ...] = tuple(_REGISTRY)
"""Every registered detector name, in table order."""

ALIASES: dict[str, str] = {"max_probability": "msp"}
"""Other names accepted by :func:`get`: ``max_probability`` is the function of
:mod:`isomax_jax.scores` for ``msp`` (whose report title is the IsoMax papers' "MPS")."""


def hyperparameters(name: str) -> dict[str, object]:
    """The hyperparameters of detector ``name`` and their defaults (the papers' defaults)."""
    cls = _lookup(name)
    return {f.name: f.default for f in dataclasses.fields(cls)}


def get(name: str, **hparams: Any) -> Detector:
    """The detector ``name`` with hyperparameters ``hparams`` (defaults: the papers').

    Raises:
      ValueError: unknown ``name`` (the message lists :data:`NAMES`), an unknown hyperparameter
        (the message lists the valid ones) or an invalid value (the message names it).

    Example:
      >>> get("energy", temperature=2.0)
      Energy(temperature=2.0)
      >>> get("energi")
      Traceback (most recent call last):
      ...
      ValueError: unknown detector 'energi'; valid names: msp, max_logit, energy, ...
    """
    cls = _lookup(name)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise ValueError(
            f"`{unknown[0]}` is not a hyperparameter of detector {name!r}; valid: "
            f"{', '.join(valid) if valid else 'none'}."
        )
    return cls(**hparams)


def _lookup(name: str) -> type[Detector]:
    name = ALIASES.get(name, name) if isinstance(name, str) else name
    if name not in _REGISTRY:
        raise ValueError(f"unknown detector {name!r}; valid names: {', '.join(NAMES)}.")
    return _REGISTRY[name]


__all__ = ["ALIASES", "HEADS", "INPUT_NAMES", "NAMES", "Detector", "get", "hyperparameters"]
