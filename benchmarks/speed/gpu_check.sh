#!/usr/bin/env bash
# The one prepared GPU check, in the order of what matters: kernel tests on the GPU (and the bitsandbytes QLoRA tests), then the whole-model training
# benchmark (bench_model: SSMLoRA vs peft LoRA on Llama-8B shapes, 2k..64k tokens per step, with and without
# activation checkpointing), then the step/layer benchmark at the target shape (which re-checks Triton against the
# reference before it times anything), then serving: greedy decode with the KV cache at 8B and 1B shapes (SSMLoRA,
# torch and Triton step, against the base model and peft LoRA unmerged). Fits one 10-minute device command: every
# part has its own time limit (tests 2, QLoRA tests 1, bench_model 3.3, bench_step 1.4, decode 8b 1, decode 1b 0.75
# minutes: 9.5 at most); bench_model and bench_step keep every finished point in the run store, decode rewrites its
# table after each batch size. DECODE_COMPILE=1 adds the compiled decode (static cache, CUDA graphs) at 1B, batch 1,
# with 4 minutes of its own (compiling two 1B models): then the whole check may take up to 13 minutes.
# Results land in benchmarks/speed/results/{model,step,decode}/<card>/ in the working tree; $OUT (default
# benchmarks/speed/results/gpu_check) gets at most 8 files: pytest.txt, bench.log, the four benchmark tables and
# results.tgz with every CSV/JSON (unpack it in the repository root). Runs from the repository root without
# installing the package. Earlier runs: benchmarks/speed/results/archive/step/nvidia-h100-80gb-hbm3/README.md.
#
#   bash benchmarks/speed/gpu_check.sh            # on a machine with a CUDA GPU, torch, triton and peft
set -uo pipefail
cd "$(dirname "$0")/../.."  # the repository root
OUT="${OUT:-benchmarks/speed/results/gpu_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="src:kernels:.${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
CARD=$("$PY" -c "from benchmarks.harness.environment import device_tag; print(device_tag())")

# 1. The card and the software, then correctness on the GPU: the interpreter-tested suite, now compiled for the
#    card (no -x: report every failure).
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import torch, triton, peft, transformers; print('torch', torch.__version__, '| triton', triton.__version__, '| peft', peft.__version__, '| transformers', transformers.__version__)"
  timeout "${TEST_TIMEOUT:-120}" "$PY" -m pytest -q -p no:cacheprovider -rf \
    tests/step_kernels/test_kernel_step.py tests/step_kernels/test_kernel_reference_gradcheck.py tests/step_kernels/test_kernel_e2e.py
} 2>&1 | tee "$OUT/pytest.txt" | tail -25
test_rc=$?
# QLoRA on the GPU: bitsandbytes' CUDA 4-bit/8-bit layers under the compiled Triton step (on CPU the tests run
# bitsandbytes' CPU backend and the interpreted kernels). They skip, saying so, when bitsandbytes is not installed.
timeout "${QLORA_TIMEOUT:-60}" "$PY" -m pytest -q -p no:cacheprovider -rfs tests/tuner/test_ssmlora_stack.py \
  -k "bitsandbytes or qlora" 2>&1 | tee -a "$OUT/pytest.txt" | tail -8
qlora_rc=$?

# 2. The whole model (the number users feel): bf16, r 16, every method interleaved in one process.
timeout "${MODEL_TIMEOUT:-200}" "$PY" -m benchmarks.speed model --preset "${PRESET:-8b}" --steps 3 --warmup 1 \
  >>"$OUT/bench.log" 2>&1
model_rc=$?

# 3. The step and the real layers at the target shape (d 4096, r 16, 4k-32k tokens), adapter weights bf16.
timeout "${STEP_TIMEOUT:-85}" "$PY" -m benchmarks.speed step --quick --tag quick >>"$OUT/bench.log" 2>&1
step_rc=$?

# 4. Serving (issue 30): greedy generate with the KV cache, prefill and decode apart, batch 1 and 8, bf16, r 16; base,
#    LoRA (r and r/2) unmerged, SSMLoRA with the torch and the Triton step, interleaved. 8b first (the goal's shape).
DECODE="benchmarks/speed/results/decode/$CARD"
timeout "${DECODE_8B_TIMEOUT:-60}" "$PY" -m benchmarks.speed decode --preset 8b --batch 1 8 --new-tokens 32 \
  --repeats 3 --warmup 1 --methods base,lora,lora-half-r,ssmlora,ssmlora-triton >>"$OUT/bench.log" 2>&1
decode8_rc=$?
timeout "${DECODE_1B_TIMEOUT:-45}" "$PY" -m benchmarks.speed decode --preset 1b --batch 1 8 --new-tokens 32 \
  --repeats 3 --warmup 1 --methods base,lora,ssmlora,ssmlora-triton >>"$OUT/bench.log" 2>&1
decode1_rc=$?
if [ "${DECODE_COMPILE:-0}" = 1 ]; then
  timeout "${DECODE_COMPILE_TIMEOUT:-240}" "$PY" -m benchmarks.speed decode --preset 1b --batch 1 --new-tokens 32 \
    --repeats 3 --warmup 2 --methods base,base-compiled,ssmlora,ssmlora-compiled \
    --out-dir "$DECODE/compiled" >>"$OUT/bench.log" 2>&1
  echo "decode compiled rc $?"
fi

cp "benchmarks/speed/results/model/$CARD/bench_model_${PRESET:-8b}.md" "benchmarks/speed/results/step/$CARD/bench_step_quick.md" \
  "$DECODE/decode_8b.md" "$DECODE/decode_1b.md" "$OUT/" 2>/dev/null
tar czf "$OUT/results.tgz" "benchmarks/speed/results/model/$CARD" "benchmarks/speed/results/step/$CARD" "$DECODE" 2>/dev/null
grep correctness "$OUT/bench.log"
echo "rc: tests $test_rc, qlora tests $qlora_rc, bench_model $model_rc, bench_step $step_rc, decode 8b $decode8_rc, decode 1b $decode1_rc (124 = cut off by its time limit)"
cat "$OUT/bench_model_${PRESET:-8b}.md" 2>/dev/null
sed -n '/## full/,/## forward/p' "$OUT/bench_step_quick.md" 2>/dev/null
grep -A12 "^| batch | ratio" "$OUT/decode_8b.md" 2>/dev/null
