"""isomax_jax.pack: round trip, tiles that do not bleed, size, damage, the tfds writer."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from isomax_jax import pack


def _smooth(n, seed=0):
    """Natural-ish 32x32 colour images: upsampled 4x4 random colours (JPEG's good case)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.float32)
    return np.clip(small.repeat(8, 1).repeat(8, 2) + rng.normal(0, 4, (n, 32, 32, 3)), 0, 255)


def _toy_sets():
    colour = _smooth(300).astype(np.uint8)
    grey = np.zeros((70, 32, 32, 3), np.uint8)  # strokes on black, as MNIST and Omniglot
    rng = np.random.default_rng(1)
    for k in range(70):
        top, left = rng.integers(4, 20, 2)
        grey[k, top : top + 10, left : left + 3] = rng.integers(128, 256)
    return {
        "cifar10": {"train": (colour[:250], np.arange(250) % 10),
                    "test": (colour[250:], np.arange(50) % 10)},
        "grey": {"test": (grey, None)},
        "gaussian_noise": {"test": pack.Generated("normal", (0.5, 1.0), seed=0, count=40)},
    }  # fmt: skip


def test_round_trip(tmp_path):
    sets = _toy_sets()
    stats = ((0.491, 0.482, 0.446), (0.247, 0.243, 0.261))
    manifest = pack.write(tmp_path / "p", sets, normalization={"cifar10": stats},
                          sources={"cifar10": "generated"})  # fmt: skip
    p = pack.Pack(tmp_path / "p")
    assert p.names == ("cifar10", "grey", "gaussian_noise")
    assert p.splits("cifar10") == ("train", "test") and p.count("cifar10", "train") == 250
    assert p.normalization("cifar10") == (stats[0], stats[1])
    for split in ("train", "test"):
        images, labels = p.load("cifar10", split)
        original, original_labels = sets["cifar10"][split]
        assert images.shape == original.shape and images.dtype == np.uint8
        np.testing.assert_array_equal(labels, original_labels)
        error = np.abs(images.astype(int) - original)
        entry = manifest["sets"]["cifar10"]["splits"][split]
        assert entry["codec"] == "jpeg" and entry["stored_channels"] == 3
        assert error.mean() == pytest.approx(entry["mae"]) and error.max() == entry["max_error"]
        assert error.mean() < 3, error.mean()  # noisy synthetic tiles; CIFAR-10: 0.7 (below)
    grey, grey_labels = p.load("grey")  # grey: one channel stored, lossless PNG (codec auto)
    np.testing.assert_array_equal(grey, sets["grey"]["test"][0])
    assert (grey_labels == -1).all()
    assert manifest["sets"]["grey"]["splits"]["test"]["codec"] == "png"
    noise, _ = p.load("gaussian_noise")
    np.testing.assert_array_equal(noise, sets["gaussian_noise"]["test"].images())
    assert all(p.checked.values()) and len(p.checked) == 4
    assert p.size_bytes == manifest["bytes"] + len((tmp_path / "p" / "manifest.json").read_bytes())
    assert "cifar10/train" in p.table()


def test_tiles_do_not_bleed_into_each_other():
    """JPEG 4:4:4 on the 8-pixel grid: a tile in a mosaic decodes as the same tile alone."""
    tiles = _smooth(130).astype(np.uint8)  # two mosaic rows, the last one part-filled
    (blob,) = pack.encode_mosaics(tiles, codec="jpeg", quality=95)
    in_mosaic = pack.decode_mosaics([blob], count=130, shape=(32, 32, 3))
    for k in (0, 1, 127, 128, 129):
        buf = io.BytesIO()
        Image.fromarray(tiles[k]).save(buf, "JPEG", quality=95, subsampling=0)
        alone = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
        np.testing.assert_array_equal(in_mosaic[k], alone)


def test_mosaics_split_into_files_of_at_most_rows_by_columns_tiles():
    tiles = np.zeros((pack.COLUMNS * pack.ROWS + 5, 8, 8, 1), np.uint8)
    tiles[-1] = 200
    blobs = pack.encode_mosaics(tiles, codec="png")
    assert len(blobs) == 2
    back = pack.decode_mosaics(blobs, count=len(tiles), shape=(8, 8, 1))
    np.testing.assert_array_equal(back, tiles)


def test_size_limit_leaves_nothing_behind(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (500, 32, 32, 3), dtype=np.uint8)
    sets = {"noise": {"test": (noise, None)}}
    with pytest.raises(pack.PackError, match="over max_mib=0.1"):
        pack.write(tmp_path / "p", sets, max_mib=0.1)
    assert list(tmp_path.iterdir()) == []


def test_errors(tmp_path):
    with pytest.raises(pack.PackError, match="not a readable pack"):
        pack.Pack(tmp_path)
    pack.write(tmp_path / "p", {"s": {"test": (_smooth(10).astype(np.uint8), None)}})
    with pytest.raises(pack.PackError, match="exists"):
        pack.write(tmp_path / "p", {})
    with pytest.raises(pack.PackError, match="uint8"):
        pack.write(tmp_path / "q", {"s": {"test": (np.zeros((2, 32, 32, 3)), None)}})
    p = pack.Pack(tmp_path / "p")
    with pytest.raises(pack.PackError, match="set 'x' is not in the pack"):
        p.load("x")
    with pytest.raises(pack.PackError, match="no split 'train'"):
        p.load("s", "train")
    with pytest.raises(pack.PackError, match="no normalisation"):
        p.normalization("s")
    (image,) = (tmp_path / "p").glob("*.jpg")
    image.write_bytes(image.read_bytes()[:-10])
    with pytest.raises(pack.PackError, match="damaged"):
        p.load("s")
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    (tmp_path / "p" / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(pack.PackError, match="version 99"):
        pack.Pack(tmp_path / "p")


def test_reading_needs_numpy_and_pillow_only(tmp_path):
    """isomax_jax/pack.py loaded as a lone file (not the package, which imports JAX)."""
    pack.write(tmp_path / "p", _toy_sets())
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('pack', {pack.__file__!r})\n"
        "pack = sys.modules['pack'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(pack)\n"
        f"p = pack.Pack({str(tmp_path / 'p')!r})\n"
        "[p.load(n, s) for n in p.names for s in p.splits(n)]\n"
        "print(sorted(m for m in ('tensorflow', 'tensorflow_datasets', 'torch', 'jax', "
        "'isomax_jax') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_noise_recipes_are_the_builders_images():
    """The reader regenerates the noise sets exactly as the package's builders generate them."""
    far_ood = pytest.importorskip("isomax_jax.data.builders.far_ood")
    for name, cls in (("gaussian_noise", far_ood.IsomaxGaussianNoise),
                      ("uniform_noise", far_ood.IsomaxUniformNoise)):  # fmt: skip
        builder = cls.__new__(cls)  # only its generator: no tfds folder
        built = np.stack([image for _, image in builder._images(())])
        np.testing.assert_array_equal(pack.NOISE_SETS[name].images(), built)


def test_tfds_writer_stores_what_the_pipelines_read(tmp_path):
    """Under generated tfds data: the pack's images are the evaluation pipeline's, in its order
    (checked through the normalisation), and the training split is load_train_split's."""
    data = pytest.importorskip("isomax_jax.data")
    from isomax_jax.data import testing
    from isomax_jax.pack_tfds import write_from_tfds

    with testing.mock_data(num_examples=24):
        write_from_tfds(tmp_path / "p", ["cifar10", "mnist"], codec="png")
        train_images, train_labels = data.load_train_split("cifar10")
        mean, std = data.normalization_stats("cifar10")
        read = {name: np.concatenate([b["image"][b["mask"]] for b in data.eval_dataset(
                    name, in_distribution="cifar10", batch_size=8, num_devices=1)])
                for name in ("cifar10", "mnist")}  # fmt: skip
    p = pack.Pack(tmp_path / "p")
    images, labels = p.load("cifar10", "train")
    np.testing.assert_array_equal(images, train_images)
    np.testing.assert_array_equal(labels, train_labels)
    for name in ("cifar10", "mnist"):
        images, labels = p.load(name, "test")
        normalised = (images / 255.0 - np.asarray(mean)) / np.asarray(std)
        np.testing.assert_allclose(normalised, read[name], atol=1e-5)
        assert (labels >= 0).all() == (name == "cifar10")
    assert p.normalization("cifar10") == (tuple(mean), tuple(std))
    assert p.manifest["sets"]["mnist"]["splits"]["test"]["stored_channels"] == 1


def test_command_writes_and_describes_a_pack(tmp_path, capsys):
    pytest.importorskip("isomax_jax.data")
    from isomax_jax import pack_tfds
    from isomax_jax.data import testing

    with testing.mock_data(num_examples=16):
        assert pack_tfds.main(["write", "--out", str(tmp_path / "p"), "--sets", "cifar10",
                               "--max-mib", "1"]) == 0  # fmt: skip
    assert pack.main(["info", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "cifar10/train" in out and "cifar10/test" in out and "total" in out


def test_cifar10_test_split_size_and_error(shared_tfds_dir, tmp_path):
    """The real CIFAR-10 test split (10,000 images) at quality 95, 4:4:4: ~5 MiB, MAE < 0.8."""
    pytest.importorskip("isomax_jax.data")
    from isomax_jax.data import training

    images, labels = training.load_split("cifar10", "cifar10", split="test",
                                         data_dir=shared_tfds_dir)  # fmt: skip
    manifest = pack.write(tmp_path / "p", {"cifar10": {"test": (images, labels)}})
    entry = manifest["sets"]["cifar10"]["splits"]["test"]
    assert entry["codec"] == "jpeg" and entry["bytes"] < 5.5 * 2**20, entry["bytes"]
    assert entry["mae"] < 0.8 and entry["max_error"] < 40, entry
    back, _ = pack.Pack(tmp_path / "p").load("cifar10")
    assert np.abs(back.astype(int) - images).mean() == pytest.approx(entry["mae"])
