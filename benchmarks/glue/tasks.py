"""GLUE task definitions for `benchmarks/glue/runner.py`: where each task's data live, how to read them, how to score them.

Every task is turned into the same shape, a `datasets.Dataset` with the columns `text_a`, `text_b` (`None` for
single-sentence tasks) and `label` (an int class id, or a float for the regression task STS-B), whether it comes
from GLUE's own TSV files (`--data-dir`) or from the Hub's `nyu-mll/glue`. Class ids follow the Hub's order so that
both sources give identical labels.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

# GLUE text contains fields longer than csv's default limit of 131072 characters in a few QQP/MNLI rows.
csv.field_size_limit(sys.maxsize)


@dataclass(frozen=True)
class GlueTask:
    """How one GLUE task is stored and scored.

    `columns` name the TSV columns holding (text_a, text_b, label); for files without a header (CoLA) they are
    column positions instead. `labels` maps the TSV's label strings to the Hub's class ids; `None` means the TSV
    already holds the ids (or, for STS-B, a float score).
    """

    name: str  # the CLI name, also the Hub config name
    folder: str  # GLUE's own folder name inside --data-dir
    columns: tuple  # (text_a, text_b or None, label) as header names, or as positions when has_header is False
    metrics: tuple[str, ...]  # official GLUE metrics, in the order they are reported
    num_labels: int = 2  # 1 means regression
    labels: dict[str, int] | None = None
    has_header: bool = True
    hub_columns: tuple[str, str | None] = ("sentence1", "sentence2")
    # dev split name(s): TSV file stem -> Hub split; several entries (MNLI) are all evaluated
    dev_splits: dict[str, str] = field(default_factory=lambda: {"dev": "validation"})

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


_NLI2 = {"entailment": 0, "not_entailment": 1}

TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in [
        GlueTask("cola", "CoLA", (3, None, 1), ("mcc",), has_header=False, hub_columns=("sentence", None)),
        GlueTask("sst2", "SST-2", ("sentence", None, "label"), ("accuracy",), hub_columns=("sentence", None)),
        GlueTask("mrpc", "MRPC", ("#1 String", "#2 String", "Quality"), ("f1", "accuracy")),
        GlueTask("stsb", "STS-B", ("sentence1", "sentence2", "score"), ("pearson", "spearman"), num_labels=1),
        GlueTask(
            "qqp", "QQP", ("question1", "question2", "is_duplicate"), ("f1", "accuracy"),
            hub_columns=("question1", "question2"),
        ),
        GlueTask(
            "mnli", "MNLI", ("sentence1", "sentence2", "gold_label"), ("accuracy",), num_labels=3,
            labels={"entailment": 0, "neutral": 1, "contradiction": 2}, hub_columns=("premise", "hypothesis"),
            dev_splits={"dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"},
        ),
        GlueTask(
            "qnli", "QNLI", ("question", "sentence", "label"), ("accuracy",), labels=_NLI2,
            hub_columns=("question", "sentence"),
        ),
        GlueTask("rte", "RTE", ("sentence1", "sentence2", "label"), ("accuracy",), labels=_NLI2),
        GlueTask("wnli", "WNLI", ("sentence1", "sentence2", "label"), ("accuracy",)),
    ]
}


def get_task(name: str) -> GlueTask:
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[key]


# ---------------------------------------------------------------------------------------------------------------
# Reading the data
# ---------------------------------------------------------------------------------------------------------------


def read_tsv(path: Path, task: GlueTask) -> dict[str, list]:
    """Read one GLUE TSV into the columns text_a / text_b / label.

    GLUE text holds bare quote characters, so quoting is off; MRPC starts with a byte-order mark, which
    `utf-8-sig` drops. A handful of rows in the big GLUE files are malformed (too few fields): they are skipped
    and counted, as the standard GLUE loaders do.
    """
    out: dict[str, list] = {"text_a": [], "text_b": [], "label": []}
    skipped = 0
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if task.has_header:
            header = next(rows)
            missing = [c for c in task.columns if c is not None and c not in header]
            if missing:
                raise ValueError(f"{path}: expected columns {missing} in the header {header}")
            pos = [header.index(c) if c is not None else None for c in task.columns]
        else:
            pos = list(task.columns)
        need = max(p for p in pos if p is not None) + 1
        for row in rows:
            if len(row) < need:
                skipped += 1
                continue
            raw = row[pos[2]].strip()
            if task.labels is not None:
                if raw not in task.labels:  # e.g. MNLI rows without a gold label ("-")
                    skipped += 1
                    continue
                label = task.labels[raw]
            else:
                try:
                    label = float(raw) if task.is_regression else int(raw)
                except ValueError:
                    kind = "a number" if task.is_regression else "an integer class id"
                    raise ValueError(f"{path}, line {rows.line_num}: label {raw!r} is not {kind} (column "
                                     f"{task.columns[2]!r} of GLUE's {task.folder} format); fix or remove that "
                                     "row") from None
            out["text_a"].append(row[pos[0]])
            out["text_b"].append(row[pos[1]] if pos[1] is not None else None)
            out["label"].append(label)
    if skipped:
        print(f"note: skipped {skipped} malformed or unlabelled rows in {path}", file=sys.stderr)
    if not out["label"]:
        raise ValueError(f"{path} holds no usable rows")
    return out


def load_task(task: GlueTask, data_dir: str | Path | None):
    """Return `(train, {dev_name: dev})` as `datasets.Dataset`s, from `data_dir` or (when None) from the Hub."""
    from datasets import Dataset

    if data_dir is not None:
        folder = Path(data_dir) / task.folder
        if not Path(data_dir).is_dir():
            raise FileNotFoundError(f"--data-dir {data_dir} does not exist (expected a folder with GLUE's <TASK>/ "
                                    f"subfolders, e.g. {task.folder}/train.tsv)")
        files = {"train": folder / "train.tsv", **{d: folder / f"{d}.tsv" for d in task.dev_splits}}
        absent = [str(p) for p in files.values() if not p.is_file()]
        if absent:
            raise FileNotFoundError(
                f"task {task.name}: missing {', '.join(absent)}. --data-dir must hold GLUE's own folder names "
                f"({task.folder}/train.tsv and {', '.join(d + '.tsv' for d in task.dev_splits)})."
            )
        train = Dataset.from_dict(read_tsv(files["train"], task))
        devs = {d: Dataset.from_dict(read_tsv(files[d], task)) for d in task.dev_splits}
        return train, devs
    return _load_from_hub(task)


def _load_from_hub(task: GlueTask):
    from datasets import load_dataset

    try:
        ds = load_dataset("nyu-mll/glue", task.name)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types when offline; all mean the same here
        raise RuntimeError(
            f"could not load GLUE/{task.name} from the Hugging Face Hub (nyu-mll/glue): {exc.__class__.__name__}: "
            f"{exc}\nOffline? Pass --data-dir with GLUE's TSV files (<TASK>/train.tsv, dev.tsv)."
        ) from exc
    a, b = task.hub_columns

    def convert(split):
        return split.map(
            lambda ex: {"text_a": ex[a], "text_b": ex[b] if b else None, "label": ex["label"]},
            remove_columns=split.column_names,
        )

    return convert(ds["train"]), {d: convert(ds[hub]) for d, hub in task.dev_splits.items()}


# ---------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------


def compute_metrics(task: GlueTask, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE's official metrics (in percent) from raw model outputs, via scikit-learn / scipy.

    `predictions` are logits (classification) or one score per row (regression).
    """
    if task.is_regression:
        preds = np.asarray(predictions, dtype=np.float64).reshape(-1)
        labels = np.asarray(labels, dtype=np.float64).reshape(-1)
        return {"pearson": 100 * float(pearsonr(preds, labels)[0]),
                "spearman": 100 * float(spearmanr(preds, labels)[0])}
    preds = np.asarray(predictions).argmax(-1)
    labels = np.asarray(labels).astype(int)
    out = {}
    for m in task.metrics:
        if m == "mcc":
            out[m] = 100 * float(matthews_corrcoef(labels, preds))
        elif m == "f1":
            out[m] = 100 * float(f1_score(labels, preds))  # positive class 1 (paraphrase / duplicate), as GLUE
        elif m == "accuracy":
            out[m] = 100 * float(accuracy_score(labels, preds))
    return out


def majority_metrics(task: GlueTask, train_labels, dev_labels) -> dict[str, float]:
    """The official metrics of always predicting the train set's most frequent class (regression: its mean)."""
    train_labels = np.asarray(train_labels)
    n = len(np.asarray(dev_labels))
    if task.is_regression:  # a constant prediction has no correlation; report 0 rather than NaN
        return {m: 0.0 for m in task.metrics}
    majority = int(np.bincount(train_labels.astype(int), minlength=task.num_labels).argmax())
    logits = np.zeros((n, task.num_labels))
    logits[:, majority] = 1.0
    return compute_metrics(task, logits, dev_labels)


def task_score(task: GlueTask, metrics: dict[str, float]) -> float:
    """One number per task, as the GLUE leaderboard forms it: the mean of the task's official metrics (MRPC/QQP: F1
    and accuracy; STS-B: Pearson and Spearman; MNLI: matched and mismatched accuracy)."""
    keys = [k for k in metrics if k.split("/")[-1] in task.metrics]
    return float(np.mean([metrics[k] for k in keys]))
