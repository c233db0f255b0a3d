#!/usr/bin/env bash
# The default experiment: SoftMax vs IsoMax vs IsoMax+ on CIFAR-10 with a small ResNet, evaluated
# against TinyImageNet (resize, crop), MNIST, Omniglot, textures and noise; writes the report to
# runs/default/results.md (+ results.json, plots/, tensorboard/). Its wall time on 2 CPU cores
# and the numbers it reaches are measured in docs/default_experiment.md. It installs the pinned
# environment (constraints.txt), so the README's numbers come from named versions.
#
# Data: the offline copies in ../shared/data/{tfds,raw} when present, else tfds's defaults
# (TFDS_DATA_DIR or ~/tensorflow_datasets, downloading on a connected machine).
# Extra arguments are passed on, e.g. `bash scripts/run_default.sh --config.runs=3`.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[experiments]"

args=()
if [[ -d ../shared/data/tfds ]]; then
  args+=("--config.data_dir=$(cd ../shared/data/tfds && pwd)")
else
  args+=("--config.download=True")  # connected machine: tfds fetches CIFAR-10 and the OOD sets
fi
if [[ -d ../shared/data/raw ]]; then
  args+=("--config.manual_dir=$(cd ../shared/data/raw && pwd)")
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
time python -m experiments.main --config experiments/configs/default.py \
  --workdir "${WORKDIR:-runs/default}" "${args[@]}" "$@"
