"""Data parallelism: ``jax.jit`` over a ``Mesh`` (main path) and a thin ``pmap`` wrapper.

Main path (single- and multi-host): a 1-D mesh with axis ``"data"`` over every device; the train
state is replicated (``P()``), the batch is split along its first axis (``P("data")``) and the
state buffers are donated. Each process passes only its host-local part of the batch;
:func:`shard_batch` assembles the global array with ``jax.make_array_from_process_local_data``.
The step itself is the unmodified :func:`isomax_jax.train.train_step`: XLA inserts the gradient
and BatchNorm all-reduces, so the result equals a one-device step on the global batch.

Legacy path: :func:`pmap_train_step` maps :func:`~isomax_jax.train.train_step` with an
``axis_name`` over the leading device axis (see :func:`replicate` / :func:`split_for_pmap`).
"""

from __future__ import annotations

import collections
import functools
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from isomax_jax import train

DATA_AXIS = "data"
PMAP_AXIS = "batch"


# jax.Device is the runtime's device class, bound by assignment in jax/__init__.py, which
# pyright does not accept as a type expression (its stubs declare no class of that name).
def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:  # pyright: ignore[reportInvalidTypeForm]
    """A 1-D mesh named ``"data"`` over ``devices`` (default: all devices of all processes).

    Example:
      >>> dict(data_mesh(jax.devices()[:2]).shape)
      {'data': 2}
    """
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis over the ``"data"`` axis of ``mesh``."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicate_state(state: Any, mesh: Mesh) -> Any:
    """Places a pytree (e.g. the train state) replicated on every device of ``mesh``.

    In a multi-process run every process must pass identical values (same seed).
    """
    sharding = replicated(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), state
    )


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Host-local batch -> global batch sharded along ``"data"``.

    Args:
      batch: pytree of host-local arrays ``[B_local, ...]``; every process passes its own part,
        ``B_local`` must be divisible by the number of local devices in the mesh.
      mesh: the data mesh.

    Returns:
      The same pytree of global ``jax.Array`` of leading size ``B_local * process_count``.

    Example:
      >>> mesh = data_mesh(jax.devices()[:2])
      >>> shard_batch({"label": np.arange(4)}, mesh)["label"].sharding.spec == P("data")
      True
    """
    sharding = batch_sharded(mesh)
    n_local = len(mesh.local_devices)

    def put(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % n_local:
            raise ValueError(
                f"host-local batch leading size must be divisible by the {n_local} local devices, "
                f"got shape {x.shape}"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)


def prefetch_to_mesh(batches: Iterable[Any], mesh: Mesh, size: int = 2) -> Iterator[Any]:
    """Yields host-local batches already placed on ``mesh`` (:func:`shard_batch`), ``size`` ahead.

    Hand-written because Flax's ``prefetch_to_device`` stacks batches on a leading device axis
    for ``pmap``; this is its jit + sharding counterpart. While the step
    that consumes batch ``k`` runs (JAX dispatches asynchronously), batches ``k + 1 .. k + size``
    are already on the devices, so the step never waits for a host-to-device copy.

    Example:
      >>> mesh = data_mesh(jax.devices()[:2])
      >>> host = ({"x": np.full(4, i)} for i in range(3))
      >>> [int(b["x"][0]) for b in prefetch_to_mesh(host, mesh)]
      [0, 1, 2]
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    source = iter(batches)
    ahead: collections.deque = collections.deque()

    def enqueue(n: int) -> None:
        for batch in itertools.islice(source, n):
            ahead.append(shard_batch(batch, mesh))

    enqueue(size)
    while ahead:
        yield ahead.popleft()
        enqueue(1)


def sharded_train_step(
    mesh: Mesh, step_fn: Callable = train.train_step
) -> Callable[[train.TrainState, Any], tuple[train.TrainState, dict[str, jax.Array]]]:
    """``jit`` of ``step_fn`` with replicated state, batch split on ``"data"``, state donated.

    The returned function takes ``(state, global_batch)`` (see :func:`replicate_state` and
    :func:`shard_batch`) and returns ``(state, metrics)`` with replicated outputs. It compiles once
    per batch shape.
    """
    rep = replicated(mesh)
    return jax.jit(
        step_fn,
        in_shardings=(rep, batch_sharded(mesh)),
        out_shardings=(rep, rep),
        donate_argnums=0,
    )


def sharded_eval_step(
    mesh: Mesh, step_fn: Callable = train.eval_step, *, return_outputs: bool = False
) -> Callable[[train.TrainState, Any], Any]:
    """``jit`` of the eval step with replicated state and a ``"data"``-split batch.

    With ``return_outputs`` the step also returns the logits and features of the whole global
    batch, replicated (so every process can read all of them, e.g. to compute OOD metrics).
    """
    rep = replicated(mesh)
    fn = functools.partial(step_fn, return_outputs=True) if return_outputs else step_fn
    return jax.jit(fn, in_shardings=(rep, batch_sharded(mesh)), out_shardings=rep)


# ----------------------------------------------------------------------------- pmap (legacy)


def replicate(
    tree: Any,
    devices: Sequence[jax.Device] | None = None,  # pyright: ignore[reportInvalidTypeForm]  # as data_mesh
    *,
    axis_name: str = PMAP_AXIS,
) -> Any:
    """Stacks a pytree along a new leading device axis for ``pmap`` (local devices only).

    The arrays get the sharding ``pmap`` gives its own outputs, so feeding the result of one step
    into the next does not retrace.
    """
    devices = jax.local_devices() if devices is None else list(devices)
    n = len(devices)
    sharding = NamedSharding(Mesh(np.asarray(devices), (axis_name,)), P(axis_name))

    def put(x):
        x = np.asarray(x)
        stacked = np.broadcast_to(x, (n, *x.shape))
        return jax.device_put(stacked, sharding)

    return jax.tree.map(put, tree)


def unreplicate(tree: Any) -> Any:
    """Takes the first replica of a ``pmap``-replicated pytree."""
    return jax.tree.map(lambda x: x[0], tree)


def split_for_pmap(batch: Any, num_devices: int | None = None) -> Any:
    """Reshapes host-local ``[B, ...]`` arrays to ``[num_devices, B // num_devices, ...]``.

    Example:
      >>> split_for_pmap({"label": np.arange(8)}, 4)["label"].shape
      (4, 2)
    """
    n = jax.local_device_count() if num_devices is None else num_devices

    def split(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % n:
            raise ValueError(
                f"batch leading size must be divisible by {n} devices, got shape {x.shape}"
            )
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])

    return jax.tree.map(split, batch)


def pmap_train_step(
    step_fn: Callable = train.train_step, *, axis_name: str = PMAP_AXIS
) -> Callable[[train.TrainState, Any], tuple[train.TrainState, dict[str, jax.Array]]]:
    """``jax.pmap`` of the train step over local devices, gradients averaged over ``axis_name``.

    Takes a state from :func:`replicate` and a batch from :func:`split_for_pmap`. Results equal
    the global-batch step when the model's BatchNorm uses ``axis_name`` too: build the model
    with ``isomax_jax.models.get_model(..., bn_axis_name=PMAP_AXIS)`` (or give your own
    ``nn.BatchNorm`` ``axis_name="batch"``). Otherwise each device normalises with its own
    batch statistics ("local" BatchNorm, as the PyTorch reference under ``nn.DataParallel``)
    and the running statistics are averaged; only the jit+sharding path is then equal to one device.
    """
    return jax.pmap(
        functools.partial(step_fn, axis_name=axis_name), axis_name=axis_name, donate_argnums=0
    )


def pmap_eval_step(
    step_fn: Callable = train.eval_step, *, axis_name: str = PMAP_AXIS
) -> Callable[[train.TrainState, Any], dict[str, jax.Array]]:
    """``jax.pmap`` of the eval step; the returned sums are already summed over devices."""
    return jax.pmap(functools.partial(step_fn, axis_name=axis_name), axis_name=axis_name)
