#!/usr/bin/env bash
# The measured GLUE grid of benchmarks/RESULTS.md: MiniLM-L6 (offline default), SSMLoRA vs LoRA at r=8, alpha=16
# (alpha/r scaling for both), lr 5e-4, batch 8, max length 128, ONE epoch over a fixed random subset of each
# train set (the same subset for both methods and all seeds; sizes below), full dev sets. Reduced to fit ~1 hour
# of a 2-core CPU shared with other jobs; see benchmarks/RESULTS.md. Seeds outermost, so an interrupted grid still
# has every task at the first seeds. Resumable: finished runs are skipped. From the repository root:
#   nohup bash benchmarks/results/glue/run_grid.sh > /tmp/glue_grid.log 2>&1 &
set -euo pipefail
DATA=${DATA:-../shared/data/glue}
OUT=${OUT:-benchmarks/results/glue}
declare -A TRAIN=([rte]=600 [mrpc]=1000 [cola]=2000 [sst2]=2000)
for seed in ${SEEDS:-0 1 2}; do
  for task in rte mrpc cola sst2; do
    python benchmarks/glue.py --task "$task" --method lora,ssmlora --seed "$seed" --data-dir "$DATA" \
      --rank 8 --alpha 16 --lr 5e-4 --epochs 1 --batch-size 8 --max-length 128 \
      --max-train-samples "${TRAIN[$task]}" --output-dir "$OUT"
  done
done
