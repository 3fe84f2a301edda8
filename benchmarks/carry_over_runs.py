"""Carry stored runs over a code change that touched only comments and formatting.

A run's identity holds a hash of the code it ran (``benchmarks.harness.code_fingerprint``), so any edit to that code
-- a comment moved, a line rewrapped -- makes the run store redo hours of runs. This script gives a stored run the
current identity only when every Python file of its code has the same syntax tree (``ast.dump``: comments, blank
lines and line breaks are not in it; docstrings are) at ``--made-at`` as now, its stored code hash is that of
``--made-at``, and it was made with the current package versions. ``identity_carried_over`` in the JSON then records
the code hash it was made with. Any other run is left alone and named, with the files whose code changed: rerun
those (for a change inside ``src/rare_data/`` that leaves the knowledge benchmark's collator outputs unchanged, see
``benchmarks.carry_over_rare_runs``).

    python -m benchmarks.carry_over_runs benchmarks/glue/results/cpu/ablation-sst2-20k --made-at 9aa14ff9
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import subprocess
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path
from unittest import mock

from benchmarks.harness import environment
from benchmarks.harness import identity as ident
from benchmarks.harness import store as run_store


def git_archive(commit: str, paths, into: str) -> None:
    """The files at ``paths`` (repo-relative) as they were at ``commit``, written under ``into``."""
    archive = subprocess.run(["git", "-C", str(ident.REPO_ROOT), "archive", commit, *paths], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as files:
        files.extractall(into, filter="data")


def code_hash_in(tree: Path, paths: tuple[str, ...]) -> str:
    """``ident.code_fingerprint(paths)`` of the checkout at ``tree`` instead of this one."""
    ident.code_fingerprint.cache_clear()  # it is cached per path list, and the tree differs here
    try:
        with mock.patch.object(ident, "REPO_ROOT", tree):
            return ident.code_fingerprint(paths)
    finally:
        ident.code_fingerprint.cache_clear()


def python_files(tree: Path, paths: tuple[str, ...]) -> dict[str, str]:
    """The Python files ``code_fingerprint`` hashes under ``paths`` of ``tree``: repo-relative name -> source."""
    files = {}
    for entry in paths:
        root = tree / entry
        for path in [root] if root.is_file() else root.rglob("*.py"):
            relative = path.relative_to(tree)
            if "results" not in relative.parts and "__pycache__" not in relative.parts:
                files[relative.as_posix()] = path.read_text()
    return files


def syntax_changes(old_tree: Path, new_tree: Path, paths: tuple[str, ...]) -> list[str]:
    """The files under ``paths`` added, removed, or with another syntax tree in ``new_tree`` than in ``old_tree``."""
    old, new = python_files(old_tree, paths), python_files(new_tree, paths)
    changed = set(old) ^ set(new)
    changed |= {name for name in old.keys() & new.keys()
                if ast.dump(ast.parse(old[name])) != ast.dump(ast.parse(new[name]))}
    return sorted(changed)


def identity_hash(config: dict) -> str:
    """The run identity's hash of its config, as ``ident.run_identity`` computes it (checked on every stored run
    before it is used)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save_carried_over(store: run_store.RunStore, name: str, result: dict, identity: dict, made_at: str,
                      why: str) -> None:
    """Store ``result`` under its new ``identity``, recording in ``identity_carried_over`` the code hash it was made
    with, the commit, any earlier carry-over and ``why`` the change cannot have altered it."""
    carried = {k: v for k, v in result.items() if k != ident.IDENTITY_KEY}
    carried["identity_carried_over"] = {
        "from_code_sha256": result[ident.IDENTITY_KEY]["config"]["code"]["sha256"], "made_at": made_at,
        "earlier": result.get("identity_carried_over"), "why": why}
    store.save(name, carried, identity)


def carry_over(folder: Path, made_at: str) -> dict[str, list[str]]:
    """Carry every run in ``folder`` made at ``made_at`` whose code changed only in comments and formatting; returns
    the run names by outcome (``carried``, ``current``, ``left alone``: "<name>: <why>")."""
    store = run_store.RunStore(folder)
    versions = environment.package_versions()
    outcome: dict[str, list[str]] = {"carried": [], "current": [], "left alone": []}
    with tempfile.TemporaryDirectory() as tree:
        old_tree, checked = Path(tree), {}
        for path in sorted(folder.glob("*.json")):
            name = path.stem
            result = store.get(name)
            identity = (result or {}).get(ident.IDENTITY_KEY)
            if not identity or "code" not in identity.get("config", {}):
                outcome["left alone"].append(f"{name}: no code hash in its identity (made before run identities)")
                continue
            config = identity["config"]
            if identity_hash(config) != identity["hash"]:
                outcome["left alone"].append(f"{name}: its identity hash is not the hash of its config")
                continue
            paths = tuple(config["code"]["paths"])
            now = ident.code_fingerprint(paths)
            if config["code"]["sha256"] == now:
                outcome["current"].append(name)
                continue
            if paths not in checked:
                git_archive(made_at, paths, tree)
                checked[paths] = (code_hash_in(old_tree, paths), syntax_changes(old_tree, ident.REPO_ROOT, paths))
            then, changes = checked[paths]
            if config["code"]["sha256"] != then:
                why = f"not made with the code of {made_at}"
            elif config["versions"] != versions:
                why = f"made with other package versions: {', '.join(ident.differences(config['versions'], versions))}"
            elif changes:
                why = f"its code changed since {made_at} in {', '.join(changes)}"
            else:
                why = None
            if why:
                outcome["left alone"].append(f"{name}: {why}")
                continue
            new_config = {**config, "code": {**config["code"], "sha256": now}}
            save_carried_over(store, name, result, {"hash": identity_hash(new_config), "config": new_config},
                              made_at, f"every Python file of its code has the same syntax tree at {made_at} as "
                              "now (only comments and formatting changed; benchmarks/carry_over_runs.py)")
            outcome["carried"].append(name)
    return outcome


def main(argv=None) -> dict[str, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="a folder of run JSONs written through benchmarks.harness.RunStore")
    parser.add_argument("--made-at", required=True, help="the commit whose code the stored runs were made with")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        raise SystemExit(f"{args.folder} is not a folder of stored runs")
    outcome = carry_over(args.folder, args.made_at)
    for kind, names in outcome.items():
        print(f"{kind}: {len(names)}" + "".join(f"\n  {name}" for name in names if kind == "left alone"))
    return outcome


if __name__ == "__main__":
    main()
