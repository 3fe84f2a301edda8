"""The speed suite's long-form rows and study tables (see `benchmarks.harness.tables`)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.harness.store import RunStore
from benchmarks.harness.tables import suite_main
from benchmarks.speed.model import write_tables as write_model_tables

SUITE = "speed"


def rows(run: dict, name: str):
    if "points" in run:  # speed model: one point (tokens per step, checkpointing) per JSON, every method in it
        for point in run["points"]:
            task = f"{point['tokens']} tokens" + (", checkpointing" if point.get("checkpointing") else "")
            for method, measured in point.get("methods", {}).items():
                for metric, value in measured.items():
                    yield task, method, None, metric, value
    elif "rows" in run and "baseline" in run:  # speed collator: one row per configuration
        for row in run["rows"]:
            yield "pubmedqa", row["configuration"], None, "examples_per_s", row.get("examples_per_s")
    elif "rows" in run and "tag" in run:  # speed step: one shape per JSON, one row per layer kind, provider, mode
        for row in run["rows"]:
            task = f"{row['kind']} d={row['d_in']} r={row['r']} tokens={row['tokens']}"
            method = f"{row['provider']} {row['mode']} {row['dtype']}/{row['adapter_dtype']}"
            for metric, value in row.items():
                yield task, method, None, metric, value

def write_study_tables(folder: Path) -> None:
    """The model runner's tables (step and collator tables are written by their runs, which hold the settings)."""
    if folder.parent.name == "model":
        for path in write_model_tables(RunStore(folder), folder.name):
            print(f"wrote {path}", flush=True)


def main(argv=None):
    return suite_main(SUITE, rows, write_study_tables, argv)
