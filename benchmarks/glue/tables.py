"""The GLUE suite's long-form rows and study tables (see `benchmarks.harness.tables`)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.glue.runner import _method_label, write_reports
from benchmarks.harness.tables import suite_main

SUITE = "glue"
PER_RUN = ("score", "majority_score", "train_loss", "train_examples_per_s", "train_time_s", "wall_time_s")


def rows(run: dict, name: str):
    if "config" in run and "metrics" in run:  # a training run
        cfg = run["config"]
        task, method, seed = cfg["task"], _method_label(cfg), cfg["seed"]
        yield from ((task, method, seed, metric, value) for metric, value in run["metrics"].items())
        yield from ((task, method, seed, metric, run.get(metric)) for metric in PER_RUN)
        for kind, count in run.get("trainable_params", {}).items():
            yield task, method, seed, f"{kind}_params", count
    elif "methods" in run and "task" in run:  # a throughput measurement (throughput-<task>-r<rank>.json)
        for method, measured in run["methods"].items():
            for metric, value in measured.items():
                yield run["task"], f"{method} r={run.get('rank')}", None, metric, value


def write_study_tables(folder: Path) -> None:
    write_reports(folder)


def main(argv=None):
    return suite_main(SUITE, rows, write_study_tables, argv)
