"""The pack's tfds side: reads an experiment's sets with :mod:`isomax_jax.data` and writes them
with :func:`isomax_jax.pack.write` (this module imports TensorFlow; the pack's reader does not).

A training set (``cifar10``, ``cifar100``, ``svhn``) contributes its ``train`` and ``test``
splits with labels and its normalisation statistics; any other evaluation set its ``test``
split, without labels. Images are what :func:`isomax_jax.data.eval_dataset` reads before
normalising: uint8 ``[32, 32, 3]``, grey copied to three channels, 28x28 (MNIST) zero-padded by
2 pixels; in the same order. The noise sets are stored as their recipe
(:data:`isomax_jax.pack.NOISE_SETS`) once the regenerated images are checked to be the tfds
set's (as a set of images: tfds reads them in another order).

Command::

    python -m isomax_jax.pack_tfds write --out packs/cifar10 --sets cifar10,mnist,... \\
        --data-dir ../shared/data/tfds --manual-dir ../shared/data/raw
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from isomax_jax import pack as pack_lib

_log = logging.getLogger(__name__)


def to_rgb32(images: np.ndarray) -> np.ndarray:
    """uint8 ``[n, h, w, c]`` -> ``[n, 32, 32, 3]`` as the evaluation pipeline does it."""
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if images.shape[1:3] == (28, 28):
        images = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    if images.shape[1:] != (32, 32, 3):
        raise ValueError(f"images of shape {images.shape[1:]}, expected (32, 32, 3)")
    return np.ascontiguousarray(images, np.uint8)


def _read(builder: Any, split: str, with_labels: bool) -> tuple[np.ndarray, np.ndarray | None]:
    import tensorflow_datasets as tfds

    ds = builder.as_dataset(split=split, shuffle_files=False).batch(4096)
    images, labels = [], []
    for chunk in tfds.as_numpy(ds):
        images.append(chunk["image"])
        if with_labels:
            labels.append(chunk["label"])
    return to_rgb32(np.concatenate(images)), np.concatenate(labels) if with_labels else None


def _same_images(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two uint8 sets hold the same images, in any order."""
    if a.shape != b.shape:
        return False
    rows = lambda x: np.sort(x.reshape(len(x), -1).view(f"V{x[0].size}").ravel())  # noqa: E731
    return bool(np.array_equal(rows(a), rows(b)))


def write_from_tfds(
    out: str | os.PathLike,
    names: Sequence[str],
    *,
    data_dir: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    manual_dir: str | os.PathLike | None = None,
    build_dir: str | os.PathLike | None = None,
    codec: str = "auto",
    quality: int = 95,
    max_mib: float | None = 60.0,
) -> dict[str, Any]:
    """Writes a pack of the sets ``names`` read from tfds (OOD sets built if missing).

    Args:
      out: the new pack directory.
      names: set names of :data:`isomax_jax.data.EVAL_NAMES`.
      data_dir, manual_dir, build_dir: as in :func:`isomax_jax.data.eval_dataset`.
      codec, quality, max_mib: as in :func:`isomax_jax.pack.write`.

    Returns:
      The manifest.
    """
    from isomax_jax import data
    from isomax_jax.data import locate, pipelines

    sets, normalization, sources = {}, {}, {}
    for name in names:
        if name not in data.EVAL_NAMES:
            raise ValueError(f"set {name!r} is not one of {data.EVAL_NAMES}")
        training = name in data.TRAIN_NAMES
        candidates = (pipelines.TRAIN_SOURCES[name],) if training else pipelines.EVAL_SOURCES[name]
        builder = locate.load_builder(
            name, candidates, data_dir=data_dir, manual_dir=manual_dir, build_dir=build_dir
        )
        sources[name] = f"tfds {builder.info.full_name}"
        splits = ("train", "test") if training else ("test",)
        sets[name] = {split: _read(builder, split, training) for split in splits}
        if training:
            normalization[name] = data.normalization_stats(name)
        if name in pack_lib.NOISE_SETS:
            recipe = pack_lib.NOISE_SETS[name]
            if _same_images(recipe.images(), sets[name]["test"][0]):
                sets[name] = {"test": recipe}
                sources[name] += ", stored as its recipe (the same images)"
            else:
                _log.warning("%s: the recipe does not give the tfds images; storing them", name)
        _log.info("read %s: %s", name, {s: len(v[0]) for s, v in sets[name].items()
                                        if isinstance(v, tuple)})  # fmt: skip
    return pack_lib.write(
        out, sets, normalization=normalization, sources=sources, codec=codec, quality=quality,
        max_mib=max_mib,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m isomax_jax.pack_tfds write --out DIR --sets a,b,...``: a pack of tfds sets,
    then its table (``python -m isomax_jax.pack info DIR`` prints it again, without TensorFlow)."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(
        prog="python -m isomax_jax.pack_tfds", description="Writes a pack of tfds sets."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    w = commands.add_parser("write", help="write a pack from tfds sets (needs TensorFlow)")
    w.add_argument("--out", required=True, help="the pack's directory (must not exist)")
    w.add_argument("--sets", required=True, help="comma-separated; training sets: train+test")
    w.add_argument("--data-dir", action="append", help="prepared tfds data (repeatable)")
    w.add_argument("--manual-dir", help="source archives of the OOD builders")
    w.add_argument("--build-dir", help="where missing OOD sets are built (default: a tmp dir)")
    w.add_argument("--codec", default="auto", choices=("auto", "jpeg", "png"))
    w.add_argument("--quality", type=int, default=95)
    w.add_argument("--max-mib", type=float, default=60.0)
    args = parser.parse_args(argv)
    build_dir = args.build_dir or tempfile.mkdtemp(prefix="isomax_pack_build_")
    write_from_tfds(
        args.out, [s for s in args.sets.split(",") if s], data_dir=args.data_dir,
        manual_dir=args.manual_dir, build_dir=build_dir, codec=args.codec,
        quality=args.quality, max_mib=args.max_mib,
    )  # fmt: skip
    print(pack_lib.Pack(args.out).table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
