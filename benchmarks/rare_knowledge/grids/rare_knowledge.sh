#!/usr/bin/env bash
# The full grid of the knowledge benchmark (issue 13), python -m benchmarks.rare_knowledge: offline
# SmolLM2-135M-Instruct, r 8, alpha 16, lr 1e-3, EPOCHS epochs (default 1), batch 1 x 8 accumulation, BM25 k = 4,
# {ssmlora, lora} x 3 seeds (the seed sets the generated data and the adapter init). Per (seed, method): RARE's own
# response order, rationale then answer (zs, sft_closed, rare, rare_raft x closed_book, bm25, oracle, bm25_edited,
# oracle_edited; 100 test questions, up to 48 generated tokens each); with ANSWER_FIRST=1 also the answer-first
# rows, scored in one forward pass (the same settings and conditions, 200 test questions: the response-format test,
# run for seed 0 in RESULTS.md -- answer first, nothing was learned).
# Seeds outermost, so an interrupted grid has whole seeds; finished runs are skipped on a rerun (the run store of
# benchmarks/harness/ reuses a result only when its identity -- every result-changing argument, the model, the
# data's sha256, the package versions and the syntax of the code it imports -- is identical).
# Knobs: SEEDS, METHODS (default "ssmlora lora"), EPOCHS, THREADS, OUT, ANSWER_FIRST=1 (add the answer-first rows).
# From the repo root:
#   nohup bash benchmarks/rare_knowledge/grids/rare_knowledge.sh > /tmp/rare_knowledge_grid.log 2>&1 &
#   python -m benchmarks.rare_knowledge --table-only --output-dir benchmarks/rare_knowledge/results/cpu/grid
#
# Cost on this project's 2-core CPU, THREADS=1 beside one other 1-thread job, one epoch of 320 questions: SFT
# training ~9-10 min, RARE ~14 min (its prompts carry four passages, ~237 tokens); rationale-first scoring 2.2-3.6 s
# a question (~4-6 min per test condition); answer-first scoring ~1.5-2.5 min per test condition (200 questions).
# At EPOCHS=3 a training is 27-45 min (SFT shortest, RAFT longest), so one (seed, method) is ~3 h in RARE's order (three
# trainings, five test conditions each, zero-shot too) and ~2.5 h answer-first. Two METHODS started side by side
# both run the zero-shot rows (same result, one file; ~20 min of a core rationale-first, ~10 answer-first).
set -euo pipefail
# OpenMP threads that spin while waiting make every step several times slower on a shared CPU.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
TRAIN_N=${TRAIN_N:-320}
THREADS=${THREADS:-2}
OUT=${OUT:-benchmarks/rare_knowledge/results/cpu/grid}
TRAININGS=zs,sft_closed,rare,rare_raft
TESTS=closed_book,bm25,oracle,bm25_edited,oracle_edited  # the *_edited ones are the edit rows
COMMON=(--k 4 --rank 8 --alpha 16 --lr 1e-3 --epochs "${EPOCHS:-1}" --batch-size 1 --grad-accum 8 --max-train "$TRAIN_N"
        --threads "$THREADS" --output-dir "$OUT")
for seed in ${SEEDS:-0 1 2}; do
  for method in ${METHODS:-ssmlora lora}; do
    # RARE's own order (`python -m benchmarks.rare_knowledge rationales` checks the facts it writes): the model writes its rationale
    # greedily, then yes / no is scored after <answer>
    python -m benchmarks.rare_knowledge "${COMMON[@]}" --seed "$seed" --method "$method" \
      --response-format rationale-answer --rationale-tokens 48 --max-test "${RATIONALE_TEST_N:-100}" \
      --trainings "$TRAININGS" --tests "$TESTS"
    [ "${ANSWER_FIRST:-0}" = 1 ] || continue
    # answer first (scored in one forward pass)
    python -m benchmarks.rare_knowledge "${COMMON[@]}" --seed "$seed" --method "$method" \
      --trainings "$TRAININGS" --tests "$TESTS"
  done
done
python -m benchmarks.rare_knowledge --table-only --output-dir "$OUT"
python -m benchmarks.rare_knowledge rationales "$OUT"
python -m benchmarks.rare_knowledge paired "$OUT"
