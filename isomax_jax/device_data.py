"""Device-resident training data: uint8 arrays on the accelerators, batches drawn inside the step.

For sets that fit in accelerator memory (CIFAR-10/100: 150 MB of uint8 pixels, SVHN: 220 MB,
the OOD test sets) the host input pipeline can go: :func:`put` places the images once on the
devices, split over the batch axis of a ``"data"`` mesh, and :func:`train_batch` draws step
``s``'s batch inside the jitted train step, so no image crosses the host-device link during
training. The stream is a pure function of ``(seed, step)``, bit-for-bit the same on every run
and every number of devices:

* epoch ``e`` visits the examples in a random order keyed by ``(seed, e)`` (``key =
  jax.random.key(seed)``, threefry; :func:`epoch_order`, a swap-or-not shuffle that gives each
  batch's rows in ``O(batch)`` instead of sorting ``n`` keys at every step); an epoch is
  ``n // batch_size`` steps, the incomplete last batch dropped, as in
  :class:`isomax_jax.data.TrainBatches`;
* step ``s`` (``i = s mod steps_per_epoch``) crops each image from its 4-pixel zero padding at
  offsets ``(dy, dx)`` uniform in ``{0, ..., 8}`` and flips it horizontally with probability
  1/2, both drawn from ``fold_in(fold_in(key, e), i + 1)`` for the whole global batch: the
  distribution of the tfds path (:mod:`isomax_jax.data.training`), drawn with JAX's generator
  instead of NumPy's (``tests/test_device_data.py`` compares the offsets and flip rates);
* images are normalised with the in-distribution mean/std, as the tfds path does.

With several devices each device gathers, for the whole global batch, the rows it holds and a
reduce-scatter (``psum_scatter``) hands each device its slice of the batch: a few hundred kB per
step instead of an all-gather of the set. DisMax's FPR mosaic needs nothing here: it runs inside
:func:`isomax_jax.train.train_step` on the batch this module draws.

This module imports neither TensorFlow nor PyTorch (it runs where only JAX is installed); the
pack of :mod:`isomax_jax.pack` provides the arrays without TensorFlow.

Example (8 images, batch 4, one device):
  >>> import numpy as np
  >>> images = np.arange(8 * 4 * 4 * 3, dtype=np.uint8).reshape(8, 4, 4, 3)
  >>> data = put(images, np.arange(8), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
  >>> batch = train_batch(data, 3, seed=0, batch_size=4)
  >>> batch["image"].shape, batch["image"].dtype, batch["label"].dtype
  ((4, 4, 4, 3), dtype('float32'), dtype('int32'))
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

__all__ = [
    "PAD",
    "ROUNDS",
    "DeviceData",
    "augment_offsets",
    "batch_indices",
    "crop_flip",
    "epoch_order",
    "eval_batches",
    "normalise",
    "put",
    "train_batch",
    "train_step",
]

#: Zero padding of the random crop, in pixels (the papers' and the tfds path's).
PAD = 4
#: Rounds of the swap-or-not shuffle of :func:`epoch_order` (about 3 log2 of CIFAR's 50,000).
ROUNDS = 48
DATA_AXIS = "data"


class DeviceData(flax.struct.PyTreeNode):
    """A training split on the devices (a pytree: pass it to a jitted step as an argument).

    Attributes:
      images: uint8 ``[m, H, W, C]``, ``m`` = ``num_examples`` rounded up to a multiple of the
        mesh's devices (zero rows at the end), split over the mesh's ``"data"`` axis.
      labels: int32 ``[m]``, split alike.
      num_examples: ``n``, the real examples (static).
      mean, std: per-channel normalisation statistics for images in [0, 1] (static).
      mesh: the 1-D ``"data"`` mesh the arrays live on (static; None: one device, no mesh).
    """

    images: jax.Array
    labels: jax.Array
    num_examples: int = flax.struct.field(pytree_node=False)
    mean: tuple[float, ...] = flax.struct.field(pytree_node=False)
    std: tuple[float, ...] = flax.struct.field(pytree_node=False)
    mesh: Mesh | None = flax.struct.field(pytree_node=False, default=None)

    def steps_per_epoch(self, batch_size: int) -> int:
        """``num_examples // batch_size``: the incomplete last batch of an epoch is dropped."""
        return self.num_examples // int(batch_size)


def put(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    mesh: Mesh | None = None,
) -> DeviceData:
    """Places a split on the devices once: uint8 images and int32 labels split over ``mesh``.

    Every process passes the whole split (host arrays); each device receives its rows
    (``jax.make_array_from_callback``), so this also works with several processes.

    Args:
      images: uint8 ``[n, H, W, C]``.
      labels: integer ``[n]``.
      mean, std: the in-distribution set's per-channel statistics for images in [0, 1]
        (:func:`isomax_jax.data.normalization_stats`, or :meth:`isomax_jax.pack.Pack.normalization`
        where TensorFlow is absent).
      mesh: a 1-D mesh with axis ``"data"`` (:func:`isomax_jax.parallel.data_mesh`); None keeps
        the arrays on the default device.

    Raises:
      TypeError: images are not uint8, labels not integer.
      ValueError: wrong ranks or shapes, statistics not one per channel, a mesh without a
        ``"data"`` axis.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8:
        raise TypeError(f"images must be uint8 [n, H, W, C], got dtype {images.dtype}")
    if images.ndim != 4:
        raise ValueError(f"images must be [n, H, W, C], got shape {images.shape}")
    n = images.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels must be [{n}] to match images, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be integer, got dtype {labels.dtype}")
    channels = images.shape[-1]
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"mean and std need one value per channel ({channels}), got {len(mean)} and {len(std)}"
        )
    labels = labels.astype(np.int32)
    if mesh is None:
        return DeviceData(jnp.asarray(images), jnp.asarray(labels), n, mean, std, None)
    if DATA_AXIS not in mesh.axis_names or len(mesh.axis_names) != 1:
        raise ValueError(f"mesh must be 1-D with axis {DATA_AXIS!r}, got axes {mesh.axis_names}")
    rows = math.ceil(n / mesh.size) * mesh.size
    if rows != n:  # zero rows at the end, never drawn: every device holds rows / devices
        images = np.concatenate([images, np.zeros((rows - n, *images.shape[1:]), np.uint8)])
        labels = np.concatenate([labels, np.zeros(rows - n, np.int32)])
    sharding = NamedSharding(mesh, P(DATA_AXIS))

    def place(array):
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    return DeviceData(place(images), place(labels), n, mean, std, mesh)


def _mix32(x: jax.Array) -> jax.Array:
    """A 32-bit integer hash with full avalanche (Wellons' ``lowbias32``), uint32 -> uint32."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def epoch_order(
    key: jax.Array, epoch: ArrayLike, positions: ArrayLike, *, num_examples: int
) -> jax.Array:
    """The example at each of ``positions`` in epoch ``epoch``'s order: a keyed permutation.

    A swap-or-not shuffle (Hoang, Morris & Rogaway, CRYPTO 2012) of ``[0, n)``: in each of
    :data:`ROUNDS` rounds, ``x`` moves to its partner ``(K_r - x) mod n`` when a hashed bit of
    ``max(x, partner)`` is set; every round is an involution, so the whole is a permutation of
    exactly ``[0, n)``, and each position is computed alone: a batch costs ``O(B)``, not the
    sort of ``n`` random keys a full ``jax.random.permutation`` needs at every step.

    Args:
      key: the stream's key; epoch: int32 scalar (may be traced).
      positions: int ``[...]`` in ``[0, n)``.
      num_examples: ``n`` (static).

    Returns:
      int32, the shape of ``positions``.
    """
    round_keys = jax.random.bits(
        jax.random.fold_in(jax.random.fold_in(key, epoch), 0), (2, ROUNDS), jnp.uint32
    )
    n = jnp.uint32(num_examples)
    partners = round_keys[0] % n
    x = jnp.asarray(positions).astype(jnp.uint32)
    for r in range(ROUNDS):
        partner = (partners[r] + n - x) % n
        swap = (_mix32(jnp.maximum(x, partner) ^ round_keys[1, r]) & 1) == 1
        x = jnp.where(swap, partner, x)
    return x.astype(jnp.int32)


def batch_indices(
    key: jax.Array, step: ArrayLike, *, num_examples: int, batch_size: int
) -> jax.Array:
    """Rows of the global batch of ``step``: positions ``[i B, (i + 1) B)`` of its epoch's order
    (:func:`epoch_order`), ``i = step mod steps_per_epoch``.

    Args:
      key: the stream's key (``jax.random.key(seed)``).
      step: the global step (int or int32 scalar, may be traced).
      num_examples: ``n``; batch_size: the global batch ``B <= n``.

    Returns:
      int32 ``[B]`` distinct indices in ``[0, n)``; the ``n // B`` batches of an epoch are
      disjoint.
    """
    steps_per_epoch = num_examples // batch_size
    epoch, i = jnp.divmod(jnp.asarray(step, jnp.int32), steps_per_epoch)
    positions = i * batch_size + jnp.arange(batch_size, dtype=jnp.int32)
    return epoch_order(key, epoch, positions, num_examples=num_examples)


def augment_offsets(
    key: jax.Array, step: ArrayLike, *, num_examples: int, batch_size: int
) -> tuple[jax.Array, jax.Array]:
    """Crop offsets ``int32 [B, 2]`` (``(dy, dx)`` in ``{0, ..., 2 PAD}``) and flips
    ``bool [B]`` of the global batch of ``step``: independent, uniform, probability 1/2."""
    epoch, i = jnp.divmod(jnp.asarray(step, jnp.int32), num_examples // batch_size)
    step_key = jax.random.fold_in(jax.random.fold_in(key, epoch), i + 1)
    offset_key, flip_key = jax.random.split(step_key)
    offsets = jax.random.randint(offset_key, (batch_size, 2), 0, 2 * PAD + 1, jnp.int32)
    return offsets, jax.random.bernoulli(flip_key, 0.5, (batch_size,))


def crop_flip(images: ArrayLike, offsets: ArrayLike, flips: ArrayLike) -> jax.Array:
    """Random crop from a ``PAD``-pixel zero padding, then horizontal flip.

    Args:
      images: ``[B, H, W, C]`` (any dtype; uint8 on the devices).
      offsets: int ``[B, 2]``: the crop's top-left corner ``(dy, dx)`` in the padded image,
        ``0 <= dy, dx <= 2 PAD``; ``(PAD, PAD)`` is the identity.
      flips: bool ``[B]``: flip the crop left-right.

    Returns:
      ``[B, H, W, C]``, the dtype of ``images``.
    """
    images, offsets, flips = jnp.asarray(images), jnp.asarray(offsets), jnp.asarray(flips)
    _, height, width, channels = images.shape
    padded = jnp.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    cropped = jax.vmap(crop)(padded, offsets)
    return jnp.where(flips[:, None, None, None], cropped[:, :, ::-1], cropped)


def normalise(images: ArrayLike, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """uint8 ``[..., C]`` -> float32 ``(x / 255 - mean) / std``, computed as the tfds path does
    (``(x - 255 mean) * (1 / (255 std))`` in float32)."""
    images = jnp.asarray(images)
    shape = (1,) * (images.ndim - 1) + (-1,)  # explicit ranks (jax_numpy_rank_promotion)
    mean255 = (np.asarray(mean, np.float32) * 255).reshape(shape)
    inv_std = (1 / (np.asarray(std, np.float32) * 255)).reshape(shape)
    return (images.astype(jnp.float32) - mean255) * inv_std


def _local_rows(images, labels, index, offsets, flips, *, augment: bool, sharded: bool):
    """This device's rows of the batch (all of it on one device): gather, crop, flip."""
    if sharded:  # gather the batch's rows held here (zero elsewhere), then reduce-scatter
        rows = images.shape[0]
        local = index - jax.lax.axis_index(DATA_AXIS) * rows
        held = (local >= 0) & (local < rows)
        local = jnp.clip(local, 0, rows - 1)
        picked = jnp.where(held[:, None, None, None], images[local], jnp.zeros((), images.dtype))
        label = jnp.where(held, labels[local], 0)
        picked = jax.lax.psum_scatter(picked, DATA_AXIS, scatter_dimension=0, tiled=True)
        label = jax.lax.psum_scatter(label, DATA_AXIS, scatter_dimension=0, tiled=True)
        per_device = picked.shape[0]
        first = jax.lax.axis_index(DATA_AXIS) * per_device
        offsets = jax.lax.dynamic_slice_in_dim(offsets, first, per_device)
        flips = jax.lax.dynamic_slice_in_dim(flips, first, per_device)
    else:
        picked, label = images[index], labels[index]
    if augment:
        picked = crop_flip(picked, offsets, flips)
    return picked, label


def train_batch(
    data: DeviceData, step: ArrayLike, *, seed: int, batch_size: int, augment: bool = True
) -> dict[str, jax.Array]:
    """The augmented, normalised global batch of ``step``, drawn on the devices (jit it).

    Args:
      data: the split from :func:`put`.
      step: the global step (int or int32 scalar; traced inside a jitted step).
      seed: the stream's seed (static).
      batch_size: the GLOBAL batch ``B <= num_examples``, a multiple of the mesh's devices.
      augment: random crop (4-pixel zero padding) and horizontal flip.

    Returns:
      ``{"image": float32 [B, H, W, C], "label": int32 [B]}``, split over the mesh's ``"data"``
      axis when ``data`` has a mesh: the batch :func:`isomax_jax.train.train_step` takes.

    Raises:
      ValueError: ``batch_size`` larger than the split or not divisible by the devices.
    """
    n = data.num_examples
    devices = 1 if data.mesh is None else data.mesh.size
    if not 1 <= batch_size <= n or batch_size % devices:
        raise ValueError(
            f"batch_size={batch_size} must be in [1, {n}] (the split's examples) and a multiple "
            f"of the {devices} devices of the mesh"
        )
    key = jax.random.key(seed)
    index = batch_indices(key, step, num_examples=n, batch_size=batch_size)
    offsets, flips = augment_offsets(key, step, num_examples=n, batch_size=batch_size)
    local = functools.partial(_local_rows, augment=augment, sharded=devices > 1)
    if devices > 1:
        local = jax.shard_map(
            local,
            mesh=data.mesh,
            in_specs=(P(DATA_AXIS), P(DATA_AXIS), P(), P(), P()),
            out_specs=(P(DATA_AXIS), P(DATA_AXIS)),
        )
    images, labels = local(data.images, data.labels, index, offsets, flips)
    return {"image": normalise(images, data.mean, data.std), "label": labels}


def train_step(
    state: Any,
    data: DeviceData,
    *,
    seed: int,
    batch_size: int,
    augment: bool = True,
    step_fn: Callable[[Any, dict], tuple[Any, dict]] | None = None,
) -> tuple[Any, dict[str, jax.Array]]:
    """One training step on the batch of ``state.step`` (:func:`train_batch`), drawn on device.

    ``step_fn`` defaults to :func:`isomax_jax.train.train_step`, unchanged (DisMax's FPR mosaic
    included). The stream follows the state's step, so a restored state resumes it exactly.

    Example:
      ``step = jax.jit(functools.partial(device_data.train_step, seed=0, batch_size=128),
      donate_argnums=0)``, then ``state, metrics = step(state, data)`` every step.
    """
    if step_fn is None:
        from isomax_jax import train

        step_fn = train.train_step
    batch = train_batch(data, state.step, seed=seed, batch_size=batch_size, augment=augment)
    return step_fn(state, batch)


def eval_batches(
    images: np.ndarray,
    labels: np.ndarray | None,
    *,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Normalised evaluation batches of host arrays, every example once, in order (NumPy only).

    The layout of :class:`isomax_jax.data.EvalBatches` without TensorFlow: global batch ``k``
    holds examples ``[k B, (k + 1) B)``, process ``i`` of ``P`` its rows ``[i b, (i + 1) b)``
    (``b = B / P``); rows past the end are padding (zero image, label -1, mask False).

    Args:
      images: uint8 ``[n, H, W, C]``.
      labels: integer ``[n]``, or None (OOD sets: label -1).
      batch_size: the GLOBAL batch, a multiple of ``process_count``.
      mean, std: the IN-DISTRIBUTION set's statistics (OOD sets use them too).

    Yields:
      ``{"image": float32 [b, H, W, C], "label": int32 [b], "mask": bool [b]}``.

    Example:
      >>> images = np.zeros((5, 2, 2, 3), np.uint8)
      >>> batches = eval_batches(images, None, batch_size=4, mean=(0,) * 3, std=(1,) * 3)
      >>> [(int(b["mask"].sum()), int(b["label"][0])) for b in batches]
      [(4, -1), (1, -1)]
    """
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size} must be a positive multiple of process_count={process_count}"
        )
    n = images.shape[0]
    labels = np.full(n, -1, np.int32) if labels is None else np.asarray(labels, np.int32)
    per_process = batch_size // process_count
    mean255 = np.asarray(mean, np.float32) * 255
    inv_std = 1 / (np.asarray(std, np.float32) * 255)
    for start in range(0, n, batch_size):
        first = start + process_index * per_process
        index = np.arange(first, first + per_process)
        mask = index < n
        index = np.where(mask, index, 0)
        image = (images[index].astype(np.float32) - mean255) * inv_std
        yield {
            "image": image * mask[:, None, None, None],
            "label": np.where(mask, labels[index], -1).astype(np.int32),
            "mask": mask,
        }
