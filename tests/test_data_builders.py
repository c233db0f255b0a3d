"""OOD builders: real offline archives (built once per session) and tiny generated fixtures."""

import hashlib
import io
import tarfile
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from isomax_jax import data
from isomax_jax.data.locate import load_builder

EXPECTED_COUNTS = {
    "tiny_imagenet_resize": 10_000,
    "tiny_imagenet_crop": 10_000,
    "omniglot": 5_840,
    "textures": 1_200,
    "gaussian_noise": 10_000,
    "uniform_noise": 10_000,
}
CIFAR10_MEAN = np.array([0.491, 0.482, 0.446], np.float32)
CIFAR10_STD = np.array([0.247, 0.243, 0.261], np.float32)


def _images(builder) -> np.ndarray:
    ds = builder.as_dataset(split="test", shuffle_files=False, batch_size=-1)
    return tfds.as_numpy(ds)["image"]


def _hashes(images) -> list[str]:
    return sorted(hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest() for x in images)


@pytest.fixture(scope="session")
def built(tmp_path_factory, shared_raw_dir):
    """Every raw-archive OOD set (and the noise sets) built once into a session directory."""
    build = tmp_path_factory.mktemp("ood_build")
    builders = {}
    for name in EXPECTED_COUNTS:
        builders[name] = load_builder(
            name, data.pipelines.EVAL_SOURCES[name], data_dir=[build], manual_dir=shared_raw_dir
        )
    builders["isomax_mnist"] = load_builder(
        "mnist", ("isomax_mnist",), data_dir=[build], manual_dir=shared_raw_dir
    )
    return build, {name: _images(b) for name, b in builders.items()}


def test_counts_shapes_dtypes(built):
    _, images = built
    for name, count in {**EXPECTED_COUNTS, "isomax_mnist": 10_000}.items():
        assert images[name].shape == (count, 32, 32, 3), name
        assert images[name].dtype == np.uint8, name


def test_tiny_imagenet_resize_is_2x2_block_mean(built, shared_raw_dir):
    _, images = built
    stored = set(_hashes(images["tiny_imagenet_resize"]))
    with zipfile.ZipFile(shared_raw_dir / "tiny-imagenet-200-test.zip") as z:
        names = [n for n in z.namelist() if n.endswith(".JPEG")][:40]
        for name in names:
            src = np.asarray(Image.open(io.BytesIO(z.read(name))).convert("RGB"), np.float64)
            expected = np.floor(src.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3)) + 0.5)
            assert _hashes([expected.astype(np.uint8)])[0] in stored, name


def test_tiny_imagenet_crop_windows(built, shared_raw_dir):
    _, images = built
    stored = set(_hashes(images["tiny_imagenet_crop"]))
    rng = np.random.default_rng(0)  # documented: offsets in sorted member-name order
    with zipfile.ZipFile(shared_raw_dir / "tiny-imagenet-200-test.zip") as z:
        names = sorted(n for n in z.namelist() if n.endswith(".JPEG"))
        for name in names[:30]:
            top, left = rng.integers(0, 33, size=2)
            src = np.asarray(Image.open(io.BytesIO(z.read(name))).convert("RGB"))
            assert _hashes([src[top : top + 32, left : left + 32]])[0] in stored, name
    assert len(stored) > 9_990  # crops of distinct images are (almost all) distinct


def test_mnist_from_idx_equals_prepared_tfds_mnist_padded(built, shared_tfds_dir):
    _, images = built
    reference = _images(tfds.builder("mnist", data_dir=str(shared_tfds_dir)))  # [N, 28, 28, 1]
    padded = np.zeros((reference.shape[0], 32, 32, 3), np.uint8)
    padded[:, 2:30, 2:30, :] = reference
    assert _hashes(images["isomax_mnist"]) == _hashes(padded)


def test_omniglot_textures_noise_values(built):
    _, images = built
    omni = images["omniglot"]
    np.testing.assert_array_equal(omni[..., 0], omni[..., 2])  # grey copied to 3 channels
    assert omni.mean() > 180  # white background, dark strokes
    tex = images["textures"]
    assert tex.std() > 20 and len(set(_hashes(tex))) == 1_200
    gauss = images["gaussian_noise"].astype(np.float64) / 255
    # N(0.5, 1) clipped: P(x <= 0) = P(x >= 1) = Phi(-0.5) = 0.3085
    np.testing.assert_allclose((gauss == 0).mean(), 0.3085, atol=0.005)
    np.testing.assert_allclose((gauss == 1).mean(), 0.3085, atol=0.005)
    uni = images["uniform_noise"].astype(np.float64) / 255
    np.testing.assert_allclose(uni.mean(), 0.5, atol=0.005)
    np.testing.assert_allclose(uni.var(), 1 / 12, atol=0.002)


def test_eval_pipeline_on_built_set_uses_in_distribution_stats(built, shared_raw_dir):
    build, images = built
    ds = data.eval_dataset(
        "textures",
        in_distribution="cifar10",
        batch_size=512,
        num_devices=8,
        data_dir=[build],
        manual_dir=shared_raw_dir,
    )
    batches = list(ds)
    assert len(batches) == 3 == len(ds)
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == 1_200 and mask.dtype == bool
    got = np.concatenate([b["image"] for b in batches])[mask]
    labels = np.concatenate([b["label"] for b in batches])
    assert (labels == -1).all()
    expected = (images["textures"].astype(np.float32) / 255 - CIFAR10_MEAN) / CIFAR10_STD
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert (np.concatenate([b["image"] for b in batches])[~mask] == 0).all()


# --- tiny generated fixtures: ODIN tarballs, bad inputs ----------------------------------------


def _jpeg(array: np.ndarray, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _targz(path, members):
    with tarfile.open(path, "w:gz") as t:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            t.addfile(info, io.BytesIO(payload))


def _decoded(payload: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"))


@pytest.mark.parametrize(
    "name,archive,folder,size",
    [
        ("lsun_resize", "LSUN_resize.tar.gz", "LSUN_resize/LSUN_resize", 32),
        ("lsun_crop", "LSUN.tar.gz", "LSUN/test", 36),
        ("isun", "iSUN.tar.gz", "iSUN/iSUN_patches", 32),
        ("tiny_imagenet_resize", "Imagenet_resize.tar.gz", "Imagenet_resize/Imagenet_resize", 32),
    ],
)
def test_odin_tarball_builders(tmp_path, name, archive, folder, size):
    manual, build = tmp_path / "manual", tmp_path / "build"
    manual.mkdir()
    rng = np.random.default_rng(1)
    payloads = [
        _jpeg(rng.integers(0, 256, (size, size, 3), dtype=np.uint8).astype(np.uint8))
        for _ in range(5)
    ]
    _targz(manual / archive, [(f"{folder}/{i}.jpg", p) for i, p in enumerate(payloads)])
    ds = data.eval_dataset(
        name,
        in_distribution="cifar10",
        batch_size=4,
        num_devices=1,
        data_dir=build,
        manual_dir=manual,
    )
    batches = list(ds)
    mask = np.concatenate([b["mask"] for b in batches])
    assert len(batches) == 2 and mask.sum() == 5
    off = (size - 32) // 2
    expected = np.stack([_decoded(p)[off : off + 32, off : off + 32] for p in payloads])
    expected = (expected.astype(np.float32) / 255 - CIFAR10_MEAN) / CIFAR10_STD
    got = np.concatenate([b["image"] for b in batches])[mask]
    assert _hashes(np.round(got * 1e4).astype(np.int64)) == _hashes(
        np.round(expected * 1e4).astype(np.int64)
    )


def _tiny_zip(path, images):
    with zipfile.ZipFile(path, "w") as z:
        for i, payload in enumerate(images):
            z.writestr(f"tiny-imagenet-200/test/images/test_{i}.JPEG", payload)


def _no_leftovers(build):
    leftovers = [p for p in build.rglob("*")] if build.exists() else []
    assert leftovers == [], leftovers


@pytest.mark.parametrize(
    "bad,match",
    [
        ("size", r"test_1\.JPEG.*size \(48, 48\)"),
        ("mode", r"test_1\.JPEG.*mode 'CMYK'"),
        ("garbage", r"test_1\.JPEG.*cannot decode image \(not a format Pillow reads\)"),
        ("truncated", r"test_1\.JPEG.*cannot decode image \(Truncated File Read\)"),
    ],
)
def test_bad_images_are_named_and_nothing_is_left(tmp_path, bad, match):
    manual, build = tmp_path / "manual", tmp_path / "build"
    manual.mkdir()
    good = _jpeg(np.full((64, 64, 3), 100, np.uint8))
    wrong = {
        "size": _jpeg(np.full((48, 48, 3), 100, np.uint8)),
        "mode": _jpeg(np.full((64, 64, 3), 100, np.uint8), mode="CMYK"),
        "garbage": b"\xff\xd8 not really a jpeg",
        "truncated": _jpeg(np.full((64, 64, 3), 100, np.uint8))[:300],
    }[bad]
    _tiny_zip(manual / "tiny-imagenet-200-test.zip", [good, wrong, good])
    with pytest.raises(data.ImageError, match=match):
        data.eval_dataset(
            "tiny_imagenet_resize",
            in_distribution="cifar10",
            batch_size=8,
            data_dir=build,
            manual_dir=manual,
        )
    _no_leftovers(build)


def _build(name, build, manual, **kwargs):
    builder = tfds.builder(name, data_dir=str(build), **kwargs)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual))
    )
    return builder


@pytest.mark.parametrize("source", ["tiny_imagenet_zip", "odin_tarball"])
def test_skip_bad_images_skips_and_counts_them(tmp_path, source):
    manual, build = tmp_path / "manual", tmp_path / "build"
    manual.mkdir()
    rng = np.random.default_rng(0)
    size = 64 if source == "tiny_imagenet_zip" else 32
    good = [_jpeg(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(3)]
    payloads = [good[0], good[1][:300], good[1], b"GIF89a? no", good[2]]  # truncated, garbage
    if source == "tiny_imagenet_zip":
        _tiny_zip(manual / "tiny-imagenet-200-test.zip", payloads)
        archive, names = "tiny-imagenet-200-test.zip", ["test_1.JPEG", "test_3.JPEG"]
    else:
        members = [(f"Imagenet_resize/{i}.jpg", p) for i, p in enumerate(payloads)]
        _targz(manual / "Imagenet_resize.tar.gz", members)
        archive, names = "Imagenet_resize.tar.gz", ["1.jpg", "3.jpg"]

    builder = _build("isomax_tiny_imagenet_resize", build, manual, skip_bad_images=True)
    assert builder.info.splits["test"].num_examples == 3
    skipped = data.builders.base.skipped_images(builder)
    assert len(skipped) == 2
    for line, name in zip(skipped, names, strict=True):
        assert line.startswith(f"{manual / archive}:") and name in line, line
    assert "Truncated File Read" in skipped[0] and "not a format Pillow reads" in skipped[1]
    # The list is part of the prepared set: a later reader (with or without the option) sees it.
    reread = tfds.builder("isomax_tiny_imagenet_resize", data_dir=str(build))
    assert data.builders.base.skipped_images(reread) == skipped
    assert len(_images(reread)) == 3


def test_skip_bad_images_with_nothing_usable_is_an_error(tmp_path):
    manual, build = tmp_path / "manual", tmp_path / "build"
    manual.mkdir()
    _targz(manual / "iSUN.tar.gz", [("iSUN/0.jpg", b"junk"), ("iSUN/1.jpg", b"more junk")])
    with pytest.raises(data.ImageError, match=r"iSUN.tar.gz: every image was bad and skipped \(2;"):
        _build("isomax_isun", build, manual, skip_bad_images=True)


def test_a_strict_build_records_no_skipped_images(tmp_path):
    manual, build = tmp_path / "manual", tmp_path / "build"
    manual.mkdir()
    _targz(manual / "iSUN.tar.gz", [("iSUN/0.jpg", _jpeg(np.zeros((32, 32, 3), np.uint8)))])
    assert data.builders.base.skipped_images(_build("isomax_isun", build, manual)) == []


def test_truncated_and_unsafe_archives_leave_nothing(tmp_path):
    manual, build = tmp_path / "manual", tmp_path / "build"
    manual.mkdir()
    payloads = [
        (f"LSUN_resize/{i}.jpg", _jpeg(np.full((32, 32, 3), i, np.uint8))) for i in range(30)
    ]
    _targz(manual / "LSUN_resize.tar.gz", payloads)
    blob = (manual / "LSUN_resize.tar.gz").read_bytes()
    (manual / "LSUN_resize.tar.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(data.ArchiveError, match="LSUN_resize.tar.gz"):
        data.eval_dataset(
            "lsun_resize", in_distribution="svhn", batch_size=8, data_dir=build, manual_dir=manual
        )
    _no_leftovers(build)
    _targz(manual / "iSUN.tar.gz", [*payloads[:2], ("../../escape.jpg", payloads[0][1])])
    with pytest.raises(data.ArchiveError, match=r"iSUN.tar.gz.*refusing member '\.\./\.\./escape"):
        data.eval_dataset(
            "isun", in_distribution="svhn", batch_size=8, data_dir=build, manual_dir=manual
        )
    _no_leftovers(build)
    assert not (tmp_path / "escape.jpg").exists()


def test_truncated_idx_named(tmp_path):
    import gzip

    manual, build = tmp_path / "manual", tmp_path / "build"
    (manual / "mnist").mkdir(parents=True)
    header = (0x803).to_bytes(4, "big") + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (manual / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(header + b"\0" * 100)
    )
    with pytest.raises(data.ImageError, match="t10k-images-idx3-ubyte.gz.*truncated"):
        load_builder("mnist", ("isomax_mnist",), data_dir=build, manual_dir=manual)
    _no_leftovers(build)


def test_missing_archives_fail_fast_without_download(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(tfds.download.DownloadManager, "download", no_download)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "default"))
    empty = tmp_path / "empty_manual"
    empty.mkdir()
    with pytest.raises(data.DataNotFoundError) as info:
        data.eval_dataset(
            "lsun_crop",
            in_distribution="cifar10",
            batch_size=8,
            data_dir=tmp_path / "d",
            manual_dir=empty,
        )
    message = str(info.value)
    for part in ("lsun_crop", "isomax_lsun_crop", str(tmp_path / "d"), "LSUN.tar.gz", str(empty)):
        assert part in message, part
    _no_leftovers(tmp_path / "d")


def test_builders_registered_with_tfds(tmp_path):
    for name, cls in data.OOD_BUILDERS.items():
        builder = tfds.builder(name, data_dir=str(tmp_path))
        assert isinstance(builder, cls)
        assert not builder.is_prepared()


# --- temporary folders and bad directories -----------------------------------------------------


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """tempfile's folder, observed: tfds used to leave an empty tmp*tfds folder in it per build."""
    import tempfile

    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_building_leaves_no_temporary_folder(tmp_path, private_tmp):
    manual, build = tmp_path / "manual", tmp_path / "build"
    manual.mkdir()
    payloads = [_jpeg(np.full((32, 32, 3), i, np.uint8)) for i in range(3)]
    _targz(manual / "iSUN.tar.gz", [(f"iSUN/{i}.jpg", p) for i, p in enumerate(payloads)])
    builder = load_builder("isun", ("isomax_isun",), data_dir=build, manual_dir=manual)
    assert builder.info.splits["test"].num_examples == 3
    assert list(private_tmp.iterdir()) == []
    assert load_builder("isun", ("isomax_isun",), data_dir=build).is_prepared()  # found again
    # A tfds set (not one of ours) whose folder exists but is not prepared: tfds's own lookup.
    (build / "mnist").mkdir()
    with pytest.raises(data.DataNotFoundError):
        load_builder("mnist", ("mnist",), data_dir=build, manual_dir=manual)
    assert list(private_tmp.iterdir()) == []


@pytest.mark.parametrize("where", ["data_dir", "data_dir_list", "build_dir", "env"])
def test_a_file_as_data_directory_is_an_error(tmp_path, monkeypatch, where):
    """It used to be skipped, and the set was built into ~/tensorflow_datasets instead."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    a_file = tmp_path / "datasets.txt"
    a_file.write_text("not a folder")
    kwargs = {
        "data_dir": dict(data_dir=a_file),
        "data_dir_list": dict(data_dir=[tmp_path / "ok", a_file]),
        "build_dir": dict(data_dir=tmp_path / "ok", build_dir=a_file),
        "env": {},
    }[where]
    if where == "env":
        monkeypatch.setenv("TFDS_DATA_DIR", str(a_file))
    what = {"env": r"\$TFDS_DATA_DIR", "build_dir": "build_dir"}.get(where, "data_dir")
    with pytest.raises(NotADirectoryError, match=rf"{what} '.*datasets.txt' is a file"):
        load_builder("gaussian_noise", ("isomax_gaussian_noise",), **kwargs)
    assert list(home.iterdir()) == []
    assert not (tmp_path / "ok").exists()
