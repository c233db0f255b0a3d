"""Detectors that store training patterns: class prototypes, neighbours, mixtures (issue 17.5)."""

from __future__ import annotations

DETECTORS: tuple = ()
