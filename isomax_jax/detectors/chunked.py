"""Bounded-memory reductions over the rows of a big ``[N, D]`` array.

The fit sets of post-hoc detectors can be large (ImageNet: 1.28M x 2048 features, 10 GB in
float32). Everything here walks the rows in chunks of ``chunk`` rows with ``lax.fori_loop`` and
``lax.dynamic_slice`` on the original array (no padded copy): the last chunk is shifted back to end
at row ``N`` and its rows already counted are masked out. Temporary memory is
``O(chunk * D)`` plus the accumulator.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def reduce_row_chunks(fn: Callable, arrays: tuple[jax.Array, ...], chunk: int, combine=_tree_add):
    """``combine``-reduction of ``fn(valid_i, *rows_i)`` over row chunks ``i`` (default: a sum).

    Args:
      fn: ``fn(valid [n], *rows) -> pytree``; ``valid`` marks the rows of the chunk not counted by
        an earlier chunk; ``fn`` must make invalid rows contribute the identity of ``combine``.
      arrays: arrays sharing their leading dimension ``N``.
      chunk: rows per chunk (clipped to ``N``).
      combine: an associative reduction of two pytrees (default: leafwise sum).
    """
    n = arrays[0].shape[0]
    chunk = max(1, min(chunk, n))

    def at(i):
        start = jnp.minimum(i * chunk, n - chunk)
        rows = tuple(lax.dynamic_slice_in_dim(a, start, chunk, 0) for a in arrays)
        return fn(start + jnp.arange(chunk) >= i * chunk, *rows)

    return lax.fori_loop(1, math.ceil(n / chunk), lambda i, acc: combine(acc, at(i)), at(0))


def _order_keys(x: jax.Array) -> jax.Array:
    """Unsigned integer keys with the order of the floats (``-0.0`` just below ``+0.0``)."""
    bits = x.dtype.itemsize * 8
    utype = jnp.dtype(f"uint{bits}")
    raw = lax.bitcast_convert_type(x, utype)
    top = jnp.asarray(1, utype) << (bits - 1)
    return jnp.where((raw & top) != 0, ~raw, raw | top)


def _from_keys(keys: jax.Array, dtype) -> jax.Array:
    bits = keys.dtype.itemsize * 8
    top = jnp.asarray(1, keys.dtype) << (bits - 1)
    raw = jnp.where((keys & top) != 0, keys ^ top, ~keys)
    return lax.bitcast_convert_type(raw, dtype)


_DIGIT = 16  # bits per radix pass: 2 passes for float32, 4 for float64


@functools.partial(jax.jit, static_argnames=("chunk",))
def kth_smallest_pair(x: jax.Array, rank, *, chunk: int) -> tuple[jax.Array, jax.Array]:
    """The ``rank``-th and ``rank + 1``-th smallest entries (0-based) of all of ``x [N, D]``.

    Exact (radix select on order-preserving integer keys, ``16`` bits per pass, histograms
    accumulated over row chunks); O(chunk * D + 65536) memory. ``x`` must be finite and
    hold at most 2**32 - 1 entries. ``rank`` may be traced. If ``rank + 1`` is out of range the
    second value repeats the first.
    """
    rank = jnp.asarray(rank, jnp.uint32)
    keys_dtype = _order_keys(x[:1, :1]).dtype
    bits = keys_dtype.itemsize * 8
    remaining = rank
    prefix = jnp.zeros((), keys_dtype)
    for p in range(bits // _DIGIT):
        shift = bits - _DIGIT * (p + 1)

        def fn(valid, rows, p=p, shift=shift, prefix=prefix):
            keys = _order_keys(rows)
            match = jnp.broadcast_to(valid[:, None], keys.shape)
            if p:  # keys whose higher digits equal the prefix found so far
                match = match & ((keys >> (shift + _DIGIT)) == prefix)
            digit = ((keys >> shift) & ((1 << _DIGIT) - 1)).astype(jnp.int32)
            hist = jnp.zeros((1 << _DIGIT,), jnp.int32).at[digit.ravel()].add(match.ravel())
            return hist.astype(jnp.uint32)

        cumulative = jnp.cumsum(reduce_row_chunks(fn, (x,), chunk))
        digit = jnp.searchsorted(cumulative, remaining, side="right")
        remaining = remaining - jnp.where(digit > 0, cumulative[jnp.maximum(digit - 1, 0)], 0)
        prefix = (prefix << _DIGIT) | digit.astype(keys_dtype)

    def after(valid, rows):  # count of keys <= prefix, smallest key above it
        keys = _order_keys(rows)
        le = jnp.sum((keys <= prefix) & valid[:, None], dtype=jnp.int32).astype(jnp.uint32)
        above = jnp.where(
            (keys > prefix) & valid[:, None],
            keys,
            jnp.asarray(jnp.iinfo(keys_dtype).max, keys_dtype),
        )
        return le, jnp.min(above)

    n_le, next_key = reduce_row_chunks(
        after, (x,), chunk, combine=lambda u, v: (u[0] + v[0], jnp.minimum(u[1], v[1]))
    )
    last = rank >= jnp.asarray(x.size - 1, jnp.uint32)
    second = jnp.where((n_le > rank + 1) | last, prefix, next_key)
    return _from_keys(prefix, x.dtype), _from_keys(second, x.dtype)


def percentile(x: jax.Array, q: float, *, chunk: int = 4096) -> jax.Array:
    """``numpy.percentile(x, q)`` (method ``"linear"``) of all entries of ``x [N, D]``, exactly.

    The virtual index ``(n - 1) q / 100`` and its fraction are computed in Python float64 as
    NumPy does, and the two order statistics by :func:`kth_smallest_pair`; the interpolation is
    NumPy's ``_lerp``.
    """
    n = int(np.prod(x.shape))
    if n >= 2**32:
        raise ValueError(f"`features` has {n} entries; the exact percentile supports < 2**32.")
    index = (n - 1) * (np.float64(q) / 100.0)
    low = int(np.floor(index))
    t = float(index - low)
    a, b = kth_smallest_pair(x, low, chunk=chunk)
    diff = b - a
    return jnp.where(t >= 0.5, b - diff * (1.0 - t), a + diff * t)
