"""jit+sharding and pmap data parallelism equal the one-device run; the step compiles once."""

import chex
import jax
import numpy as np
import pytest
from train_worker import init_state, make_batch

from isomax_jax import parallel, train

STEPS = 5
BATCH = 16
RTOL, ATOL = 1e-5, 1e-6


def _one_device_run():
    state = init_state()
    step_fn = jax.jit(train.train_step)
    for step in range(STEPS):
        state, metrics = step_fn(state, make_batch(step, batch_size=BATCH))
    return state, metrics


def _assert_states_close(a, b):
    chex.assert_trees_all_close(a.params, b.params, rtol=RTOL, atol=ATOL)
    chex.assert_trees_all_close(a.batch_stats, b.batch_stats, rtol=RTOL, atol=ATOL)


@pytest.fixture(scope="module")
def reference():
    assert jax.device_count() == 8, "conftest must provide 8 CPU devices"
    return _one_device_run()


def test_sharded_jit_equals_one_device_and_compiles_once(reference):
    ref_state, ref_metrics = reference
    mesh = parallel.data_mesh()
    traces = []

    def counted_step(state, batch):
        traces.append(1)  # Python side effect: runs once per trace
        return train.train_step(state, batch)

    step_fn = parallel.sharded_train_step(mesh, counted_step)
    state = parallel.replicate_state(init_state(), mesh)
    for step in range(STEPS):
        batch = parallel.shard_batch(make_batch(step, batch_size=BATCH), mesh)
        assert len(batch["image"].sharding.device_set) == 8
        state, metrics = step_fn(state, batch)
    assert len(traces) == 1
    assert step_fn._cache_size() == 1
    assert int(state.step) == STEPS
    _assert_states_close(state, ref_state)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=RTOL)
    # Parameters are replicated and the state buffers were donated.
    leaf = jax.tree.leaves(state.params)[0]
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8


def test_pmap_equals_one_device(reference):
    ref_state, ref_metrics = reference
    traces = []

    def counted_step(state, batch, *, axis_name):
        traces.append(1)
        return train.train_step(state, batch, axis_name=axis_name)

    step_fn = parallel.pmap_train_step(counted_step)
    # Exact global-batch BatchNorm: the model's BatchNorm reduces over the pmap axis too.
    state = parallel.replicate(init_state(bn_axis_name=parallel.PMAP_AXIS))
    for step in range(STEPS):
        state, metrics = step_fn(state, parallel.split_for_pmap(make_batch(step, batch_size=BATCH)))
    assert len(traces) == 1
    _assert_states_close(parallel.unreplicate(state), ref_state)
    np.testing.assert_allclose(metrics["loss"][0], ref_metrics["loss"], rtol=RTOL)


def test_padded_eval_matches_across_paths(reference):
    state, _ = reference
    batch = make_batch(99, batch_size=BATCH)
    batch["mask"] = np.arange(BATCH) < 11  # 5 padding rows
    expected = jax.jit(train.eval_step)(state, batch)
    mesh = parallel.data_mesh()
    sharded = parallel.sharded_eval_step(mesh)(
        parallel.replicate_state(state, mesh), parallel.shard_batch(batch, mesh)
    )
    pmapped = parallel.pmap_eval_step()(parallel.replicate(state), parallel.split_for_pmap(batch))
    assert float(expected["count"]) == 11.0
    chex.assert_trees_all_close(sharded, expected, rtol=RTOL)
    chex.assert_trees_all_close(parallel.unreplicate(pmapped), expected, rtol=RTOL)


def test_batch_not_divisible_by_devices_is_rejected():
    mesh = parallel.data_mesh()
    with pytest.raises(ValueError, match=r"divisible by the 8 local devices, got shape \(12,"):
        parallel.shard_batch({"label": np.zeros(12, np.int32)}, mesh)
    with pytest.raises(ValueError, match=r"divisible by 8 devices, got shape \(12,"):
        parallel.split_for_pmap({"label": np.zeros(12, np.int32)})
