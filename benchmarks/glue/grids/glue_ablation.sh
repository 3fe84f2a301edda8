#!/usr/bin/env bash
# The GLUE ablation grid of benchmarks/RESULTS.md ("does the state path earn its place?"): MiniLM-L6 (offline
# default), batch 16, max length 128, full dev set, four methods on the same data and seeds:
#   ssmlora (default placement, r 8) | lora (q,v every layer, r 8) | lora-sparse (LoRA r 8 on exactly SSMLoRA's
#   modules, no state) | lora-half (LoRA r 4 on q,v every layer: SSMLoRA's parameter count)
# 1. Learning rate per method (lora and ssmlora; the ablations take lora's) on a held-out 10 % slice of a train
#    subset of SEL_N examples, one seed: never on the dev set.
# 2. Every method at its rate, seeds outermost (an interrupted grid has whole seeds), TRAIN_N train examples.
# Resumable: finished runs are skipped. From the repo root:
#   nohup bash benchmarks/glue/grids/glue_ablation.sh > /tmp/glue_ablation.log 2>&1 &
# Knobs: TASK, TRAIN_N, SEL_N, EPOCHS, RATES, SEEDS, OUT, DATA, MODEL (a local folder; default the offline MiniLM-L6)
# and PARALLEL=1: the rate-selection runs (one per rate), then the seeds, run as concurrent processes of one thread
# each (OMP_NUM_THREADS=1 unless set; many on a GPU, see glue_ablation_gpu.sh). A seed's four methods stay in one
# process.
set -euo pipefail
# OpenMP threads that spin while waiting make every step several times slower on a shared CPU.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
# Concurrent runs (PARALLEL=1) take one thread each unless told otherwise: more threads than cores slow every run.
if [ "${PARALLEL:-0}" = 1 ]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi
DATA=${DATA:-../shared/data/glue}
TASK=${TASK:-sst2}
# Defaults: the first SST-2 grid (6,000 train examples, one epoch, rates {1e-3, 2e-3}). The full protocol
# is, per task (TRAIN_N = the full train set except SST-2; EPOCHS must let LoRA leave the majority class):
#   TASK=sst2 TRAIN_N=20000 RATES="5e-4 1e-3 2e-3" OUT=benchmarks/glue/results/cpu/ablation-sst2-20k
#   TASK=cola TRAIN_N=8551 SEL_N=4000 EPOCHS=3 RATES="5e-4 1e-3 2e-3" OUT=benchmarks/glue/results/cpu/ablation-cola
#   TASK=mrpc TRAIN_N=3668 SEL_N=3668 EPOCHS=3 RATES="5e-4 1e-3 2e-3" OUT=benchmarks/glue/results/cpu/ablation-mrpc
#   TASK=rte  TRAIN_N=2490 SEL_N=2490 EPOCHS=10 RATES="5e-4 1e-3 2e-3" OUT=benchmarks/glue/results/cpu/ablation-rte-10ep
#   (RTE at 3 epochs, ablation-rte/, left every method near the majority class; see RESULTS.md)
# Cost on this project's 2-core CPU, one thread per job (OMP_NUM_THREADS=1, two jobs side by side), train
# examples/s measured with --throughput-steps (ssmlora / lora): SST-2 35 / 31 (27 inside the grid), CoLA 47 / 48,
# MRPC 14 / 12, RTE 7.7 / 6.9. So one 3-epoch cell (4 methods x 3 seeds) takes ~1.8 h for CoLA (measured: 1.7 h,
# plus 21 min of rate selection), ~2.8 h for MRPC, ~3.4 h for RTE (measured with
# PARALLEL=1: 2.3 h of both cores, selection included), and SST-2 at 20,000 examples ~2.5 h, plus the rate
# selection; RTE at 10 epochs: 36-39 min per selection run two side by side (9.7-10.4 examples/s), so ~2 h of both
# cores for the selection and ~4 h for the seeds (measured: 38-41 min a run); minutes per task on a GPU.
TRAIN_N=${TRAIN_N:-6000}
SEL_N=${SEL_N:-4000}
EPOCHS=${EPOCHS:-1}
RATES=${RATES:-1e-3 2e-3}
OUT=${OUT:-benchmarks/glue/results/cpu/ablation-$TASK}
COMMON=(--task "$TASK" --data-dir "$DATA" --rank 8 --alpha 16 --epochs "$EPOCHS" --batch-size 16 --max-length 128
        ${MODEL:+--model "$MODEL"})
# Runs one job, in the background when PARALLEL=1 (its pid kept, so that `finish` can report any job's failure).
jobs_started=()
start() { if [ "${PARALLEL:-0}" = 1 ]; then "$@" & jobs_started+=($!); else "$@"; fi; }
finish() { for pid in "${jobs_started[@]}"; do wait "$pid"; done; jobs_started=(); }
for lr in $RATES; do
  start python -m benchmarks.glue "${COMMON[@]}" --method lora,ssmlora --seed 0 --lr "$lr" --holdout-fraction 0.1 \
    --max-train-samples "$SEL_N" --output-dir "$OUT/lr-select"
done
finish
# (again: concurrent jobs each rewrite the table as they finish)
python -m benchmarks.glue --table-only --output-dir "$OUT/lr-select"
for seed in ${SEEDS:-0 1 2}; do
  start python -m benchmarks.glue "${COMMON[@]}" --method ssmlora,lora,lora-sparse,lora-half --seed "$seed" \
    --lr-from "$OUT/lr-select" --max-train-samples "$TRAIN_N" --output-dir "$OUT"
done
finish
python -m benchmarks.glue --table-only --output-dir "$OUT"
