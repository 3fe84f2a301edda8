"""The shared benchmark module: run identity, the run store (resume, atomic writes, corrupt files), tables."""

from __future__ import annotations

import json
import os

import pytest
from tiny_models import tiny_bert

from benchmarks.harness.adapters import add_adapter, count_parameters, share_frozen_copy
from benchmarks.harness.identity import IDENTITY_KEY, run_identity
from benchmarks.harness.report import markdown_table
from benchmarks.harness.store import RunStore, write_json_atomic

# any project module: what it imports is the code of these runs (tests/bench/test_run_identity.py tests that part)
RUNNER = "benchmarks.glue.tasks"


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    return path


def test_identity_changes_with_arguments_data_and_model_only(data_file):
    base = run_identity({"k": 3, "lr": 1e-3}, model="m", data_files=[data_file], runner=RUNNER)
    assert run_identity({"lr": 1e-3, "k": 3}, model="m", data_files=[data_file], runner=RUNNER)["hash"] == base["hash"]
    assert run_identity({"k": 1, "lr": 1e-3}, model="m", data_files=[data_file], runner=RUNNER)["hash"] != base["hash"]
    other_model = run_identity({"k": 3, "lr": 1e-3}, model="other", data_files=[data_file], runner=RUNNER)
    assert other_model["hash"] != base["hash"]
    data_file.write_text("sentence\tlabel\ngood\t1\nbad\t1\n")  # same size, other contents
    changed = run_identity({"k": 3, "lr": 1e-3}, model="m", data_files=[data_file], runner=RUNNER)
    assert changed["hash"] != base["hash"]
    assert changed["config"]["data"][0]["size"] == base["config"]["data"][0]["size"]
    assert set(base["config"]) == {"arguments", "model", "data", "versions", "code"}
    assert "torch" in base["config"]["versions"]


def test_store_resumes_only_identical_runs(tmp_path, data_file, capsys):
    store = RunStore(tmp_path / "runs")
    identity = run_identity({"k": 3}, data_files=[data_file], runner=RUNNER)
    assert store.needs_run("rte-lora", identity)
    store.save("rte-lora", {"score": 70.0}, identity)
    assert not store.needs_run("rte-lora", identity)
    assert store.get("rte-lora")[IDENTITY_KEY]["hash"] == identity["hash"]
    assert store.needs_run("rte-lora", run_identity({"k": 1}, data_files=[data_file], runner=RUNNER))
    assert "arguments.k: 3 -> 1" in capsys.readouterr().err
    data_file.write_text("truncated\n")
    assert store.needs_run("rte-lora", run_identity({"k": 3}, data_files=[data_file], runner=RUNNER))
    assert "data (files or their contents)" in capsys.readouterr().err


def test_results_without_identity_are_read_for_tables_but_rerun(tmp_path, capsys):
    """JSONs written before run identities (the old runners') still make tables, but never count as done."""
    store = RunStore(tmp_path)
    (tmp_path / "old.json").write_text(json.dumps({"config": {"task": "rte"}, "metrics": {"accuracy": 50.0}}))
    assert store.load() == [{"config": {"task": "rte"}, "metrics": {"accuracy": 50.0}}]
    assert store.needs_run("old", run_identity({"task": "rte"}, runner=RUNNER))
    assert "written before run identities" in capsys.readouterr().err


def test_a_corrupt_file_is_reported_by_name_and_rerun_never_fatal(tmp_path, capsys):
    store = RunStore(tmp_path)
    identity = run_identity({"seed": 0}, runner=RUNNER)
    store.save("a", {"score": 1.0}, identity)
    store.save("b", {"score": 2.0}, identity)
    text = store.path("b").read_text()
    store.path("b").write_text(text[: len(text) // 2])  # what a killed non-atomic write leaves
    (tmp_path / "c.json").write_text("[1, 2]")  # valid JSON but not a result
    assert [r["score"] for r in store.load()] == [1.0]
    err = capsys.readouterr().err
    assert f"corrupt result file {store.path('b')}" in err and f"corrupt result file {tmp_path / 'c.json'}" in err
    assert store.needs_run("b", identity)
    assert store.status("b", identity)[0] == "corrupt"


def test_writes_are_atomic(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    identity = run_identity({"seed": 0}, runner=RUNNER)
    store.save("run", {"score": 1.0}, identity)
    before = store.path("run").read_text()
    with pytest.raises(TypeError):  # a value JSON cannot encode: nothing is written
        store.save("run", {"score": object()}, identity)

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)  # a crash between writing the temp file and renaming it
    with pytest.raises(OSError):
        write_json_atomic(store.path("run"), {"score": 2.0})
    assert store.path("run").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]  # no temp file left behind


def test_markdown_table():
    assert markdown_table(["a", "b"], [[1, "x"], [2, "y"]]) == "| a | b |\n|---|---|\n| 1 | x |\n| 2 | y |"
    assert markdown_table(["a", "b"], [], align=["", "r"]).splitlines()[1] == "|---|---:|"


def test_parameter_counts_and_shared_frozen_copies():
    base = tiny_bert()
    copy = share_frozen_copy(base)
    assert all(a is b for a, b in zip(base.parameters(), copy.parameters()))
    model = add_adapter(copy, "lora", r=2, alpha=4, task_type="SEQ_CLS")
    counts = count_parameters(model)
    # q and v of 4 layers at r=2 (hidden 32): 8 x 2 x (32 + 32); the head: peft's trained copy of the classifier
    assert counts["adapter"] == 8 * 2 * 64 and counts["head"] == 32 * 2 + 2
    assert counts["total"] == counts["adapter"] + counts["head"]
