"""`benchmarks/rare_rationales.py`: the facts a rationale-first model states, checked against the generated world."""

from __future__ import annotations

import json

import pytest

from benchmarks import rare_knowledge_data as rkd
from benchmarks import rare_rationales as rr


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world")
    rkd.write_data(folder, 0)
    return rkd.load_data(folder), rkd.data_fingerprint(folder)


def _result(folder, name, test, per_question, sha256, training="rare", method="ssmlora"):
    recipe = rkd.Recipe()
    config = {"data_dir": None, "seed": 0, "train_drugs": recipe.train_drugs, "test_drugs": recipe.test_drugs,
              "drugs_per_target": recipe.drugs_per_target, "edit_fraction": recipe.edit_fraction}
    result = {"training": training, "test": test, "method_label": method, "seed": 0, "config": config,
              "response_format": "rationale-answer", "data_sha256": sha256, "per_question": per_question}
    (folder / f"{name}.json").write_text(json.dumps(result))


def test_facts_are_checked_per_hop(world, tmp_path):
    data, sha256 = world
    yes = [q for q in data["test.jsonl"] if q["answer"] == "yes"]
    no = [q for q in data["test.jsonl"] if q["answer"] == "no"]
    hallucinated = no[1]  # the "yes" template filled with the drug's target: hop 1 right, hop 2 wrong
    template_yes = rkd.rationale(hallucinated["drug"], hallucinated["target"], hallucinated["disease"],
                                 hallucinated["target"])
    rows = [
        {"id": yes[0]["id"], "gold": "yes", "pred": "yes", "rationale": yes[0]["rationale"]},
        {"id": no[0]["id"], "gold": "no", "pred": "no", "rationale": no[0]["rationale"]},
        {"id": hallucinated["id"], "gold": "no", "pred": "yes", "rationale": template_yes},
        {"id": yes[1]["id"], "gold": "yes", "pred": "no", "rationale": "It depends on the dose."},
    ]
    counts = rr.check({"test": "bm25", "per_question": rows}, data)
    assert counts == {"n": 4, "correct": 2, "target": 3, "driver": 2, "both": 2, "both_correct": 2, "stated": 3,
                      "follows": 3, "no": 2, "both_on_no": 1}

    _result(tmp_path, "rare-bm25", "bm25", rows, sha256)
    text = rr.main([str(tmp_path)])
    assert "| rare | bm25 | ssmlora | 0 | 4 | 50.0 | 75.0 | 50.0 | 50.0 | 50.0 (of 2) | 100.0 (of 3) | 100.0 (of 2) |" \
        in text
    assert (tmp_path / "rationale_facts.md").read_text() == text
    assert "RARE minus SFT" not in text  # no SFT run beside it: nothing to pair

    # an SFT run on the same questions, right on one of the four where RARE was right on two: +25 points
    sft_rows = [dict(row, pred=("yes" if row["gold"] == "no" else "no")) for row in rows]
    sft_rows[0]["pred"] = sft_rows[0]["gold"]
    _result(tmp_path, "sft-bm25", "bm25", sft_rows, sha256, training="sft_closed")
    paired = [line for line in rr.main([str(tmp_path)]).splitlines() if line.startswith("| bm25 |")]
    assert len(paired) == 1 and paired[0].startswith("| bm25 | ssmlora | 0 | 4 | +25.0 [")
    assert "SSMLoRA minus LoRA" not in rr.main([str(tmp_path)])

    # a LoRA RARE run on the same questions, right on all four: SSMLoRA (two of four) is 50 points behind
    lora_rows = [dict(row, pred=row["gold"]) for row in rows]
    _result(tmp_path, "rare-bm25-lora", "bm25", lora_rows, sha256, method="lora")
    text = rr.main([str(tmp_path)])
    assert "| rare | bm25 | lora | 0 | 4 | 100.0 |" in text
    assert "| rare | bm25 | 0 | 4 | -50.0 [" in text.split("SSMLoRA minus peft LoRA")[1]


def test_edited_tests_are_checked_against_the_edited_world(world):
    data, _ = world
    edit = data["edit.jsonl"][0]
    flip = edit["flipped"][0]
    question = next(q for q in data["test.jsonl"] if q["id"] == flip["id"])
    row = {"id": flip["id"], "gold": flip["answer"], "pred": flip["answer"], "rationale": flip["rationale"]}
    assert edit["new_target"] != question["target"]
    edited = rr.check({"test": "bm25_edited", "per_question": [row]}, data)
    assert edited["target"] == 1 and edited["both_correct"] == 1
    # the same rationale judged against the world before the edit states the wrong target
    assert rr.check({"test": "bm25", "per_question": [row]}, data)["target"] == 0


def test_results_from_other_data_or_formats_are_refused(world, tmp_path):
    data, _ = world
    row = {"id": data["test.jsonl"][0]["id"], "gold": "yes", "pred": "yes", "rationale": ""}
    _result(tmp_path, "stale", "bm25", [row], "0" * 64)
    with pytest.raises(SystemExit, match="does not match the result's data sha256"):
        rr.main([str(tmp_path)])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no rationale-first results"):
        rr.main([str(empty)])


def test_paired_differences_pool_the_seeds():
    def result(seed, method, right):  # ``right``: which of four questions are answered right
        return {"training": "rare", "test": "bm25", "seed": seed, "method_label": method,
                "per_question": [{"id": f"q{i}", "gold": "yes", "pred": "yes" if ok else "no"}
                                 for i, ok in enumerate(right)]}

    results = [result(0, "ssmlora", [1, 1, 0, 0]), result(0, "lora", [1, 1, 1, 1]),
               result(1, "ssmlora", [1, 1, 1, 1]), result(1, "lora", [1, 1, 1, 1])]
    rows = rr.paired_differences(results, "method_label", "ssmlora", "lora", ("training", "test", "seed"), 200)
    assert [r[:4] for r in rows] == [["rare", "bm25", "0", "4"], ["rare", "bm25", "1", "4"],
                                     ["rare", "bm25", "all", "8"]]
    assert rows[0][4].startswith("-50.0 [") and rows[1][4].startswith("+0.0 [") and rows[2][4].startswith("-25.0 [")
    # one seed only: nothing to pool
    assert len(rr.paired_differences(results[:2], "method_label", "ssmlora", "lora", ("training", "test", "seed"),
                                     200)) == 1
