"""The PubMedQA suite's long-form rows and study tables (see `benchmarks.harness.tables`)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.harness.tables import suite_main
from benchmarks.rare_pubmedqa.runner import method_label, write_table

SUITE = "rare_pubmedqa"
METRICS = ("accuracy", "yes_no_auc", "answer_nll", "validity", "answer_mass", "eval_gold_hit_rate", "test_examples",
           "train_loss_first", "train_loss_last", "train_loss_mean", "trainable_parameters", "train_seconds",
           "eval_seconds")


def rows(run: dict, name: str):
    if "setting" not in run or "accuracy" not in run:
        return
    cfg = run["config"]
    method = (f"{method_label(run)} {run['response_format']} {run['eval']} lr={cfg['lr']:g} ep={cfg['epochs']:g} "
              f"train={run['train_examples_requested'] or 'all'} test={run['test_examples_requested'] or 'all'}")
    for metric in METRICS:
        yield run["setting"], method, run["seed"], metric, run.get(metric)


def write_study_tables(folder: Path) -> None:
    print(f"wrote {write_table(folder)}", flush=True)


def main(argv=None):
    return suite_main(SUITE, rows, write_study_tables, argv)
