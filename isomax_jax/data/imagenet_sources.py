"""Where the 224-px sets come from: names, finding and building them, ImageNet-O's classes.

``imagenet2012`` is tfds's own set: prepared, or built by tfds's ``imagenet2012`` builder from the
ILSVRC tars in ``manual_dir`` (the first call then takes hours for the real set). The OOD sets are
:data:`isomax_jax.data.builders.IMAGENET_OOD_BUILDERS`, built from the user's folders in
``manual_dir`` (none of them is downloadable). Data directories are searched as
:mod:`isomax_jax.data.locate` does; missing data fails at once with a message naming the set, the
directories searched and the files to provide.

ImageNet-O's protocol (Hendrycks et al. 2021, github.com/hendrycks/natural-adv-examples): the
1000-way logits restricted to its 200 classes, the in-distribution set to the ImageNet validation
images of those classes. :func:`imagenet_o_protocol` gives the classes (the ``<wnid>/`` folders
of the user's ImageNet-O, as stored in the prepared set) for
``imagenet_eval_dataset("imagenet2012", classes=...)`` and for the evaluator's logits; its
``"dismax"`` variant (all 1000 logits, the whole validation set) is how the DisMax paper measured
its ImageNet-O number.

Example:
  >>> int(imagenet_class_indices(["n01443537"])[0])  # goldfish
  1
  >>> OPENOOD_NEAR_OOD, OPENOOD_FAR_OOD
  (('ssb_hard', 'ninco'), ('inaturalist', 'openood_textures', 'openimage_o'))
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
from collections.abc import Sequence
from unittest import mock

import numpy as np
import tensorflow_datasets as tfds

from isomax_jax.data import locate, pipelines
from isomax_jax.data.builders import IMAGENET_OOD_BUILDERS
from isomax_jax.data.locate import DataDir, DataNotFoundError

__all__ = [
    "ILSVRC_TARS",
    "IMAGENET_EVAL_NAMES",
    "IMAGENET_EVAL_SOURCES",
    "OPENOOD_FAR_OOD",
    "OPENOOD_NEAR_OOD",
    "ImageNetOProtocol",
    "check_imagenet_available",
    "imagenet_builder",
    "imagenet_class_indices",
    "imagenet_num_examples",
    "imagenet_o_protocol",
]

#: The user's files from which tfds's ``imagenet2012`` builder prepares its splits (it fails
#: without the validation tar, so that one is required; the train tar is optional).
ILSVRC_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
#: 224-px evaluation sets: user name -> tfds name.
IMAGENET_EVAL_SOURCES: dict[str, str] = {
    "imagenet2012": "imagenet2012",
    "ssb_hard": "isomax_ssb_hard",
    "ninco": "isomax_ninco",
    "inaturalist": "isomax_inaturalist",
    "openood_textures": "isomax_openood_textures",
    "openimage_o": "isomax_openimage_o",
    "imagenet_o": "isomax_imagenet_o",
}
IMAGENET_EVAL_NAMES: tuple[str, ...] = tuple(IMAGENET_EVAL_SOURCES)
#: OpenOOD v1.5's ImageNet-1K benchmark: near-OOD and far-OOD sets.
OPENOOD_NEAR_OOD: tuple[str, ...] = ("ssb_hard", "ninco")
OPENOOD_FAR_OOD: tuple[str, ...] = ("inaturalist", "openood_textures", "openimage_o")


def _has_source(tfds_name: str, manual_dir) -> bool:
    if manual_dir is None:
        return False
    if tfds_name == "imagenet2012":  # tfds's builder reads the validation tar in any case
        return (pathlib.Path(manual_dir) / "ILSVRC2012_img_val.tar").is_file()
    return IMAGENET_OOD_BUILDERS[tfds_name].find_source(manual_dir) is not None


def _how_to_provide(tfds_name: str, manual_dir) -> str:
    if tfds_name == "imagenet2012":
        return (
            "put ILSVRC2012_img_val.tar (tfds's imagenet2012 builder needs it in any case) and, "
            "for training, ILSVRC2012_img_train.tar (https://image-net.org/download-images) in "
            f"manual_dir (manual_dir={manual_dir}); tfds's builder prepares them"
        )
    return f"put {IMAGENET_OOD_BUILDERS[tfds_name].expected_files(manual_dir)}"


@contextlib.contextmanager
def _no_bucket_lookup():
    """tfds looks up a set's metadata in its GCS bucket when it creates the builder of a set that
    is not prepared (imagenet2012 here), leaving an empty ``tmp*tfds`` folder in the temp
    directory; the build makes that metadata itself, so the lookup is skipped."""
    with mock.patch.object(tfds.core.DatasetInfo, "initialize_from_bucket", lambda self: None):
        yield


def imagenet_builder(name: str, *, data_dir: DataDir, manual_dir, build_dir):
    """The prepared tfds builder of the 224-px set ``name``, built from ``manual_dir`` first if
    it is not prepared in ``data_dir`` (into ``build_dir`` or the first writable directory).

    Raises:
      DataNotFoundError: not prepared, and its files are not in ``manual_dir`` or there is no
        writable directory to build into.
    """
    tfds_name = IMAGENET_EVAL_SOURCES[name]
    try:
        return locate.load_builder(
            name, (tfds_name,), data_dir=data_dir, manual_dir=manual_dir, build_dir=build_dir
        )
    except DataNotFoundError:
        pass
    dirs = locate.resolve_data_dirs(data_dir)
    target = locate.build_target(dirs, build_dir)
    writable = target is not None and locate._is_writable(target)
    if _has_source(tfds_name, manual_dir) and writable:
        with _no_bucket_lookup():
            # `writable` implies a target directory.
            return locate._build(tfds_name, target, manual_dir, download=False)  # pyright: ignore[reportArgumentType]
    raise DataNotFoundError(_missing_message(name, dirs, target, writable, manual_dir))


def _missing_message(name, dirs, target, writable, manual_dir) -> str:
    tfds_name = IMAGENET_EVAL_SOURCES[name]
    search = dirs + [target] if target is not None and target not in dirs else dirs
    where_to_build = (
        f"builds would go to {target}"
        if writable
        else "no writable directory to build into (pass build_dir= or a writable data_dir first)"
    )
    return (
        f"Dataset {name!r} (tfds {tfds_name!r}) is not prepared in any searched data_dir "
        f"[{', '.join(str(d) for d in search)}] and cannot be built from manual_dir="
        f"{manual_dir}; {where_to_build}. It is not downloadable: "
        f"{_how_to_provide(tfds_name, manual_dir)}."
    )


def _check_name(argument: str, name, allowed) -> None:
    if name not in allowed:
        raise ValueError(
            f"{argument}={name!r} is not a known 224-px dataset; expected one of {list(allowed)}"
        )


def _default_split(name: str, split: str | None) -> str:
    if split is not None:
        return split
    return "validation" if name == "imagenet2012" else "test"


def check_imagenet_available(
    name: str,
    *,
    split: str | None = None,
    data_dir: DataDir = None,
    manual_dir: str | os.PathLike | None = None,
    build_dir: str | os.PathLike | None = None,
) -> None:
    """Raises unless ``name`` can be read: prepared (with ``split``) or buildable offline.

    Fast: nothing is decoded or built. ``split`` defaults to ``"validation"`` for
    ``imagenet2012`` and ``"test"`` for the OOD sets.

    Raises:
      ValueError: unknown name or bad split of a prepared set.
      DataNotFoundError: not prepared and its files are not in ``manual_dir``.
      FileNotFoundError: an OpenOOD image list names a missing file.
    """
    _check_name("name", name, IMAGENET_EVAL_NAMES)
    tfds_name = IMAGENET_EVAL_SOURCES[name]
    try:
        pipelines._check_prepared_or_buildable(
            name, (tfds_name,), _default_split(name, split), data_dir=data_dir,
            manual_dir=manual_dir, build_dir=build_dir, download=False,
        )  # fmt: skip
        return
    except DataNotFoundError:
        pass
    dirs = locate.resolve_data_dirs(data_dir)
    target = locate.build_target(dirs, build_dir)
    writable = target is not None and locate._is_writable(target)
    if not (writable and _has_source(tfds_name, manual_dir)):
        raise DataNotFoundError(_missing_message(name, dirs, target, writable, manual_dir))


def imagenet_num_examples(
    name: str,
    *,
    split: str | None = None,
    data_dir: DataDir = None,
    manual_dir: str | os.PathLike | None = None,
    build_dir: str | os.PathLike | None = None,
) -> int:
    """Examples in ``split`` of a 224-px set (building it first if need be)."""
    _check_name("name", name, IMAGENET_EVAL_NAMES)
    builder = imagenet_builder(name, data_dir=data_dir, manual_dir=manual_dir, build_dir=build_dir)
    return pipelines._split_size(builder, _default_split(name, split))


# ------------------------------------------------------------------------------ ImageNet-O


def imagenet_class_indices(wnids: Sequence[str]) -> np.ndarray:
    """ImageNet-1K class indices (int32, tfds's ``imagenet2012`` labels = torchvision's order,
    the sorted wnids) of ``wnids``.

    Raises:
      ValueError: a wnid is not one of the 1000 classes.
    """
    names = tfds.core.tfds_path("datasets/imagenet2012/labels.txt").read_text().split()
    position = {wnid: i for i, wnid in enumerate(names)}
    unknown = [w for w in wnids if w not in position]
    if unknown:
        raise ValueError(
            f"not ImageNet-1K classes: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
        )
    return np.asarray([position[w] for w in wnids], np.int32)


@dataclasses.dataclass(frozen=True)
class ImageNetOProtocol:
    """How ImageNet-O is evaluated against ImageNet validation.

    Attributes:
      variant: ``"hendrycks"`` (the dataset's protocol: 200-class logits, the validation images
        of those classes) or ``"dismax"`` (all 1000 logits, the whole validation set: how the
        DisMax paper measured its ImageNet-O number).
      wnids: ImageNet-O's 200 class folders, sorted.
      class_indices: their ImageNet-1K indices, int32 ``[200]``, ascending.
    """

    variant: str
    wnids: tuple[str, ...]
    class_indices: np.ndarray

    @property
    def logit_indices(self) -> np.ndarray | None:
        """Columns of the 1000-way logits to keep (``logits[:, logit_indices]``); None: all."""
        return self.class_indices if self.variant == "hendrycks" else None

    @property
    def in_distribution_classes(self) -> np.ndarray | None:
        """``classes=`` for ``imagenet_eval_dataset("imagenet2012", ...)``; None: every class."""
        return self.class_indices if self.variant == "hendrycks" else None


def imagenet_o_protocol(
    variant: str = "hendrycks",
    *,
    data_dir: DataDir = None,
    manual_dir: str | os.PathLike | None = None,
    build_dir: str | os.PathLike | None = None,
) -> ImageNetOProtocol:
    """ImageNet-O's classes, read from the prepared set (built from ``manual_dir`` if need be).

    The classes are the ``<wnid>/`` folders of the user's ImageNet-O (200 in the release; the
    count is not enforced, so a subset works too).

    Raises:
      ValueError: unknown variant; a folder is not an ImageNet-1K class.
      DataNotFoundError: ImageNet-O is neither prepared nor in ``manual_dir``.
    """
    if variant not in ("hendrycks", "dismax"):
        raise ValueError(f"variant={variant!r}; expected 'hendrycks' or 'dismax'")
    builder = imagenet_builder(
        "imagenet_o", data_dir=data_dir, manual_dir=manual_dir, build_dir=build_dir
    )
    # tfds's logging decorator hides as_dataset's signature (split=...) from type checkers.
    ds = builder.as_dataset(
        split="test",  # pyright: ignore[reportCallIssue]
        shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    names = ds.map(lambda ex: ex["file_name"]).batch(4096)
    file_names = [f.decode() for batch in tfds.as_numpy(names) for f in batch]
    wnids = tuple(sorted({f.split("/", 1)[0] for f in file_names}))
    return ImageNetOProtocol(variant, wnids, imagenet_class_indices(wnids))
