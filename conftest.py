"""Test-wide set-up: 8 fake CPU devices, strict rank promotion, shared data locations.

This file sits at the repository root so that it also applies to the doctests collected from
``isomax_jax/``.
"""

import os

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

ROOT = pathlib.Path(__file__).resolve().parent
SHARED_DATA = pathlib.Path(os.environ.get("ISOMAX_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def x64():
    """JAX float64 for the test (reference checks to 1e-10 and beyond)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="session")
def shared_tfds_dir() -> pathlib.Path:
    """Read-only prepared TFDS datasets (CIFAR-10, MNIST)."""
    path = SHARED_DATA / "tfds"
    if not path.is_dir():
        pytest.skip(f"offline TFDS data not found at {path} (set ISOMAX_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def shared_raw_dir() -> pathlib.Path:
    """Read-only raw archives (TinyImageNet test, MNIST idx, Omniglot, DTD subset)."""
    path = SHARED_DATA / "raw"
    if not path.is_dir():
        pytest.skip(f"offline raw archives not found at {path} (set ISOMAX_SHARED_DATA)")
    return path
