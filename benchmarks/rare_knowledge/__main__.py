"""RARE where the knowledge must be retrieved: a generated drug-target world, trained and tested by setting.

    python -m benchmarks.rare_knowledge --seed 0 --method ssmlora ...   the runner (rare_knowledge/runner.py)
    python -m benchmarks.rare_knowledge paired <folder>       accuracy by setting and test, paired differences
    python -m benchmarks.rare_knowledge rationales <folder>   the facts the rationale-first models state
    python -m benchmarks.rare_knowledge tables                rebuild results/runs.csv and every table

Grid: benchmarks/rare_knowledge/grids/rare_knowledge.sh. Results: benchmarks/rare_knowledge/results/<device>/<study>/.
"""

from benchmarks.harness.suite import run_suite

SUBCOMMANDS = {"tables": "benchmarks.rare_knowledge.tables", "paired": "benchmarks.rare_knowledge.paired",
               "rationales": "benchmarks.rare_knowledge.rationales"}

if __name__ == "__main__":
    run_suite(__doc__, "benchmarks.rare_knowledge.runner", SUBCOMMANDS)
