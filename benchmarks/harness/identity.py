"""A run's identity: what a stored result depends on, so that the run store resumes only what is identical.

identity = `run_identity(arguments, model=..., data_files=[...])`: a sha256 of the whole resolved config, i.e. every
argument, the model id, size + sha256 of every data file read, the package versions and a sha256 of the code
(`code_fingerprint(code)`); not the git commit, so committing results does not make them stale.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from benchmarks.harness.environment import package_versions

REPO_ROOT = Path(__file__).resolve().parents[2]
IDENTITY_KEY = "run_identity"


@functools.cache
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """`{"file", "size", "sha256"}` of one data file (hashed once per process while it is unchanged)."""
    stat = Path(path).stat()
    return {"file": str(path), "size": stat.st_size, "sha256": _sha256(str(path), stat.st_size, stat.st_mtime_ns)}


# The code whose behaviour a stored result depends on. Hashing its files instead of naming the git commit lets a
# grid resume across sessions: committing finished results (or editing tests, docs or another runner) changes the
# commit but not one byte of the code that produced them. A runner narrows it to the code it runs (`code=`).
CODE_PATHS = ("src", "kernels", "benchmarks")


@functools.cache
def code_fingerprint(paths: tuple[str, ...] = CODE_PATHS) -> str:
    """sha256 of the Python files at `paths` (repo-relative files or folders; paths and contents, results excluded)."""
    digest = hashlib.sha256()
    for entry in paths:
        root = REPO_ROOT / entry
        if not root.exists():
            raise FileNotFoundError(f"code path {entry!r} is not in {REPO_ROOT}: fix the runner's code= list")
        for path in sorted([root] if root.is_file() else root.rglob("*.py")):
            relative = path.relative_to(REPO_ROOT)
            if "results" in relative.parts or "__pycache__" in relative.parts:
                continue
            digest.update(relative.as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _canonical(value: Any) -> Any:
    """JSON-stable form of an argument value (paths as strings, tuples as lists, sets sorted)."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_canonical(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def run_identity(arguments: dict[str, Any], *, model: str | None = None,
                 data_files: Iterable[str | Path] = (), code: tuple[str, ...] = CODE_PATHS) -> dict[str, Any]:
    """`{"hash", "config"}`: the sha256 of the run's whole resolved config (see the module docstring)."""
    config = {
        "arguments": _canonical(arguments),
        "model": model,
        "data": [file_fingerprint(f) for f in sorted({str(f) for f in data_files})],
        "versions": package_versions(),
        "code": {"paths": list(code), "sha256": code_fingerprint(tuple(code))},
    }
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return {"hash": hashlib.sha256(blob.encode()).hexdigest(), "config": config}


def arguments_of(args: argparse.Namespace, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """Every parsed argument except those that do not define a run's result (output folder, table-only...)."""
    skip = set(exclude)
    return {k: v for k, v in vars(args).items() if k not in skip}


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable keys whose values differ between two identity configs."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            if key == "data":
                out.append(f"{prefix}data (files or their contents)")
            else:
                out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
