"""Common machinery of the OOD builders: sources, image checks, 32x32x3 conversion, PNG encoding.

Every OOD builder stores one split, ``test``, with a single feature ``image`` (uint8
``[32, 32, 3]``, PNG-encoded); the preprocessing of each set (resize, crop, grey -> RGB, padding)
happens once, at build time, so reading needs no further resizing.

A builder lists *sources*: alternative sets of files looked up in ``manual_dir`` (directly or in the
builder's ``MANUAL_SUBDIR``), the first complete one wins; without one it downloads
``DOWNLOAD_URLS`` (only when the caller allows downloads, see :mod:`isomax_jax.data.locate`).

**Bad files.** An image that cannot be decoded (truncated, not an image) or has the wrong mode or
size stops the build with :class:`ImageError` naming the file (``archive:member``). With
``tfds.builder(name, ..., skip_bad_images=True)`` it is skipped instead, with a warning, and
listed in the prepared set's metadata: :func:`skipped_images` reads the list back (a report
counts it). :class:`SkipsBadImages` is that behaviour for any tfds builder (the ImageNet-size
builders too): call :meth:`~SkipsBadImages.read_image` (or :meth:`~SkipsBadImages.bad_image` on
your own decoder's :class:`ImageError`) per file and :meth:`~SkipsBadImages.record_skipped` when
the examples are generated, and give ``_info`` a ``metadata=tfds.core.MetadataDict()``.
"""

from __future__ import annotations

import io
import logging
import os
import pathlib
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

__all__ = [
    "ImageError",
    "OODBuilder",
    "SkipsBadImages",
    "center_crop",
    "check_image",
    "decode_image",
    "encode_png",
    "skipped_images",
]

IMAGE_SIZE = 32
#: The key of the prepared set's metadata that lists the files skipped at build time.
SKIPPED_KEY = "skipped_images"

log = logging.getLogger(__name__)


class ImageError(ValueError):
    """An image in a source archive cannot be decoded or has the wrong size or mode."""


def decode_image(data: bytes, *, where: str) -> Image.Image:
    """Decodes image bytes with PIL; ``where`` (``archive:member``) is named in errors."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Image.UnidentifiedImageError:
        raise ImageError(f"{where}: cannot decode image (not a format Pillow reads)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{where}: cannot decode image ({e})") from e
    return image


def check_image(
    image: Image.Image,
    *,
    where: str,
    modes: Sequence[str],
    size: tuple[int, int] | None = None,
    min_size: int | None = None,
) -> None:
    """Raises :class:`ImageError` if the mode or size (width, height) is not the expected one."""
    if image.mode not in modes:
        raise ImageError(f"{where}: image mode {image.mode!r}, expected one of {list(modes)}")
    if size is not None and image.size != tuple(size):
        raise ImageError(f"{where}: image size {image.size} (w, h), expected {tuple(size)}")
    if min_size is not None and min(image.size) < min_size:
        raise ImageError(f"{where}: image size {image.size} (w, h), expected both >= {min_size}")


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """PIL image (mode ``1``/``L``/``RGB``) -> uint8 ``[H, W, 3]``."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def center_crop(array: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Central ``size x size`` crop of ``[H, W, C]`` (top/left offsets rounded down)."""
    h, w = array.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return array[top : top + size, left : left + size]


def encode_png(array: np.ndarray) -> bytes:
    """uint8 ``[32, 32, 3]`` -> PNG bytes (checked, so no malformed example is ever written)."""
    if array.shape != (IMAGE_SIZE, IMAGE_SIZE, 3) or array.dtype != np.uint8:
        raise ImageError(f"internal: image {array.shape} {array.dtype}, expected (32, 32, 3) uint8")
    buf = io.BytesIO()
    Image.fromarray(array, "RGB").save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


def skipped_images(builder: tfds.core.DatasetBuilder) -> list[str]:
    """The files a prepared set's build skipped (``"where: why"`` each; empty if none, or for a
    builder that records nothing)."""
    metadata = builder.info.metadata
    return list(metadata.get(SKIPPED_KEY, [])) if metadata is not None else []


class SkipsBadImages:
    """The ``skip_bad_images`` option of a tfds builder: an unusable image file is an error naming
    the file (the default) or, with the option, skipped, logged and counted in the metadata.

    Put it first among the bases (``class B(SkipsBadImages, tfds.core.GeneratorBasedBuilder)``).
    """

    def __init__(self, *, skip_bad_images: bool = False, **kwargs):
        self.skip_bad_images = skip_bad_images
        self.skipped: list[str] = []
        super().__init__(**kwargs)

    def bad_image(self, error: ImageError) -> None:
        """Raises ``error`` unless the builder skips bad images; then records and logs it."""
        if not self.skip_bad_images:
            raise error
        self.skipped.append(str(error))
        log.warning("%s: skipped (skip_bad_images=True): %s", getattr(self, "name", ""), error)

    def read_image(
        self,
        data: bytes,
        *,
        where: str,
        modes: Sequence[str],
        size: tuple[int, int] | None = None,
        min_size: int | None = None,
    ) -> Image.Image | None:
        """:func:`decode_image` and :func:`check_image`: the image, or None when it is bad and
        skipped (:meth:`bad_image`)."""
        try:
            image = decode_image(data, where=where)
            check_image(image, where=where, modes=modes, size=size, min_size=min_size)
        except ImageError as e:
            self.bad_image(e)
            return None
        return image

    def record_skipped(self) -> None:
        """Stores the skipped files in the set's metadata (call after the last example)."""
        # A mixin of tfds builders, which provide `info`.
        self.info.metadata[SKIPPED_KEY] = list(self.skipped)  # pyright: ignore[reportAttributeAccessIssue]

    def no_images(self, where: str, what: str) -> ImageError:
        """The error of a source without a usable image (``what``: e.g. "no .png images")."""
        if self.skipped:
            return ImageError(
                f"{where}: every image was bad and skipped ({len(self.skipped)}; the first: "
                f"{self.skipped[0]})"
            )
        return ImageError(f"{where}: {what}")


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    """The info of a set built locally: never looked up in the tfds GCS bucket.

    tfds's ``initialize_from_bucket`` runs when a builder is created for a set that is not
    prepared yet; it creates a ``tmp*tfds`` folder in the temp directory and never removes it
    (one empty folder per build). These sets are not in the bucket, so the lookup is skipped.
    """

    def initialize_from_bucket(self) -> None:
        return None


class OODBuilder(SkipsBadImages, tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the OOD builders: one ``test`` split of uint8 ``[32, 32, 3]`` images.

    Subclasses set ``name``, ``SOURCES`` (tuple of alternative tuples of file names, relative to
    ``manual_dir``), optionally ``MANUAL_SUBDIR`` and ``DOWNLOAD_URLS`` (one URL per file of the
    first source), and implement ``_images(paths) -> Iterator[(key, uint8 [32, 32, 3])]``,
    reading each image file with :meth:`read_image` (None: a bad file, skipped).

    Args:
      skip_bad_images: skip (and count) image files that cannot be used instead of failing.
      **kwargs: those of ``tfds.core.GeneratorBasedBuilder`` (``data_dir``, ...).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    SOURCES: tuple[tuple[str, ...], ...] = ()
    MANUAL_SUBDIR: str = ""
    DOWNLOAD_URLS: tuple[str, ...] = ()
    DESCRIPTION: str | None = ""  # a subclass's __doc__
    HOMEPAGE: str = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.SOURCES and not cls.__dict__.get("MANUAL_DOWNLOAD_INSTRUCTIONS"):
            alternatives = " or ".join(" + ".join(files) for files in cls.SOURCES)
            where = f" (or in its '{cls.MANUAL_SUBDIR}/' folder)" if cls.MANUAL_SUBDIR else ""
            cls.MANUAL_DOWNLOAD_INSTRUCTIONS = (
                f"Place {alternatives} in manual_dir{where}. Download: "
                + (", ".join(cls.DOWNLOAD_URLS) or cls.HOMEPAGE)
            )

    @classmethod
    def find_source(cls, manual_dir: os.PathLike | str | None) -> tuple[pathlib.Path, ...] | None:
        """The files of the first complete source in ``manual_dir``; ``()`` if none is needed."""
        if not cls.SOURCES:
            return ()
        if manual_dir is None:
            return None
        roots = [pathlib.Path(manual_dir)]
        if cls.MANUAL_SUBDIR:
            roots.append(roots[0] / cls.MANUAL_SUBDIR)
        for files in cls.SOURCES:
            for root in roots:
                paths = tuple(root / f for f in files)
                if all(p.is_file() for p in paths):
                    return paths
        return None

    @classmethod
    def expected_files(cls, manual_dir: os.PathLike | str | None) -> str:
        """Human-readable list of the files looked for (for error messages)."""
        roots = [str(manual_dir)] + (
            [f"{manual_dir}/{cls.MANUAL_SUBDIR}"] if cls.MANUAL_SUBDIR else []
        )
        alternatives = " or ".join(" + ".join(files) for files in cls.SOURCES)
        return f"{alternatives} in {' or '.join(roots)}"

    def _info(self) -> tfds.core.DatasetInfo:
        return _LocalDatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png"
                    )
                }
            ),
            homepage=self.HOMEPAGE or None,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        try:
            manual_dir = dl_manager.manual_dir if self.SOURCES else None
        except AssertionError:  # manual_dir not given or empty
            manual_dir = None
        paths = self.find_source(manual_dir)
        if paths is None:
            # download() of a list returns a list of paths (typed as one path by tfds).
            urls = list(self.DOWNLOAD_URLS)
            paths = tuple(pathlib.Path(p) for p in dl_manager.download(urls))  # pyright: ignore[reportGeneralTypeIssues]
        return {"test": self._generate_examples(paths)}

    def _generate_examples(self, paths):
        for key, array in self._images(paths):
            yield key, {"image": encode_png(array)}
        self.record_skipped()

    def _images(self, paths: Sequence[pathlib.Path]) -> Iterator[tuple[str, np.ndarray]]:
        raise NotImplementedError
