"""The suites' command lines and long-form tables: `python -m benchmarks.<suite> --help` for each suite, and
`runs.csv` / `archive/runs.csv` rebuilt from stored run JSONs, history kept out of the current table."""

from __future__ import annotations

import csv
import importlib
import json
import runpy
import sys

import pytest

from benchmarks.glue import tables as glue_tables
from benchmarks.harness import tables
from benchmarks.harness.identity import IDENTITY_KEY, run_identity


@pytest.mark.parametrize("suite, says", [("speed", "speed model"), ("glue", "--task"),
                                         ("rare_knowledge", "rare_knowledge paired"), ("rare_pubmedqa", "--settings")])
def test_every_suite_answers_help(suite, says, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [f"benchmarks.{suite}", "--help"])
    try:
        runpy.run_module(f"benchmarks.{suite}", run_name="__main__")
    except SystemExit as exit_:  # a runner's argparse --help exits
        assert exit_.code in (None, 0)
    assert says in capsys.readouterr().out


def test_a_suite_without_a_default_runner_names_its_subcommands(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmarks.speed", "modle"])
    with pytest.raises(SystemExit, match="unknown subcommand 'modle': choose one of tables, step, model, collator"):
        runpy.run_module("benchmarks.speed", run_name="__main__")


def _glue_run(seed: int, score: float, runner: str = "benchmarks.glue.tasks") -> dict:
    return {"config": {"task": "rte", "method": "lora", "rank": 8, "seed": seed, "lr": 2e-3},
            "metrics": {"accuracy": score}, "score": score, "train_loss": 0.6, "trainable_params": {"adapter": 10},
            IDENTITY_KEY: run_identity({"seed": seed}, runner=runner)}


def test_runs_csv_holds_current_runs_and_archive_holds_history(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tables, "BENCHMARKS_DIR", tmp_path)
    study = tmp_path / "glue" / "results" / "cpu" / "ablation-rte"
    old = tmp_path / "glue" / "results" / "archive" / "cpu" / "lr2e-3"
    for folder, runs in ((study, [_glue_run(0, 52.0), _glue_run(1, 54.0)]), (old, [_glue_run(0, 50.0)])):
        folder.mkdir(parents=True)
        for i, run in enumerate(runs):
            (folder / f"rte-lora-r8-seed{i}.json").write_text(json.dumps(run))
    stale = _glue_run(2, 60.0)
    stale[IDENTITY_KEY]["config"]["code"]["modules"]["benchmarks.glue.tasks"] = "0" * 64  # made by other code
    (study / "rte-lora-r8-seed2.json").write_text(json.dumps(stale))
    del_identity = _glue_run(3, 40.0)
    del del_identity[IDENTITY_KEY]
    (old / "rte-lora-r8-seed3.json").write_text(json.dumps(del_identity))

    counts = tables.rebuild("glue", glue_tables.rows, None)
    assert counts == {"current": 3, "archived": 2, "stale": 1}
    assert "glue/results/cpu/ablation-rte/rte-lora-r8-seed2.json: " \
           "benchmarks.glue.tasks" in capsys.readouterr().err
    with open(tmp_path / "glue" / "results" / "runs.csv") as f:
        current = list(csv.DictReader(f))
    assert tuple(current[0]) == tables.COLUMNS
    scores = {(r["seed"], r["value"]) for r in current if r["metric"] == "score"}
    assert scores == {("0", "52.0"), ("1", "54.0"), ("2", "60.0")}
    first = next(r for r in current if r["metric"] == "accuracy" and r["seed"] == "0")
    assert first == {"suite": "glue", "study": "ablation-rte", "task": "rte", "method": "lora r=8", "seed": "0",
                     "metric": "accuracy", "value": "52.0", "device": "cpu",
                     "identity": _glue_run(0, 52.0)[IDENTITY_KEY]["hash"][:12]}
    with open(tmp_path / "glue" / "results" / "archive" / "runs.csv") as f:
        archived = list(csv.DictReader(f))
    assert {(r["study"], r["seed"], r["value"], r["identity"]) for r in archived if r["metric"] == "score"} == \
           {("lr2e-3", "0", "50.0", _glue_run(0, 50.0)[IDENTITY_KEY]["hash"][:12]), ("lr2e-3", "3", "40.0", "")}


def test_speed_runs_split_by_runner_then_device():
    assert tables.device_and_study("speed", tables.Path("model/cpu")) == ("cpu", "model")
    study = tables.Path("cpu/ablation-rte/lr-select")
    assert tables.device_and_study("glue", study) == ("cpu", "ablation-rte/lr-select")
    assert tables.device_and_study("glue", tables.Path("grad_norms/cpu")) == ("cpu", "grad_norms")


@pytest.mark.parametrize("suite", tables.SUITES)
def test_the_committed_long_form_tables_are_those_of_the_stored_runs(suite):
    """`runs.csv` and `archive/runs.csv` as committed are what `python -m benchmarks.<suite> tables` makes from the
    stored JSONs (rebuild them after adding or moving runs)."""
    rows = importlib.import_module(f"benchmarks.{suite}.tables").rows
    for archived, name in ((False, "runs.csv"), (True, "archive/runs.csv")):
        built, _ = tables.long_form(suite, rows, archived)
        committed = tables.results_dir(suite) / name
        assert tables.csv_of(built) == (committed.read_text() if committed.exists() else tables.csv_of([])), \
            f"{committed} is out of date: python -m benchmarks.{suite} tables"
