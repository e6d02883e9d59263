#!/usr/bin/env bash
# The GPU suite in one command, for a bare CUDA machine: installs lorafit with a CUDA build
# of PyTorch, runs the checks marked `gpu` (tests/gpu/), within a
# fixed time budget (LORAFIT_GPU_BUDGET seconds). Record what it prints, with the date, in
# README.md and docs/memory.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
BUDGET=${LORAFIT_GPU_BUDGET:-480}
start=$(date +%s)
python3 -m venv .venv-gpu
. .venv-gpu/bin/activate
pip install -q torch "bitsandbytes>=0.45"
pip install -q -e ".[test]"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python - <<'PY'
import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
PY
left=$(( BUDGET - ($(date +%s) - start) ))
timeout "$left" python -m pytest -q -m gpu tests/gpu -p no:cacheprovider -rs || true
