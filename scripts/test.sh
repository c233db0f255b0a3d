#!/usr/bin/env bash
# Installs everything the test suite needs in the pinned environment (constraints.txt: the exact
# versions CI and the default experiment use), then runs lint, format check and pytest: unit,
# doctest and parity tests, the examples, the type check (pyright, tests/test_types.py), the
# docs build with warnings as errors (tests/test_docs.py) and the wheel built and installed into
# a clean virtual environment (tests/test_wheel.py). Torch is pinned to the CPU build (2.13.0) so
# no CUDA wheel is downloaded; the PyTorch reference packages are installed without their
# (heavy, unused) dependency lists.
# Tests run on every core (pytest-xdist, one worker per core, modules kept together so that
# module fixtures are built once); `-m "not slow"` skips the end-to-end runs.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
python -m pip install -q --disable-pip-version-check -c constraints.txt --no-deps \
    robust-deep-learning==0.5.0 pytorch-ood==0.4.0 torchvision==0.28.0
ruff check .
ruff format --check .
export ISOMAX_SHARED_DATA="${ISOMAX_SHARED_DATA:-$(cd .. && pwd)/shared/data}"
python -m pytest -q -n "${PYTEST_WORKERS:-auto}" --dist loadscope "$@"
