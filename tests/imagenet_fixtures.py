"""Tiny ImageNet-layout fixtures from real JPEGs, and torchvision's evaluation transform in PIL.

Used by tests/test_data_imagenet.py and benchmarks/bench_input_pipeline.py. Nothing here is
copied into the repository: images are read from the shared offline archives at run time.
"""

from __future__ import annotations

import io
import pathlib
import tarfile
import zipfile
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

TINY_ZIP = "tiny-imagenet-200-test.zip"
DTD_ZIP = "dtd-subset.zip"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def zip_images(
    path: pathlib.Path, *, suffix: str, count: int, mode: str | None = None, skip: int = 0
) -> list[tuple[str, bytes]]:
    """``(member name, bytes)`` of ``count`` images of a zip, in sorted name order.

    Args:
      path: the zip.
      suffix: member suffix (``".JPEG"``, ``".jpg"``, ``".png"``).
      count: how many.
      mode: only images of this PIL mode (e.g. ``"L"`` for greyscale).
      skip: leave out the first ``skip`` matches.
    """
    out = []
    with zipfile.ZipFile(path) as z:
        for name in sorted(n for n in z.namelist() if n.endswith(suffix)):
            data = z.read(name)
            if mode is not None and Image.open(io.BytesIO(data)).mode != mode:
                continue
            if skip:
                skip -= 1
                continue
            out.append((name, data))
            if len(out) == count:
                return out
    raise ValueError(f"{path}: only {len(out)} images with suffix {suffix} and mode {mode}")


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def pack_ilsvrc(
    manual_dir: pathlib.Path, train: Mapping[str, Sequence[bytes]], val: Sequence[bytes]
) -> None:
    """Writes ``ILSVRC2012_img_train.tar`` (one ``<wnid>.tar`` of ``<wnid>_<i>.JPEG`` per class)
    and ``ILSVRC2012_img_val.tar`` (``ILSVRC2012_val_<8 digits>.JPEG``, from 1) into
    ``manual_dir``, the layout tfds's ``imagenet2012`` builder reads. Validation labels come
    from tfds's own ``validation_labels.txt`` (its first ``len(val)`` lines)."""
    manual_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(manual_dir / "ILSVRC2012_img_train.tar", "w") as outer:
        for wnid, images in train.items():
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as t:
                for i, payload in enumerate(images):
                    _add(t, f"{wnid}_{i}.JPEG", payload)
            _add(outer, f"{wnid}.tar", inner.getvalue())
    with tarfile.open(manual_dir / "ILSVRC2012_img_val.tar", "w") as t:
        for i, payload in enumerate(val, start=1):
            _add(t, f"ILSVRC2012_val_{i:08d}.JPEG", payload)


def mosaic_jpeg(
    payloads: Sequence[bytes], *, rows: int = 3, cols: int = 4, tile: int = 128, quality: int = 95
) -> bytes:
    """A JPEG of ImageNet's typical size made of real pixels: the central ``tile`` squares of
    ``rows * cols`` real images (DTD: 128 px shorter side) side by side, 384x512 px by default,
    re-encoded (~70-90 KB at quality 95; ImageNet-1K train averages ~400x350 px, ~110 KB)."""
    canvas = Image.new("RGB", (cols * tile, rows * tile))
    for k, data in enumerate(payloads[: rows * cols]):
        image = Image.open(io.BytesIO(data)).convert("RGB")
        left, top = (image.width - tile) // 2, (image.height - tile) // 2
        square = image.crop((left, top, left + tile, top + tile))
        canvas.paste(square, ((k % cols) * tile, (k // cols) * tile))
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def torchvision_eval(data: bytes, *, resize_size: int = 256, crop_size: int = 224) -> np.ndarray:
    """uint8 ``[crop, crop, 3]``: ``Resize(resize_size) + CenterCrop(crop_size)`` as torchvision
    applies them to a PIL image (``PIL.Image.resize(..., BILINEAR)``, the shorter side to
    ``resize_size``, the longer to ``int(resize_size * long / short)``, crop offsets
    ``int(round((size - crop) / 2))``), after ``convert("RGB")``."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize_size, int(resize_size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    resized = np.asarray(image.resize((new_w, new_h), Image.BILINEAR))
    top = int(round((new_h - crop_size) / 2.0))
    left = int(round((new_w - crop_size) / 2.0))
    return resized[top : top + crop_size, left : left + crop_size]


def unnormalise(images: np.ndarray) -> np.ndarray:
    """float32 ImageNet-normalised images -> float64 on the 0-255 scale."""
    return (images.astype(np.float64) * IMAGENET_STD + IMAGENET_MEAN) * 255
