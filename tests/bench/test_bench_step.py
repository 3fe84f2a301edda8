"""`benchmarks/speed/step.py --smoke`: every layer provider runs, and the SSMLoRA layer rows time the real
`peft_ssmlora.Linear` (built by `get_peft_model`) with the step implementation each provider names."""

from __future__ import annotations

import csv
import os

import benchmarks.speed.step as bench_step
import peft_ssmlora.layer
from peft_ssmlora.step import IMPL_ENV_VAR

ARGS = ["--device", "cpu", "--smoke", "--kinds", "layer", "--modes", "forward", "--no-compile", "--min-time-s", "0",
        "--min-reps", "1", "--max-reps", "1"]


def test_layer_rows_time_the_real_ssmlora_layer_and_resume(tmp_path, monkeypatch, capsys):
    impls = []
    real_step = peft_ssmlora.layer.ssmlora_step

    def counting_step(*args, **kwargs):
        impls.append(os.environ.get(IMPL_ENV_VAR))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(peft_ssmlora.layer, "ssmlora_step", counting_step)
    assert bench_step.main([*ARGS, "--out-dir", str(tmp_path)]) == 0
    # the real layer ran under each provider's implementation (eager: torch; triton: the interpreted kernel)
    assert "torch" in impls and "triton" in impls
    with open(tmp_path / "bench_step_smoke.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["provider"] for r in rows} == {"eager", "triton", "lora_p0", "lora_p0.1", "linear"}
    assert all(float(r["median_ms"]) > 0 for r in rows)
    assert (tmp_path / "bench_step_smoke.md").read_text().count("| 96 | 64 | 8 |") == 1

    # the same command again: the shape is stored with the same identity, so nothing is measured
    impls.clear()
    capsys.readouterr()
    assert bench_step.main([*ARGS, "--out-dir", str(tmp_path)]) == 0
    assert impls == [] and "skip smoke-d64-r8-t96: identical run already stored" in capsys.readouterr().err
