"""`benchmarks/carry_over_runs.py`: stored runs carried over code changes that touch only comments and formatting."""

from __future__ import annotations

import subprocess
from unittest import mock

import pytest

from benchmarks import carry_over_runs as cor
from benchmarks.harness import identity
from benchmarks.harness import store as run_store

STEP = "def step(x):\n    return x + 1\n"


@pytest.fixture
def repo(tmp_path):
    """A git repository whose `pkg/` is a runner's code, committed once; `common` pointed at it."""
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "step.py").write_text(STEP)
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "first"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    with mock.patch.object(identity, "REPO_ROOT", root):
        identity.code_fingerprint.cache_clear()
        yield root, commit
    identity.code_fingerprint.cache_clear()


def _edit(root, text, name="step.py"):
    (root / "pkg" / name).write_text(text)
    identity.code_fingerprint.cache_clear()


def _identity():
    return identity.run_identity({"lr": 1e-3}, model="tiny", code=("pkg",))


def test_a_run_is_carried_over_comment_and_line_break_changes(repo, tmp_path):
    root, commit = repo
    store = run_store.RunStore(tmp_path / "runs")
    made = _identity()
    store.save("run", {"score": 0.9}, made)
    _edit(root, "def step(x):\n    # one more than x\n    return (x +\n            1)\n")
    assert store.status("run", _identity())[0] == "changed"  # the run store alone would redo it

    assert cor.main([str(tmp_path / "runs"), "--made-at", commit])["carried"] == ["run"]
    assert store.status("run", _identity())[0] == "done"
    stored = store.get("run")
    assert stored["score"] == 0.9
    assert stored["identity_carried_over"]["from_code_sha256"] == made["config"]["code"]["sha256"]
    assert cor.carry_over(tmp_path / "runs", commit)["current"] == ["run"]


@pytest.mark.parametrize("change, why", [
    (lambda root: _edit(root, "def step(x):\n    return x + 2\n"), "its code changed since {commit} in pkg/step.py"),
    (lambda root: _edit(root, "X = 1\n", name="extra.py"), "its code changed since {commit} in pkg/extra.py"),
    (lambda root: _edit(root, '"""Docstrings are code: argparse prints them."""\n' + STEP),
     "its code changed since {commit} in pkg/step.py"),
])
def test_a_real_code_change_leaves_the_run_alone_and_names_the_file(repo, tmp_path, change, why):
    root, commit = repo
    store = run_store.RunStore(tmp_path / "runs")
    store.save("run", {"score": 0.9}, _identity())
    before = (tmp_path / "runs" / "run.json").read_bytes()
    change(root)
    assert cor.carry_over(tmp_path / "runs", commit)["left alone"] == [f"run: {why.format(commit=commit)}"]
    assert (tmp_path / "runs" / "run.json").read_bytes() == before


def test_runs_of_other_code_or_package_versions_are_left_alone(repo, tmp_path):
    root, commit = repo
    store = run_store.RunStore(tmp_path / "runs")
    _edit(root, "def step(x):\n    return x + 3\n")  # a run made with uncommitted code, not that of the commit
    store.save("uncommitted", {}, _identity())
    _edit(root, STEP)
    identity = _identity()
    config = {**identity["config"], "versions": {**identity["config"]["versions"], "torch": "0.1"}}
    store.save("old_torch", {}, {"hash": cor.identity_hash(config), "config": config})
    _edit(root, STEP + "# a comment\n")
    old_torch, uncommitted = cor.carry_over(tmp_path / "runs", commit)["left alone"]
    assert old_torch.startswith("old_torch: made with other package versions: torch: '0.1' -> ")
    assert uncommitted == f"uncommitted: not made with the code of {commit}"
