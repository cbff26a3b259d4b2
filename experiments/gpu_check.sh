#!/usr/bin/env bash
# GPU check for one H100/H200 (the `device` tool), under 8 minutes: ResNet-20 on CIFAR-10, BP jitted
# step vs the FDBP emulator on one device. Before the call, on the development machine:
#   mkdir -p data && cp ../shared/data/cifar10-jpeg-q75.tar.gz data/     (data/ is git-ignored)
# and call the device tool with carry=["data"] and command "bash experiments/gpu_check.sh".
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv /tmp/venv && . /tmp/venv/bin/activate
pip install --quiet --upgrade pip
pip install --quiet "jax[cuda12]" && pip install --quiet -e .
python - <<'PY'
import jax; print(jax.__version__, jax.devices())
PY
export PYTHONUNBUFFERED=1
python experiments/gpu_check.py --tarball data/cifar10-jpeg-q75.tar.gz --epochs "${EPOCHS:-10}" \
  --out "${OUT:-runs/gpu_check}" 2>&1 | tee "${OUT:-runs/gpu_check}.log"
