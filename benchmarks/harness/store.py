"""The run store: one JSON file per run, resumed only when its identity is the same (`benchmarks.harness.identity`).

`store = RunStore(folder)`; `store.needs_run(name, identity)` is False only when `<name>.json` holds a result with the
same identity (it says why otherwise: missing, changed keys, written before identities, corrupt);
`store.save(name, result, identity)` writes atomically; `store.get(name)` reads one result; `store.load()` returns
every readable result (old JSONs without an identity included) and reports each corrupt file by name instead of
failing. `write_text_atomic(path, text)`: temp file + rename, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.harness.identity import IDENTITY_KEY, differences


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to a temp file beside `path`, then rename it over `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it a normal file's mode
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj: Any, indent: int = 1) -> Path:
    """`obj` as JSON, atomically; a value JSON cannot encode raises before the target is touched."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, allow_nan=True) + "\n")


class RunStore:
    """One JSON file per run in `folder`, keyed by a name for humans and by the run identity for resuming."""

    def __init__(self, folder: str | Path, log=None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.corrupt: list[Path] = []

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def _read(self, path: Path) -> dict | None:
        """The JSON object in `path`, or None (reported by name) when it is truncated or not an object."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            data, why = None, f"{exc.__class__.__name__}: {exc}"
        else:
            why = "not a JSON object"
        if not isinstance(data, dict):
            self.log(f"corrupt result file {path} ({why}); it is left out of the tables and rerun by the same "
                     "command")
            if path not in self.corrupt:
                self.corrupt.append(path)
            return None
        return data

    def get(self, name: str) -> dict | None:
        """The stored result `name`, or None when it is missing or unreadable (reported by name)."""
        path = self.path(name)
        return self._read(path) if path.exists() else None

    def status(self, name: str, identity: dict) -> tuple[str, str]:
        """(`done` | `missing` | `changed` | `legacy` | `corrupt`, explanation)."""
        path = self.path(name)
        if not path.exists():
            return "missing", "no result yet"
        data = self.get(name)
        if data is None:
            return "corrupt", f"{path.name} is not readable JSON"
        stored = data.get(IDENTITY_KEY)
        if not isinstance(stored, dict) or "hash" not in stored:
            return "legacy", f"{path.name} was written before run identities, so its settings cannot be verified"
        if stored["hash"] == identity["hash"]:
            return "done", "identical run already stored"
        changed = differences(stored.get("config", {}), identity["config"]) or ["(identity hash)"]
        return "changed", f"{path.name} was made with other settings: {'; '.join(changed)}"

    def needs_run(self, name: str, identity: dict) -> bool:
        state, why = self.status(name, identity)
        if state == "done":
            self.log(f"skip {name}: {why}")
            return False
        if state != "missing":
            self.log(f"rerun {name}: {why}")
        return True

    def save(self, name: str, result: dict, identity: dict) -> Path:
        """Store `result` (a JSON object) with its identity, atomically."""
        return write_json_atomic(self.path(name), {**result, IDENTITY_KEY: identity})

    def load(self, where: Callable[[dict], bool] | None = None) -> list[dict]:
        """Every readable result in the folder (sorted by file name) for which `where` holds; corrupt files are
        reported by name and skipped."""
        runs = []
        for path in sorted(self.folder.glob("*.json")):
            data = self._read(path)
            if data is not None and (where is None or where(data)):
                runs.append(data)
        return runs
