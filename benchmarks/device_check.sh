#!/usr/bin/env bash
# One command for a lent accelerator (one GPU or one TPU host), <= 8 minutes:
#
#   bash benchmarks/device_check.sh                      # figures printed and in device_check.json
#   bash benchmarks/device_check.sh --out /tmp/dc.json   # any option of benchmarks/device_check.py
#   bash benchmarks/device_check.sh --smoke              # the same code paths on CPU, < 1 minute
#   bash benchmarks/device_check.sh --reproduce --pack packs/cifar10 --out DIR  # paper-scale
#       CIFAR-10 run, <= 9 min (benchmarks/device_reproduce.py; --reproduce --smoke: CPU)
#
# Every part fails soft and has its own time budget; the script's watchdog stops it at 475 s
# and `timeout` below is the last resort. See benchmarks/device_check.py for what is measured.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
if [ "${1:-}" = "--reproduce" ]; then  # the paper-scale run: benchmarks/device_reproduce.py, <= 9 min
  shift
  exec timeout --kill-after=5 530 "${PYTHON:-python}" benchmarks/device_reproduce.py "$@"
fi
exec timeout --kill-after=10 490 "${PYTHON:-python}" benchmarks/device_check.py "$@"
