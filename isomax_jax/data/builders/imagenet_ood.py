"""ImageNet-scale OOD sets built from folders in ``manual_dir``: OpenOOD v1.5 and ImageNet-O.

None of these sets can be downloaded by tfds; the user provides them (OpenOOD's download script,
the NINCO / SSB / ImageNet-O releases). Each builder stores one split, ``test``, of
variable-size encoded images (feature ``image``, uint8 ``[H, W, 3]`` once decoded) and their
``file_name`` (path relative to the folder, ``/``-separated). The 224-px preprocessing (resize
256, centre crop 224) happens when reading (:mod:`isomax_jax.data.imagenet`), never at build
time, so the stored images are the source files themselves:

* a JPEG in RGB or greyscale is stored byte for byte;
* anything else PIL reads (PNG, CMYK JPEG, GIF, WebP, ...) is stored as the lossless PNG of
  ``PIL.Image.convert("RGB")``, the conversion torchvision's loaders (and OpenOOD's) apply.

Every image is decoded once at build time (JPEGs by TensorFlow with the decoder the pipelines
use); a file that cannot be decoded (truncated, not an image) raises :class:`ImageError` naming
the file, and nothing is left in the build directory.

**Where the files are looked for** (first match wins; ``<root>`` = ``manual_dir``):

* OpenOOD v1.5 layout: the image list ``<root>/benchmark_imglist/imagenet/test_<set>.txt`` (or
  ``<root>/test_<set>.txt``), one ``path label`` line per image; ``path`` is relative to
  ``<root>/images_largescale/`` (``images_classic/`` for Textures) or ``<root>``. Only the listed
  images are built, in the list's order; a listed file that is missing is an error.
* Without a list: every image file (``.jpg .jpeg .png .bmp .gif .webp``, any case) under the
  set's folder (e.g. ``<root>/images_largescale/ssb_hard/`` or ``<root>/ssb_hard/``), in sorted
  path order.

Sets (OpenOOD v1.5, ImageNet-1K benchmark; Zhang et al. 2023, arXiv:2306.09301):

===========================  =========================  ============================================
builder                      OpenOOD list               folders searched (without a list)
===========================  =========================  ============================================
``isomax_ssb_hard``          ``test_ssb_hard.txt``      ``images_largescale/ssb_hard``, ``ssb_hard``
``isomax_ninco``             ``test_ninco.txt``         ``images_largescale/ninco``, ``ninco``
``isomax_inaturalist``       ``test_inaturalist.txt``   ``images_largescale/inaturalist``,
                                                        ``inaturalist``, ``iNaturalist``
``isomax_openood_textures``  ``test_textures.txt``      ``images_classic/texture``, ``textures``,
                                                        ``dtd/images`` (the DTD release)
``isomax_openimage_o``       ``test_openimage_o.txt``   ``images_largescale/openimage_o``,
                                                        ``openimage_o``
``isomax_imagenet_o``        (none)                     ``imagenet-o``, ``imagenet_o``
===========================  =========================  ============================================

ImageNet-O (Hendrycks et al. 2021, "Natural Adversarial Examples") keeps the release's layout
``imagenet-o/<wnid>/<image>``: its 200 ``wnid`` folders name the ImageNet classes of its
protocol (see :func:`isomax_jax.data.imagenet.imagenet_o_protocol`), so every image must sit in
a folder named like ``n01443537``.
"""

from __future__ import annotations

import io
import os
import pathlib
import re
from collections.abc import Iterator

import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from isomax_jax.data.builders.base import ImageError, _LocalDatasetInfo

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageFolderBuilder",
    "IsomaxImagenetO",
    "IsomaxInaturalist",
    "IsomaxNinco",
    "IsomaxOpenimageO",
    "IsomaxOpenoodTextures",
    "IsomaxSsbHard",
    "Source",
    "stored_image_bytes",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_LIST_FOLDERS = ("benchmark_imglist/imagenet", "")
_WNID = re.compile(r"n\d{8}")


def stored_image_bytes(data: bytes, *, where: str) -> bytes:
    """The bytes a builder stores for an image file: checked, converted if not an RGB/grey JPEG.

    Args:
      data: the file's content.
      where: the file's path, named in errors.

    Raises:
      ImageError: the data is not a decodable image.
    """
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        fmt, mode = image.format, image.mode
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{where}: cannot decode image ({e})") from e
    if fmt == "JPEG" and mode in ("RGB", "L"):
        try:  # the decoder (and DCT) of the pipelines: a truncated file fails here
            tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
            raise ImageError(f"{where}: cannot decode image ({e.message.splitlines()[-1]})") from e
        return data
    try:
        image.load()
        rgb = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{where}: cannot decode image ({e})") from e
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class Source:
    """Where a set's files are: ``files`` (absolute paths) and their ``names`` (stored keys).

    ``description`` says which list or folder they come from (for logs and errors).
    """

    def __init__(self, files: list[pathlib.Path], names: list[str], description: str):
        self.files, self.names, self.description = files, names, description

    def __len__(self) -> int:
        return len(self.files)


def _read_list(list_path: pathlib.Path) -> list[tuple[int, str]]:
    """``(line number, relative path)`` of the ``path label`` lines of an OpenOOD image list."""
    entries = []
    for number, line in enumerate(list_path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        path = line.split(" ", 1)[0]
        if path.startswith("/") or ".." in pathlib.PurePosixPath(path).parts:
            raise ValueError(f"{list_path}:{number}: refusing path {path!r} (absolute or '..')")
        entries.append((number, path))
    if not entries:
        raise ValueError(f"{list_path}: the image list is empty")
    return entries


def _images_under(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


class ImageFolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the ImageNet-scale OOD builders: one ``test`` split of variable-size images.

    Subclasses set ``name``, ``IMAGE_LIST`` (OpenOOD list file name, or ``""``),
    ``LIST_ROOTS`` (folders of ``manual_dir`` the list's paths are relative to), ``FOLDERS``
    (folders of ``manual_dir`` searched without a list), ``HOMEPAGE`` and ``DESCRIPTION``.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    IMAGE_LIST: str = ""
    LIST_ROOTS: tuple[str, ...] = ("images_largescale", "")
    FOLDERS: tuple[str, ...] = ()
    HOMEPAGE: str = "https://github.com/Jingkang50/OpenOOD"
    DESCRIPTION: str | None = ""  # a subclass's __doc__

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.FOLDERS and not cls.__dict__.get("MANUAL_DOWNLOAD_INSTRUCTIONS"):
            cls.MANUAL_DOWNLOAD_INSTRUCTIONS = (
                f"Not downloadable by tfds: put {cls.expected_files('manual_dir')}. "
                f"Source: {cls.HOMEPAGE}"
            )

    @classmethod
    def expected_files(cls, manual_dir: os.PathLike | str | None) -> str:
        """Human-readable list of what is looked for (for error messages)."""
        folders = " or ".join(f"{manual_dir}/{f}/" for f in cls.FOLDERS)
        if not cls.IMAGE_LIST:
            return f"the images in {folders}"
        lists = " or ".join(f"{manual_dir}/{d}/{cls.IMAGE_LIST}".replace("//", "/")
                            for d in _LIST_FOLDERS)  # fmt: skip
        roots = ", ".join(f"{manual_dir}/{r}".rstrip("/") for r in cls.LIST_ROOTS)
        return f"the image list {lists} with its images under {roots}; or the images in {folders}"

    @classmethod
    def _list_file(cls, root: pathlib.Path) -> pathlib.Path | None:
        if not cls.IMAGE_LIST:
            return None
        for folder in _LIST_FOLDERS:
            path = root / folder / cls.IMAGE_LIST
            if path.is_file():
                return path
        return None

    @classmethod
    def find_source(cls, manual_dir: os.PathLike | str | None) -> Source | None:
        """The set's files in ``manual_dir``, or None if neither its list nor its folder is there.

        Raises:
          FileNotFoundError: an image list is there but a listed file is missing.
          ValueError: the image list is empty or has an unsafe path.
        """
        if manual_dir is None:
            return None
        root = pathlib.Path(manual_dir)
        list_path = cls._list_file(root)
        if list_path is not None:
            entries = _read_list(list_path)
            first = entries[0][1]
            base = next((root / r for r in cls.LIST_ROOTS if (root / r / first).is_file()), None)
            if base is None:
                raise FileNotFoundError(
                    f"{list_path}:{entries[0][0]}: {first} is in none of "
                    f"{[str(root / r) for r in cls.LIST_ROOTS]}"
                )
            files = []
            for number, path in entries:
                if not (base / path).is_file():
                    raise FileNotFoundError(f"{list_path}:{number}: {base / path} is missing")
                files.append(base / path)
            names = [path for _, path in entries]
            return Source(files, names, f"{len(files)} images listed in {list_path}")
        for folder in cls.FOLDERS:
            path = root / folder
            if path.is_dir():
                files = _images_under(path)
                names = [f.relative_to(path).as_posix() for f in files]
                return Source(files, names, f"{len(files)} images under {path}")
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        return _LocalDatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "file_name": tfds.features.Text(),
                }
            ),
            homepage=self.HOMEPAGE,
            disable_shuffling=True,  # stored in the list's (or sorted paths') order
        )

    def _split_generators(self, dl_manager):
        try:
            manual_dir = dl_manager.manual_dir
        except AssertionError:  # manual_dir not given or empty
            manual_dir = None
        source = self.find_source(manual_dir)
        if source is None:
            raise FileNotFoundError(
                f"{self.name}: expected {self.expected_files(manual_dir)} (not downloadable)"
            )
        if not len(source):
            raise ImageError(f"{self.name}: no images in {source.description}")
        self._check_names(source)
        return {"test": self._generate_examples(source)}

    def _check_names(self, source: Source) -> None:
        del source

    def _generate_examples(self, source: Source) -> Iterator[tuple[str, dict]]:
        for path, name in zip(source.files, source.names, strict=True):
            image = stored_image_bytes(path.read_bytes(), where=str(path))
            yield name, {"image": image, "file_name": name}


class IsomaxSsbHard(ImageFolderBuilder):
    """SSB-hard (Vaze et al. 2022): 49,000 ImageNet-21K images of 980 classes semantically
    close to ImageNet-1K's; OpenOOD v1.5's near-OOD set."""

    name = "isomax_ssb_hard"
    IMAGE_LIST = "test_ssb_hard.txt"
    FOLDERS = ("images_largescale/ssb_hard", "ssb_hard")
    DESCRIPTION = __doc__


class IsomaxNinco(ImageFolderBuilder):
    """NINCO (Bitterwolf et al. 2023): 5,879 images of 64 classes absent from ImageNet-1K,
    checked by hand; OpenOOD v1.5's near-OOD set."""

    name = "isomax_ninco"
    IMAGE_LIST = "test_ninco.txt"
    FOLDERS = ("images_largescale/ninco", "ninco")
    DESCRIPTION = __doc__


class IsomaxInaturalist(ImageFolderBuilder):
    """iNaturalist (the MOS subset, Huang & Li 2021): 10,000 images of 110 plant classes absent
    from ImageNet-1K; OpenOOD v1.5's far-OOD set."""

    name = "isomax_inaturalist"
    IMAGE_LIST = "test_inaturalist.txt"
    FOLDERS = ("images_largescale/inaturalist", "inaturalist", "iNaturalist")
    DESCRIPTION = __doc__


class IsomaxOpenoodTextures(ImageFolderBuilder):
    """Textures (DTD, Cimpoi et al. 2014): 5,160 texture images at full size; OpenOOD v1.5's
    far-OOD set (the 32-px ``isomax_textures`` is the CIFAR-benchmark version)."""

    name = "isomax_openood_textures"
    IMAGE_LIST = "test_textures.txt"
    LIST_ROOTS = ("images_classic", "")
    FOLDERS = ("images_classic/texture", "textures", "dtd/images")
    DESCRIPTION = __doc__


class IsomaxOpenimageO(ImageFolderBuilder):
    """OpenImage-O (Wang et al. 2022, ViM): 15,869 Open Images test images whose content is
    none of ImageNet-1K's classes; OpenOOD v1.5's far-OOD set."""

    name = "isomax_openimage_o"
    IMAGE_LIST = "test_openimage_o.txt"
    FOLDERS = ("images_largescale/openimage_o", "openimage_o")
    DESCRIPTION = __doc__


class IsomaxImagenetO(ImageFolderBuilder):
    """ImageNet-O (Hendrycks et al. 2021): 2,000 ImageNet-22K images that a ResNet-50 assigns
    with high confidence to one of 200 ImageNet-1K classes, in ``<wnid>/`` folders."""

    name = "isomax_imagenet_o"
    FOLDERS = ("imagenet-o", "imagenet_o")
    HOMEPAGE = "https://github.com/hendrycks/natural-adv-examples"
    DESCRIPTION = __doc__

    def _check_names(self, source: Source) -> None:
        for path, name in zip(source.files, source.names, strict=True):
            parts = name.split("/")
            if len(parts) != 2 or not _WNID.fullmatch(parts[0]):
                raise ImageError(
                    f"{path}: ImageNet-O images must sit in <wnid>/ folders (e.g. "
                    f"n01443537/<image>); found {name!r}"
                )
