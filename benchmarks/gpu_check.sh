#!/usr/bin/env bash
# The one prepared GPU check: kernel tests on the GPU first, then the step/layer benchmark (which re-checks
# correctness against the reference before it times anything). Writes logs, CSVs and tables under $OUT
# (default benchmarks/results/gpu). Runs from the repository root without installing the package.
#
#   bash benchmarks/gpu_check.sh            # on a machine with a CUDA GPU, torch, triton and peft
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="src:kernels${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import torch, triton, peft, transformers; print('torch', torch.__version__, '| triton', triton.__version__, '| peft', peft.__version__, '| transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"

# 1. Correctness on the GPU: the interpreter-tested suite, now compiled for the card (no -x: report every failure).
timeout "${TEST_TIMEOUT:-170}" "$PY" -m pytest -q -p no:cacheprovider -rf \
  tests/test_kernel_step.py tests/test_kernel_reference_gradcheck.py tests/test_kernel_e2e.py 2>&1 | tee "$OUT/pytest.txt" | tail -25
test_rc=$?

# 2. The target shape first (d 4096, r 16, 4k-32k tokens), then the whole grid while time allows.
timeout "${QUICK_TIMEOUT:-150}" "$PY" benchmarks/bench_step.py --quick --out-dir "$OUT" --tag quick 2>&1 | tee "$OUT/bench_quick.log" | grep -v "^layer\|^step"
quick_rc=$?
timeout "${GRID_TIMEOUT:-170}" "$PY" benchmarks/bench_step.py --out-dir "$OUT" --tag grid > "$OUT/bench_grid.log" 2>&1
grid_rc=$?
echo "rc: tests $test_rc, quick bench $quick_rc, grid bench $grid_rc (124 = cut off by its time limit)"
cat "$OUT/bench_step_quick.md" 2>/dev/null | sed -n '/## full/,/## forward/p'
