"""Far-OOD sets: MNIST, Omniglot, Textures (DTD), Gaussian and uniform noise.

Preprocessing (fixed at build time, documented here because it changes the numbers):

* MNIST test (10,000): the 28x28 grey digits zero-padded by 2 pixels to 32x32 (no interpolation,
  the LeNet-5 convention), grey copied to the three channels. The same transform is applied when
  MNIST is read from a prepared TFDS ``mnist`` instead (see :mod:`isomax_jax.data.pipelines`).
* Omniglot ``images_background_small1`` + ``small2`` (5,840 binary 105x105 PNGs): resized to 32x32
  with PIL bilinear (antialiased) filtering, grey copied to three channels.
* Textures (DTD ``dtd/images/<class>/*.jpg``, the full set or a subset): shorter side resized to 32
  (PIL bilinear), then centre-cropped to 32x32.
* Gaussian noise (10,000): i.i.d. N(0.5, 1) per value, clipped to [0, 1]; uniform noise (10,000):
  U[0, 1] -- both as in ODIN -- quantised to uint8 by rounding ``255 x``; seeds fixed.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from isomax_jax.data.archives import iter_archive, read_gzip
from isomax_jax.data.builders.base import (
    IMAGE_SIZE,
    ImageError,
    OODBuilder,
    center_crop,
    to_rgb_array,
)

__all__ = [
    "IsomaxGaussianNoise",
    "IsomaxMnist",
    "IsomaxOmniglot",
    "IsomaxTextures",
    "IsomaxUniformNoise",
    "pad_mnist",
    "parse_idx_images",
]

NUM_NOISE_IMAGES = 10_000


def parse_idx_images(data: bytes, *, where: str) -> np.ndarray:
    """IDX3 (MNIST image file) bytes -> uint8 ``[N, rows, cols]``; errors name ``where``."""
    if len(data) < 16 or int.from_bytes(data[:4], "big") != 0x00000803:
        raise ImageError(f"{where}: not an IDX3 uint8 image file (bad header)")
    n, rows, cols = (int.from_bytes(data[i : i + 4], "big") for i in (4, 8, 12))
    if len(data) != 16 + n * rows * cols:
        raise ImageError(
            f"{where}: truncated or oversized IDX file: {len(data) - 16} pixel bytes for "
            f"{n} images of {rows}x{cols}"
        )
    if (rows, cols) != (28, 28):
        raise ImageError(f"{where}: images are {rows}x{cols}, expected 28x28")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows, cols)


def pad_mnist(images: np.ndarray) -> np.ndarray:
    """uint8 ``[..., 28, 28]`` -> ``[..., 32, 32, 3]``: zero-pad 2 px, grey to three channels."""
    pad = [(0, 0)] * (images.ndim - 2) + [(2, 2), (2, 2)]
    padded = np.pad(images, pad)
    return np.repeat(padded[..., None], 3, axis=-1)


class IsomaxMnist(OODBuilder):
    """MNIST test digits (10,000) as 32x32 RGB far-OOD images, from the raw IDX file."""

    name = "isomax_mnist"
    SOURCES = (("t10k-images-idx3-ubyte.gz",),)
    MANUAL_SUBDIR = "mnist"
    DOWNLOAD_URLS = (
        "https://storage.googleapis.com/cvdf-datasets/mnist/t10k-images-idx3-ubyte.gz",
    )
    HOMEPAGE = "http://yann.lecun.com/exdb/mnist/"
    DESCRIPTION = __doc__

    def _images(self, paths: Sequence[pathlib.Path]) -> Iterator[tuple[str, np.ndarray]]:
        (path,) = paths
        images = parse_idx_images(read_gzip(path), where=str(path))
        padded = pad_mnist(images)
        for i in range(padded.shape[0]):
            yield f"{i:05d}", padded[i]


class IsomaxOmniglot(OODBuilder):
    """Omniglot background-small1 + small2 characters (5,840) as 32x32 RGB far-OOD images."""

    name = "isomax_omniglot"
    SOURCES = (("images_background_small1.zip", "images_background_small2.zip"),)
    MANUAL_SUBDIR = "omniglot"
    DOWNLOAD_URLS = tuple(
        f"https://github.com/brendenlake/omniglot/raw/master/python/images_background_small{i}.zip"
        for i in (1, 2)
    )
    HOMEPAGE = "https://github.com/brendenlake/omniglot"
    DESCRIPTION = __doc__

    def _images(self, paths: Sequence[pathlib.Path]) -> Iterator[tuple[str, np.ndarray]]:
        for path in paths:
            count = 0
            for name, data in iter_archive(path, suffixes=(".png",)):
                where = f"{path}:{name}"
                image = self.read_image(data, where=where, modes=("1", "L"), size=(105, 105))
                if image is None:
                    continue
                # Image.BILINEAR is Image.Resampling.BILINEAR; Pillow's stubs declare the enum only.
                small = image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)  # pyright: ignore[reportAttributeAccessIssue]
                count += 1
                yield f"{path.name}/{name}", to_rgb_array(small)
            if not count:
                raise self.no_images(str(path), "no .png images found in the archive")


class IsomaxTextures(OODBuilder):
    """Describable Textures (DTD) images, shorter side resized to 32 then centre-cropped."""

    name = "isomax_textures"
    SOURCES = (("dtd-r1.0.1.tar.gz",), ("dtd-subset.zip",))
    MANUAL_SUBDIR = "dtd"
    DOWNLOAD_URLS = ("https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",)
    HOMEPAGE = "https://www.robots.ox.ac.uk/~vgg/data/dtd/"
    DESCRIPTION = __doc__

    def _images(self, paths: Sequence[pathlib.Path]) -> Iterator[tuple[str, np.ndarray]]:
        (path,) = paths
        count = 0
        for name, data in iter_archive(path, suffixes=(".jpg",), prefix="dtd/images/"):
            where = f"{path}:{name}"
            image = self.read_image(data, where=where, modes=("RGB", "L"), min_size=IMAGE_SIZE)
            if image is None:
                continue
            w, h = image.size
            scale = IMAGE_SIZE / min(w, h)
            new_size = (max(IMAGE_SIZE, round(w * scale)), max(IMAGE_SIZE, round(h * scale)))
            # Image.BILINEAR is Image.Resampling.BILINEAR; Pillow's stubs declare the enum only.
            resized = image.convert("RGB").resize(new_size, Image.BILINEAR)  # pyright: ignore[reportAttributeAccessIssue]
            count += 1
            yield name, center_crop(to_rgb_array(resized))
        if not count:
            raise self.no_images(str(path), "no images under 'dtd/images/' in the archive")


class _Noise(OODBuilder, skip_registration=True):
    SEED = 0
    HOMEPAGE = "https://arxiv.org/abs/1706.02690"

    def _noise(self, rng: np.random.Generator, shape) -> np.ndarray:
        raise NotImplementedError

    def _images(self, paths: Sequence[pathlib.Path]) -> Iterator[tuple[str, np.ndarray]]:
        del paths  # generated, no source files
        rng = np.random.default_rng(self.SEED)
        for start in range(0, NUM_NOISE_IMAGES, 1000):
            values = self._noise(rng, (1000, IMAGE_SIZE, IMAGE_SIZE, 3))
            arrays = np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
            for i in range(arrays.shape[0]):
                yield f"{start + i:05d}", arrays[i]


class IsomaxGaussianNoise(_Noise):
    """10,000 images of i.i.d. N(0.5, 1) values clipped to [0, 1] (seed 0), as in ODIN."""

    name = "isomax_gaussian_noise"
    SEED = 0
    DESCRIPTION = __doc__

    def _noise(self, rng, shape):
        return rng.normal(0.5, 1.0, size=shape)


class IsomaxUniformNoise(_Noise):
    """10,000 images of i.i.d. U[0, 1] values (seed 1), as in ODIN."""

    name = "isomax_uniform_noise"
    SEED = 1
    DESCRIPTION = __doc__

    def _noise(self, rng, shape):
        return rng.uniform(0.0, 1.0, size=shape)
