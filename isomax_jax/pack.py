"""A TensorFlow-free pack of an experiment's image sets: tile mosaics in JPEG/PNG + a manifest.

A machine without TensorFlow (a lent accelerator) and with a small transfer limit (64 MiB for
the whole working tree) cannot read tfds. The pack holds an experiment's in-distribution
train/test splits and its OOD test sets in a few files that NumPy and Pillow alone read back:

``<pack>/manifest.json``
  format, version and, per set and split: the number of images, their shape, the codec, the
  files, the error of the stored pixels (``mae``, ``max_error`` on the 0-255 scale), the SHA-256
  of each file and of the decoded uint8 array, the source (tfds name and version); per
  in-distribution set its normalisation mean/std.
``<pack>/<set>.<split>.<k>.jpg`` (or ``.png``)
  mosaics of the 32x32 images, :data:`COLUMNS` tiles wide, at most :data:`ROWS` tiles high.
  JPEG at quality 95 with 4:4:4 chroma: the tiles lie on the 8-pixel DCT grid and no chroma is
  subsampled, so a tile decodes exactly as it would alone (no tile bleeds into another). Grey
  sets (R = G = B) are stored with one channel; codec ``auto`` stores them losslessly in PNG
  when that is at most :data:`PNG_SLACK` times the JPEG's size.
``<pack>/labels.npz``
  int32 labels of the in-distribution splits (OOD sets have none: label -1).

Generated sets (Gaussian and uniform noise) are stored as their recipe and regenerated with
NumPy exactly as :mod:`isomax_jax.data.builders.far_ood` builds them (JPEG would neither shrink
nor keep noise); the writer checks that the regenerated images are the tfds set's.

Writing (:func:`write`, from arrays; :func:`isomax_jax.pack_tfds.write_from_tfds` or the command
below, from tfds, which that machine must have)::

    python -m isomax_jax.pack_tfds write --out packs/cifar10 --sets cifar10,tiny_imagenet_resize,\\
        tiny_imagenet_crop,mnist,omniglot,textures,gaussian_noise,uniform_noise \\
        --data-dir ../shared/data/tfds --manual-dir ../shared/data/raw
    python -m isomax_jax.pack info packs/cifar10

Reading (NumPy + Pillow): ``pack = Pack(path)``; ``images, labels = pack.load("cifar10",
"train")`` (uint8 ``[n, 32, 32, 3]``, int32 ``[n]``); ``pack.normalization("cifar10")``.

Example (a pack of one set of 20 flat-coloured images, written and read back):
  >>> import tempfile
  >>> colours = np.random.default_rng(0).integers(0, 256, (20, 1, 1, 3), dtype=np.uint8)
  >>> images = np.broadcast_to(colours, (20, 32, 32, 3))
  >>> path = tempfile.mkdtemp() + "/pack"
  >>> manifest = write(path, {"toy": {"test": (images, np.arange(20))}})
  >>> back, labels = Pack(path).load("toy", "test")
  >>> back.shape, labels[:3], float(np.abs(back.astype(int) - images).mean()) < 1
  ((20, 32, 32, 3), array([0, 1, 2], dtype=int32), True)
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "COLUMNS",
    "FORMAT",
    "Generated",
    "NOISE_SETS",
    "Pack",
    "PackError",
    "decode_mosaics",
    "encode_mosaics",
    "write",
]

FORMAT, VERSION = "isomax-pack", 1
#: Tiles per mosaic row, and mosaic rows per file (4096 x 2048 pixels for 32x32 tiles).
COLUMNS, ROWS = 128, 64
#: Codec ``auto`` keeps a grey split lossless (PNG) when PNG is at most this times the JPEG.
PNG_SLACK = 1.5
LABELS_FILE, MANIFEST_FILE = "labels.npz", "manifest.json"


class PackError(ValueError):
    """A pack that is missing, damaged, too large or asked for a set or split it lacks."""


@dataclasses.dataclass(frozen=True)
class Generated:
    """A set generated from a seed, as :mod:`isomax_jax.data.builders.far_ood` builds noise.

    ``count`` images of ``shape``, drawn ``chunk`` at a time from ``default_rng(seed)`` with
    ``normal(*params)`` or ``uniform(*params)``, clipped to [0, 1], ``round(255 x)`` as uint8.
    """

    distribution: str
    params: tuple[float, float]
    seed: int
    count: int = 10_000
    chunk: int = 1000
    shape: tuple[int, int, int] = (32, 32, 3)

    def images(self) -> np.ndarray:
        if self.distribution not in ("normal", "uniform"):
            raise PackError(f"unknown generated distribution {self.distribution!r}")
        rng = np.random.default_rng(self.seed)
        draw = rng.normal if self.distribution == "normal" else rng.uniform
        parts = [
            np.round(np.clip(draw(*self.params, size=(self.chunk, *self.shape)), 0, 1) * 255)
            for _ in range(-(-self.count // self.chunk))
        ]
        return np.concatenate(parts)[: self.count].astype(np.uint8)


#: The package's generated OOD sets (``isomax_gaussian_noise`` / ``isomax_uniform_noise``).
NOISE_SETS: dict[str, Generated] = {
    "gaussian_noise": Generated("normal", (0.5, 1.0), seed=0),
    "uniform_noise": Generated("uniform", (0.0, 1.0), seed=1),
}


def encode_mosaics(images: np.ndarray, *, codec: str, quality: int = 95) -> list[bytes]:
    """uint8 ``[n, h, w, c]`` (``c`` 1 or 3) -> files of :data:`COLUMNS`-wide tile mosaics.

    ``codec`` ``"jpeg"`` (4:4:4, ``quality``; ``h`` and ``w`` multiples of 8) or ``"png"``.
    Empty slots of the last mosaic row are zero.
    """
    n, h, w, c = images.shape
    if codec == "jpeg" and (h % 8 or w % 8):
        raise PackError(f"JPEG tiles must be multiples of 8 pixels, got {h}x{w}")
    per_file = COLUMNS * ROWS
    files = []
    for start in range(0, n, per_file):
        tiles = images[start : start + per_file]
        rows = -(-len(tiles) // COLUMNS)
        grid = np.zeros((rows * COLUMNS, h, w, c), np.uint8)
        grid[: len(tiles)] = tiles
        mosaic = grid.reshape(rows, COLUMNS, h, w, c).transpose(0, 2, 1, 3, 4)
        mosaic = mosaic.reshape(rows * h, COLUMNS * w, c)
        image = Image.fromarray(mosaic[..., 0] if c == 1 else mosaic, "L" if c == 1 else "RGB")
        buf = io.BytesIO()
        if codec == "jpeg":
            image.save(buf, "JPEG", quality=quality, subsampling=0, optimize=True)
        elif codec == "png":
            image.save(buf, "PNG", optimize=True)
        else:
            raise PackError(f"codec must be 'jpeg' or 'png', got {codec!r}")
        files.append(buf.getvalue())
    return files


def decode_mosaics(files: list[bytes], *, count: int, shape: tuple[int, int, int]) -> np.ndarray:
    """The inverse of :func:`encode_mosaics`: uint8 ``[count, h, w, c]``."""
    h, w, c = shape
    parts = []
    for data in files:
        with Image.open(io.BytesIO(data)) as image:
            mosaic = np.asarray(image)
        if mosaic.ndim == 2:
            mosaic = mosaic[..., None]
        rows = mosaic.shape[0] // h
        tiles = mosaic.reshape(rows, h, COLUMNS, w, mosaic.shape[-1]).transpose(0, 2, 1, 3, 4)
        parts.append(tiles.reshape(-1, h, w, mosaic.shape[-1]))
    images = np.concatenate(parts)[:count] if parts else np.zeros((0, h, w, c), np.uint8)
    if images.shape[0] != count:
        raise PackError(f"the mosaics hold {images.shape[0]} images, the manifest {count}")
    return np.ascontiguousarray(np.broadcast_to(images, (count, h, w, c)))


def _sha256(data: bytes | np.ndarray) -> str:
    return hashlib.sha256(data.tobytes() if isinstance(data, np.ndarray) else data).hexdigest()


def _is_grey(images: np.ndarray) -> bool:
    return images.shape[-1] == 1 or bool(
        np.array_equal(images[..., 0], images[..., 1])
        and np.array_equal(images[..., 0], images[..., 2])
    )


def _encode_split(images: np.ndarray, codec: str, quality: int) -> tuple[str, list[bytes], int]:
    """``(codec, files, stored channels)`` of one split under the codec rule."""
    stored = images[..., :1] if _is_grey(images) else images
    if codec != "auto":
        return codec, encode_mosaics(stored, codec=codec, quality=quality), stored.shape[-1]
    jpeg = encode_mosaics(stored, codec="jpeg", quality=quality)
    if stored.shape[-1] == 1:
        png = encode_mosaics(stored, codec="png")
        if sum(map(len, png)) <= PNG_SLACK * sum(map(len, jpeg)):
            return "png", png, 1
    return "jpeg", jpeg, stored.shape[-1]


def write(
    out: str | os.PathLike,
    sets: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray | None] | Generated]],
    *,
    normalization: Mapping[str, tuple[tuple[float, ...], tuple[float, ...]]] | None = None,
    sources: Mapping[str, str] | None = None,
    codec: str = "auto",
    quality: int = 95,
    max_mib: float | None = 60.0,
) -> dict[str, Any]:
    """Writes a pack (NumPy + Pillow) into the new directory ``out``; returns its manifest.

    Args:
      out: the pack's directory; must not exist (written beside it, then renamed).
      sets: ``{set: {split: (uint8 images [n, h, w, c], int labels [n] or None) or Generated}}``.
      normalization: ``{set: (mean, std)}`` of the in-distribution sets.
      sources: ``{set: where the images came from}``, recorded in the manifest.
      codec: ``"auto"`` (JPEG; PNG for grey splits it stores within :data:`PNG_SLACK`),
        ``"jpeg"`` or ``"png"``.
      quality: the JPEG quality.
      max_mib: the largest pack allowed (None: no limit); nothing is left behind if exceeded.

    Raises:
      PackError: ``out`` exists, images not uint8 ``[n, h, w, 1 or 3]``, the pack too large.
    """
    out = pathlib.Path(out)
    if out.exists():
        raise PackError(f"{out} exists; remove it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        manifest = _write_into(tmp, sets, normalization or {}, sources or {}, codec, quality)
        mib = manifest["bytes"] / 2**20
        if max_mib is not None and mib > max_mib:
            raise PackError(f"the pack would take {mib:.1f} MiB, over max_mib={max_mib}")
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _write_into(tmp, sets, normalization, sources, codec, quality) -> dict[str, Any]:
    manifest: dict[str, Any] = {"format": FORMAT, "version": VERSION, "sets": {}}
    labels_out: dict[str, np.ndarray] = {}
    total = 0
    for name, splits in sets.items():
        entry: dict[str, Any] = {"splits": {}, "source": sources.get(name)}
        if name in normalization:
            mean, std = normalization[name]
            entry["normalization"] = {"mean": list(mean), "std": list(std)}
        for split, value in splits.items():
            if isinstance(value, Generated):
                entry["splits"][split] = {
                    "codec": "generated", "count": value.count, "shape": list(value.shape),
                    "generator": dataclasses.asdict(value), "mae": 0.0, "max_error": 0,
                    "files": {}, "bytes": 0, "labels": None,
                    "sha256": _sha256(value.images()),
                }  # fmt: skip
                continue
            images, labels = value
            images = np.asarray(images)
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
                raise PackError(
                    f"{name}/{split}: images must be uint8 [n, h, w, 1 or 3], got "
                    f"{images.dtype} {images.shape}"
                )
            chosen, blobs, stored = _encode_split(images, codec, quality)
            files = {}
            for k, blob in enumerate(blobs):
                filename = f"{name}.{split}.{k}.{'jpg' if chosen == 'jpeg' else 'png'}"
                (tmp / filename).write_bytes(blob)
                files[filename] = _sha256(blob)
            decoded = decode_mosaics(blobs, count=len(images), shape=images.shape[1:])
            error = np.abs(decoded.astype(np.int16) - images)
            key = None
            if labels is not None:
                key = f"{name}.{split}"
                labels_out[key] = np.asarray(labels, np.int32)
            size = sum(map(len, blobs))
            total += size
            entry["splits"][split] = {
                "codec": chosen, "count": int(len(images)), "shape": list(images.shape[1:]),
                "stored_channels": stored, "quality": quality if chosen == "jpeg" else None,
                "files": files, "bytes": size, "labels": key,
                "mae": float(error.mean()) if error.size else 0.0,
                "max_error": int(error.max()) if error.size else 0, "sha256": _sha256(decoded),
            }  # fmt: skip
        manifest["sets"][name] = entry
    np.savez_compressed(tmp / LABELS_FILE, **labels_out)  # pyright: ignore[reportArgumentType]  # numpy's stub matches **arrays to allow_pickle
    total += (tmp / LABELS_FILE).stat().st_size
    manifest["bytes"] = total
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


class Pack:
    """A pack opened for reading (NumPy + Pillow only).

    Args:
      path: the pack's directory (with ``manifest.json``).

    Attributes:
      manifest: the parsed manifest.
      checked: ``{(set, split): bool}``, for each split loaded: whether the decoded pixels are
        exactly those the writer decoded (the SHA-256 of the uint8 array; False means another
        JPEG decoder, the images then differ by rounding).

    Raises:
      PackError: no manifest, or not a pack of this format and version.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        try:
            self.manifest = json.loads((self.path / MANIFEST_FILE).read_text())
        except (OSError, ValueError) as err:
            raise PackError(f"{self.path} is not a readable pack ({MANIFEST_FILE}): {err}") from err
        if (self.manifest.get("format"), self.manifest.get("version")) != (FORMAT, VERSION):
            raise PackError(
                f"{self.path}: format {self.manifest.get('format')!r} version "
                f"{self.manifest.get('version')!r}, expected {FORMAT!r} version {VERSION}"
            )
        self.checked: dict[tuple[str, str], bool] = {}

    @property
    def names(self) -> tuple[str, ...]:
        """The sets, in the order they were written."""
        return tuple(self.manifest["sets"])

    def splits(self, name: str) -> tuple[str, ...]:
        return tuple(self._set(name)["splits"])

    def _set(self, name: str) -> dict[str, Any]:
        if name not in self.manifest["sets"]:
            raise PackError(f"set {name!r} is not in the pack {self.path}; it has {self.names}")
        return self.manifest["sets"][name]

    def _split(self, name: str, split: str) -> dict[str, Any]:
        splits = self._set(name)["splits"]
        if split not in splits:
            raise PackError(f"set {name!r} has no split {split!r} in the pack; it has {splits}")
        return splits[split]

    def normalization(self, name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(mean, std)`` of an in-distribution set, for images in [0, 1]."""
        entry = self._set(name).get("normalization")
        if entry is None:
            raise PackError(f"set {name!r} has no normalisation statistics (not a training set)")
        return tuple(entry["mean"]), tuple(entry["std"])

    def count(self, name: str, split: str = "test") -> int:
        return int(self._split(name, split)["count"])

    @property
    def size_bytes(self) -> int:
        """Bytes of the pack's files (manifest included)."""
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())

    def load(self, name: str, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
        """``(uint8 images [n, h, w, c], int32 labels [n])`` of a split; labels -1 if none.

        Raises:
          PackError: unknown set or split, a file missing or not what the writer wrote.
        """
        entry = self._split(name, split)
        count, shape = int(entry["count"]), tuple(entry["shape"])
        if entry["codec"] == "generated":
            spec = entry["generator"]
            spec = {**spec, "params": tuple(spec["params"]), "shape": tuple(spec["shape"])}
            images = Generated(**spec).images()
        else:
            blobs = []
            for filename, digest in entry["files"].items():
                try:
                    blob = (self.path / filename).read_bytes()
                except OSError as err:
                    raise PackError(f"{name}/{split}: {err}") from err
                if _sha256(blob) != digest:
                    raise PackError(f"{self.path / filename} is damaged (SHA-256 differs)")
                blobs.append(blob)
            images = decode_mosaics(blobs, count=count, shape=shape)
        self.checked[(name, split)] = _sha256(images) == entry["sha256"]
        if entry.get("labels") is None:
            return images, np.full(count, -1, np.int32)
        with np.load(self.path / LABELS_FILE) as labels:
            return images, labels[entry["labels"]].astype(np.int32)

    def table(self) -> str:
        """One line per split: count, codec, MiB, mean and largest absolute error."""
        lines = [f"{'set/split':<30} {'count':>7} {'codec':>9} {'MiB':>7} {'MAE':>6} {'max':>4}"]
        for name, entry in self.manifest["sets"].items():
            for split, s in entry["splits"].items():
                lines.append(
                    f"{name + '/' + split:<30} {s['count']:>7} {s['codec']:>9} "
                    f"{s['bytes'] / 2**20:>7.2f} {s['mae']:>6.3f} {s['max_error']:>4}"
                )
        lines.append(f"{'total':<30} {'':>7} {'':>9} {self.size_bytes / 2**20:>7.2f}")
        return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m isomax_jax.pack info PACK``: a pack's sets, sizes and errors (NumPy + Pillow).
    Writing one from tfds is ``python -m isomax_jax.pack_tfds write``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m isomax_jax.pack", description=(__doc__ or "")[:75]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    i = commands.add_parser("info", help="print a pack's sets, sizes and errors")
    i.add_argument("pack")
    args = parser.parse_args(argv)
    print(Pack(args.pack).table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
