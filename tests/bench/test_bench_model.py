"""`benchmarks/speed/model.py` at the tiny preset: every CPU method trains a whole Llama-shaped model, interleaved,
with and without activation checkpointing; a rerun skips stored points; bad arguments are refused up front."""

from __future__ import annotations

import csv
import json

import pytest

import benchmarks.speed.model as bench_model

ARGS = ["--device", "cpu", "--preset", "tiny", "--tokens", "64", "--steps", "2", "--warmup", "0", "--rank", "4"]


def test_tiny_preset_measures_every_method_and_resumes(tmp_path, monkeypatch, capsys):
    checkpointed = []
    real_step = bench_model.train_step

    def spy(model, optimizer, batch, device):
        lm = model.get_base_model()
        checkpointed.append(getattr(lm, "is_activation_checkpointing", None) or lm.is_gradient_checkpointing)
        weights = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        out = real_step(model, optimizer, batch, device)
        # a real optimizer step: the adapter's weights moved
        assert any(not w.equal(p) for w, p in zip(weights, (p for p in model.parameters() if p.requires_grad)))
        return out

    monkeypatch.setattr(bench_model, "train_step", spy)
    assert bench_model.main([*ARGS, "--out-dir", str(tmp_path)]) == 0
    assert checkpointed.count(True) == checkpointed.count(False) == 3 * 2  # 3 methods x 2 steps per mode
    records = sorted(tmp_path.glob("tiny-t64-*.json"))
    assert [p.name for p in records] == ["tiny-t64-ckpt.json", "tiny-t64-nockpt.json"]
    point = json.loads(records[0].read_text())["points"][0]
    assert point["batch"] * point["seq_len"] == 64 and point["checkpointing"] is True
    methods = point["methods"]
    assert list(methods) == ["lora", "lora-half-r", "ssmlora-torch"]
    # LoRA at r/2 has half of LoRA's parameters; SSMLoRA (q/v staggered) about half, plus its r x r matrices
    assert methods["lora-half-r"]["trainable_params"] * 2 == methods["lora"]["trainable_params"]
    assert methods["lora-half-r"]["trainable_params"] < methods["ssmlora-torch"]["trainable_params"]
    assert all(m["status"] == "ok" and m["tokens_per_s"] > 0 for m in methods.values())
    with open(tmp_path / "bench_model_tiny.csv") as f:
        rows = list(csv.DictReader(f))
    ratios = [r for r in rows if r["metric_name"] == "step_time_ratio_vs_lora" and r["provider"] == "lora"]
    assert len(ratios) == 2 and all(float(r["y_50"]) == 1.0 for r in ratios)
    assert "| 64 (2 x 32) | on | ssmlora-torch |" in (tmp_path / "bench_model_tiny.md").read_text()

    checkpointed.clear()
    capsys.readouterr()
    assert bench_model.main([*ARGS, "--out-dir", str(tmp_path)]) == 0
    assert checkpointed == [] and "skip tiny-t64-ckpt: identical run already stored" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--tokens", "0"], "expected an integer >= 1"),
    (["--tokens", "48"], "not multiples of the sequence length 32"),
    (["--methods", "ssmlora-triton"], "needs a CUDA device"),
    (["--methods", "dora"], "unknown method"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_model.parse_args(["--device", "cpu", "--preset", "tiny", *argv])
    assert message in capsys.readouterr().err
