"""Tests of KNN's search (isomax_jax.detectors.knn): the bank sharded over devices and the
low-precision bank with exact re-ranking, against NumPy float64 brute force and against the
float32 search itself.

The float32 search's own error: ``s = q.b - |b|^2/2`` in float32 errs by at most
``gamma_D |q||b| + u (|q||b| + |b|^2/2)`` (``u = 2^-24``), so the squared distance
``|q|^2 - 2 s`` by twice that plus ``u |q|^2`` (:func:`d2_bound`, the tolerance of every float32
comparison here). The suite's 8 fake CPU devices (``conftest.py``) carry the sharded tests.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from isomax_jax import detectors
from isomax_jax.detectors import knn

N, D, B = 600, 16, 45


def make_data(seed=0, n=N, d=D, b=B):
    """Class-structured non-negative features (pooled ReLU-like), queries half near, half far."""
    rng = np.random.default_rng(seed)
    centers = np.abs(rng.normal(size=(6, d))) * 2
    bank = np.abs(centers[np.arange(n) % 6] + rng.normal(size=(n, d)))
    near = np.abs(centers[np.arange(b // 2) % 6] + rng.normal(size=(b // 2, d)))
    far = np.abs(rng.normal(size=(b - b // 2, d)) * 3)
    return bank.astype(np.float32), np.concatenate([near, far]).astype(np.float32)


def np_unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def np_kth_d2(bank, queries, k):
    """Squared distance to the k-th nearest bank row, float64 brute force."""
    d2 = np.sum((queries[:, None, :] - bank[None, :, :]) ** 2, axis=2)
    return np.sort(d2, axis=1)[:, k - 1]


def d2_bound(bank, queries):
    """Bound on the float32 search's error in a squared distance (module docstring)."""
    u, d = 2.0**-24, bank.shape[1]
    gamma = d * u / (1 - d * u)
    qn, bn = np.linalg.norm(queries, axis=1), np.max(np.linalg.norm(bank, axis=1))
    return 2 * (gamma * qn * bn + u * (qn * bn + bn * bn / 2)) + u * qn * qn + 1e-12


def d2_of(scores):
    return np.float64(scores) ** 2  # scores are -distance


@pytest.mark.parametrize("k, bank_chunk, query_chunk", [(1, 64, 16), (30, 7, 45), (50, 1000, 8)])
def test_search_equals_float64_brute_force(k, bank_chunk, query_chunk):
    """k larger than a block's rows (30 > 7: the running top k spans blocks, and several blocks
    join it per selection, the last selection partial), one block, and query chunks that do not
    divide the queries (the last chunk overlaps)."""
    bank, queries = make_data()
    det = detectors.get("knn", k=k, bank_chunk=bank_chunk, query_chunk=query_chunk)
    state = det.fit(features=bank)
    blocks, rows = state["bank"].shape[:2]
    per = knn.blocks_per_selection(k, rows, query_chunk, blocks)
    if k == 30:  # several blocks per selection, the last selection partial
        assert 1 < per < blocks and blocks % per
    got = d2_of(det.score(state, features=queries))
    expected = np_kth_d2(np_unit(bank), np_unit(queries), k)
    assert np.all(np.abs(got - expected) <= d2_bound(np_unit(bank), np_unit(queries)))


def test_half_norm_form_is_the_doubled_form_bit_for_bit():
    """The search keeps ``q.b - |b|^2/2``; ``2 q.b - |b|^2`` (the form before) is the same value
    doubled, exactly (scaling by 2 commutes with rounding), so scores did not move."""
    bank, queries = make_data(seed=1)
    state = detectors.get("knn", k=5, normalize=False).fit(features=bank)
    q, b, sq = jnp.asarray(queries), state["bank"][0], state["bank_sq_norms"][0]
    dot = jnp.matmul(q, b.T, precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_array_equal(2 * (dot - 0.5 * sq[None, :]), 2 * dot - sq[None, :])


# -- the bank sharded over devices ---------------------------------------------------------------


@pytest.mark.parametrize("rounded", ["float32", "bfloat16"])
def test_sharded_bank_equals_unsharded(rounded):
    """8 devices, each the top k of its blocks, merged: the unsharded search's scores bit for
    bit (same block layout; a rounded bank within float32 rounding), under jit too, and within
    float32 rounding of brute force."""
    assert jax.device_count() == 8
    bank, queries = make_data(seed=2)
    hp = dict(k=20, bank_chunk=40, query_chunk=16, bank_dtype=rounded)
    det = detectors.get("knn", bank_axis="bank", **hp)
    state = det.fit(features=bank)
    assert state["bank"].shape[0] % 8 == 0  # 15 blocks padded to 16
    for value in state.values():
        assert value.sharding.spec == P("bank") and len(value.sharding.device_set) == 8
    flat = detectors.get("knn", **{**hp, "bank_chunk": state["bank"].shape[1]})
    flat_state = flat.fit(features=bank)
    assert flat_state["bank"].shape == state["bank"].shape
    want = flat.score(flat_state, features=queries)
    got = det.score(state, features=queries)
    jitted = jax.jit(lambda s, f: det.score(s, features=f))(state, queries)
    np.testing.assert_array_equal(jitted, got)
    unit = np_unit(bank), np_unit(queries)
    slack = 1 if rounded == "float32" else 2
    if rounded == "float32":
        np.testing.assert_array_equal(got, want)
    else:  # each device re-ranks its own candidates (or falls back): same values, other roundings
        assert np.all(np.abs(d2_of(got) - d2_of(want)) <= 2 * d2_bound(*unit))
    assert np.all(np.abs(d2_of(got) - np_kth_d2(*unit, 20)) <= slack * d2_bound(*unit))


def test_sharded_bank_uses_the_mesh_that_is_set():
    """Under ``jax.set_mesh`` with a 2 x 4 ("data", "bank") mesh the bank is split 4 ways (and
    replicated over "data"); queries sharded over "data" give the same scores."""
    bank, queries = make_data(seed=3)
    mesh = jax.make_mesh((2, 4), ("data", "bank"))
    det = detectors.get("knn", k=10, bank_chunk=50, query_chunk=8, bank_axis="bank")
    with jax.set_mesh(mesh):
        state = det.fit(features=bank)
        assert state["bank"].shape[0] == 12 and state["bank"].sharding.mesh.shape == mesh.shape
        split = jax.device_put(queries[:44], NamedSharding(mesh, P("data")))
        got = jax.jit(lambda s, f: det.score(s, features=f))(state, split)
    plain = detectors.get("knn", k=10, bank_chunk=50, query_chunk=8)
    np.testing.assert_array_equal(got, plain.score(plain.fit(features=bank), features=queries[:44]))


def test_sharded_state_must_fit_the_devices():
    bank, queries = make_data(seed=4)
    state = detectors.get("knn", k=5, bank_chunk=100).fit(features=bank)  # 6 blocks
    with pytest.raises(ValueError, match="6 bank blocks, not a multiple of the 8 devices"):
        detectors.get("knn", k=5, bank_axis="bank").score(state, features=queries)


# -- the low-precision bank ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("normalize", [True, False])
def test_low_precision_bank_equals_float32_search(dtype, normalize):
    """Candidates from the rounded bank, re-ranked from the float32 copy: every query's
    candidates are complete here (so the re-ranking path ran, not the fallback), hold the float64
    top k, and the scores equal the float32 search's within its rounding."""
    bank, queries = make_data(seed=5)
    hp = dict(k=5, normalize=normalize, bank_chunk=128, query_chunk=16)
    det = detectors.get("knn", bank_dtype=dtype, candidates=60, **hp)
    state = det.fit(features=bank)
    assert state["bank"].dtype == jnp.uint16 and state["exact_bank"].dtype == jnp.float32
    rounded = jax.lax.bitcast_convert_type(state["bank"], dtype)
    np.testing.assert_array_equal(rounded, state["exact_bank"].astype(dtype))
    plain = detectors.get("knn", **hp)
    plain_state = plain.fit(features=bank)
    np.testing.assert_array_equal(state["exact_bank"], plain_state["bank"])
    chex.assert_trees_all_equal(state["bank_sq_norms"], plain_state["bank_sq_norms"])

    q = knn.normalize(jnp.asarray(queries)) if normalize else jnp.asarray(queries)
    half = 0.5 * state["bank_sq_norms"]
    kept, ids, complete = knn.rounded_candidates(
        q, state["bank"], half, state["bank_rounding"], k=5, candidates=60, rounded=dtype,
        exact_dtype=jnp.float32,
    )  # fmt: skip
    assert bool(jnp.all(complete))
    exact_bank = np.asarray(state["exact_bank"], np.float64).reshape(-1, D)
    exact = np.asarray(q, np.float64) @ exact_bank.T - 0.5 * np.sum(exact_bank**2, axis=1)
    exact[:, N:] = -np.inf  # padding rows
    top = np.argsort(-exact, axis=1)[:, :5]
    assert all(set(t) <= set(i) for t, i in zip(top, np.asarray(ids), strict=True))

    got, want = det.score(state, features=queries), plain.score(plain_state, features=queries)
    unit = (
        (np_unit if normalize else np.float64)(bank),
        (np_unit if normalize else np.float64)(queries),
    )
    assert np.all(np.abs(d2_of(got) - d2_of(want)) <= 2 * d2_bound(*unit))
    np.testing.assert_array_equal(
        jax.jit(lambda s, f: det.score(s, features=f))(state, queries), got
    )
    stacked = jax.vmap(lambda f: det.score(state, features=f))(np.stack([queries, queries[::-1]]))
    np.testing.assert_allclose(stacked[1], got[::-1], rtol=1e-6)


def test_low_precision_falls_back_to_the_float32_search():
    """Rows closer than the rounding can tell apart (near-duplicates) with as many candidates as
    k: the candidates are not provably complete, the chunk is searched in float32, and the scores
    are the float32 search's bit for bit."""
    rng = np.random.default_rng(6)
    base = np.abs(rng.normal(size=(20, D)))
    bank = (np.repeat(base, 30, axis=0) * (1 + 1e-4 * rng.normal(size=(600, 1)))).astype(np.float32)
    queries = (base[:8] * 1.01).astype(np.float32)
    hp = dict(k=10, bank_chunk=128, query_chunk=8)
    det = detectors.get("knn", bank_dtype="bfloat16", candidates=10, **hp)
    state = det.fit(features=bank)
    q = knn.normalize(jnp.asarray(queries))
    complete = knn.rounded_candidates(
        q, state["bank"], 0.5 * state["bank_sq_norms"], state["bank_rounding"], k=10,
        candidates=10, rounded="bfloat16", exact_dtype=jnp.float32,
    )[2]  # fmt: skip
    assert not bool(jnp.any(complete))
    plain = detectors.get("knn", **hp)
    want = plain.score(plain.fit(features=bank), features=queries)
    np.testing.assert_array_equal(det.score(state, features=queries), want)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_rounding_bound_holds(dtype):
    """Every pair's rounded ``s~`` within :func:`knn.rounding_bound` of float64's ``s``, for
    queries and rows of very different scales, including entries below float16's normal range
    (subnormal or flushed to zero)."""
    rng = np.random.default_rng(7)
    scales = np.array([1e-6, 1e-3, 1.0, 30.0])[:, None]
    rows = (rng.normal(size=(400, D)) * np.repeat(scales, 100, axis=0)).astype(np.float32)
    rows[::7, :3] = 3e-6  # float16 subnormals
    queries = (rng.normal(size=(40, D)) * np.repeat(scales, 10, axis=0)).astype(np.float32)
    rounded_rows = jnp.asarray(rows).astype(dtype)
    rounded_q = jnp.asarray(queries).astype(dtype)
    got = np.asarray(
        jnp.matmul(rounded_q, rounded_rows.T, preferred_element_type=jnp.float32)
        - 0.5 * jnp.sum(jnp.asarray(rows) ** 2, axis=1)[None, :]
    )
    r64, q64 = rows.astype(np.float64), queries.astype(np.float64)
    exact = q64 @ r64.T - 0.5 * np.sum(r64**2, axis=1)
    row_error = np.linalg.norm(np.float64(rounded_rows.astype(jnp.float32)) - r64, axis=1).max()
    q_error = np.linalg.norm(np.float64(rounded_q.astype(jnp.float32)) - q64, axis=1)
    bound = knn.rounding_bound(
        np.linalg.norm(q64, axis=1), q_error, np.linalg.norm(r64, axis=1).max(), row_error, D,
        jnp.float32,
    )  # fmt: skip
    assert np.all(np.abs(got - exact) <= np.asarray(bound)[:, None])


def test_low_precision_bad_inputs():
    bank, queries = make_data(seed=8)
    with pytest.raises(ValueError, match="float16's range"):
        detectors.get("knn", k=3, normalize=False, bank_dtype="float16").fit(features=bank * 1e5)
    state32 = detectors.get("knn", k=3).fit(features=bank)
    with pytest.raises(ValueError, match="bank_dtype='bfloat16'; fit it"):
        detectors.get("knn", k=3, bank_dtype="bfloat16").score(state32, features=queries)
    state16 = detectors.get("knn", k=3, bank_dtype="bfloat16").fit(features=bank)
    with pytest.raises(ValueError, match="rounded bank but this KNN has bank_dtype='float32'"):
        detectors.get("knn", k=3).score(state16, features=queries)
    with pytest.raises(ValueError, match="without exact_bank"):
        detectors.get("knn", k=3, bank_dtype="bfloat16").score(
            {k: v for k, v in state16.items() if k != "exact_bank"}, features=queries
        )
    for hp, field in (
        ({"bank_dtype": "int8"}, "bank_dtype"), ({"candidates": 2}, "candidates"),
        ({"bank_axis": 3}, "bank_axis"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=f"`{field}`"):
            detectors.get("knn", k=3, **hp)


def test_memory_is_bounded_at_imagenet_scale_with_a_rounded_bank():
    """Compiled (not run) at 1.28M x 2048, k = 1000, 2000 candidates: the rounded search, the
    re-ranking (one query's candidate rows at a time) and the fallback stay far below the bank
    (its bits pass into the loop as they are: no widened copy)."""
    shape = (157, 8153)
    args = (
        jax.ShapeDtypeStruct((50_000, 2048), jnp.float32),
        jax.ShapeDtypeStruct((*shape, 2048), jnp.uint16),
        jax.ShapeDtypeStruct(shape, jnp.float32),
        jax.ShapeDtypeStruct((*shape, 2048), jnp.float32),
        jax.ShapeDtypeStruct(shape[:1], jnp.float32),
    )
    search = functools.partial(knn.search, k=1000, chunk=1024, candidates=2000, rounded="bfloat16")
    temp = jax.jit(search).lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert temp < 256 * 2**20, temp  # vs 5 GB for the rounded bank, 10 GB for the float32 one
