"""RARE on PubMedQA: RARE vs closed-book training of SmolLM2 with SSMLoRA, LoRA or full fine-tuning.

    python -m benchmarks.rare_pubmedqa --settings ... --method ssmlora ...   the runner (rare_pubmedqa/runner.py)
    python -m benchmarks.rare_pubmedqa tables    rebuild results/runs.csv and every table from the stored runs

Grid: benchmarks/rare_pubmedqa/grids/rare_pubmedqa.sh. Results: benchmarks/rare_pubmedqa/results/<device>/.
"""

from benchmarks.harness.suite import run_suite

SUBCOMMANDS = {"tables": "benchmarks.rare_pubmedqa.tables"}

if __name__ == "__main__":
    run_suite(__doc__, "benchmarks.rare_pubmedqa.runner", SUBCOMMANDS)
