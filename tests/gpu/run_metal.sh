#!/usr/bin/env bash
# The Metal suite in one command, for an Apple Silicon Mac:
#
#     bash tests/gpu/run_metal.sh            # install, check, benchmark; gpu-results.{json,md}
#     bash tests/gpu/run_metal.sh --dry-run  # print the plan only: installs and runs nothing
#
# Parts, each under its own timeout within LORAFIT_GPU_BUDGET seconds (480 by default):
#   install      a venv with mlx, mlx-lm and lorafit[test]
#   correctness  the tests marked `gpu` that a Metal device runs (tests/gpu/test_metal.py:
#                MLX on Metal vs the CPU, logits and a training step)
#   benchmark    tests/benchmarks/bench_train.py --only mlx on Metal in bf16: lorafit vs
#                mlx-lm's LoRA trainer, tokens/s, peak memory, share of the measured GEMM rate
# Then gpu-results.json and gpu-results.md in the repository root (tests/gpu/report.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
BUDGET=${LORAFIT_GPU_BUDGET:-480}
T_INSTALL=${LORAFIT_GPU_T_INSTALL:-120}
T_CHECKS=${LORAFIT_GPU_T_CHECKS:-120}
T_BENCH=$(( BUDGET - T_INSTALL - T_CHECKS - 10 ))
VENV=.venv-metal
PY="$VENV/bin/python"
BENCH_ARGS=(--device metal --dtype bfloat16 --layers 4 --hidden 2048 --intermediate 8192
            --heads 16 --kv-heads 8 --vocab 128256 --seq 1024 --batch 1 --steps 5 --warmup 2
            --rounds 2 --contenders lorafit-mlx,mlx-lm --json gpu-bench.json)

plan() {
  echo "Metal suite plan (budget ${BUDGET}s):"
  echo "  part install      timeout ${T_INSTALL}s: python3 -m venv $VENV; pip install mlx" \
       "mlx-lm -e .[test]"
  echo "  part correctness  timeout ${T_CHECKS}s: pytest -m gpu tests/gpu/test_metal.py" \
       "(MLX Metal vs CPU logits, a training step)"
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
  "$VENV/bin/pip" install -q mlx mlx-lm
  "$VENV/bin/pip" install -q -e ".[test]"
  "$PY" -c "import mlx.core as mx; print('mlx', mx.__version__, 'metal', mx.metal.is_available())"
}

export -f install
export VENV PY
part install "$T_INSTALL" bash -c install
part correctness "$T_CHECKS" "$PY" -m pytest -q -m gpu tests/gpu/test_metal.py \
  -p no:cacheprovider -rs --junitxml=gpu-tests.xml
part benchmark "$T_BENCH" "$PY" tests/benchmarks/bench_train.py "${BENCH_ARGS[@]}"

report
