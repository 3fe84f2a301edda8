"""`benchmarks/rare_knowledge/rationales.py`: the facts a rationale-first model states, checked against the generated world."""

from __future__ import annotations

import json

import pytest

from benchmarks.rare_knowledge import data as rkd
from benchmarks.rare_knowledge import rationales as rr
from benchmarks.rare_knowledge.paired import current_code_and_versions


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world")
    rkd.write_data(folder, 0)
    return rkd.load_data(folder), rkd.data_fingerprint(folder)


def _result(folder, name, test, per_question, sha256, response_format="rationale-answer"):
    recipe = rkd.Recipe()
    config = {"data_dir": None, "seed": 0, "train_drugs": recipe.train_drugs, "test_drugs": recipe.test_drugs,
              "drugs_per_target": recipe.drugs_per_target, "edit_fraction": recipe.edit_fraction}
    result = {"training": "rare", "test": test, "method_label": "ssmlora", "seed": 0, "config": config,
              "response_format": response_format, "data_sha256": sha256, "per_question": per_question,
              "run_identity": {"config": current_code_and_versions()}}
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

    # an answer-first run in the same folder is not a rationale-first one: its rows are not checked
    _result(tmp_path, "answer-first", "bm25", rows, sha256, response_format="answer-rationale")
    assert rr.main([str(tmp_path)]) == text


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
    with pytest.raises(SystemExit, match="no current rationale-first results"):
        rr.main([str(empty)])
