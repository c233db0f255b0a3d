"""Per-channel normalisation statistics of the in-distribution sets (docs/recipe.md).

Every evaluation set, OOD sets included, is normalised with the statistics of the
**in-distribution** set the model was trained on.

Example:
  >>> mean, std = normalization_stats("cifar10")
  >>> mean, std
  ((0.491, 0.482, 0.446), (0.247, 0.243, 0.261))
"""

from __future__ import annotations

__all__ = ["IN_DISTRIBUTION_NAMES", "NORMALIZATION", "normalization_stats"]

#: ``name -> (mean, std)``, RGB, for images scaled to [0, 1].
NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.491, 0.482, 0.446), (0.247, 0.243, 0.261)),
    "cifar100": ((0.507, 0.486, 0.440), (0.267, 0.256, 0.276)),
    "svhn": ((0.437, 0.443, 0.472), (0.198, 0.201, 0.197)),
}

#: Names accepted as in-distribution sets (training sets).
IN_DISTRIBUTION_NAMES: tuple[str, ...] = tuple(NORMALIZATION)


def normalization_stats(
    name: str,
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Returns ``(mean, std)`` (RGB, for [0, 1] images) of an in-distribution set.

    Args:
      name: one of ``"cifar10"``, ``"cifar100"``, ``"svhn"``.

    Raises:
      ValueError: unknown name.
    """
    if name not in NORMALIZATION:
        raise ValueError(
            f"in_distribution={name!r} is not an in-distribution set; expected one of "
            f"{list(IN_DISTRIBUTION_NAMES)}"
        )
    return NORMALIZATION[name]
