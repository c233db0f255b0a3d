"""`input="device"`: the experiment's training split on the devices, batches drawn in the step.

On the 8 host devices of the suite: a run trains with the device-resident stream
(`isomax_jax.device_data`), records it, and an interrupted run resumes bit-identically (the
stream is a function of the state's step); `input="auto"` keeps the host pipeline on a CPU.
"""

import jax
import numpy as np
import pytest
import test_experiments

from experiments import inputs, train_eval, training, validate
from isomax_jax import distributed, parallel
from isomax_jax.data import testing


def tiny_config(**overrides):
    return test_experiments.tiny_config(**{
        "losses": ("isomax",), "ood_datasets": ("gaussian_noise",),
        "detectors": ("msp", "entropic"), "num_train_steps": 6, "eval_batch_size": 16,
        "max_eval_examples": 32, "bootstrap_samples": 0, "checkpoint_every_steps": 10**6,
        "early_image_size": 24, "early_fraction": 0.5, **overrides,
    })  # fmt: skip


class _StopAt:
    """A preemption notice that fires at one step (what SIGTERM would do)."""

    def __init__(self, step):
        self.step = step

    def reached(self, step):
        return step >= self.step


def _params(run):
    return jax.tree.leaves(jax.device_get(run.state.params))


@pytest.mark.slow
def test_device_input_trains_records_and_resumes_bit_identically(tmp_path):
    config = tiny_config(input="device")
    mesh = parallel.data_mesh()
    with testing.mock_data(num_examples=64):
        source = inputs.TrainSource(config, str(tmp_path))
        assert inputs.input_kind(config, mesh) == "device"
        whole = training.train_one(config, str(tmp_path / "whole"), loss="isomax", seed=0,
                                   run=0, mesh=mesh, source=source)  # fmt: skip
        with pytest.raises(distributed.Preempted, match="saved at step 2 of 6"):
            training.train_one(config, str(tmp_path / "cut"), loss="isomax", seed=0, run=0,
                               mesh=mesh, source=source, preemption=_StopAt(2))  # fmt: skip
        resumed = training.train_one(config, str(tmp_path / "cut"), loss="isomax", seed=0,
                                     run=0, mesh=mesh, source=source)  # fmt: skip
        host_config = tiny_config(input="host")
        host = training.train_one(host_config, str(tmp_path / "host"), loss="isomax", seed=0,
                                  run=0, mesh=mesh, source=source)  # fmt: skip
    assert whole.train["input"] == "device" and host.train["input"] == "host"
    for a, b in zip(_params(whole), _params(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    # Another stream (JAX's generator instead of NumPy's): another model from the same start.
    assert any(not np.array_equal(a, b) for a, b in zip(_params(whole), _params(host), strict=True))


@pytest.mark.slow
def test_experiment_with_device_input_end_to_end(tmp_path):
    with testing.mock_data(num_examples=64):
        results = train_eval.run(tiny_config(input="device"), str(tmp_path / "w"))
    assert results["runs"][0]["train"]["input"] == "device"
    assert results["runs"][0]["train"]["steps"] == 6
    assert 0.0 <= results["runs"][0]["accuracy"] <= 1.0


def test_auto_is_host_on_cpu_and_bad_values_fail_early(tmp_path):
    assert inputs.input_kind(tiny_config(), parallel.data_mesh()) == "host"
    with pytest.raises(validate.ConfigError, match=r"config.input='gpu': expected 'auto'"):
        validate.check(tiny_config(input="gpu"), str(tmp_path / "w"), mode="train_and_evaluate",
                       device_count=8)  # fmt: skip
