"""The knowledge benchmark's folder summary: accuracy by setting and test condition, then paired differences.

First, per response format, one matrix: a row per (training, adapter), a column per test condition, each cell the
accuracy's mean ± standard deviation over the seeds run (their number in brackets).

Then the paired differences. Two runs that differ in one field and agree on all others (response format, seed,
and the rest of training, test and adapter) answered the same questions, so their difference is measured per
question: the mean of (first right) - (second right), with a bootstrap 95 % interval over the questions.
Compared:

- RARE minus closed-book SFT, RAFT minus plain RARE (training; same test, adapter, seed);
- SSMLoRA minus peft LoRA (adapter; same training, test, seed);
- BM25 passages minus closed-book, oracle passages minus BM25 (what each model makes of the passages at test).

When a comparison is made in more than one seed, a row with seed "all" follows: the mean of the per-seed
differences with a t 95 % interval over the seeds (the interval to quote: each seed is its own generated world and
training), and beside it the bootstrap interval over all their questions with the trained models fixed.

Two test conditions of one trained model are usually scored after one training; when a later rerun trained the
model again (a test condition added later, a stored run gone stale) the two runs may come from two trainings whose
floats differ, e.g. on another machine's CPU. Such a difference is marked ‡ (told by the training losses each run
recorded): it also holds the rerun's noise.

Only runs made by this checkout's code and package versions are read (those a rerun of the grid would skip); any
other run in the folder is named at the top of the report and left out, so a table never mixes stale runs in.

    python -m benchmarks.rare_knowledge paired benchmarks/rare_knowledge/results/cpu/grid-3ep   # writes paired.md there
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.harness import stats
from benchmarks.harness.environment import package_versions
from benchmarks.harness.identity import IDENTITY_KEY, code_changes, code_identity
from benchmarks.harness.report import markdown_table
from benchmarks.harness.store import write_text_atomic
from benchmarks.rare_knowledge import runner as rk

# (title, the field that differs, first, second); every other field of KEY is held equal
COMPARISONS = [
    ("RARE minus closed-book SFT", "training", "rare", "sft_closed"),
    ("RARE with RAFT distractors minus plain RARE", "training", "rare_raft", "rare"),
    ("SSMLoRA minus peft LoRA", "method_label", "ssmlora", "lora"),
    ("BM25 passages minus closed-book at test", "test", "bm25", "closed_book"),
    ("oracle passages minus BM25 at test", "test", "oracle", "bm25"),
]
KEY = ("response_format", "training", "test", "method_label", "seed")


def _order(value: str, known: dict) -> tuple[int, str]:
    """Sort key: the runner's own order of its trainings / test conditions (``known``), unknown names last."""
    order = list(known)
    return (order.index(value) if value in known else len(order), value)


def accuracy_matrix(results: list[dict]) -> str:
    """Per response format, a markdown matrix: (training, adapter) x test condition, accuracy (%) as
    "mean ± std (seeds)" over the seeds run ("mean (1)" for one seed); "–" where that run does not exist."""
    accuracies = defaultdict(list)
    for r in results:
        accuracies[r["response_format"], r["training"], r["method_label"], r["test"]].append(100 * r["accuracy"])
    text = ""
    for response_format in sorted({key[0] for key in accuracies}):
        keys = [key for key in accuracies if key[0] == response_format]
        tests = sorted({key[3] for key in keys}, key=lambda t: _order(t, rk.TESTS))
        rows = sorted({key[1:3] for key in keys}, key=lambda row: (_order(row[0], rk.TRAININGS), row[1]))
        cells = []
        for training, method in rows:
            cells.append([training, method])
            for test in tests:
                values = accuracies.get((response_format, training, method, test))
                if not values:
                    cells[-1].append("–")
                elif len(values) == 1:
                    cells[-1].append(f"{values[0]:.1f} (1)")
                else:
                    cells[-1].append(f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f} ({len(values)})")
        text += (f"\nAccuracy (%), {response_format}: mean ± standard deviation over seeds (number of seeds); the "
                 "edited columns score only the questions the edit flipped:\n\n"
                 + markdown_table(["training", "adapter", *tests], cells) + "\n")
    return text


def paired_differences(results: list[dict], side: str, first: str, second: str, group: tuple[str, ...],
                       resamples: int = 10_000) -> list[list[str]]:
    """Accuracy of the results whose ``side`` field is ``first`` minus those where it is ``second``, on the same
    questions, per value of the ``group`` fields, with a bootstrap 95 % interval over the questions (seeded, so the
    table is reproducible). E.g. side="training", first="rare", second="sft_closed",
    group=("test", "method_label", "seed"). When ``group`` holds the seed, a row with seed "all" follows for each
    comparison made in more than one seed: the mean of the per-seed differences with a t 95 % interval over the
    seeds (each seed is its own generated world and training, so the seeds are the units), and beside it the
    bootstrap interval over all their questions with the trained models fixed (`benchmarks.harness.stats`)."""
    correct, trainings = defaultdict(dict), defaultdict(dict)
    for r in results:
        key = tuple(r[field] for field in group)
        correct[key][r[side]] = {q["id"]: float(q["pred"] == q["gold"]) for q in r["per_question"]}
        trainings[key][r[side]] = training_losses(r)

    def row(key: tuple, per_seed: list[np.ndarray], two_trainings: bool) -> list[str]:
        # right-or-wrong per question as the "outputs", every label 1: accuracy is the share right
        paired = stats.paired_comparison([(a, b, np.ones_like(a)) for a, b in per_seed], resamples=resamples)
        text = paired.text(digits=1) if paired.seeds else paired.examples.text(digits=1)
        return [*map(str, key), str(sum(len(a) for a, _ in per_seed)), text + (" ‡" if two_trainings else "")]

    rows, over_seeds = [], defaultdict(list)
    for key, by_side in sorted(correct.items()):
        if not {first, second} <= set(by_side):
            continue
        ids = sorted(by_side[first].keys() & by_side[second].keys())
        pair = (np.array([by_side[first][i] for i in ids]), np.array([by_side[second][i] for i in ids]))
        # only two test conditions of one trained model should share a training
        two_trainings = side == "test" and trainings[key][first] != trainings[key][second]
        rows.append(row(key, [pair], two_trainings))
        if "seed" in group:
            pooled = tuple("all" if field == "seed" else value for field, value in zip(group, key))
            over_seeds[pooled].append((pair, two_trainings))
    return rows + [row(key, [pair for pair, _ in parts], any(two for _, two in parts))
                   for key, parts in over_seeds.items() if len(parts) > 1]


def training_losses(result: dict) -> tuple:
    """What tells one training from another of the same setting and seed: its first, last and mean training loss
    (all None for a run that trained nothing, which records none)."""
    return tuple(result.get(field) for field in ("train_loss_first", "train_loss_last", "train_loss_mean"))


def current_code_and_versions() -> dict:
    """The code and package versions a result's identity must record to be current (the runner's own fields)."""
    return {"code": code_identity(rk.__spec__.name), "versions": package_versions()}


def load_results(folder: Path) -> tuple[list[dict], list[str]]:
    """The folder's current result JSONs that kept their per-question predictions, and one line per result left
    out because another code or package version made it (its file name and why)."""
    versions = package_versions()
    results, left_out = [], []
    for path in sorted(folder.glob("*.json")):
        result = json.loads(path.read_text())
        if not result.get("per_question"):
            continue
        made_with = result.get(IDENTITY_KEY, {}).get("config", {})
        stale = []
        changed = code_changes(made_with.get("code"))
        if changed:
            stale.append(f"code ({', '.join(changed)})")
        if made_with.get("versions") != versions:
            stale.append("package versions")
        if stale:
            left_out.append(f"`{path.name}`: made with other {' and '.join(stale)}")
        else:
            results.append({**result, "_file": path.name})
    return results, left_out


def left_out_note(left_out: list[str]) -> str:
    """The report's opening lines on the runs left out (empty when none was)."""
    if not left_out:
        return ""
    return (f"**Left out: {len(left_out)} run(s) made with other code or package versions than this checkout's** "
            "(a rerun of the grid's command redoes them):\n\n" + "".join(f"- {line}\n" for line in left_out) + "\n")


def table(results: list[dict]) -> str:
    text = ""
    for title, side, first, second in COMPARISONS:
        group = tuple(field for field in KEY if field != side)
        paired = paired_differences(results, side, first, second, group)
        if paired:
            header = [*(field.removesuffix("_label") for field in group), "n", "difference (points)"]
            text += f"\n{title}, on the same questions:\n\n" + markdown_table(header, paired) + "\n"
            if any(row[-1].endswith("‡") for row in paired):
                text += ("\n‡ the two runs come from two trainings of that model (a rerun trained it again; their "
                         "training losses differ), so the difference also holds the rerun's noise.\n")
    return text


def report(folder: Path) -> str:
    results, left_out = load_results(folder)
    pairs = table(results)
    if not pairs:
        raise SystemExit(f"{folder} holds no two current runs that differ in one compared field on the same questions")
    return (left_out_note(left_out) + accuracy_matrix(results).lstrip("\n")
            + "\nPaired accuracy differences (points) between runs on the same questions; per seed a bootstrap 95 % "
            "interval over the questions (10,000 resamples, the trained models fixed); seed \"all\": the mean of the "
            "per-seed differences with a t 95 % interval over the seeds, then the bootstrap interval over all their "
            "questions (`python -m benchmarks.rare_knowledge paired`).\n"
            + pairs)


def folder_report_main(argv, description: str, out_name: str, make_report) -> str:
    """The command line of a reader of a results folder: ``make_report(folder)`` written to ``<folder>/<out_name>``
    (or ``--out``) and printed."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("folder", type=Path, help="a folder of rare_knowledge result JSONs")
    parser.add_argument("--out", type=Path, default=None, help=f"default: <folder>/{out_name}")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        raise SystemExit(f"{args.folder} is not a folder of rare_knowledge results")
    text = make_report(args.folder)
    write_text_atomic(args.out or args.folder / out_name, text)
    sys.stdout.write(text)
    return text


def main(argv=None) -> str:
    return folder_report_main(argv, __doc__.split("\n\n")[0], "paired.md", report)


if __name__ == "__main__":
    main()
