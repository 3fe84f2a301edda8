"""A run's code identity is the project code its runner imports, compared by syntax tree: comment, formatting and
docstring edits keep a run current, a change to imported code stales it, a change to code it does not import does not.
The tests edit a copy of this checkout's Python files, so what they check is the real runners' import graph."""

from __future__ import annotations

import pytest

from benchmarks.harness import identity
from benchmarks.harness.identity import code_changes, code_identity, project_modules, run_identity
from benchmarks.harness.store import RunStore

GLUE = "benchmarks.glue.runner"
COLLATOR = "benchmarks.speed.collator"


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A copy of src/, kernels/ and benchmarks/ (Python files, results left out), the identity pointed at it."""
    copy = tmp_path / "code"
    for root in ("src", "kernels", "benchmarks"):
        for path in (identity.REPO_ROOT / root).rglob("*.py"):
            relative = path.relative_to(identity.REPO_ROOT)
            if "results" not in relative.parts and "__pycache__" not in relative.parts:
                (copy / relative).parent.mkdir(parents=True, exist_ok=True)
                (copy / relative).write_text(path.read_text())
    monkeypatch.setattr(identity, "REPO_ROOT", copy)
    return copy


def test_runners_import_what_they_run():
    glue, collator = project_modules(GLUE), project_modules(COLLATOR)
    # lazy imports inside functions (adapters builds SSMLoRA's config) and relative imports (inside peft_ssmlora) count
    assert {"benchmarks.harness.adapters", "peft_ssmlora.layer", "peft_ssmlora.step",
            "ssmlora_kernels.reference", "benchmarks.glue.tasks", "benchmarks"} <= set(glue)
    assert "rare_data" not in glue and "benchmarks.rare_knowledge.runner" not in glue
    assert {"rare_data", "benchmarks.harness.store"} <= set(collator)
    assert not any(name.startswith("peft_ssmlora") for name in collator)
    with pytest.raises(ValueError, match="benchmarks.glue.runr"):
        project_modules("benchmarks.glue.runr")


def test_comment_and_formatting_edits_keep_runs_current(checkout, tmp_path, capsys):
    store = RunStore(tmp_path / "runs")
    store.save("rte-lora", {"score": 0.5}, run_identity({"task": "rte"}, runner=GLUE))
    runner = checkout / "benchmarks" / "glue" / "runner.py"
    source = runner.read_text()
    # a comment, blank lines, a rewrapped call and a rewritten docstring: the same program
    edited = source.replace("def main(argv=None) -> int:\n", "# a new comment\n\n\ndef main(argv=None) -> int:\n", 1)
    edited = edited.replace('"""', '"""Reworded. ', 1)
    edited = edited.replace("runner=__spec__.name)", "runner=__spec__.name,\n)", 1)
    assert edited != source
    runner.write_text(edited)
    assert not store.needs_run("rte-lora", run_identity({"task": "rte"}, runner=GLUE))
    assert "skip rte-lora" in capsys.readouterr().err
    # a change to what the runner does stales its runs, and the store names the module
    runner.write_text(edited + "\nDEFAULT_SEED = 1\n")
    assert store.needs_run("rte-lora", run_identity({"task": "rte"}, runner=GLUE))
    assert "benchmarks.glue.runner" in capsys.readouterr().err


def test_an_edit_to_the_layer_stales_glue_runs_not_collator_runs(checkout):
    glue, collator = code_identity(GLUE), code_identity(COLLATOR)
    layer = checkout / "src" / "peft_ssmlora" / "layer.py"
    layer.write_text(layer.read_text() + "\nLAYER_VERSION = 2\n")
    assert code_changes(glue) == ["peft_ssmlora.layer"]
    assert code_changes(collator) == []
    assert code_identity(GLUE)["sha256"] != glue["sha256"]
    assert code_identity(COLLATOR) == collator


def test_an_identity_from_before_identities_by_import_is_not_current():
    assert code_changes({"paths": ["src"], "sha256": "0" * 64}) == ["no code identity by import"]
    assert code_changes(None) == ["no code identity by import"]
