"""One long-form table per suite, rebuilt from its stored runs, and the per-study tables beside them.

    python -m benchmarks.harness.tables [SUITE ...]    every suite (default) or the named ones
    python -m benchmarks.<suite> tables                the same for one suite

For each suite it writes `benchmarks/<suite>/results/runs.csv` (the current runs) and `results/archive/runs.csv`
(history), one row per number a run stored, with the columns `COLUMNS`: `study` is the run's folder below the
device folder, `identity` the first 12 characters of its identity hash (empty for a run without one). Then it
rebuilds each current study's own tables (`table.md`, `plot.png`: the suite's `write_study_tables`) from the same
run JSONs: those tables also hold statistics over per-example outputs (paired bootstrap intervals), which a
long-form table of numbers does not carry. A current run whose code changed since it was made (see
`benchmarks.harness.identity.code_changes`) is named on stderr: rerun its grid.

A suite provides a module `benchmarks.<suite>.tables` with `SUITE`, `rows(run, name)` (the (task, method, seed,
metric, value) tuples of one stored run; `name` is its file name without `.json`) and `write_study_tables(folder)`.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import json
import math
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from benchmarks.harness.identity import IDENTITY_KEY, REPO_ROOT, code_changes
from benchmarks.harness.store import write_text_atomic

COLUMNS = ("suite", "study", "task", "method", "seed", "metric", "value", "device", "identity")
SUITES = ("speed", "glue", "rare_knowledge", "rare_pubmedqa")
ARCHIVE = "archive"
# Suites whose results/ first splits by runner, then by device (speed/results/model/cpu/...).
RUNNER_FOLDERS = {"speed": ("step", "model", "collator"), "glue": ("grad_norms",)}

Row = tuple[str, str, object, str, object]  # task, method, seed, metric, value


BENCHMARKS_DIR = REPO_ROOT / "benchmarks"


def results_dir(suite: str) -> Path:
    return BENCHMARKS_DIR / suite / "results"


def device_and_study(suite: str, folder: Path) -> tuple[str, str]:
    """(device, study) of a run folder given relative to its results/ (or results/archive/) folder."""
    parts = list(folder.parts)
    if parts and parts[0] in RUNNER_FOLDERS.get(suite, ()):
        runner, device, rest = parts[0], parts[1] if len(parts) > 1 else "", parts[2:]
        return device, "/".join([runner, *rest])
    return (parts[0] if parts else ""), "/".join(parts[1:])


def run_files(suite: str, archived: bool) -> list[Path]:
    """The suite's run JSONs: under results/archive/ (`archived`) or everywhere else under results/."""
    root = results_dir(suite)
    if archived:
        return sorted((root / ARCHIVE).rglob("*.json"))
    return sorted(p for p in root.rglob("*.json") if ARCHIVE not in p.relative_to(root).parts)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def long_form(suite: str, rows: Callable[[dict, str], Iterable[Row]], archived: bool) -> tuple[list[dict], list[str]]:
    """The long-form rows of the suite's current (or archived) runs, and the current runs whose code changed."""
    root = results_dir(suite) / ARCHIVE if archived else results_dir(suite)
    table, stale = [], []
    for path in run_files(suite, archived):
        run = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(run, dict):
            raise SystemExit(f"{path} is not a JSON object: fix or remove it")
        device, study = device_and_study(suite, path.parent.relative_to(root))
        identity = run.get(IDENTITY_KEY) or {}
        changed = [] if archived else code_changes(identity.get("config", {}).get("code"))
        if changed:
            stale.append(f"{path.relative_to(BENCHMARKS_DIR.parent)}: {', '.join(changed)}")
        for task, method, seed, metric, value in rows(run, path.stem):
            if _number(value):
                table.append(dict(zip(COLUMNS, (suite, study, task, method, "" if seed is None else seed, metric,
                                                value, device, identity.get("hash", "")[:12]))))
    return table, stale


def csv_of(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def rebuild(suite: str, rows: Callable[[dict, str], Iterable[Row]],
            write_study_tables: Callable[[Path], None] | None) -> dict[str, int]:
    """Write the suite's runs.csv and archive/runs.csv and rebuild each current study's tables; the counts."""
    counts = {"current": len(run_files(suite, False)), "archived": len(run_files(suite, True))}
    current, stale = long_form(suite, rows, archived=False)
    archived, _ = long_form(suite, rows, archived=True)
    write_text_atomic(results_dir(suite) / "runs.csv", csv_of(current))
    if archived:
        write_text_atomic(results_dir(suite) / ARCHIVE / "runs.csv", csv_of(archived))
    if write_study_tables is not None:
        for folder in sorted({p.parent for p in run_files(suite, False)}):
            write_study_tables(folder)
    for line in stale:
        print(f"stale (its code changed since; rerun it): {line}", file=sys.stderr)
    counts["stale"] = len(stale)
    print(f"{suite}: {counts['current']} current runs ({len(current)} rows in results/runs.csv), "
          f"{counts['archived']} archived ({len(archived)} rows in results/archive/runs.csv), "
          f"{counts['stale']} current ones stale", flush=True)
    return counts


def main(argv=None) -> dict[str, dict[str, int]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.harness.tables", description=__doc__.split("\n")[0])
    parser.add_argument("suites", nargs="*", help=f"suites to rebuild (default: all of {', '.join(SUITES)})")
    args = parser.parse_args(argv)
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        parser.error(f"unknown suites {unknown}: choose from {', '.join(SUITES)}")
    return {suite: importlib.import_module(f"benchmarks.{suite}.tables").main([])
            for suite in args.suites or SUITES}



def suite_main(suite: str, rows, write_study_tables, argv=None) -> dict[str, int]:
    """`python -m benchmarks.<suite> tables`: rebuild that suite's tables (no options)."""
    argparse.ArgumentParser(prog=f"python -m benchmarks.{suite} tables",
                            description=f"Rebuild benchmarks/{suite}/results/runs.csv, archive/runs.csv and every "
                                        "current study's tables from the stored run JSONs.").parse_args(argv)
    return rebuild(suite, rows, write_study_tables)


if __name__ == "__main__":
    main()
