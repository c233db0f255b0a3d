"""Deep nearest-neighbour detector (KNN): the exact k-th neighbour distance in bounded memory.

The search walks the bank block by block for each chunk of queries and keeps each query's running
top ``k`` of ``s = q.b - |b|^2/2`` (``|q - b|^2 = |q|^2 - 2 s``): one matrix product per block
(``Precision.HIGHEST``: no TF32 on GPUs) and one partial selection (``lax.top_k``) of the running
top ``k`` joined to the next blocks' products (:func:`blocks_per_selection`). No sort, and no
``[queries, bank]`` matrix larger than ``[query_chunk, k + a few blocks' rows]``. The bank can be
held three ways:

* **one copy** (default): ``[blocks, rows, D]`` in the features' dtype (float32; float64 with x64);
* **sharded over devices** (``bank_axis``): the blocks are split over a mesh axis; each device keeps
  the top ``k`` of its own blocks, and an all-gather of the ``[query_chunk, k]`` lists and one
  ``top_k`` merge them (:func:`search` under ``shard_map``);
* **low precision** (``bank_dtype="bfloat16"`` or ``"float16"``): the search runs on the rounded
  bank (stored as its uint16 bit patterns, see :func:`search`), keeps ``candidates`` rows per
  query and re-ranks them exactly from the float32 copy ``exact_bank``. The result is the float32
  search's: the rounding moves every ``s`` by at most ``delta`` (:func:`rounding_bound`, from the
  largest rounding error of a bank row, measured at fit, and of each query), so the float32 top
  ``k`` lies among the rows whose rounded ``s`` is within ``2 delta`` of the rounded ``k``-th;
  when the ``candidates``-th kept value is not below that line for some query, that chunk of
  queries is searched again in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from isomax_jax import validation
from isomax_jax.detectors.base import Detector, as_matrix, check_width

BANK_DTYPES = ("float32", "bfloat16", "float16")
_HIGHEST = lax.Precision.HIGHEST
_RERANK_FLOATS = 2**22  # gathered rows per re-ranking step: 16 MiB in float32


def normalize(x: jax.Array) -> jax.Array:
    """``x / max(||x||, 1e-12)`` row-wise (a zero row stays zero, as in pytorch-ood)."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=1))
    return x / jnp.maximum(norm, 1e-12)[:, None]


def kth_neighbour_distance(
    queries: jax.Array,
    bank: jax.Array,
    bank_sq_norms: jax.Array,
    *,
    k: int,
    chunk: int,
    normalize_queries: bool = False,
) -> jax.Array:
    """Euclidean distance of each query to its ``k``-th nearest bank row, ``[B]``, exact.

    Args:
      queries: ``[B, D]``.
      bank: ``[num_chunks, chunk_rows, D]`` (padded rows are ignored via their norm).
      bank_sq_norms: ``[num_chunks, chunk_rows]`` squared norms, ``+inf`` on padded rows. The
        search uses these values as given (NNGuide passes lifted norms, see
        :func:`isomax_jax.detectors.patterns.top_k_mean`).
      k: the neighbour rank (1 = nearest).
      chunk: queries per chunk.
      normalize_queries: L2-normalise each query chunk (:func:`normalize`) before the search, so
        no normalised copy of all queries is ever made.

    Temporary memory is ``O(chunk * (chunk_rows + k))``, never ``B x N``.
    """
    return search(
        queries, bank, bank_sq_norms, k=k, chunk=chunk, normalize_queries=normalize_queries
    )


@functools.partial(
    jax.jit, static_argnames=("k", "chunk", "normalize_queries", "candidates", "rounded", "axis")
)
def search(
    queries: jax.Array,
    bank: jax.Array,
    bank_sq_norms: jax.Array,
    exact_bank: jax.Array | None = None,
    bank_rounding: jax.Array | None = None,
    *,
    k: int,
    chunk: int,
    normalize_queries: bool = False,
    candidates: int | None = None,
    rounded: str | None = None,
    axis: str | None = None,
) -> jax.Array:
    """:func:`kth_neighbour_distance` with a low-precision bank and/or a sharded one, ``[B]``.

    Args:
      queries, bank_sq_norms, k, chunk, normalize_queries: as :func:`kth_neighbour_distance`.
      bank: ``[num_chunks, chunk_rows, D]``, in the queries' dtype or, with ``exact_bank``, the
        bit patterns (uint16) of the rows rounded to ``rounded``: XLA:CPU would widen a whole
        bfloat16/float16 array to float32 once it enters the search loop; bits pass untouched.
      exact_bank: the bank in the queries' dtype when ``bank`` is rounded (same shape).
      bank_rounding: with ``exact_bank``, ``[num_chunks]``: the largest ``||b~ - b||`` of a row of
        each block (``b~`` the rounded row).
      candidates: rows per query kept by the rounded search and re-ranked (``>= k``).
      rounded: ``"bfloat16"`` or ``"float16"``, with ``exact_bank``.
      axis: a mesh axis over which ``bank``'s blocks (and ``exact_bank``'s, ``bank_sq_norms``'s)
        are split: the mesh set by ``jax.set_mesh`` if it has that axis, else all devices
        (:func:`bank_mesh`). Queries are replicated; the result is too.
    """
    b = queries.shape[0]
    chunk = max(1, min(chunk, b))
    if exact_bank is not None:
        candidates = max(k, candidates or 2 * k)

    def run(queries, bank, sq_norms, exact_bank, bank_rounding):
        half = 0.5 * sq_norms

        def one_chunk(q):
            if normalize_queries:
                q = normalize(q)
            if exact_bank is None:
                best = _top_k(q, bank, half, k)[0]
            else:
                best = _rounded_then_exact(
                    q, bank, half, exact_bank, bank_rounding, k, candidates, rounded
                )
            if axis is not None:  # every device's top k, then the top k of them all
                best = lax.top_k(lax.all_gather(best, axis, axis=1, tiled=True), k)[0]
            # min, not best[:, k - 1]: XLA rewrites a top-k whose only use is one column into a
            # full sort (20x slower on CPU).
            d2 = jnp.sum(q * q, axis=1) - 2 * jnp.min(best, axis=1)
            return jnp.sqrt(jnp.maximum(d2, 0))

        def body(i, out):
            start = jnp.minimum(i * chunk, b - chunk)
            q = lax.dynamic_slice_in_dim(queries, start, chunk, 0)
            return lax.dynamic_update_slice_in_dim(out, one_chunk(q), start, 0)

        out = jnp.zeros_like(queries[:, 0])  # (derived from queries: "varying" under shard_map)
        return lax.fori_loop(0, math.ceil(b / chunk), body, out)

    if axis is None:
        return run(queries, bank, bank_sq_norms, exact_bank, bank_rounding)
    mesh = bank_mesh(axis, abstract=True)
    if jax.sharding.AxisType.Explicit in mesh.axis_types:  # queries typed as sharded: replicate
        queries = jax.sharding.reshard(queries, P())
    arrays = (queries, bank, bank_sq_norms, exact_bank, bank_rounding)
    spec = P(axis)
    exact_spec = None if exact_bank is None else spec
    # check_vma=False: all_gather's result is typed "varying" although every device holds the
    # same merged top k, hence the same distances (out_specs P()).
    sharded = jax.shard_map(
        run, mesh=mesh,
        in_specs=(P(), spec, spec, exact_spec, exact_spec), out_specs=P(), check_vma=False,
    )  # fmt: skip
    return sharded(*arrays)


def blocks_per_selection(k: int, rows: int, chunk: int, blocks: int) -> int:
    """How many bank blocks are joined to the running top ``k`` before each ``lax.top_k``.

    XLA:CPU's top-k is a partial sort per row (single-threaded): it costs ~1.5 ns per element
    read plus ~``k log2 k`` comparisons to order its output, paid once per call. With ``k = 1000``
    the second term matches the first on ~8,000 rows, so calls are spread over
    ``~4 k log2(k) / rows`` blocks (measured: ``k = 1000`` on 7 x 7143 rows, 3.3 s -> 2.5 s),
    while the ``[chunk, k + blocks x rows]`` buffer stays under 128 MiB (float32).
    """
    wanted = math.ceil(4 * k * math.log2(max(k, 2)) / rows)
    room = max(1, (2**25 // chunk - k) // rows)
    return max(1, min(blocks, wanted, room))


def _top_k(q, bank, half, k, with_ids=False, rounded=None):
    """The ``k`` largest ``q.b - |b|^2/2`` over ``bank``'s blocks, ``[c, k]`` (and their flat row
    ids when ``with_ids``). The running top ``k`` and the products with the next ``per`` blocks
    share one ``[c, k + per x rows]`` buffer (written in place); one ``lax.top_k`` of it per
    ``per`` blocks (:func:`blocks_per_selection`). With ``rounded``, ``bank`` holds bit patterns
    and each block is read as that dtype."""
    blocks, rows = bank.shape[:2]
    c = q.shape[0]
    per = blocks_per_selection(k, rows, c, blocks)

    def similarity(j):  # q.b - |b|^2/2 for bank block j, [c, rows]
        block = lax.dynamic_index_in_dim(bank, j, 0, keepdims=False)
        if rounded is not None:
            block = lax.bitcast_convert_type(block, rounded)
        h = lax.dynamic_index_in_dim(half, j, 0, keepdims=False)
        s = jnp.matmul(
            q.astype(block.dtype), block.T, precision=_HIGHEST, preferred_element_type=half.dtype
        )
        return s - h[None, :]

    def select(i, carry):  # blocks i * per .. (i + 1) * per - 1 joined to the running top k
        best, ids = carry
        first = i * per
        if per == 1:
            joined = jnp.concatenate([best, similarity(first)], axis=1)
        else:  # filled block by block in a loop: one block's products live at a time

            def put(t, joined):
                return lax.dynamic_update_slice_in_dim(
                    joined, similarity(first + t), k + t * rows, 1
                )

            joined = jnp.full((c, k + per * rows), -jnp.inf, half.dtype).at[:, :k].set(best)
            joined = lax.fori_loop(0, jnp.minimum(per, blocks - first), put, joined)
        best, where = lax.top_k(joined, k)
        if ids is not None:  # a position p >= k is row p - k of the blocks from `first` on
            old = jnp.take_along_axis(ids, jnp.minimum(where, k - 1), axis=1)
            ids = jnp.where(where < k, old, first * rows + where - k)
        return best, ids

    # Shaped like `q` (full_like): "varying" under an outer shard_map over the queries, as the
    # loop's results are.
    best = jnp.broadcast_to(jnp.full_like(q[:, :1], -jnp.inf, half.dtype), (c, k))
    ids = jnp.broadcast_to(jnp.zeros_like(q[:, :1], jnp.int32), (c, k)) if with_ids else None
    return lax.fori_loop(0, -(-blocks // per), select, (best, ids))


def rounded_candidates(
    q, bank, half, bank_rounding, *, k: int, candidates: int, rounded: str, exact_dtype
):
    """The rounded search: per query the ``candidates`` largest rounded ``s~ = q~.b~ - |b|^2/2``
    ``[c, candidates]`` (descending), their flat row ids, and whether they surely hold the exact
    top ``k`` (``[c]`` bool: the last kept value lies more than ``2 delta`` below the ``k``-th, or
    is ``-inf``, every row kept; :func:`rounding_bound`).

    Args:
      q: ``[c, D]`` queries (float32, or float64 with x64).
      bank: ``[blocks, rows, D]`` the bits of the rows rounded to ``rounded`` (:func:`search`);
        ``half``: ``[blocks, rows]`` their exact
        ``|b|^2/2`` (``+inf`` on padding); ``bank_rounding``: ``[blocks]`` the largest
        ``||b~ - b||`` of each block.
    """
    kept, ids = _top_k(q, bank, half, candidates, with_ids=True, rounded=rounded)
    sq_norms = jnp.where(jnp.isfinite(half), 2 * half, 0)
    q_error = jnp.sqrt(jnp.sum(jnp.square(q.astype(rounded).astype(q.dtype) - q), axis=1))
    q_norm, bank_norm = jnp.sqrt(jnp.sum(q * q, axis=1)), jnp.sqrt(jnp.max(sq_norms))
    delta = rounding_bound(
        q_norm, q_error, bank_norm, jnp.max(bank_rounding), q.shape[1], exact_dtype
    )
    last = kept[:, candidates - 1]
    # -inf: padding or unfilled slots only. A query that overflows the rounded dtype is never
    # complete (its rounded values say nothing).
    complete = (last < kept[:, k - 1] - 2 * delta) | (last == -jnp.inf)
    return kept, ids, complete & jnp.isfinite(q_error)


def _rounded_then_exact(q, bank, half, exact_bank, bank_rounding, k, candidates, rounded):
    """The exact top ``k`` of ``q.b - |b|^2/2`` from a rounded ``bank``: the candidates of
    :func:`rounded_candidates` re-ranked from ``exact_bank``, or, if some query's candidates may
    miss a row of its exact top ``k``, this chunk searched in ``exact_bank`` itself. Under
    ``shard_map`` each device decides for its own rows (its ``k``-th is below the global one, so
    its complete candidates hold every row of the global top ``k`` it has)."""
    kept, ids, complete = rounded_candidates(
        q, bank, half, bank_rounding, k=k, candidates=candidates, rounded=rounded,
        exact_dtype=exact_bank.dtype,
    )  # fmt: skip
    flat, flat_half = exact_bank.reshape(-1, q.shape[1]), half.reshape(-1)

    def rerank(_):
        def exact(row):
            query, row_ids, row_kept = row
            s = jnp.matmul(flat[row_ids], query, precision=_HIGHEST) - flat_half[row_ids]
            return jnp.where(row_kept > -jnp.inf, s, -jnp.inf)  # unfilled slots stay out

        step = max(1, min(q.shape[0], _RERANK_FLOATS // (candidates * q.shape[1])))
        return lax.top_k(lax.map(exact, (q, ids, kept), batch_size=step), k)[0]

    def exact_search(_):
        return _top_k(q, exact_bank, half, k)[0]

    return lax.cond(jnp.all(complete), rerank, exact_search, None)


def rounding_bound(q_norm, q_error, bank_norm, bank_error, dim: int, exact_dtype) -> jax.Array:
    """A bound on ``|s~ - s|``: ``s = q.b - |b|^2/2`` as the exact search computes it (in
    ``exact_dtype``), ``s~`` from the rounded ``q~``, ``b~`` (products summed in float32).

    ``q~.b~ - q.b = q.(b~ - b) + (q~ - q).b~``, so by Cauchy-Schwarz the rounding moves the
    product by at most ``|q| e_b + e_q (|b| + e_b)`` with ``e = ||x~ - x||`` (``bank_error``
    measured at fit, ``q_error`` per query). A sum of ``D`` products in a dtype of unit roundoff
    ``v`` errs by at most ``gamma_D |q||b|``, ``gamma_D = D v / (1 - D v)`` (the rounded
    products are exact in float32), and the subtraction of ``|b|^2/2`` by ``v (|q||b| + |b|^2/2)``,
    for each of the two computations. Doubled, for the rounding of the norms and for safety.
    """

    def summed(v, qn, bn):
        gamma = dim * v / (1 - dim * v)
        return gamma * qn * bn + v * (qn * bn + bank_norm * bank_norm / 2)

    q_rounded, b_rounded = q_norm + q_error, bank_norm + bank_error
    rounding = q_norm * bank_error + q_error * b_rounded
    exact = summed(2.0 ** -(jnp.finfo(exact_dtype).nmant + 1), q_norm, bank_norm)
    return 2 * (rounding + summed(2.0**-24, q_rounded, b_rounded) + exact)


def bank_mesh(axis: str, *, abstract: bool = False) -> Mesh | jax.sharding.AbstractMesh:
    """The mesh a bank is sharded over: the one set by ``jax.set_mesh`` if it has ``axis``, else
    a 1-D mesh of every device named ``axis`` (``abstract``: inside ``jit``)."""
    current = jax.sharding.get_abstract_mesh() if abstract else jax.sharding.get_mesh()
    if axis in current.axis_names:
        return current
    return Mesh(np.asarray(jax.devices()), (axis,))


@functools.partial(jax.jit, static_argnames=("blocks", "rows", "normalize_rows"))
def _blocks(x, *, blocks: int, rows: int, normalize_rows: bool):
    """``x`` (normalised) padded and cut into ``[blocks, rows, D]``, and the squared norms
    (``+inf`` on padded rows): one pass, no normalised copy besides the bank itself."""
    n, dim = x.shape
    z = normalize(x) if normalize_rows else x
    bank = jnp.pad(z, ((0, blocks * rows - n), (0, 0))).reshape(blocks, rows, dim)
    padded = (jnp.arange(blocks * rows) >= n).reshape(blocks, rows)
    return bank, jnp.where(padded, jnp.inf, jnp.sum(bank * bank, axis=2))


@dataclasses.dataclass(frozen=True)
class KNN(Detector):
    """Deep nearest neighbours: ``-||z - z_(k)||``, ``z = f / ||f||``, ``z_(k)`` the ``k``-th
    nearest normalised training feature.

    Sun, Ming, Zhu & Li, "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML 2022.
    Defaults: ``k=50`` (the paper's CIFAR-10 choice; it uses 200 for CIFAR-100 and 1000 for
    ImageNet), ``normalize=True`` (the paper's L2 normalisation; False uses raw features).
    Exact search (no approximate top-k): the state is the normalised training bank, stored in
    ``[num_chunks, bank_chunk, D]`` blocks (``bank_chunk=8192`` rows, balanced so padding is under
    one row per block); queries are scored ``query_chunk=1024`` at a time against each block,
    keeping the running top-``k`` (:func:`search`). A 1.28M x 2048 bank needs the bank itself plus
    ``~query_chunk x bank_chunk`` floats, never an ``N x N`` matrix. Applies to every head (it
    only uses features). pytorch-ood 0.4.0 returns ``+||z - z_(k)||`` (sklearn): ours is its
    negation.

    ``bank_axis`` (default None): a mesh axis to shard the bank's blocks over (the mesh set by
    ``jax.set_mesh`` if it has that axis, else every device); ``fit`` pads the block count to a
    multiple of its size and places the state, ``score`` merges the devices' top ``k``.
    ``bank_dtype`` (default ``"float32"``: the features' dtype): ``"bfloat16"`` or ``"float16"``
    searches a rounded bank (``state["bank"]`` holds its uint16 bit patterns) and re-ranks
    ``candidates`` rows per query (default ``2 k``) exactly from a float32 copy kept in the state
    as ``exact_bank`` (with ``bank_rounding``, the largest rounding error of a row per block; see
    the module docstring): the same scores as the float32 search, within float32 rounding.
    """

    k: int = 50
    normalize: bool = True
    bank_chunk: int = 8192
    query_chunk: int = 1024
    bank_dtype: str = "float32"
    candidates: int | None = None
    bank_axis: str | None = None
    name = "knn"
    title = "KNN"
    fit_inputs = frozenset({"features"})
    score_inputs = frozenset({"features"})
    state_keys = frozenset({"bank", "bank_sq_norms"})

    def __post_init__(self):
        for field in ("k", "bank_chunk", "query_chunk"):
            validation.check_int(field, getattr(self, field))
        validation.check_int("candidates", self.candidates, minimum=self.k, allow_none=True)
        if not isinstance(self.normalize, bool):
            raise ValueError(f"`normalize` must be a bool; got {self.normalize!r}.")
        if self.bank_dtype not in BANK_DTYPES:
            raise ValueError(f"`bank_dtype` must be one of {BANK_DTYPES}; got {self.bank_dtype!r}.")
        if self.bank_axis is not None and not isinstance(self.bank_axis, str):
            raise ValueError(
                f"`bank_axis` must be None or a mesh axis name; got {self.bank_axis!r}."
            )

    @property
    def _rounded(self) -> bool:
        return self.bank_dtype != "float32"

    def _fit(self, *, features, **_):
        x = as_matrix("features", features, "[N, D]")
        validation.check_finite("features", x)
        n, dim = x.shape
        if n < self.k:
            raise ValueError(f"`features` has {n} rows; k={self.k} needs at least {self.k}.")
        shards = 1 if self.bank_axis is None else bank_mesh(self.bank_axis).shape[self.bank_axis]
        blocks = math.ceil(math.ceil(n / self.bank_chunk) / shards) * shards
        bank, sq_norms = _blocks(
            x, blocks=blocks, rows=math.ceil(n / blocks), normalize_rows=self.normalize
        )
        state = {"bank": bank, "bank_sq_norms": sq_norms}
        if self._rounded:
            limit = float(jnp.finfo(self.bank_dtype).max)
            if float(jnp.max(jnp.abs(bank))) > limit:
                raise ValueError(
                    f"`features` has entries beyond {self.bank_dtype}'s range (|x| > {limit:g}) "
                    f"after normalisation; use bank_dtype='bfloat16' or normalize=True."
                )
            rounded = bank.astype(self.bank_dtype)
            error = jnp.sum(jnp.square(rounded.astype(bank.dtype) - bank), axis=2)
            state = {
                "bank": lax.bitcast_convert_type(rounded, jnp.uint16), "bank_sq_norms": sq_norms,
                "exact_bank": bank,
                "bank_rounding": jnp.sqrt(jnp.max(error, axis=1)),
            }  # fmt: skip
        if self.bank_axis is not None:
            sharding = NamedSharding(bank_mesh(self.bank_axis), P(self.bank_axis))
            state = jax.device_put(state, sharding)
        return state

    def _prepare(self, state, *, features):
        x = as_matrix("features", features, "[batch, features]")
        check_width("features", x, state["bank"].shape[2], "feature dimensions")
        rounded = state["bank"].dtype == jnp.uint16
        complete = {"exact_bank", "bank_rounding"} <= set(state)
        if rounded != self._rounded or (self._rounded and not complete):
            raise ValueError(
                f"`state` holds a {'rounded' if rounded else state['bank'].dtype} bank"
                f"{'' if complete or not rounded else ' without exact_bank/bank_rounding'} but "
                f"this KNN has bank_dtype={self.bank_dtype!r}; fit it with these hyperparameters."
            )
        if self.bank_axis is not None:
            shards = bank_mesh(self.bank_axis, abstract=True).shape[self.bank_axis]
            if state["bank"].shape[0] % shards:
                raise ValueError(
                    f"`state` has {state['bank'].shape[0]} bank blocks, not a multiple of the "
                    f"{shards} devices of axis {self.bank_axis!r}; fit it with bank_axis set."
                )
        return {"features": x}

    def _score(self, state, head_fn, *, features):
        exact = state["exact_bank"] if self._rounded else state["bank"]
        dtype = jnp.promote_types(features.dtype, exact.dtype)
        rounded = (
            (exact.astype(dtype), state["bank_rounding"].astype(dtype)) if self._rounded else ()
        )
        distance = search(
            features.astype(dtype), state["bank"] if self._rounded else exact.astype(dtype),
            state["bank_sq_norms"].astype(dtype), *rounded, k=self.k, chunk=self.query_chunk,
            normalize_queries=self.normalize, candidates=self.candidates,
            rounded=self.bank_dtype if self._rounded else None, axis=self.bank_axis,
        )  # fmt: skip
        return -distance


DETECTORS = (KNN,)
