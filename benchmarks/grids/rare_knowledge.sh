#!/usr/bin/env bash
# The full grid of the knowledge benchmark (issue 13), python -m benchmarks.rare_knowledge: offline
# SmolLM2-135M-Instruct, r 8, alpha 16, lr 1e-3, one epoch, batch 1 x 8 accumulation, BM25 k = 4, every training
# setting (zs, sft_closed, rare, rare_raft) x every test condition (closed_book, bm25, oracle, bm25_edited,
# oracle_edited) x {ssmlora, lora} x 3 seeds (the seed sets the generated data and the adapter init), then the
# rationale-first response order for the trained RARE and SFT models at a smaller test set (it generates up to 48
# tokens a question).
# Seeds outermost, so an interrupted grid has whole seeds; finished runs are skipped on a rerun (the run store of
# benchmarks/common.py reuses a result only when its identity -- every result-changing argument, the model, the
# data's sha256, the package versions and the git commit -- is identical).
# From the repo root:
#   nohup bash benchmarks/grids/rare_knowledge.sh > /tmp/rare_knowledge_grid.log 2>&1 &
#   python -m benchmarks.rare_knowledge --table-only --output-dir benchmarks/results/rare_knowledge/cpu/grid
#
# Cost (measured on the shared 2-core CPU of this project, load average ~8-9 from other jobs, 2 threads): RARE
# prompts are ~237 tokens per training example and train at ~8 s/example, scored evaluation takes ~1.4 s/question.
# PubMedQA's RARE runs on the same CPU trained at ~6 ms/token (~1.5 s for such an example) when it was less loaded,
# so TRAIN_N=320 should train one setting in about 8 minutes on a quiet CPU (about 45 minutes at today's load).
# One (method, seed) invocation trains three settings and scores 4 x 200 + 8 x 50 prompts per trained setting.
set -euo pipefail
# OpenMP threads that spin while waiting make every step several times slower on a shared CPU.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
TRAIN_N=${TRAIN_N:-320}
THREADS=${THREADS:-2}
OUT=${OUT:-benchmarks/results/rare_knowledge/cpu/grid}
COMMON=(--k 4 --rank 8 --alpha 16 --lr 1e-3 --epochs 1 --batch-size 1 --grad-accum 8 --max-train "$TRAIN_N"
        --threads "$THREADS" --output-dir "$OUT")
for seed in ${SEEDS:-0 1 2}; do
  for method in ssmlora lora; do
    # answer first (scored in one forward pass); the edit rows are the *_edited test conditions
    python -m benchmarks.rare_knowledge "${COMMON[@]}" --seed "$seed" --method "$method" \
      --trainings zs,sft_closed,rare,rare_raft --tests closed_book,bm25,oracle,bm25_edited,oracle_edited
    # RARE's own order: the model writes its rationale greedily, then yes / no is scored after <answer>
    python -m benchmarks.rare_knowledge "${COMMON[@]}" --seed "$seed" --method "$method" \
      --response-format rationale-answer --rationale-tokens 48 --max-test "${RATIONALE_TEST_N:-100}" \
      --trainings zs,sft_closed,rare --tests bm25,bm25_edited
  done
done
python -m benchmarks.rare_knowledge --table-only --output-dir "$OUT"
