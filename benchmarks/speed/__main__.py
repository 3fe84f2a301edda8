"""Speed: the SSMLoRA step and its layers, the whole-model training step, the RARE collator's throughput.

    python -m benchmarks.speed step ...       the step and the real adapted layers (eager / compile / Triton)
    python -m benchmarks.speed model ...      whole-model training step: SSMLoRA vs peft LoRA (tokens/s, memory)
    python -m benchmarks.speed collator ...   RAREDataCollator throughput against a baseline copy
    python -m benchmarks.speed decode ...     serving: greedy generate with the KV cache (prefill, decode ms/token)
    python -m benchmarks.speed tables         rebuild results/runs.csv and every table from the stored runs
    bash benchmarks/speed/gpu_check.sh        the one prepared GPU check (kernel tests, model, step, decode)

Results: benchmarks/speed/results/{step,model,collator,decode}/<device>/ (see results/README.md).
"""

from benchmarks.harness.suite import run_suite

SUBCOMMANDS = {"tables": "benchmarks.speed.tables", "step": "benchmarks.speed.step", "model": "benchmarks.speed.model",
               "collator": "benchmarks.speed.collator", "decode": "benchmarks.speed.decode"}

if __name__ == "__main__":
    run_suite(__doc__, None, SUBCOMMANDS)
