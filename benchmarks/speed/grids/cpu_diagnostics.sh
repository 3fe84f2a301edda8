#!/usr/bin/env bash
# The CPU measurements of benchmarks/RESULTS.md besides GLUE and PubMedQA: the whole-model training step (small
# preset), the gradient-norm diagnostic (2 seeds) and the collator throughput. Each is stored in the run store and
# skipped when rerun with the same identity (add --force to a benchmark to measure again). From the repo root:
#   bash benchmarks/speed/grids/cpu_diagnostics.sh
set -euo pipefail
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
python -m benchmarks.speed model --preset cpu --threads 1 --steps 9 --warmup 1
for seed in 0 1; do
  python -m benchmarks.glue grad_norms --data-dir "${GLUE_DATA:-../shared/data/glue}" --steps 60 --seed "$seed"
done
python -m benchmarks.speed collator --data-dir "${PUBMEDQA_DATA:-../shared/data/pubmedqa}"
