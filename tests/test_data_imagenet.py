"""224-px pipelines on real JPEGs: tfds's imagenet2012 builder on ILSVRC-layout tars, the OOD
folder builders, torchvision's evaluation transform, exact multi-process evaluation, ImageNet-O."""

import hashlib
import io
import tempfile

import imagenet_fixtures as fx
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from isomax_jax import data
from isomax_jax.data import imagenet, imagenet_preprocessing, imagenet_sources, testing
from isomax_jax.data.builders import IMAGENET_OOD_BUILDERS, imagenet_ood

WNIDS = ("n01440764", "n01443537", "n01484850")  # ImageNet classes 0, 1, 2


def _key(image: np.ndarray, label) -> str:
    """A label + image key insensitive to the pipelines' 1-level rounding differences."""
    coarse = np.round(np.asarray(image, np.float64) / 8).astype(np.int16).tobytes()
    return hashlib.sha1(coarse + int(label).to_bytes(4, "big", signed=True)).hexdigest()


def _gather(batches):
    out = {k: np.concatenate([b[k] for b in batches]) for k in ("image", "label", "mask")}
    return out["image"][out["mask"]], out["label"][out["mask"]], out


@pytest.fixture(scope="module")
def jpegs(shared_raw_dir):
    """Real JPEGs: TinyImageNet test (64x64, one greyscale) and DTD (shorter side 128)."""
    tiny = fx.zip_images(shared_raw_dir / fx.TINY_ZIP, suffix=".JPEG", count=14)
    grey = fx.zip_images(shared_raw_dir / fx.TINY_ZIP, suffix=".JPEG", count=1, mode="L")
    dtd = fx.zip_images(shared_raw_dir / fx.DTD_ZIP, suffix=".jpg", count=12)
    return [d for _, d in tiny + grey + dtd], dtd


@pytest.fixture(scope="module")
def ilsvrc(tmp_path_factory, jpegs):
    """tfds's own imagenet2012 builder prepares tars of 18 train / 9 validation real JPEGs."""
    images, _ = jpegs
    root = tmp_path_factory.mktemp("ilsvrc")
    train = {wnid: images[6 * c : 6 * c + 6] for c, wnid in enumerate(WNIDS)}
    val = images[18:27]
    fx.pack_ilsvrc(root / "manual", train, val)
    with pytest.MonkeyPatch.context() as patch:
        (root / "tmp").mkdir()
        patch.setattr(tempfile, "tempdir", str(root / "tmp"))
        n = imagenet_sources.imagenet_num_examples(
            "imagenet2012", split="train", data_dir=root / "data", manual_dir=root / "manual"
        )
        leftovers = list((root / "tmp").iterdir())
    return {"dir": root / "data", "n_train": n, "train": train, "val": val, "tmp": leftovers}


def _eval(name, ilsvrc_or_dir, **kwargs):
    data_dir = ilsvrc_or_dir["dir"] if isinstance(ilsvrc_or_dir, dict) else ilsvrc_or_dir
    kwargs.setdefault("num_devices", 1)
    return imagenet.imagenet_eval_dataset(name, data_dir=data_dir, **kwargs)


def test_tfds_imagenet2012_builder_prepares_the_ilsvrc_tars(ilsvrc):
    assert ilsvrc["n_train"] == 18 and ilsvrc["tmp"] == []  # no tmp*tfds folder left behind
    builder = tfds.builder("imagenet2012", data_dir=str(ilsvrc["dir"]))
    assert builder.info.splits["validation"].num_examples == 9
    ds = builder.as_dataset(split="validation", decoders={"image": tfds.decode.SkipDecoding()})
    got = {ex["file_name"].decode(): ex for ex in tfds.as_numpy(ds)}
    truth = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt").read_text().split()
    labels = imagenet_sources.imagenet_class_indices(truth[:9])
    for i, payload in enumerate(ilsvrc["val"]):
        ex = got[f"ILSVRC2012_val_{i + 1:08d}.JPEG"]
        assert ex["image"] == payload and ex["label"] == labels[i]  # bytes stored unchanged


def test_eval_is_torchvision_resize_and_center_crop(ilsvrc):
    batches = list(_eval("imagenet2012", ilsvrc, batch_size=4))
    images, labels, full = _gather(batches)
    assert len(batches) == 3 and [b["image"].shape for b in batches] == [(4, 224, 224, 3)] * 3
    assert full["mask"].tolist() == [True] * 9 + [False] * 3
    assert (full["label"][9:] == -1).all() and not full["image"][9:].any()
    ds = tfds.builder("imagenet2012", data_dir=str(ilsvrc["dir"])).as_dataset(
        split="validation", shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
    )
    for got, label, ex in zip(images, labels, tfds.as_numpy(ds), strict=True):
        assert label == ex["label"]
        diff = np.abs(fx.unnormalise(got) - fx.torchvision_eval(ex["image"]))
        assert diff.max() < 1 + 1e-3 and diff.mean() < 0.3, (diff.max(), diff.mean())


@pytest.mark.parametrize("resize,crop", [(256, 224), (96, 80), (45, 33)])
def test_eval_transform_up_and_down_scaling(jpegs, resize, crop):
    """DTD JPEGs (128 px shorter side, various aspect ratios) up- and downscaled: torchvision's
    sizes and crop offsets exactly; pixels within one level of PIL's (0.1-0.2 on average)."""
    _, dtd = jpegs
    means = []
    for _, payload in dtd:
        got = imagenet_preprocessing.preprocess_for_eval(
            tf.constant(payload), resize_size=resize, crop_size=crop
        ).numpy()
        diff = np.abs(got.astype(np.float64) - fx.torchvision_eval(payload, resize_size=resize,
                                                                   crop_size=crop))  # fmt: skip
        assert diff.max() <= 1, diff.max()
        means.append(diff.mean())
    assert np.mean(means) < 0.3, means
    # the accurate DCT decodes to PIL's pixels exactly
    decoded = imagenet_preprocessing.decode_rgb(tf.constant(dtd[0][1])).numpy()
    np.testing.assert_array_equal(decoded, np.asarray(Image.open(io.BytesIO(dtd[0][1]))))


@pytest.mark.parametrize("process_count", [2, 3])
def test_eval_every_example_once_over_processes(ilsvrc, process_count):
    reference_images, reference_labels, _ = _gather(
        list(_eval("imagenet2012", ilsvrc, batch_size=2))
    )
    parts = [
        list(_eval("imagenet2012", ilsvrc, batch_size=2 * process_count, process_index=i,
                   process_count=process_count))
        for i in range(process_count)
    ]  # fmt: skip
    assert len({len(p) for p in parts}) == 1  # the same batch count on every process
    got = [_gather(p)[:2] for p in parts]
    keys = sorted(_key(x, y) for images, labels in got for x, y in zip(images, labels, strict=True))
    expected = sorted(_key(x, y) for x, y in zip(reference_images, reference_labels, strict=True))
    assert keys == expected


def test_eval_classes_select_validation_images_of_those_classes(ilsvrc):
    _, all_labels, _ = _gather(list(_eval("imagenet2012", ilsvrc, batch_size=9)))
    classes = sorted(set(all_labels.tolist()))[:3]
    expected = int(np.isin(all_labels, classes).sum())
    parts = [
        list(_eval("imagenet2012", ilsvrc, batch_size=4, classes=classes, process_index=i,
                   process_count=2))
        for i in range(2)
    ]  # fmt: skip
    labels = np.concatenate([_gather(p)[1] for p in parts])
    assert len(labels) == expected and np.isin(labels, classes).all()
    assert len(parts[0]) == len(parts[1]) == int(np.ceil(np.ceil(expected / 2) / 2))
    with pytest.raises(ValueError, match="'ninco' is an OOD set"):
        _eval("ninco", ilsvrc, batch_size=4, classes=[0])


def _train(ilsvrc, **kwargs):
    kwargs.setdefault("num_devices", 1)
    return imagenet.imagenet_train_dataset(data_dir=ilsvrc["dir"], **kwargs)


def test_train_stream_is_seeded_resumable_and_split_over_processes(ilsvrc):
    stream = list(_train(ilsvrc, batch_size=6, seed=3, num_steps=5))  # crosses an epoch (3 steps)
    again = list(_train(ilsvrc, batch_size=6, seed=3, num_steps=5))
    other = list(_train(ilsvrc, batch_size=6, seed=4, num_steps=1))
    resumed = list(_train(ilsvrc, batch_size=6, seed=3, start_step=2, num_steps=3))
    for a, b in zip(stream, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    for a, b in zip(stream[2:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(stream[0]["image"], other[0]["image"])
    batch = stream[0]
    assert set(batch) == {"image", "label"} and batch["image"].shape == (6, 224, 224, 3)
    assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
    pixels = fx.unnormalise(np.concatenate([b["image"] for b in stream]))
    assert pixels.min() > -0.5 and pixels.max() < 255.5 and pixels.std() > 20
    epoch = np.concatenate([b["label"] for b in stream[:3]])
    assert sorted(epoch.tolist()) == [0] * 6 + [1] * 6 + [2] * 6  # an epoch: every example once
    # two processes: 9 examples each, one epoch = 3 steps of 3; together every example once
    parts = [
        _train(ilsvrc, batch_size=6, seed=3, num_epochs=1, process_index=i, process_count=2)
        for i in range(2)
    ]
    assert [len(p) for p in parts] == [3, 3] and parts[0].num_examples == 9
    labels = np.concatenate([b["label"] for p in parts for b in p])
    assert sorted(labels.tolist()) == [0] * 6 + [1] * 6 + [2] * 6


def test_train_crop_is_a_resized_window_of_the_decoded_image(jpegs):
    _, dtd = jpegs
    payload = dtd[3][1]
    full = tf.io.decode_jpeg(payload, channels=3).numpy()
    for s in range(5):
        seed = tf.constant([7, s], tf.int64)
        got = imagenet_preprocessing.preprocess_for_train(tf.constant(payload), seed).numpy()
        crop_seed, flip_seed = tf.random.experimental.stateless_split(seed, 2)
        shape = tf.io.extract_jpeg_shape(payload)
        window = imagenet_preprocessing.train_crop_window(shape, crop_seed)
        top, left, h, w = window.numpy()
        cropped = tf.io.decode_and_crop_jpeg(payload, window, channels=3)
        # only the window is decoded: the full image's pixels, but for libjpeg's chroma
        # upsampling at the window's left and right edges
        np.testing.assert_array_equal(
            cropped.numpy()[:, 1:-1], full[top : top + h, left + 1 : left + w - 1]
        )
        expected = tf.image.resize(cropped, [224, 224])
        flipped = tf.image.stateless_random_flip_left_right(expected, flip_seed).numpy()
        np.testing.assert_allclose(got, flipped, rtol=0, atol=1e-3)


def test_train_crop_window_area_and_aspect():
    areas, fallbacks = [], 0
    for shape in ((375, 500), (64, 64), (500, 200)):
        for s in range(60):
            top, left, h, w = imagenet_preprocessing.train_crop_window(
                tf.constant([*shape, 3]), tf.constant([s, 1], tf.int64)
            ).numpy()
            assert 0 <= top and top + h <= shape[0] and 0 <= left and left + w <= shape[1]
            side = int(224 / 256 * min(shape))
            if (h, w) == (side, side) and top == (shape[0] - side + 1) // 2:
                fallbacks += 1  # sampling failed: the Flax example's centre crop
                continue
            area = h * w / (shape[0] * shape[1])
            assert 0.08 - 0.02 <= area <= 1 and 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05, (h, w)
            areas.append(area)
    assert fallbacks < 20 and min(areas) < 0.3 and max(areas) > 0.7


# --- OOD folder builders -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ood_folders(tmp_path_factory, jpegs, shared_raw_dir):
    """Real image folders in the layouts the six builders read (a few images each)."""
    images, dtd = jpegs
    root = tmp_path_factory.mktemp("ood")
    manual = root / "manual"

    def put(rel, payload):
        (manual / rel).parent.mkdir(parents=True, exist_ok=True)
        (manual / rel).write_bytes(payload)

    # OpenOOD layout, selected by image lists (not every file is listed; list order kept)
    for i in range(5):
        put(f"images_largescale/ssb_hard/n0000{i}/img_{i}.JPEG", images[i])
        put(f"images_largescale/openimage_o/{i}.jpg", images[5 + i])
    lists = manual / "benchmark_imglist" / "imagenet"
    lists.mkdir(parents=True)
    listed = [
        "ssb_hard/n00003/img_3.JPEG",
        "ssb_hard/n00000/img_0.JPEG",
        "ssb_hard/n00001/img_1.JPEG",
    ]
    (lists / "test_ssb_hard.txt").write_text("".join(f"{p} -1\n" for p in listed))
    (lists / "test_openimage_o.txt").write_text("openimage_o/4.jpg -1\nopenimage_o/2.jpg -1\n")
    # plain folders: NINCO nested, iNaturalist's images/, DTD's own dtd/images/<class>/ layout
    for i in range(3):
        put(f"ninco/class_{i % 2}/{i}.jpg", images[10 + i])
        put(f"iNaturalist/images/{i}.jpg", images[13 + i])
    for name, payload in dtd[:4]:
        put(name, payload)  # dtd/images/<class>/<file>.jpg
    # ImageNet-O: <wnid>/ folders, one real PNG (Omniglot, mode 1) among the JPEGs
    png = fx.zip_images(shared_raw_dir / "omniglot" / "images_background_small1.zip",
                        suffix=".png", count=1)[0][1]  # fmt: skip
    put("imagenet-o/n01443537/a.jpg", images[16])
    put("imagenet-o/n01443537/b.png", png)
    put("imagenet-o/n01704323/c.jpg", images[17])
    put("imagenet-o/README.txt", b"not an image")
    return {"manual": manual, "build": root / "build", "listed": listed, "dtd": dtd[:4]}


EXPECTED_OOD = {"ssb_hard": 3, "openimage_o": 2, "ninco": 3, "inaturalist": 3,
                "openood_textures": 4, "imagenet_o": 3}  # fmt: skip


def test_ood_builders_read_real_folders(ood_folders):
    kwargs = dict(data_dir=ood_folders["build"], manual_dir=ood_folders["manual"], batch_size=4)
    for name, count in EXPECTED_OOD.items():
        images, labels, full = _gather(list(imagenet.imagenet_eval_dataset(name, num_devices=1,
                                                                           **kwargs)))  # fmt: skip
        assert len(images) == count and (full["label"] == -1).all(), name
        builder = tfds.builder(
            imagenet_sources.IMAGENET_EVAL_SOURCES[name], data_dir=str(kwargs["data_dir"])
        )
        ds = builder.as_dataset(split="test", shuffle_files=False,
                                decoders={"image": tfds.decode.SkipDecoding()})  # fmt: skip
        stored = list(tfds.as_numpy(ds))
        for got, ex in zip(images, stored, strict=True):
            diff = np.abs(fx.unnormalise(got) - fx.torchvision_eval(ex["image"]))
            assert diff.max() < 1 + 1e-3, (name, diff.max())
            source = ood_folders["manual"] / _source_path(name, ex["file_name"].decode())
            if source.suffix != ".png":
                assert ex["image"] == source.read_bytes()  # JPEGs stored byte for byte
            else:
                rgb = np.asarray(Image.open(source).convert("RGB"))
                np.testing.assert_array_equal(tf.io.decode_png(ex["image"]).numpy(), rgb)
    names = [
        ex["file_name"].decode()
        for ex in tfds.as_numpy(
            tfds.builder("isomax_ssb_hard", data_dir=str(kwargs["data_dir"])).as_dataset(
                split="test", shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
            )
        )
    ]
    assert names == ood_folders["listed"]  # the OpenOOD list's selection, in its order


def _source_path(name, file_name):
    folders = {
        "ssb_hard": "images_largescale", "openimage_o": "images_largescale", "ninco": "ninco",
        "inaturalist": "iNaturalist", "openood_textures": "dtd/images", "imagenet_o": "imagenet-o",
    }  # fmt: skip
    return f"{folders[name]}/{file_name}"


def test_imagenet_o_protocol(ood_folders):
    kwargs = dict(data_dir=ood_folders["build"], manual_dir=ood_folders["manual"])
    protocol = imagenet_sources.imagenet_o_protocol(**kwargs)
    assert protocol.wnids == ("n01443537", "n01704323")
    labels = tfds.core.tfds_path("datasets/imagenet2012/labels.txt").read_text().split()
    expected = [labels.index(w) for w in protocol.wnids]
    np.testing.assert_array_equal(protocol.class_indices, expected)
    np.testing.assert_array_equal(protocol.logit_indices, expected)
    np.testing.assert_array_equal(protocol.in_distribution_classes, expected)
    dismax = imagenet_sources.imagenet_o_protocol(
        "dismax", data_dir=ood_folders["build"]
    )  # prepared
    assert dismax.logit_indices is None and dismax.in_distribution_classes is None
    with pytest.raises(ValueError, match="variant='odin'"):
        imagenet_sources.imagenet_o_protocol("odin", **kwargs)
    with pytest.raises(ValueError, match="n99999999"):
        imagenet_sources.imagenet_class_indices(["n01440764", "n99999999"])


def test_imagenet_o_needs_wnid_folders(tmp_path, jpegs):
    (tmp_path / "manual" / "imagenet-o" / "dogs").mkdir(parents=True)
    (tmp_path / "manual" / "imagenet-o" / "dogs" / "x.jpg").write_bytes(jpegs[0][0])
    with pytest.raises(data.ImageError, match=r"dogs/x\.jpg.*<wnid>/ folders"):
        imagenet_sources.imagenet_o_protocol(
            data_dir=tmp_path / "build", manual_dir=tmp_path / "manual"
        )
    assert not any((tmp_path / "build").rglob("*"))


def test_undecodable_file_is_named_and_nothing_is_left(tmp_path, jpegs):
    images, _ = jpegs
    folder = tmp_path / "manual" / "ninco" / "a"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(images[i][: len(images[i]) // 2] if i == 1 else images[i])
    kwargs = dict(batch_size=4, num_devices=1, data_dir=tmp_path / "build",
                  manual_dir=tmp_path / "manual")  # fmt: skip
    with pytest.raises(data.ImageError, match=r"ninco/a/1\.jpg: cannot decode image"):
        imagenet.imagenet_eval_dataset("ninco", **kwargs)
    assert not any((tmp_path / "build").rglob("*"))
    (folder / "1.jpg").write_bytes(b"GIF89a not really")
    with pytest.raises(data.ImageError, match=r"ninco/a/1\.jpg: cannot decode image"):
        imagenet.imagenet_eval_dataset("ninco", **kwargs)
    # an OpenOOD list that names a missing file
    lists = tmp_path / "manual" / "benchmark_imglist" / "imagenet"
    lists.mkdir(parents=True)
    (folder / "1.jpg").unlink()
    (lists / "test_ninco.txt").write_text("ninco/a/0.jpg -1\nninco/a/1.jpg -1\n")
    with pytest.raises(FileNotFoundError, match=r"test_ninco.txt:2: .*ninco/a/1\.jpg is missing"):
        imagenet.imagenet_eval_dataset("ninco", **kwargs)


def test_stored_bytes_convert_what_is_not_an_rgb_jpeg(jpegs):
    _, dtd = jpegs
    payload = dtd[0][1]
    assert imagenet_ood.stored_image_bytes(payload, where="x") == payload
    buf = io.BytesIO()
    Image.open(io.BytesIO(payload)).convert("CMYK").save(buf, format="JPEG")
    stored = imagenet_ood.stored_image_bytes(buf.getvalue(), where="x")
    assert stored.startswith(b"\x89PNG")
    expected = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    np.testing.assert_array_equal(imagenet_preprocessing.decode_rgb(stored).numpy(), expected)


# --- generated data, errors, registry ----------------------------------------------------------


def test_pipelines_under_mock_data():
    with testing.mock_data(num_examples=5):
        for name in imagenet_sources.IMAGENET_EVAL_NAMES:
            batches = list(imagenet.imagenet_eval_dataset(name, batch_size=4, num_devices=1))
            assert [int(b["mask"].sum()) for b in batches] == [4, 1], name
            assert batches[0]["image"].shape == (4, 224, 224, 3)
            assert (batches[0]["label"] >= 0).all() == (name == "imagenet2012")
        imagenet_sources.check_imagenet_available("ssb_hard")
        train = imagenet.imagenet_train_dataset(batch_size=4, seed=0, num_devices=1, num_steps=2)
        batch = next(iter(train))
    assert len(train) == 2 and batch["image"].shape == (4, 224, 224, 3)
    assert ((batch["label"] >= 0) & (batch["label"] < 1000)).all()


def test_eval_process_without_examples_yields_padding(ilsvrc):
    """3 examples over 4 processes: the last one reads none and still yields its batch."""
    parts = [
        list(_eval("imagenet2012", ilsvrc, batch_size=8, split="validation[:3]", process_index=i,
                   process_count=4))
        for i in range(4)
    ]  # fmt: skip
    assert [len(p) for p in parts] == [1] * 4
    assert [int(p[0]["mask"].sum()) for p in parts] == [1, 1, 1, 0]
    assert (parts[3][0]["label"] == -1).all() and not parts[3][0]["image"].any()


def test_batches_prefetched_to_the_mesh():
    from isomax_jax import parallel

    mesh = parallel.data_mesh()
    with testing.mock_data(num_examples=8):
        batches = imagenet.imagenet_eval_dataset("imagenet2012", batch_size=8, mesh=mesh)
        first = next(iter(batches))
    assert first["image"].shape == (8, 224, 224, 3)
    assert first["image"].sharding.spec == parallel.batch_sharded(mesh).spec


def test_missing_data_and_bad_arguments(tmp_path):
    empty = tmp_path / "manual"
    empty.mkdir()
    with pytest.raises(data.DataNotFoundError) as info:
        imagenet.imagenet_train_dataset(batch_size=8, seed=0, num_devices=1,
                                        data_dir=tmp_path / "d", manual_dir=empty)  # fmt: skip
    for part in ("imagenet2012", "ILSVRC2012_img_val.tar", str(empty), str(tmp_path / "d")):
        assert part in str(info.value), part
    (empty / "ILSVRC2012_img_train.tar").write_bytes(b"")  # tfds's builder needs the val tar too
    with pytest.raises(data.DataNotFoundError, match="ILSVRC2012_img_val.tar"):
        imagenet_sources.check_imagenet_available(
            "imagenet2012", data_dir=tmp_path / "d", manual_dir=empty
        )
    with pytest.raises(data.DataNotFoundError, match="test_ssb_hard.txt"):
        imagenet_sources.check_imagenet_available(
            "ssb_hard", data_dir=tmp_path / "d", manual_dir=empty
        )
    assert not (tmp_path / "d").exists()
    bad = [
        (dict(name="cifar10"), "name='cifar10'"),
        (dict(interpolation="nearest"), "interpolation='nearest'"),
        (dict(resize_size=200), "crop_size=224"),
        (dict(normalization="cifar10"), "normalization='cifar10'"),
        (dict(batch_size=12, num_devices=8), "batch_size=12 .*8 local devices"),
    ]
    for kwargs, match in bad:
        args = {"name": "ninco", "batch_size": 8, **kwargs}
        with pytest.raises(ValueError, match=match):
            imagenet.imagenet_eval_dataset(args.pop("name"), **args)
    with pytest.raises(ValueError, match="seed=-1"):
        imagenet.imagenet_train_dataset(batch_size=8, seed=-1)


def test_family_normalization_and_registry(tmp_path):
    assert data.family_normalization_stats("tv_vit_b_16") == data.IMAGENET_MEAN_STD
    assert data.family_normalization_stats("inception") == ((0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="normalization='resnet34'"):
        data.family_normalization_stats("resnet34")
    assert "imagenet2012" not in data.IN_DISTRIBUTION_NAMES  # the 32-px pipeline is unchanged
    assert set(data.IMAGENET_OOD_BUILDERS).isdisjoint(data.OOD_BUILDERS)
    for name, cls in IMAGENET_OOD_BUILDERS.items():
        builder = tfds.builder(name, data_dir=str(tmp_path))
        assert isinstance(builder, cls) and not builder.is_prepared()
    assert list(tmp_path.iterdir()) == [] or all(p.is_dir() for p in tmp_path.iterdir())
