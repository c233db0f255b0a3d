"""Train / eval pipelines: values, determinism, multi-process sharding, padding, errors, offline."""

import hashlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from isomax_jax import data
from isomax_jax.data import testing

STATS = {
    k: (np.array(m, np.float32), np.array(s, np.float32))
    for k, (m, s) in data.NORMALIZATION.items()
}


def _unnormalise(images, name="cifar10"):
    mean, std = STATS[name]
    return np.round((images * std + mean) * 255).astype(np.uint8)


def _keys(images, labels):
    return sorted(
        hashlib.sha1(
            np.ascontiguousarray(x).tobytes() + int(y).to_bytes(4, "big", signed=True)
        ).hexdigest()
        for x, y in zip(images, labels, strict=True)
    )


def _take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def cifar_test(shared_tfds_dir):
    ds = tfds.builder("cifar10", data_dir=str(shared_tfds_dir)).as_dataset(
        split="test", batch_size=-1
    )
    return tfds.as_numpy(ds)


@pytest.fixture(scope="module")
def mock_train():
    """A mocked CIFAR-10 training split of 96 examples, decoded once (no shared data needed)."""
    with testing.mock_data(num_examples=96):
        images, labels = data.load_train_split("cifar10")
    return np.asarray(images), np.asarray(labels)


def _batches(mock_train, **kwargs):
    images, labels = mock_train
    return data.TrainBatches(images, labels, name="cifar10", prefetch=0, **kwargs)


def test_train_batches_shapes_ranges_and_augmentation(mock_train):
    aug = _take(_batches(mock_train, batch_size=16, seed=3), 3)
    plain = _take(_batches(mock_train, batch_size=16, seed=3, augment=False), 3)
    mean, std = STATS["cifar10"]
    for a, p in zip(aug, plain, strict=True):
        assert a["image"].shape == (16, 32, 32, 3) and a["image"].dtype == np.float32
        assert a["label"].shape == (16,) and a["label"].dtype == np.int32
        assert set(a) == {"image", "label"}
        np.testing.assert_array_equal(a["label"], p["label"])  # augmentation keeps the order
        lo, hi = (0 - mean) / std, (1 - mean) / std
        assert (a["image"] >= lo - 1e-5).all() and (a["image"] <= hi + 1e-5).all()
        # every augmented image is a 32x32 window of the 4-px zero-padded original, maybe flipped
        orig = np.pad(_unnormalise(p["image"]), ((0, 0), (4, 4), (4, 4), (0, 0)))
        got = _unnormalise(a["image"])
        for i in range(16):
            windows = [
                w
                for dy in range(9)
                for dx in range(9)
                for w in (
                    orig[i, dy : dy + 32, dx : dx + 32],
                    orig[i, dy : dy + 32, dx : dx + 32][:, ::-1],
                )
            ]
            assert any(np.array_equal(got[i], w) for w in windows), i
    assert not all(np.array_equal(a["image"], p["image"]) for a, p in zip(aug, plain, strict=True))


def test_train_epochs_are_permutations_and_seeded(mock_train):
    images, labels = mock_train
    stream = _take(_batches(mock_train, batch_size=32, seed=7, augment=False), 6)  # 2 epochs
    again = _take(_batches(mock_train, batch_size=32, seed=7, augment=False), 6)
    other = _take(_batches(mock_train, batch_size=32, seed=8, augment=False), 3)
    for a, b in zip(stream, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(stream[0]["image"], other[0]["image"])
    # each epoch (3 steps of 32 = all 96 examples) visits every example exactly once
    expected = _keys(images, labels)
    for epoch in (stream[:3], stream[3:]):
        got = np.concatenate([_unnormalise(b["image"]) for b in epoch])
        assert _keys(got, np.concatenate([b["label"] for b in epoch])) == expected
    assert not np.array_equal(stream[0]["image"], stream[3]["image"])  # a new order each epoch


def test_train_resumes_at_any_step_without_replay(mock_train):
    full = _take(_batches(mock_train, batch_size=16, seed=1), 14)  # crosses two epochs
    for start in (0, 5, 6, 11):
        resumed = _take(_batches(mock_train, batch_size=16, seed=1, start_step=start), 14 - start)
        for a, b in zip(full[start:], resumed, strict=True):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])
    # The prefetching iterator (background thread) yields the same stream and stops cleanly.
    images, labels = mock_train
    with data.TrainBatches(
        images, labels, batch_size=16, seed=1, name="cifar10", start_step=3, num_steps=4
    ) as threaded:
        got = list(threaded)
    assert len(got) == 4
    for a, b in zip(full[3:7], got, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_train_processes_split_every_global_batch(mock_train):
    full = _take(_batches(mock_train, batch_size=24, seed=0), 5)
    parts = [
        _take(_batches(mock_train, batch_size=24, seed=0, process_index=i, process_count=3), 5)
        for i in range(3)
    ]
    for step in range(5):
        for key in ("image", "label"):
            joined = np.concatenate([p[step][key] for p in parts])
            np.testing.assert_array_equal(joined, full[step][key])  # same global batch


@pytest.mark.parametrize("process_count", [1, 3])
def test_eval_batches_cover_an_in_memory_split_once_in_order(mock_train, process_count):
    images, labels = mock_train[0][:50], mock_train[1][:50]
    parts = [
        list(
            data.EvalBatches(
                images, labels, batch_size=12, name="cifar10", process_index=i,
                process_count=process_count,
            )
        )
        for i in range(process_count)
    ]  # fmt: skip
    assert [len(p) for p in parts] == [5] * process_count  # ceil(50 / 12) on every process
    joined = {
        key: np.concatenate([np.concatenate([p[k][key] for p in parts]) for k in range(5)])
        for key in ("image", "label", "mask")
    }
    assert joined["mask"].tolist() == [True] * 50 + [False] * 10  # global order, then padding
    np.testing.assert_array_equal(joined["label"], np.concatenate([labels, np.full(10, -1)]))
    np.testing.assert_array_equal(_unnormalise(joined["image"][:50]), images)
    assert not joined["image"][50:].any()
    # the normalisation of the training batches (without augmentation), bit for bit
    plain = data.TrainBatches(images, labels, batch_size=50, seed=0, name="cifar10",
                              augment=False, prefetch=0).batch(0)  # fmt: skip
    order = np.argsort(np.random.default_rng([0, 0]).permutation(50))
    np.testing.assert_array_equal(plain["image"][order], joined["image"][:50])
    with pytest.raises(ValueError, match="multiple of the process count 3"):
        data.EvalBatches(images, labels, batch_size=10, name="cifar10", process_count=3)


def test_train_dataset_wraps_the_in_memory_split():
    with testing.mock_data(num_examples=48):
        with data.train_dataset("cifar10", batch_size=8, seed=0, num_devices=8) as batches:
            batch = next(batches)
        finite = data.train_dataset("cifar10", batch_size=8, seed=0, num_epochs=2, num_devices=1)
        assert len(finite) == 2 * (48 // 8) and len(list(finite)) == 12
        assert data.steps_per_epoch("cifar10", batch_size=8) == 6
    assert batch["image"].shape == (8, 32, 32, 3) and batch["label"].dtype == np.int32


@pytest.mark.parametrize("process_count,batch_size,n", [(1, 512, 2_000), (3, 3 * 64, 10_000)])
def test_eval_covers_split_exactly_once(shared_tfds_dir, cifar_test, process_count, batch_size, n):
    outs = [
        data.eval_dataset(
            "cifar10",
            in_distribution="cifar10",
            batch_size=batch_size,
            split=f"test[:{n}]",
            data_dir=shared_tfds_dir,
            process_index=i,
            process_count=process_count,
            num_devices=8 if process_count == 1 else 1,
        )
        for i in range(process_count)
    ]
    per = batch_size // process_count
    lengths = {len(o) for o in outs}
    assert lengths == {int(np.ceil(np.ceil(n / process_count) / per))}
    images, labels = [], []
    for o in outs:
        batches = list(o)
        assert len(batches) == len(o)
        for b in batches:
            assert b["image"].shape == (per, 32, 32, 3) and b["mask"].dtype == bool
            assert b["label"].dtype == np.int32
            assert (b["label"][~b["mask"]] == -1).all() and (b["image"][~b["mask"]] == 0).all()
            images.append(b["image"][b["mask"]])
            labels.append(b["label"][b["mask"]])
    images, labels = np.concatenate(images), np.concatenate(labels)
    assert images.shape[0] == n
    mean, std = STATS["cifar10"]
    ref_images, ref_labels = cifar_test["image"][:n], cifar_test["label"][:n]
    if process_count == 1:  # same order as the split: compare values directly
        expected = (ref_images.astype(np.float32) / 255 - mean) / std
        np.testing.assert_allclose(images, expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(labels, ref_labels)
    assert _keys(_unnormalise(images), labels) == _keys(ref_images, ref_labels)


def test_ood_set_uses_in_distribution_stats_and_minus_one_labels(shared_tfds_dir, cifar_test):
    batches = list(
        data.eval_dataset(
            "cifar10",
            in_distribution="svhn",
            batch_size=512,
            split="test[:1000]",
            data_dir=shared_tfds_dir,
        )
    )
    mask = np.concatenate([b["mask"] for b in batches])
    images = np.concatenate([b["image"] for b in batches])[mask]
    mean, std = STATS["svhn"]
    np.testing.assert_allclose(
        images,
        (cifar_test["image"][:1000].astype(np.float32) / 255 - mean) / std,
        rtol=1e-6,
        atol=1e-6,
    )
    assert (np.concatenate([b["label"] for b in batches]) == -1).all()


def test_mnist_from_prepared_tfds_is_padded_rgb(shared_tfds_dir):
    batch = next(
        iter(
            data.eval_dataset(
                "mnist", in_distribution="cifar10", batch_size=64, data_dir=shared_tfds_dir
            )
        )
    )
    raw = _unnormalise(batch["image"])
    assert batch["image"].shape == (64, 32, 32, 3)
    assert (raw[:, :2] == 0).all() and (raw[:, :, -2:] == 0).all()  # 2-px zero border
    np.testing.assert_array_equal(raw[..., 0], raw[..., 2])
    assert (batch["label"] == -1).all()


def test_counts_and_steps(shared_tfds_dir):
    assert data.num_examples("cifar10", data_dir=shared_tfds_dir) == 50_000
    assert data.num_examples("cifar10", split="test", data_dir=shared_tfds_dir) == 10_000
    assert data.num_examples("mnist", data_dir=shared_tfds_dir) == 10_000
    assert data.steps_per_epoch("cifar10", batch_size=128, data_dir=shared_tfds_dir) == 390
    assert (
        data.steps_per_epoch("cifar10", batch_size=128, data_dir=shared_tfds_dir, process_count=2)
        == 390
    )
    assert (
        data.steps_per_epoch("cifar10", batch_size=99, data_dir=shared_tfds_dir, process_count=3)
        == 50_000 // 99
    )
    with pytest.raises(ValueError, match="process count 3"):
        data.steps_per_epoch("cifar10", batch_size=100, data_dir=shared_tfds_dir, process_count=3)


@pytest.mark.parametrize("name,classes", [("svhn", 10), ("cifar100", 100)])
def test_sets_not_available_offline_under_mock_data(name, classes):
    with testing.mock_data(num_examples=10):
        with data.train_dataset(name, batch_size=8, seed=0, num_devices=8) as batches:
            batch = next(batches)
        assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
        assert ((batch["label"] >= 0) & (batch["label"] < classes)).all()
        own = list(data.eval_dataset(name, in_distribution=name, batch_size=4, num_devices=1))
        other = list(
            data.eval_dataset(name, in_distribution="cifar10", batch_size=4, num_devices=1)
        )
    assert len(own) == 3 and sum(b["mask"].sum() for b in own) == 10
    labels = np.concatenate([b["label"] for b in own])[np.concatenate([b["mask"] for b in own])]
    assert ((labels >= 0) & (labels < classes)).all()
    assert all((b["label"] == -1).all() for b in other)
    # same examples, different in-distribution statistics
    (m1, s1), (m2, s2) = STATS[name], STATS["cifar10"]
    np.testing.assert_allclose(own[0]["image"] * s1 + m1, other[0]["image"] * s2 + m2, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="name='imagenet'"):
        data.train_dataset("imagenet", batch_size=8, seed=0)
    with pytest.raises(ValueError, match="name='lsun'"):
        data.eval_dataset("lsun", in_distribution="cifar10", batch_size=8)
    with pytest.raises(ValueError, match="in_distribution='mnist'"):
        data.eval_dataset("mnist", in_distribution="mnist", batch_size=8)
    with pytest.raises(ValueError, match="batch_size=12 .*8 local devices"):
        data.train_dataset("cifar10", batch_size=12, seed=0)
    with pytest.raises(ValueError, match="batch_size=12 .*8 local devices"):
        data.eval_dataset("cifar10", in_distribution="cifar10", batch_size=12)
    with pytest.raises(ValueError, match="batch_size=10 is not divisible by the process count 4"):
        data.train_dataset("cifar10", batch_size=10, seed=0, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="batch_size=0"):
        data.train_dataset("cifar10", batch_size=0, seed=0)
    with pytest.raises(ValueError, match="seed=None"):
        data.train_dataset("cifar10", batch_size=8, seed=None)
    with pytest.raises(ValueError, match="process_index=2"):
        data.train_dataset("cifar10", batch_size=8, seed=0, process_index=2, process_count=2)


def test_missing_data_fails_fast_with_a_useful_message(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(tfds.download.DownloadManager, "download", no_download)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "env_dir"))
    with pytest.raises(data.DataNotFoundError) as info:
        data.train_dataset(
            "cifar100", batch_size=8, seed=0, data_dir=[tmp_path / "a", tmp_path / "b"]
        )
    message = str(info.value)
    for part in ("cifar100", str(tmp_path / "a"), str(tmp_path / "b"), "download=True"):
        assert part in message, part
    with pytest.raises(data.DataNotFoundError, match=str(tmp_path / "env_dir")):
        data.eval_dataset("svhn", in_distribution="cifar10", batch_size=8)  # $TFDS_DATA_DIR used
    assert not (tmp_path / "a").exists() and not (tmp_path / "env_dir").exists()


def _tiny_lsun_archive(manual):
    import io
    import tarfile

    from PIL import Image

    manual.mkdir()
    with tarfile.open(manual / "LSUN_resize.tar.gz", "w:gz") as t:
        for i in range(3):
            buf = io.BytesIO()
            Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(buf, format="PNG")
            info = tarfile.TarInfo(f"LSUN_resize/{i}.png")
            info.size = len(buf.getvalue())
            t.addfile(info, io.BytesIO(buf.getvalue()))


def test_read_only_data_dir_builds_into_build_dir(shared_tfds_dir, tmp_path, monkeypatch):
    manual, read_only, build = tmp_path / "manual", tmp_path / "read_only", tmp_path / "build"
    _tiny_lsun_archive(manual)
    read_only.mkdir()
    read_only.chmod(0o555)  # like the shared dataset folder (respected even when run as root)
    monkeypatch.setenv("TFDS_DATA_DIR", str(read_only))  # the default is read-only too
    kwargs = dict(in_distribution="cifar10", batch_size=8, manual_dir=manual)
    with pytest.raises(data.DataNotFoundError, match="no writable directory"):
        data.eval_dataset("lsun_resize", data_dir=read_only, **kwargs)
    assert list(read_only.iterdir()) == []
    ds = data.eval_dataset(
        "lsun_resize", data_dir=[read_only, shared_tfds_dir], build_dir=build, **kwargs
    )
    assert len(ds) == 1 and (build / "isomax_lsun_resize").is_dir()
    assert list(read_only.iterdir()) == []
    # a list [writable, read-only] searches the build directory first and finds the set
    again = list(data.eval_dataset("lsun_resize", data_dir=[build, read_only], **kwargs))
    assert sum(b["mask"].sum() for b in again) == 3
    raw = np.sort(_unnormalise(again[0]["image"][again[0]["mask"]])[:, 0, 0, 0])
    np.testing.assert_array_equal(raw, [0, 40, 80])


@pytest.mark.parametrize("process_count", [1, 3])
def test_eval_covers_a_mocked_split_exactly_once(process_count):
    with testing.mock_data(num_examples=37):
        ref = next(iter(tfds.as_numpy(tfds.builder("cifar10").as_dataset(split="test").batch(100))))
        outs = [
            list(
                data.eval_dataset(
                    "cifar10",
                    in_distribution="cifar10",
                    batch_size=6 * process_count,
                    process_index=i,
                    process_count=process_count,
                    num_devices=1,
                )
            )
            for i in range(process_count)
        ]
    assert len({len(o) for o in outs}) == 1  # every process yields the same number of batches
    images = np.concatenate([b["image"][b["mask"]] for o in outs for b in o])
    labels = np.concatenate([b["label"][b["mask"]] for o in outs for b in o])
    assert all((b["label"][~b["mask"]] == -1).all() for o in outs for b in o)
    assert _keys(_unnormalise(images), labels) == _keys(ref["image"], ref["label"])


def test_check_available_is_fast_and_names_what_is_missing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.DataNotFoundError, match="'svhn'"):
        data.check_available("svhn", data_dir=empty, build_dir=tmp_path / "build")
    with pytest.raises(data.DataNotFoundError, match="tiny_imagenet_resize"):
        data.check_available("tiny_imagenet_resize", data_dir=empty, manual_dir=tmp_path)
    # generated sets only need a writable place to be built; downloads are trusted to work
    data.check_available("gaussian_noise", data_dir=empty, build_dir=tmp_path / "build")
    data.check_available("svhn", data_dir=empty, download=True)
    assert not (tmp_path / "build").exists()  # nothing was built or written
    with pytest.raises(ValueError, match="name='svhnn'"):
        data.check_available("svhnn")


def test_check_available_on_prepared_data(shared_tfds_dir):
    data.check_available("cifar10", split="train[:1000]", data_dir=shared_tfds_dir)
    data.check_available("mnist", data_dir=shared_tfds_dir)
    with pytest.raises(ValueError, match="split"):
        data.check_available("cifar10", split="validation", data_dir=shared_tfds_dir)
