"""isomax_jax.device_data: device-resident batches, bit-deterministic, the tfds path's augmentation
distribution, usable with train.train_step unchanged (DisMax's FPR included)."""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isomax_jax import device_data, parallel, train
from isomax_jax.models import make_head
from isomax_jax.models.classifier import Classifier
from isomax_jax.models.resnet import CifarResNet

CIFAR10 = ((0.491, 0.482, 0.446), (0.247, 0.243, 0.261))
jitted_batch = jax.jit(device_data.train_batch, static_argnames=("seed", "batch_size", "augment"))


def _split(n=100, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), np.arange(n)


def _put(images, labels, mesh=None):
    return device_data.put(images, labels, mean=CIFAR10[0], std=CIFAR10[1], mesh=mesh)


def test_import_pulls_neither_tensorflow_nor_torch():
    code = (
        "import sys, isomax_jax.device_data, isomax_jax.pack\n"
        "print(sorted(m for m in ('tensorflow', 'torch', 'tensorflow_datasets') "
        "if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_batches_are_a_pure_function_of_seed_and_step():
    data = _put(*_split())
    first = jitted_batch(data, 7, seed=3, batch_size=16)
    again = jitted_batch(data, jnp.int32(7), seed=3, batch_size=16)
    np.testing.assert_array_equal(again["image"], first["image"])
    np.testing.assert_array_equal(again["label"], first["label"])
    other_step = jitted_batch(data, 8, seed=3, batch_size=16)
    other_seed = jitted_batch(data, 7, seed=4, batch_size=16)
    assert not np.array_equal(other_step["label"], first["label"])
    assert not np.array_equal(other_seed["label"], first["label"])
    assert first["image"].dtype == jnp.float32 and first["label"].dtype == jnp.int32


@pytest.mark.parametrize("n", [96, 101])  # divisible by the 8 devices, and not
def test_sharded_batches_equal_one_device_bit_for_bit(n):
    images, labels = _split(n)
    mesh = parallel.data_mesh(jax.devices()[:8])
    one, eight = _put(images, labels), _put(images, labels, mesh)
    assert eight.images.shape[0] == -(-n // 8) * 8 and eight.num_examples == n
    for step in (0, 5, 11, 12, 30):
        a = jitted_batch(one, step, seed=1, batch_size=16)
        b = jitted_batch(eight, step, seed=1, batch_size=16)
        assert b["image"].sharding.spec == jax.sharding.PartitionSpec("data")
        np.testing.assert_array_equal(np.asarray(b["image"]), np.asarray(a["image"]))
        np.testing.assert_array_equal(np.asarray(b["label"]), np.asarray(a["label"]))


def test_an_epoch_visits_each_example_at_most_once_and_epochs_differ():
    images, labels = _split(100)
    data = _put(images, labels)
    steps = data.steps_per_epoch(16)
    assert steps == 6  # 4 examples left out per epoch, as in the tfds path

    def epoch(e):
        batches = [jitted_batch(data, e * steps + i, seed=0, batch_size=16) for i in range(steps)]
        return np.concatenate([np.asarray(b["label"]) for b in batches])

    first, second = epoch(0), epoch(1)
    assert len(set(first.tolist())) == 96 and len(set(second.tolist())) == 96
    assert not np.array_equal(first, second)
    # Unaugmented rows are the stored images of those labels, normalised.
    batch = jitted_batch(data, 2, seed=0, batch_size=16, augment=False)
    expected = (images[np.asarray(batch["label"])] / 255.0 - CIFAR10[0]) / CIFAR10[1]
    np.testing.assert_allclose(batch["image"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 101, 50_000])
def test_epoch_order_is_a_permutation_of_the_split(n):
    order = jax.jit(lambda e: device_data.epoch_order(jax.random.key(1), e, jnp.arange(n),
                                                      num_examples=n))  # fmt: skip
    first, second = np.asarray(order(0)), np.asarray(order(1))
    np.testing.assert_array_equal(np.sort(first), np.arange(n))
    np.testing.assert_array_equal(np.sort(second), np.arange(n))
    assert n < 3 or not np.array_equal(first, second)


def test_epoch_order_is_uniform_over_all_permutations():
    """24,000 keys: each of the 120 orders of 5 examples ~200 times (chi-square, 119 dof,
    p > 1e-4 with these fixed keys)."""
    import itertools

    keys = jax.random.split(jax.random.key(0), 24_000)
    orders = jax.jit(jax.vmap(lambda k: device_data.epoch_order(k, 0, jnp.arange(5),
                                                                num_examples=5)))(keys)  # fmt: skip
    index = {p: i for i, p in enumerate(itertools.permutations(range(5)))}
    counts = np.bincount([index[tuple(o)] for o in np.asarray(orders).tolist()], minlength=120)
    assert ((counts - 200) ** 2 / 200).sum() < 185.1, counts


def _reference_crop_flip(images, offsets, flips, pad=4):
    """The tfds path's NumPy crop and flip (isomax_jax.data.training.TrainBatches.batch)."""
    height, width = images.shape[1:3]
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.empty_like(images)
    for k, ((dy, dx), flip) in enumerate(zip(offsets, flips, strict=True)):
        window = padded[k, dy : dy + height, dx : dx + width]
        out[k] = window[:, ::-1] if flip else window
    return out


def test_crop_flip_equals_the_numpy_reference():
    images, _ = _split(64, size=32)
    rng = np.random.default_rng(1)
    offsets = rng.integers(0, 9, (64, 2))
    flips = rng.random(64) < 0.5
    got = jax.jit(device_data.crop_flip)(images, offsets, flips)
    np.testing.assert_array_equal(np.asarray(got), _reference_crop_flip(images, offsets, flips))
    centred = device_data.crop_flip(images, np.full((64, 2), 4), np.zeros(64, bool))
    np.testing.assert_array_equal(np.asarray(centred), images)


def _coordinate_images(n):
    """Red = row + 1, green = column + 1: a crop's offsets and flip can be read off the centre."""
    grid = np.arange(1, 33, dtype=np.uint8)
    image = np.stack([np.repeat(grid[:, None], 32, 1), np.repeat(grid[None, :], 32, 0),
                      np.zeros((32, 32), np.uint8)], axis=-1)  # fmt: skip
    return np.broadcast_to(image, (n, 32, 32, 3)).copy()


def _offsets_and_flips(normalised, mean, std):
    pixels = np.rint(np.asarray(normalised) * (np.asarray(std) * 255) + np.asarray(mean) * 255)
    centre, right = pixels[:, 16, 16], pixels[:, 16, 17]
    flipped = right[:, 1] < centre[:, 1]
    dy = centre[:, 0] - 1 - 12
    dx = centre[:, 1] - 1 - np.where(flipped, 11, 12)
    return dy.astype(int), dx.astype(int), flipped


def _chi_square(counts_a, counts_b):
    table = np.stack([counts_a, counts_b]).astype(float)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    return float(((table - expected) ** 2 / expected).sum())


def test_augmentation_distribution_matches_the_tfds_path():
    """Crop offsets uniform on {0..8}^2 and flips at rate 1/2 in both paths; the two paths'
    histograms agree (chi-square, p > 1e-4 with these fixed seeds)."""
    training = pytest.importorskip("isomax_jax.data.training")
    n, batch, steps = 512, 512, 8
    images, labels = _coordinate_images(n), np.arange(n)
    host = training.TrainBatches(images, labels, batch_size=batch, seed=0, name="cifar10",
                                 prefetch=0)  # fmt: skip
    data = _put(images, labels)
    paths = {
        "tfds": [host.batch(s)["image"] for s in range(steps)],
        "device": [jitted_batch(data, s, seed=0, batch_size=batch)["image"] for s in range(steps)],
    }
    stats = {}
    for name, batches in paths.items():
        dy, dx, flips = _offsets_and_flips(np.concatenate(batches), *CIFAR10)
        assert dy.min() == 0 and dy.max() == 8 and dx.min() == 0 and dx.max() == 8, name
        total = len(dy)
        for offsets in (dy, dx):  # uniform: chi-square against n/9 per value, 8 dof
            counts = np.bincount(offsets, minlength=9)
            assert ((counts - total / 9) ** 2 / (total / 9)).sum() < 31.83, (name, counts)
        assert abs(flips.mean() - 0.5) < 4 * np.sqrt(0.25 / total), (name, flips.mean())
        joint = np.bincount(dy * 9 + dx, minlength=81)  # independent: uniform on 81 cells
        assert ((joint - total / 81) ** 2 / (total / 81)).sum() < 135.8, name
        stats[name] = (np.bincount(dy, minlength=9), np.bincount(dx, minlength=9),
                       np.bincount(flips.astype(int), minlength=2))  # fmt: skip
    for a, b, critical in zip(stats["tfds"], stats["device"], (31.83, 31.83, 15.14), strict=True):
        assert _chi_square(a, b) < critical, (a, b)


def _tiny_state(head="softmax", fpr=False):
    backbone = CifarResNet(stage_sizes=(1,), widths=(8,), stem_width=8, stem_stride=2,
                           shortcut="zero_pad")  # fmt: skip
    model = Classifier(backbone, make_head(head, num_classes=10))
    tx, loss = train.reference_optimizer(0.1), train.LossConfig(head, fpr=fpr)
    return train.create_train_state(
        model, key=jax.random.key(0), tx=tx, loss=loss, input_shape=(1, 8, 8, 3)
    )


def test_train_step_is_train_train_step_on_the_drawn_batch():
    images, labels = _split(64)
    data = _put(images, labels % 10)
    state = _tiny_state()
    step = jax.jit(functools.partial(device_data.train_step, seed=2, batch_size=16))
    new, metrics = step(state, data)
    batch = device_data.train_batch(data, state.step, seed=2, batch_size=16)
    expected, expected_metrics = jax.jit(train.train_step)(state, batch)
    np.testing.assert_allclose(metrics["loss"], expected_metrics["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 new.params, expected.params)  # fmt: skip
    # The stream follows state.step: the next call draws the batch of step 1.
    assert int(new.step) == 1


def test_dismax_fpr_runs_unchanged_on_device_batches():
    images, labels = _split(64)
    data = _put(images, labels % 10, parallel.data_mesh(jax.devices()[:8]))
    state = parallel.replicate_state(_tiny_state("dismax", fpr=True), data.mesh)
    step = jax.jit(functools.partial(device_data.train_step, seed=0, batch_size=16),
                   donate_argnums=0)  # fmt: skip
    for _ in range(2):
        state, metrics = step(state, data)
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 2


def test_eval_batches_equal_the_tfds_paths_evaluation_batches():
    training = pytest.importorskip("isomax_jax.data.training")
    images, labels = _split(10, size=32)
    for process in range(2):
        ours = list(device_data.eval_batches(images, labels, batch_size=4, mean=CIFAR10[0],
                                             std=CIFAR10[1], process_index=process,
                                             process_count=2))  # fmt: skip
        theirs = list(training.EvalBatches(images, labels, batch_size=4, name="cifar10",
                                           process_index=process, process_count=2))  # fmt: skip
        assert len(ours) == len(theirs) == 3
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_allclose(a["image"], b["image"], rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(a["label"], b["label"])
            np.testing.assert_array_equal(a["mask"], b["mask"])
    ood = list(device_data.eval_batches(images, None, batch_size=4, mean=(0,) * 3, std=(1,) * 3))
    assert all((b["label"] == -1).all() for b in ood)


def test_bad_inputs_name_the_argument():
    images, labels = _split(20)
    stats = dict(mean=CIFAR10[0], std=CIFAR10[1])
    with pytest.raises(TypeError, match="uint8"):
        device_data.put(images.astype(np.float32), labels, **stats)
    with pytest.raises(ValueError, match=r"labels must be \[20\]"):
        device_data.put(images, labels[:5], **stats)
    with pytest.raises(TypeError, match="labels must be integer"):
        device_data.put(images, labels.astype(float), **stats)
    with pytest.raises(ValueError, match="one value per channel"):
        device_data.put(images, labels, mean=(0.5,), std=(0.2,))
    with pytest.raises(ValueError, match="axis 'data'"):
        device_data.put(images, labels, mesh=jax.sharding.Mesh(jax.devices()[:2], ("x",)), **stats)
    data = device_data.put(images, labels, mesh=parallel.data_mesh(jax.devices()[:8]), **stats)
    with pytest.raises(ValueError, match="batch_size=32"):
        device_data.train_batch(data, 0, seed=0, batch_size=32)
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        device_data.train_batch(data, 0, seed=0, batch_size=12)
