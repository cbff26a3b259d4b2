#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then the quick FDBP-vs-BP comparison on CIFAR-10,
# printing a table (extra arguments go to experiments/compare.py, e.g. --seeds 0,1,2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
if [ -z "${TFDS_DATA_DIR:-}" ] && [ -d ../shared/tfds ]; then
  export TFDS_DATA_DIR="$(cd ../shared/tfds && pwd)"   # our machines' prepared copy; elsewhere TFDS downloads
fi
exec .venv/bin/python experiments/compare.py --preset quick "$@"
