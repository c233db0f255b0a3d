"""TFDS builders of the OOD benchmark sets, registered with tfds when this package is imported.

``tfds.builder("isomax_tiny_imagenet_resize", data_dir=...)`` etc. work once
``isomax_jax.data`` has been imported. Two registries:

* :data:`OOD_BUILDERS`, the CIFAR benchmark's sets: one ``test`` split of uint8 ``[32, 32, 3]``
  images, preprocessed at build time (see :mod:`.odin` and :mod:`.far_ood`); read by
  :func:`isomax_jax.data.eval_dataset`.
* :data:`IMAGENET_OOD_BUILDERS`, the ImageNet-scale sets (OpenOOD v1.5, ImageNet-O): one ``test``
  split of variable-size encoded images, resized and cropped to 224 px only when read (see
  :mod:`.imagenet_ood`); read by :func:`isomax_jax.data.imagenet_eval_dataset`. A separate
  registry because everything that consults :data:`OOD_BUILDERS` (the 32-px pipeline, its
  availability checks) assumes 32x32 images and archive sources.
"""

from isomax_jax.data.builders.base import ImageError, OODBuilder
from isomax_jax.data.builders.far_ood import (
    IsomaxGaussianNoise,
    IsomaxMnist,
    IsomaxOmniglot,
    IsomaxTextures,
    IsomaxUniformNoise,
)
from isomax_jax.data.builders.imagenet_ood import (
    ImageFolderBuilder,
    IsomaxImagenetO,
    IsomaxInaturalist,
    IsomaxNinco,
    IsomaxOpenimageO,
    IsomaxOpenoodTextures,
    IsomaxSsbHard,
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

#: tfds name -> builder class, for the ImageNet-scale (224-px) OOD builders.
IMAGENET_OOD_BUILDERS: dict[str, type[ImageFolderBuilder]] = {
    cls.name: cls
    for cls in (
        IsomaxSsbHard,
        IsomaxNinco,
        IsomaxInaturalist,
        IsomaxOpenoodTextures,
        IsomaxOpenimageO,
        IsomaxImagenetO,
    )
}

__all__ = [
    "IMAGENET_OOD_BUILDERS",
    "OOD_BUILDERS",
    "ImageError",
    "ImageFolderBuilder",
    "OODBuilder",
    *sorted(c.__name__ for c in (*OOD_BUILDERS.values(), *IMAGENET_OOD_BUILDERS.values())),
]
