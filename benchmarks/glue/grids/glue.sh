#!/usr/bin/env bash
# The measured GLUE grid of benchmarks/RESULTS.md: MiniLM-L6 (offline default), SSMLoRA vs LoRA at r=8, alpha=16
# (alpha/r scaling for both), the same learning rate for both, batch 8, max length 128, ONE epoch over a fixed random
# subset of each train set (the same subset for both methods and all seeds), full dev sets. Reduced to fit about
# 40 minutes of a 2-core CPU shared with other jobs (see benchmarks/RESULTS.md). Seeds outermost, so an
# interrupted grid has every task at the first seeds; finished runs are skipped on a rerun. From the repo root:
#   nohup bash benchmarks/glue/grids/glue.sh > /tmp/glue_grid.log 2>&1 &
# Then an interleaved throughput measurement (both methods step by step on identical batches).
set -euo pipefail
# On a CPU shared with other busy processes, OpenMP threads that spin while waiting make every step several times
# slower (7.5 s vs 1.1 s per MiniLM step measured here); passive waiting avoids that.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
DATA=${DATA:-../shared/data/glue}
LR=${LR:-2e-3}
INIT=${INIT:-kaiming}  # SSMLoRA's A: kaiming (the tuner's default) or gaussian (the paper's; grids A-C)
OUT=${OUT:-benchmarks/glue/results/cpu/lr$LR}
declare -A TRAIN=([sst2]=${N_SST2:-800} [cola]=${N_COLA:-800} [mrpc]=${N_MRPC:-600} [rte]=${N_RTE:-400})
for seed in ${SEEDS:-0 1}; do
  for task in sst2 cola mrpc rte; do
    python -m benchmarks.glue --task "$task" --method lora,ssmlora --seed "$seed" --data-dir "$DATA" \
      --rank 8 --alpha 16 --lr "$LR" --epochs 1 --batch-size 8 --max-length 128 --ssmlora-init "$INIT" \
      --max-train-samples "${TRAIN[$task]}" --output-dir "$OUT"
  done
done
for task in mrpc sst2; do
  python -m benchmarks.glue --task "$task" --method lora,ssmlora --data-dir "$DATA" --rank 8 --alpha 16 \
    --batch-size 8 --max-length 128 --ssmlora-init "$INIT" --max-train-samples 400 --throughput-steps 30 \
    --output-dir "$OUT"
done
