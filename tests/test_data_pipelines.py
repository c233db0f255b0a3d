"""Train / eval pipelines: values, determinism, multi-process sharding, padding, errors, offline."""

import hashlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from isomax_jax import data

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


def test_train_batches_shapes_ranges_and_augmentation(shared_tfds_dir):
    kwargs = dict(
        batch_size=16, seed=3, data_dir=shared_tfds_dir, split="train[:256]", num_devices=8
    )
    aug = _take(data.train_dataset("cifar10", **kwargs), 3)
    plain = _take(data.train_dataset("cifar10", augment=False, **kwargs), 3)
    mean, std = STATS["cifar10"]
    for a, p in zip(aug, plain, strict=True):
        assert a["image"].shape == (16, 32, 32, 3) and a["image"].dtype == np.float32
        assert a["label"].shape == (16,) and a["label"].dtype == np.int32
        assert set(a) == {"image", "label"}
        assert a["label"].min() >= 0 and a["label"].max() <= 9
        np.testing.assert_array_equal(a["label"], p["label"])  # augmentation keeps the order
        lo, hi = (0 - mean) / std, (1 - mean) / std
        assert (a["image"] >= lo - 1e-6).all() and (a["image"] <= hi + 1e-6).all()
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


def test_train_deterministic_under_seed(shared_tfds_dir):
    kwargs = dict(batch_size=32, data_dir=shared_tfds_dir, split="train[:512]", num_devices=8)
    first = _take(data.train_dataset("cifar10", seed=7, **kwargs), 20)  # crosses an epoch
    again = _take(data.train_dataset("cifar10", seed=7, **kwargs), 20)
    other = _take(data.train_dataset("cifar10", seed=8, **kwargs), 20)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(first[0]["label"], other[0]["label"])
    # epoch 2 is a different permutation of the same 512 examples
    e1 = np.concatenate([b["label"] for b in first[:16]])
    e2 = np.concatenate([b["label"] for b in first[16:]] + [b["label"] for b in again[:12]])[:512]
    assert not np.array_equal(e1, e2) and np.bincount(e1, minlength=10).sum() == 512


def test_train_processes_get_disjoint_shards(shared_tfds_dir):
    kwargs = dict(
        seed=0,
        data_dir=shared_tfds_dir,
        split="train[:600]",
        augment=False,
        num_epochs=1,
        num_devices=1,
    )
    shards = [
        list(
            data.train_dataset(
                "cifar10", batch_size=100, process_index=i, process_count=2, **kwargs
            )
        )
        for i in range(2)
    ]
    full = list(
        data.train_dataset("cifar10", batch_size=100, process_count=1, process_index=0, **kwargs)
    )
    assert [len(s) for s in shards] == [6, 6] and len(full) == 6
    assert all(b["image"].shape[0] == 50 for s in shards for b in s)

    def keys(batches):
        return _keys(
            np.concatenate([b["image"] for b in batches]),
            np.concatenate([b["label"] for b in batches]),
        )

    k0, k1 = keys(shards[0]), keys(shards[1])
    assert sorted(k0 + k1) == keys(full)  # together: each example exactly once
    assert not set(k0) & set(k1)


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
        == 16_666 // 33
    )
    with pytest.raises(ValueError, match="process count 3"):
        data.steps_per_epoch("cifar10", batch_size=100, data_dir=shared_tfds_dir, process_count=3)


@pytest.mark.parametrize("name,classes", [("svhn", 10), ("cifar100", 100)])
def test_sets_not_available_offline_under_mock_data(name, classes):
    with tfds.testing.mock_data(num_examples=10):
        batch = next(iter(data.train_dataset(name, batch_size=8, seed=0, num_devices=8)))
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
