#!/usr/bin/env bash
# Installs everything the test suite needs, then runs lint, format check, unit, doctest and
# parity tests. Torch is pinned to the CPU build (2.13.0) so no CUDA wheel is downloaded; the
# PyTorch reference package is installed without its (heavy, unused) dependency list.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check -e ".[test]"
python -m pip install -q --disable-pip-version-check --no-deps robust-deep-learning==0.5.0 pytorch-ood==0.4.0
ruff check .
ruff format --check .
export ISOMAX_SHARED_DATA="${ISOMAX_SHARED_DATA:-$(cd .. && pwd)/shared/data}"
python -m pytest -q "$@"
