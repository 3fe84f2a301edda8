"""The benchmark runners of peft-ssmlora, as one package: run them from the repository root with `python -m`.

    python -m benchmarks.glue ...          GLUE fine-tuning (accuracy, parameters, training throughput)
    python -m benchmarks.rare_pubmedqa ... RARE vs closed-book training on PubMedQA
    python -m benchmarks.bench_model ...   whole-model training step: SSMLoRA vs peft LoRA (tokens/s, memory)
    python -m benchmarks.bench_step ...    the SSMLoRA step and the real adapted layers (eager / compile / Triton)
    python -m benchmarks.bench_collator ...       RAREDataCollator throughput
    python -m benchmarks.ssmlora_grad_norms ...   early gradient norms of SSMLoRA vs LoRA

What they share (model lookup, adapter builder, parameter counts, host info, markdown tables, the run store) lives in
`benchmarks.common`; results go to `benchmarks/results/<runner>/<device>/` (see `benchmarks/results/README.md`).
"""
