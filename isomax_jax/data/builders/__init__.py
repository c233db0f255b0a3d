"""TFDS builders of the OOD benchmark sets, registered with tfds when this package is imported.

``tfds.builder("isomax_tiny_imagenet_resize", data_dir=...)`` etc. work once
``isomax_jax.data`` has been imported. Each builder has one ``test`` split of uint8
``[32, 32, 3]`` images; see :mod:`.odin` and :mod:`.far_ood` for sources and preprocessing.
"""

from isomax_jax.data.builders.base import ImageError, OODBuilder
from isomax_jax.data.builders.far_ood import (
    IsomaxGaussianNoise,
    IsomaxMnist,
    IsomaxOmniglot,
    IsomaxTextures,
    IsomaxUniformNoise,
)
from isomax_jax.data.builders.odin import (
    IsomaxIsun,
    IsomaxLsunCrop,
    IsomaxLsunResize,
    IsomaxTinyImagenetCrop,
    IsomaxTinyImagenetResize,
)

#: tfds name -> builder class, for every OOD builder of the package.
OOD_BUILDERS: dict[str, type[OODBuilder]] = {
    cls.name: cls
    for cls in (
        IsomaxTinyImagenetResize,
        IsomaxTinyImagenetCrop,
        IsomaxLsunResize,
        IsomaxLsunCrop,
        IsomaxIsun,
        IsomaxMnist,
        IsomaxOmniglot,
        IsomaxTextures,
        IsomaxGaussianNoise,
        IsomaxUniformNoise,
    )
}

__all__ = [
    "OOD_BUILDERS",
    "ImageError",
    "OODBuilder",
    *sorted(c.__name__ for c in OOD_BUILDERS.values()),
]
