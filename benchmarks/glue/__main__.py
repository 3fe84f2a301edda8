"""GLUE: fine-tuning SSMLoRA against peft LoRA and its ablations (accuracy, parameters, training throughput).

    python -m benchmarks.glue --task sst2 --method lora,ssmlora ...   the GLUE runner (benchmarks/glue/runner.py)
    python -m benchmarks.glue grad_norms ...   early gradient norms of SSMLoRA vs LoRA (a diagnostic)
    python -m benchmarks.glue tables           rebuild results/runs.csv and every table from the stored runs

Grids: benchmarks/glue/grids/*.sh. Results: benchmarks/glue/results/<device>/<study>/ (see results/README.md).
"""

from benchmarks.harness.suite import run_suite

SUBCOMMANDS = {"tables": "benchmarks.glue.tables", "grad_norms": "benchmarks.glue.grad_norms"}

if __name__ == "__main__":
    run_suite(__doc__, "benchmarks.glue.runner", SUBCOMMANDS)
