#!/usr/bin/env bash
# The one prepared GPU check: kernel tests on the GPU first, then the step/layer benchmark (which re-checks
# correctness against the reference before it times anything). Writes at most 8 files under $OUT (default
# benchmarks/results/gpu/latest). Runs from the repository root without installing the package; about 7 minutes
# on an H100 (tests 2, QLoRA tests under 1, target shape 1, grid 4). Results of the runs so far:
# benchmarks/results/gpu/README.md.
#
#   bash benchmarks/gpu_check.sh            # on a machine with a CUDA GPU, torch, triton and peft
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu/latest}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="src:kernels${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"

# 1. The card and the software, then correctness on the GPU: the interpreter-tested suite, now compiled for the
#    card (no -x: report every failure).
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import torch, triton, peft, transformers; print('torch', torch.__version__, '| triton', triton.__version__, '| peft', peft.__version__, '| transformers', transformers.__version__)"
  timeout "${TEST_TIMEOUT:-170}" "$PY" -m pytest -q -p no:cacheprovider -rf \
    tests/test_kernel_step.py tests/test_kernel_reference_gradcheck.py tests/test_kernel_e2e.py
} 2>&1 | tee "$OUT/pytest.txt" | tail -25
test_rc=$?
# QLoRA on the GPU: bitsandbytes' CUDA 4-bit/8-bit layers under the compiled Triton step (on CPU the tests run
# bitsandbytes' CPU backend and the interpreted kernels). They skip, saying so, when bitsandbytes is not installed.
timeout "${QLORA_TIMEOUT:-120}" "$PY" -m pytest -q -p no:cacheprovider -rfs tests/test_ssmlora_stack.py \
  -k "bitsandbytes or qlora" 2>&1 | tee -a "$OUT/pytest.txt" | tail -8
qlora_rc=$?

# 2. The target shape (d 4096, r 16, 4k-32k tokens) with both methods' adapter weights in bf16 and in float32
#    (get_peft_model's default upcast), then the whole grid while time allows.
bench() { timeout "$1" "$PY" benchmarks/bench_step.py --out-dir "$OUT" "${@:2}" >>"$OUT/bench.log" 2>&1; }
bench "${QUICK_TIMEOUT:-150}" --quick --tag quick
quick_rc=$?
bench 60 --quick --no-compile --kinds layer --modes full --adapter-dtype float32 --tag quick_fp32w
fp32_rc=$?
bench "${GRID_TIMEOUT:-240}" --tag grid
grid_rc=$?
grep correctness "$OUT/bench.log"
echo "rc: tests $test_rc, qlora tests $qlora_rc, quick $quick_rc, quick fp32 weights $fp32_rc, grid $grid_rc (124 = cut off by its time limit)"
sed -n '/## full/,/## forward/p' "$OUT/bench_step_quick.md" "$OUT/bench_step_quick_fp32w.md" 2>/dev/null
