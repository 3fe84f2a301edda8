#!/usr/bin/env bash
# The RARE-on-PubMedQA runs of benchmarks/RESULTS.md (offline SmolLM2-135M-Instruct, 96 train / 150 test questions,
# scored answers; about 28 minutes for the main grid on the shared 2-core CPU). Resumable: a setting is skipped
# when its stored run has the same identity. From the repo root:
#   nohup bash benchmarks/rare_pubmedqa/grids/rare_pubmedqa.sh > /tmp/rare_pubmedqa.log 2>&1 &
set -euo pipefail
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
DATA=${DATA:-../shared/data/pubmedqa}
COMMON=(--data-dir "$DATA" --eval scored --max-train 96 --max-test 150 --max-length 640 --max-passage-tokens 128
        --grad-accum 4)
# main grid (the paper's N(0, 1/r) init of A, the tuner's default when it ran)
python -m benchmarks.rare_pubmedqa "${COMMON[@]}" --method ssmlora --ssmlora-init gaussian \
  --response-format answer-rationale --threads 1 --settings sft_closed,rare,rare_oracle,rare_raft,zs_closed,zs_rag
# diagnostics: full fine-tuning; answer-only responses (the whole loss on the answer token)
python -m benchmarks.rare_pubmedqa "${COMMON[@]}" --method full --lr 1e-4 --response-format answer-rationale \
  --threads 1 --settings sft_closed,rare
python -m benchmarks.rare_pubmedqa "${COMMON[@]}" --method ssmlora --ssmlora-init gaussian \
  --response-format answer-only --threads 1 --settings rare,sft_closed
# the two trained settings with the current default (kaiming A)
python -m benchmarks.rare_pubmedqa "${COMMON[@]}" --method ssmlora --response-format answer-rationale --threads 2 \
  --settings sft_closed,rare
python -m benchmarks.rare_pubmedqa --table-only
