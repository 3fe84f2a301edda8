"""A run's identity: what a stored result depends on, so that the run store resumes only what is identical.

identity = `run_identity(arguments, runner=..., model=..., data_files=[...])`: a sha256 of the whole resolved config,
i.e. every argument, the model id, size + sha256 of every data file read, the package versions and the code identity
(`code_identity(runner)`: the syntax tree of every project module the runner imports, so comment and formatting
edits, or edits to code the runner does not import, leave a run current). `code_changes(stored)` names the modules
that changed since a stored run was made.
"""

from __future__ import annotations

import argparse
import ast
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


# Where each top-level project package lives, relative to the repository root. A run's code is the project modules
# its runner imports; everything else it imports (torch, peft, ...) is named by its version instead.
PROJECT_PACKAGES = {"benchmarks": ".", "peft_ssmlora": "src", "rare_data": "src", "ssmlora_kernels": "kernels"}


def module_file(name: str) -> Path | None:
    """The source file of project module `name` (a package's `__init__.py`), or None when it is not one."""
    top = name.split(".")[0]
    if top not in PROJECT_PACKAGES:
        return None
    base = REPO_ROOT / PROJECT_PACKAGES[top] / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported(path: Path, name: str) -> frozenset[str]:
    """Every module name an import statement of module `name` (at `path`) may load, wherever the statement is (a
    function's lazy imports count too). `from a import b` yields `a` and `a.b`; names that are not modules are
    dropped later. Read once per process while the file is unchanged."""
    stat = path.stat()
    return _imported_by(str(path), stat.st_size, stat.st_mtime_ns, name)


@functools.cache
def _imported_by(path: str, size: int, mtime_ns: int, name: str) -> frozenset[str]:
    package = name if Path(path).name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(Path(path).read_text(encoding="utf-8"), filename=path)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from .x import y` inside `package`
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return frozenset(found)


def project_modules(runner: str) -> dict[str, Path]:
    """The project modules importing `runner` runs: itself, the packages above it, and every project module they
    import, transitively (sorted by name)."""
    if module_file(runner) is None:
        raise ValueError(f"{runner!r} is not a module of this project ({', '.join(PROJECT_PACKAGES)})")
    seen: dict[str, Path] = {}
    todo = [runner]
    while todo:
        parts = todo.pop().split(".")
        for depth in range(1, len(parts) + 1):  # a module's packages run their __init__ first
            name = ".".join(parts[:depth])
            path = module_file(name)
            if name in seen or path is None:
                continue
            seen[name] = path
            todo += [m for m in _imported(path, name) if m.split(".")[0] in PROJECT_PACKAGES]
    return dict(sorted(seen.items()))


def _without_docstrings(tree: ast.Module) -> ast.Module:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:]
    return tree


def syntax_hash(path: Path) -> str:
    """sha256 of the module's syntax tree without line numbers and docstrings: comments, formatting and docs do not
    change it; any change to what the code does does."""
    stat = path.stat()
    return _syntax_hash(str(path), stat.st_size, stat.st_mtime_ns)


@functools.cache
def _syntax_hash(path: str, size: int, mtime_ns: int) -> str:
    tree = _without_docstrings(ast.parse(Path(path).read_text(encoding="utf-8")))
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


def code_identity(runner: str) -> dict[str, Any]:
    """`{"runner", "modules": {module: syntax hash}, "sha256"}` of the project code `runner` (a module name such as
    `benchmarks.glue.runner`) imports. Not the git commit: committing results, or editing tests, docs, comments or a
    module the runner does not import, leaves it unchanged, so a grid resumes across sessions."""
    modules = {name: syntax_hash(path) for name, path in project_modules(runner).items()}
    blob = json.dumps(modules, sort_keys=True).encode()
    return {"runner": runner, "modules": modules, "sha256": hashlib.sha256(blob).hexdigest()}


def code_changes(stored: dict[str, Any]) -> list[str]:
    """The modules whose code changed (or that were added or dropped) since a run with code identity `stored` was
    made; empty when it is current. An identity from before code identities by import is all change."""
    if not isinstance(stored, dict) or "runner" not in stored or "modules" not in stored:
        return ["no code identity by import"]
    now = code_identity(stored["runner"])["modules"]
    made_with = stored["modules"]
    return sorted(name for name in made_with.keys() | now.keys() if made_with.get(name) != now.get(name))


def identity_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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


def run_identity(arguments: dict[str, Any], *, runner: str, model: str | None = None,
                 data_files: Iterable[str | Path] = ()) -> dict[str, Any]:
    """`{"hash", "config"}`: the sha256 of the run's whole resolved config (see the module docstring); `runner` is
    the module that makes the run (`__spec__.name` inside it), whose imports define the code it depends on."""
    config = {
        "arguments": _canonical(arguments),
        "model": model,
        "data": [file_fingerprint(f) for f in sorted({str(f) for f in data_files})],
        "versions": package_versions(),
        "code": code_identity(runner),
    }
    return {"hash": identity_hash(config), "config": config}


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
