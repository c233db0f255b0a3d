"""The ODIN near-OOD sets: TinyImageNet (resize, crop), LSUN (resize, crop), iSUN.

Sources (in ``manual_dir``, first complete one wins; the ODIN tarballs are downloaded otherwise):

* ODIN tarballs (Liang et al., 2018, github.com/facebookresearch/odin): ``Imagenet_resize.tar.gz``,
  ``Imagenet.tar.gz`` (crop), ``LSUN_resize.tar.gz``, ``LSUN.tar.gz`` (crop), ``iSUN.tar.gz``.
  Their images are stored as they are; any image larger than 32x32 is centre-cropped to 32x32,
  a smaller one is an error.
* TinyImageNet also from the official ``tiny-imagenet-200.zip`` or its test part
  ``tiny-imagenet-200-test.zip``: the 10,000 test images (64x64, RGB or grey), either downsampled
  64 -> 32 by averaging 2x2 blocks (``resize``) or randomly cropped to 32x32 with offsets drawn
  from ``numpy.random.default_rng(0)`` in sorted-file-name order (``crop``).
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from isomax_jax.data.archives import iter_archive
from isomax_jax.data.builders.base import (
    IMAGE_SIZE,
    OODBuilder,
    SkipsBadImages,
    center_crop,
    to_rgb_array,
)

__all__ = [
    "IsomaxIsun",
    "IsomaxLsunCrop",
    "IsomaxLsunResize",
    "IsomaxTinyImagenetCrop",
    "IsomaxTinyImagenetResize",
]

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_TINY_PREFIX = "tiny-imagenet-200/test/images/"
_TINY_ZIPS = (("tiny-imagenet-200.zip",), ("tiny-imagenet-200-test.zip",))
_ODIN_HOME = "https://github.com/facebookresearch/odin"
CROP_SEED = 0


def odin_images(
    path: pathlib.Path, builder: SkipsBadImages | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Images of an ODIN tarball as uint8 ``[32, 32, 3]`` (larger ones centre-cropped); a bad
    file is an error, or skipped by a ``builder`` with ``skip_bad_images``."""
    builder = builder or SkipsBadImages()
    count = 0
    for name, data in iter_archive(path, suffixes=_IMAGE_SUFFIXES):
        where = f"{path}:{name}"
        image = builder.read_image(data, where=where, modes=("RGB", "L"), min_size=IMAGE_SIZE)
        if image is None:
            continue
        count += 1
        yield name, center_crop(to_rgb_array(image))
    if not count:
        raise builder.no_images(str(path), "no .jpg/.png images found in the archive")


def tiny_imagenet_test_images(
    path: pathlib.Path, builder: SkipsBadImages | None = None
) -> Iterator[tuple[str, Image.Image]]:
    """The 64x64 test images of a ``tiny-imagenet-200[-test].zip``, sorted by member name; a
    bad file is an error, or skipped by a ``builder`` with ``skip_bad_images``."""
    builder = builder or SkipsBadImages()
    count = 0
    for name, data in iter_archive(path, suffixes=(".jpeg", ".jpg"), prefix=_TINY_PREFIX):
        where = f"{path}:{name}"
        image = builder.read_image(data, where=where, modes=("RGB", "L"), size=(64, 64))
        if image is None:
            continue
        count += 1
        yield name, image
    if not count:
        raise builder.no_images(str(path), f"no images under {_TINY_PREFIX!r} in the archive")


def downsample_2x(array: np.ndarray) -> np.ndarray:
    """uint8 ``[2H, 2W, C]`` -> ``[H, W, C]`` by the rounded mean of each 2x2 block."""
    a = array.astype(np.uint16)
    blocks = a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]
    return ((blocks + 2) // 4).astype(np.uint8)


class _TinyImagenet(OODBuilder, skip_registration=True):
    MANUAL_SUBDIR = "tiny_imagenet"
    HOMEPAGE = _ODIN_HOME

    def _images(self, paths: Sequence[pathlib.Path]) -> Iterator[tuple[str, np.ndarray]]:
        (path,) = paths
        if "tiny-imagenet-200" not in path.name:  # an ODIN tarball (or a download of one)
            yield from odin_images(path, self)
            return
        yield from self._from_test_images(tiny_imagenet_test_images(path, self))

    def _from_test_images(self, images):
        raise NotImplementedError


class IsomaxTinyImagenetResize(_TinyImagenet):
    """TinyImageNet (resize): the 10,000 TinyImageNet test images downsampled to 32x32."""

    name = "isomax_tiny_imagenet_resize"
    SOURCES = (("Imagenet_resize.tar.gz",), *_TINY_ZIPS)
    DOWNLOAD_URLS = ("https://www.dropbox.com/s/kp3my3412u5k9rl/Imagenet_resize.tar.gz?dl=1",)
    DESCRIPTION = __doc__

    def _from_test_images(self, images):
        for name, image in images:
            yield name, downsample_2x(to_rgb_array(image))


class IsomaxTinyImagenetCrop(_TinyImagenet):
    """TinyImageNet (crop): random 32x32 crops (fixed seed) of the 10,000 test images."""

    name = "isomax_tiny_imagenet_crop"
    SOURCES = (("Imagenet.tar.gz",), *_TINY_ZIPS)
    DOWNLOAD_URLS = ("https://www.dropbox.com/s/avgm2u562itwpkl/Imagenet.tar.gz?dl=1",)
    DESCRIPTION = __doc__

    def _from_test_images(self, images):
        rng = np.random.default_rng(CROP_SEED)
        for name, image in images:
            top, left = rng.integers(0, 64 - IMAGE_SIZE + 1, size=2)
            array = to_rgb_array(image)
            yield name, array[top : top + IMAGE_SIZE, left : left + IMAGE_SIZE]


class _OdinTarball(OODBuilder, skip_registration=True):
    HOMEPAGE = _ODIN_HOME

    def _images(self, paths: Sequence[pathlib.Path]) -> Iterator[tuple[str, np.ndarray]]:
        (path,) = paths
        yield from odin_images(path, self)


class IsomaxLsunResize(_OdinTarball):
    """LSUN (resize): 10,000 LSUN test images downsampled to 32x32 (ODIN tarball)."""

    name = "isomax_lsun_resize"
    SOURCES = (("LSUN_resize.tar.gz",),)
    MANUAL_SUBDIR = "lsun"
    DOWNLOAD_URLS = ("https://www.dropbox.com/s/moqh2wh8696c3yl/LSUN_resize.tar.gz?dl=1",)
    DESCRIPTION = __doc__


class IsomaxLsunCrop(_OdinTarball):
    """LSUN (crop): 10,000 random crops of LSUN test images (ODIN tarball)."""

    name = "isomax_lsun_crop"
    SOURCES = (("LSUN.tar.gz",),)
    MANUAL_SUBDIR = "lsun"
    DOWNLOAD_URLS = ("https://www.dropbox.com/s/fhtsw1m3qxlwj6h/LSUN.tar.gz?dl=1",)
    DESCRIPTION = __doc__


class IsomaxIsun(_OdinTarball):
    """iSUN: 8,925 SUN scene images downsampled to 32x32 (ODIN tarball)."""

    name = "isomax_isun"
    SOURCES = (("iSUN.tar.gz",),)
    MANUAL_SUBDIR = "isun"
    DOWNLOAD_URLS = ("https://www.dropbox.com/s/ssz7qxfqae0cca5/iSUN.tar.gz?dl=1",)
    DESCRIPTION = __doc__
