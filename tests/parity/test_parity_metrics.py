"""Parity of isomax_jax.metrics with robust_deep_learning.detection.get_ood_metrics_from_scores.

The reference package computes AUROC, AUPR-in and AUPR-out with scikit-learn (in-distribution
positive for AUROC/AUPR-in, OOD positive on the negated score for AUPR-out). That is exactly the
OpenOOD convention here; the papers' own sweep ("reference") has the same AUROC on tie-free
scores and AUPRs within ~1e-4 (docs/metrics.md).
"""

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isomax_jax.metrics import ood_metrics

torch = pytest.importorskip("torch")
detection = pytest.importorskip("robust_deep_learning.detection")

N_IN, N_OUT = 400, 150  # the shapes of tests/test_metrics.py: the compiled code is reused


def _rdl(ins, outs):
    with contextlib.redirect_stdout(io.StringIO()):  # the reference prints its results
        return detection.get_ood_metrics_from_scores(
            {"type": "ES", "values": torch.from_numpy(ins)},
            {"type": "ES", "values": torch.from_numpy(outs)},
        )


def _ours(ins, outs, convention):
    with jax.enable_x64(True):
        got = ood_metrics(jnp.asarray(ins), jnp.asarray(outs), convention=convention)
        return {k: float(v) for k, v in got.items()}


@pytest.mark.parametrize("tied", [False, True], ids=["continuous", "tied"])
def test_openood_equals_reference_package(tied):
    rng = np.random.default_rng(3)
    ins, outs = rng.normal(1.0, 1.0, N_IN), rng.normal(0.0, 1.5, N_OUT)
    if tied:
        ins, outs = ins.round(1), outs.round(1)
    want = _rdl(ins, outs)
    got = _ours(ins, outs, "openood")
    np.testing.assert_allclose(got["auroc"], want["auroc"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got["aupr_in"], want["auprin"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got["aupr_out"], want["auprout"], rtol=0, atol=1e-12)


def test_reference_convention_close_to_reference_package():
    """Tie-free scores: AUROC equal. The papers' AUPRs end at precision 0 where scikit-learn's
    end at precision 1, which moves the last trapezoid by at most 0.5 / n (5e-5 at the papers'
    10^4 test scores: the documented ~1e-4)."""
    rng = np.random.default_rng(4)
    ins, outs = rng.normal(1.0, 1.0, N_IN), rng.normal(0.0, 1.5, N_OUT)
    want = _rdl(ins, outs)
    got = _ours(ins, outs, "reference")
    np.testing.assert_allclose(got["auroc"], want["auroc"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got["aupr_in"], want["auprin"], rtol=0, atol=0.5 / N_IN + 1e-12)
    np.testing.assert_allclose(got["aupr_out"], want["auprout"], rtol=0, atol=0.5 / N_OUT + 1e-12)
