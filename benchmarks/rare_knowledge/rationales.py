"""Check the facts in the rationales the knowledge benchmark's models wrote (rationale-first runs).

A rationale-first model (``--response-format rationale-answer``) writes, before its answer, the two facts the
answer rests on, in the training template's words: "<drug> inhibits <T>, and <T> drives <disease>, so ..." or
"<drug> inhibits <T>, but <disease> is driven by <T2>, so ...". Accuracy alone cannot say which step fails; this
reads each stored rationale and checks, against the generated world (the edited one for ``*_edited`` tests):

- target right: the drug's target it states is the drug's real target (hop 1, from the drug's "inhibits" passage);
- driver right: the target it says drives the disease is the real one (hop 2, from the disease's "drives" passage);
- follows: among rationales that state both facts, the answer is the one those stated facts imply (yes exactly when
  the two targets are the same), i.e. whether the model's final step uses its own reasoning;
- accuracy when both facts are stated right;
- both facts right on the "no" questions only: there the two targets differ, so a model that reads one passage and
  fills the "yes" template ("<drug> inhibits T, and T drives <disease>") gets one of them wrong.

The paired differences between runs (RARE minus SFT, SSMLoRA minus LoRA, ...) are `benchmarks.rare_knowledge.paired`'s.

A fact stated in other words than the template's counts as not stated right. The data is regenerated from each
result's recorded arguments by the runner's own loader (seed and recipe, or its ``data_dir``) and must match the
result's data sha256.

    python -m benchmarks.rare_knowledge rationales benchmarks/rare_knowledge/results/cpu/grid
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from benchmarks.harness.report import markdown_table
from benchmarks.rare_knowledge import runner as rk
from benchmarks.rare_knowledge.paired import folder_report_main, left_out_note, load_results

HEADER = ["training", "test", "method", "seed", "n", "accuracy", "target right", "driver right", "both right",
          "both right on 'no' questions", "answer follows its rationale", "accuracy when both right"]


def world_of(result: dict, cache: dict) -> dict[str, list[dict]]:
    """The data a result was scored on, made by the runner's own loader from the run's stored arguments, and
    checked against its recorded sha256."""
    config = result["config"]
    key = (config.get("data_dir"), config["seed"], config["train_drugs"], config["test_drugs"],
           config["drugs_per_target"], config["edit_fraction"])
    if key not in cache:
        cache[key] = rk.load_or_generate(argparse.Namespace(**config))
    data, sha256 = cache[key]
    if sha256 != result["data_sha256"]:
        raise SystemExit(f"{result['_file']}: the regenerated data does not match the result's data sha256 "
                         "(the generator changed since the run): rerun it, or pass its data with --data-dir")
    return data


def stated_facts(rationale: str, drug: str, disease: str) -> tuple[str | None, str | None]:
    """(the drug's target, the disease's driving target) as the rationale states them, None where it does not."""
    target = re.search(re.escape(drug) + r" inhibits (\w+)", rationale)
    driver = (re.search(r"(\w+) drives " + re.escape(disease), rationale)
              or re.search(re.escape(disease) + r" is driven by (\w+)", rationale))
    return (target.group(1) if target else None), (driver.group(1) if driver else None)


def check(result: dict, data: dict[str, list[dict]]) -> dict:
    """The fact checks of one result (see the module docstring)."""
    questions = {q["id"]: q for q in data["test.jsonl"]}
    targets = {q["drug"]: q["target"] for q in data["test.jsonl"]}
    if result["test"].endswith("_edited"):
        targets.update({e["drug"]: e["new_target"] for e in data["edit.jsonl"]})
    counts = {"n": 0, "correct": 0, "target": 0, "driver": 0, "both": 0, "both_correct": 0, "stated": 0,
              "follows": 0, "no": 0, "both_on_no": 0}
    for row in result["per_question"]:
        question = questions[row["id"]]
        target, driver = stated_facts(row["rationale"], question["drug"], question["disease"])
        target_right = target == targets[question["drug"]]
        driver_right = driver == question["disease_target"]
        counts["n"] += 1
        counts["correct"] += row["pred"] == row["gold"]
        counts["target"] += target_right
        counts["driver"] += driver_right
        if row["gold"] == "no":
            counts["no"] += 1
            counts["both_on_no"] += target_right and driver_right
        if target_right and driver_right:
            counts["both"] += 1
            counts["both_correct"] += row["pred"] == row["gold"]
        if target and driver:
            counts["stated"] += 1
            counts["follows"] += row["pred"] == ("yes" if target == driver else "no")
    return counts


def percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}" if whole else "–"


def table(folder: Path) -> str:
    results, left_out = load_results(folder)
    results = [r for r in results if r.get("response_format") == "rationale-answer"]
    if not results:
        raise SystemExit(f"{folder} holds no current rationale-first results (--response-format rationale-answer)")
    cache: dict = {}
    rows = []
    for result in sorted(results, key=lambda r: (r["training"], r["test"], r["method_label"], r["seed"])):
        c = check(result, world_of(result, cache))
        rows.append([result["training"], result["test"], result["method_label"], str(result["seed"]), str(c["n"]),
                     percent(c["correct"], c["n"]), percent(c["target"], c["n"]), percent(c["driver"], c["n"]),
                     percent(c["both"], c["n"]), f"{percent(c['both_on_no'], c['no'])} (of {c['no']})",
                     f"{percent(c['follows'], c['stated'])} (of {c['stated']})",
                     f"{percent(c['both_correct'], c['both'])} (of {c['both']})"])
    return (left_out_note(left_out)
            + "Facts in the rationales of rationale-first runs (%), checked against the generated world "
            "(`python -m benchmarks.rare_knowledge rationales`):\n\n" + markdown_table(HEADER, rows) + "\n")


def main(argv=None) -> str:
    return folder_report_main(argv, __doc__.split("\n\n")[0], "rationale_facts.md", table)


if __name__ == "__main__":
    main()
