"""`python -m benchmarks.speed.decode`: one cheap run writes the long-form CSV and the markdown table, every method
generates the tokens it is timed on, and arguments that cannot work stop with a message naming the fix."""

from __future__ import annotations

import csv

import pytest

import benchmarks.speed.decode as decode


def test_tiny_run_writes_long_form_rows_and_table(tmp_path, capsys):
    args = ["--device", "cpu", "--preset", "tiny", "--batch", "1", "2", "--new-tokens", "3", "--repeats", "2",
            "--warmup", "0", "--methods", "base,lora,ssmlora", "--count-ops", "--out-dir", str(tmp_path)]
    assert decode.main(args) == 0
    with open(tmp_path / "decode_tiny.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"suite", "study", "task", "method", "batch", "phase", "metric", "value", "p20", "p80", "device"} <= set(rows[0])
    by_key = {(r["method"], r["batch"], r["phase"], r["metric"]): r for r in rows}
    for method in ("base", "lora", "ssmlora"):
        for batch in ("1", "2"):
            row = by_key[(method, batch, "decode", "ms_per_token")]
            assert float(row["p20"]) <= float(row["value"]) <= float(row["p80"])
            assert float(by_key[(method, batch, "prefill", "ms")]["value"]) > 0
    # tiny: 8 layers; LoRA q and v in each, SSMLoRA q/v staggered (one module per layer)
    assert by_key[("lora", "1", "-", "adapted_modules")]["value"] == "16"
    assert by_key[("ssmlora", "1", "-", "adapted_modules")]["value"] == "8"
    assert ("ssmlora", "1", "decode", "ratio_vs_lora") in by_key
    calls = {m: float(by_key[(m, "1", "decode", "torch_calls_per_module")]["value"]) for m in ("lora", "ssmlora")}
    assert 0 < calls["lora"] < calls["ssmlora"]  # SSMLoRA's state path: more calls per module than LoRA's B A x
    assert float(by_key[("ssmlora", "1", "decode", "aten_ops_per_module")]["value"]) > 0
    table = (tmp_path / "decode_tiny.md").read_text()
    assert "| 2 | ssmlora | 8 |" in table and "ssmlora/lora" in table


@pytest.mark.parametrize(
    "argv,message",
    [(["--preset", "8b"], "run it on a GPU"), (["--methods", "ssmlora-triton"], "needs a CUDA device"),
     (["--new-tokens", "1"], "at least 2"), (["--methods", "qlora"], "unknown method")],
)
def test_arguments_that_cannot_work_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        decode.parse_args(["--device", "cpu", *argv])
    assert message in capsys.readouterr().err
