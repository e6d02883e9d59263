#!/usr/bin/env bash
# The GPU suite in one command, for a bare CUDA machine:
#
#     bash tests/gpu/run.sh            # install, check, benchmark; writes gpu-results.{json,md}
#     bash tests/gpu/run.sh --dry-run  # print the plan only: installs and runs nothing
#
# Three parts, each under its own timeout so the whole stays within LORAFIT_GPU_BUDGET
# seconds (480 by default):
#   install      a venv with a CUDA build of PyTorch, bitsandbytes, peft, transformers, trl
#                and lorafit[test]; unsloth and liger-kernel when they install (a failure
#                there is recorded, not fatal)
#   correctness  the tests marked `gpu` in tests/gpu/: torch-cuda vs torch-cpu logits and
#                gradients (fp32 and bf16 tolerances, every family), resume with fused AdamW,
#                QLoRA on CUDA, the estimate vs the allocator's peak for 4 configs
#   benchmark    tests/benchmarks/bench_train.py on an 8B-shaped model (Llama 3 8B widths,
#                a few layers), seq 2048, bf16: tokens/s, peak memory, share of the measured
#                bf16 GEMM rate and MFU against the device's nominal peak, vs transformers +
#                PEFT, TRL's SFTTrainer (bf16, Liger kernels when installed) and Unsloth when
#                it installs
# Then gpu-results.json (everything) and gpu-results.md (the tables) in the repository root.
# Record them, with the date, in README.md and docs/memory.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
BUDGET=${LORAFIT_GPU_BUDGET:-480}
T_INSTALL=${LORAFIT_GPU_T_INSTALL:-150}
T_CHECKS=${LORAFIT_GPU_T_CHECKS:-150}
T_BENCH=$(( BUDGET - T_INSTALL - T_CHECKS - 10 ))
VENV=.venv-gpu
PY="$VENV/bin/python"
BENCH_ARGS=(--device cuda --dtype bfloat16 --layers 4 --hidden 4096 --intermediate 14336
            --heads 32 --kv-heads 8 --vocab 128256 --seq 2048 --batch 1 --steps 5 --warmup 2
            --rounds 1 --contenders lorafit-torch,peft,trl,unsloth --json gpu-bench.json)

plan() {
  echo "GPU suite plan (budget ${BUDGET}s):"
  echo "  part install      timeout ${T_INSTALL}s: python3 -m venv $VENV; pip install torch" \
       "bitsandbytes peft transformers trl -e .[test]; optional: unsloth liger-kernel"
  echo "  part correctness  timeout ${T_CHECKS}s: pytest -m gpu tests/gpu" \
       "(logits+gradients cuda vs cpu fp32/bf16 per family, resume, QLoRA, estimate vs peak)"
  echo "  part benchmark    timeout ${T_BENCH}s: python tests/benchmarks/bench_train.py" \
       "${BENCH_ARGS[*]}"
  echo "  part report       gpu-results.json gpu-results.md"
}

plan
if (( DRY )); then
  exit 0
fi

source tests/gpu/parts.sh

install() {
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch "bitsandbytes>=0.45" peft transformers trl
  "$VENV/bin/pip" install -q -e ".[test]"
  "$VENV/bin/pip" install -q liger-kernel || echo "liger-kernel did not install (skipped)"
  "$VENV/bin/pip" install -q unsloth || echo "unsloth did not install (skipped)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  torch.cuda.get_device_name(0))"
}

export -f install
export VENV PY
part install "$T_INSTALL" bash -c install
part correctness "$T_CHECKS" "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider -rs \
  --junitxml=gpu-tests.xml
part benchmark "$T_BENCH" "$PY" tests/benchmarks/bench_train.py "${BENCH_ARGS[@]}"

report
