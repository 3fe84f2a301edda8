"""The knowledge benchmark's long-form rows and study tables (see `benchmarks.harness.tables`)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.harness.tables import suite_main
from benchmarks.rare_knowledge.runner import write_table

SUITE = "rare_knowledge"
METRICS = ("accuracy", "yes_no_auc", "accuracy_before_edit", "test_examples", "train_loss_first", "train_loss_last",
           "train_loss_mean", "trainable_parameters", "train_seconds", "eval_seconds")


def rows(run: dict, name: str):
    if "training" not in run or "accuracy" not in run:
        return
    # the trained setting, the adapter, the response format and the budget: what a row of table.md is keyed by
    method = f"{run['training']} {run['method_label']} {run['response_format']} ({run['config_label']})"
    for metric in METRICS:
        yield run["test"], method, run["seed"], metric, run.get(metric)
    for bound, value in zip(("low", "high"), run.get("accuracy_ci95") or ()):
        yield run["test"], method, run["seed"], f"accuracy_ci95_{bound}", value


def write_study_tables(folder: Path) -> None:
    print(f"wrote {write_table(folder)}", flush=True)


def main(argv=None):
    return suite_main(SUITE, rows, write_study_tables, argv)
