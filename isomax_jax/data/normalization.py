"""Per-channel normalisation statistics: of the 32-px in-distribution sets, of model families.

32-px sets (docs/recipe.md): every evaluation set, OOD sets included, is normalised with the
statistics of the **in-distribution** set the model was trained on.

224-px (ImageNet-scale) sets are normalised with the statistics of the **model family**, i.e. those
its weights were trained with (:data:`FAMILY_NORMALIZATION`): ``torchvision`` (every ``tv_*``
model: torchvision's ImageNet weights, and the Flax ImageNet example, use the ImageNet mean/std)
or ``inception`` (``[-1, 1]``: big_vision / timm ViT checkpoints).

Example:
  >>> mean, std = normalization_stats("cifar10")
  >>> mean, std
  ((0.491, 0.482, 0.446), (0.247, 0.243, 0.261))
  >>> family_normalization_stats("tv_resnet50")
  ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
"""

from __future__ import annotations

__all__ = [
    "FAMILY_NORMALIZATION",
    "IMAGENET_MEAN_STD",
    "IN_DISTRIBUTION_NAMES",
    "NORMALIZATION",
    "family_normalization_stats",
    "normalization_stats",
]

Stats = tuple[tuple[float, float, float], tuple[float, float, float]]

#: ``name -> (mean, std)``, RGB, for images scaled to [0, 1].
NORMALIZATION: dict[str, Stats] = {
    "cifar10": ((0.491, 0.482, 0.446), (0.247, 0.243, 0.261)),
    "cifar100": ((0.507, 0.486, 0.440), (0.267, 0.256, 0.276)),
    "svhn": ((0.437, 0.443, 0.472), (0.198, 0.201, 0.197)),
}

#: Names accepted as in-distribution sets (training sets).
IN_DISTRIBUTION_NAMES: tuple[str, ...] = tuple(NORMALIZATION)


def normalization_stats(name: str) -> Stats:
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


#: ImageNet-1K train-set mean/std (RGB, [0, 1] scale), as torchvision's weights use them.
IMAGENET_MEAN_STD: Stats = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

#: Model family -> ``(mean, std)`` of the 224-px inputs its weights expect (RGB, [0, 1] scale).
FAMILY_NORMALIZATION: dict[str, Stats] = {
    "torchvision": IMAGENET_MEAN_STD,
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

#: Model-name prefix -> family (``tv_resnet50`` -> ``torchvision``).
_FAMILY_PREFIXES: dict[str, str] = {"tv_": "torchvision"}


def family_normalization_stats(model_or_family: str) -> Stats:
    """``(mean, std)`` of a 224-px model family, given the family or a model name.

    Args:
      model_or_family: a family of :data:`FAMILY_NORMALIZATION` (``"torchvision"``,
        ``"inception"``) or a model name with a known prefix (``tv_*`` -> ``torchvision``).

    Raises:
      ValueError: neither a family nor a model of a known family.
    """
    if model_or_family in FAMILY_NORMALIZATION:
        return FAMILY_NORMALIZATION[model_or_family]
    for prefix, family in _FAMILY_PREFIXES.items():
        if isinstance(model_or_family, str) and model_or_family.startswith(prefix):
            return FAMILY_NORMALIZATION[family]
    raise ValueError(
        f"normalization={model_or_family!r} is neither a model family "
        f"{list(FAMILY_NORMALIZATION)} nor a model of one (prefixes {list(_FAMILY_PREFIXES)})"
    )
