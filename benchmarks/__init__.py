"""The benchmarks of peft-ssmlora, one package per suite: run them from the repository root with `python -m`.

    python -m benchmarks.speed step|model|collator ...   the SSMLoRA step and layers, the whole-model training step,
                                                         the RARE collator's throughput
    python -m benchmarks.glue ...                        GLUE fine-tuning (and `glue grad_norms`, a diagnostic)
    python -m benchmarks.rare_knowledge ...              RARE where the knowledge must be retrieved (and `paired`,
                                                         `rationales`: reports over its runs)
    python -m benchmarks.rare_pubmedqa ...               RARE vs closed-book training on PubMedQA

`python -m benchmarks.<suite> --help` lists a suite's commands; `python -m benchmarks.harness.tables` rebuilds every
suite's long-form `results/runs.csv` (and `results/archive/runs.csv`) and its study tables from the stored runs.
Each suite keeps its grid scripts in `grids/` and its results in `results/<device>/<study>/` (map: `results/README.md`); what they share (models, adapters, environment,
run identity, run store, tables) lives in `benchmarks.harness`.
"""
