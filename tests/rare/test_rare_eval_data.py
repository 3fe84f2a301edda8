"""PubMedQA loader and evaluation helpers."""

from __future__ import annotations

import json

import pytest

from rare_data import accuracy, extract_answer, hit_rate_at_k, load_pubmedqa, macro_f1, recall_at_k, validity_rate


def test_load_pubmedqa_local_official_split(shared_data):
    folder = shared_data / "pubmedqa"
    data = load_pubmedqa(folder)
    truth = json.loads((folder / "test_ground_truth.json").read_text())
    assert len(data.train) == 500 and len(data.test) == 500
    assert set(data.test["id"]) == set(truth)
    assert dict(zip(data.test["id"], data.test["answer"])) == truth
    assert len(data.passages) == len(data.passage_ids) == len(set(data.passage_ids)) == 3358
    raw = json.loads((folder / "ori_pqal.json").read_text())
    ex = data.train[0]
    record = raw[ex["id"]]
    assert ex["question"] == record["QUESTION"]
    assert ex["response"] == f"{record['LONG_ANSWER'].strip()}\n<answer>{record['final_decision']}</answer>"
    assert ex["gold_passage_ids"] == [f"{ex['id']}_{i}" for i in range(len(record["CONTEXTS"]))]
    lookup = dict(zip(data.passage_ids, data.passages))
    assert [lookup[g] for g in ex["gold_passage_ids"]] == record["CONTEXTS"]
    assert extract_answer(ex["response"], ["yes", "no", "maybe"]) == ex["answer"]


def test_load_pubmedqa_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pubmedqa(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="ori_pqal.json"):
        load_pubmedqa(tmp_path)
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="data_dir="):
        load_pubmedqa()


@pytest.mark.parametrize("text, choices, expected", [
    ("<think>because</think>\n<answer>yes</answer>", ["yes", "no", "maybe"], "yes"),
    ("<answer> No </answer>", ["yes", "no", "maybe"], "no"),
    ("<answer>yes</answer> wait, <answer>maybe</answer>", ["yes", "no", "maybe"], "maybe"),  # the last tag wins
    ("reasoning... <answer>B. insulin</answer>", list("abcde"), "b"),
    ("Therefore the answer is (C).", list("abcde"), "c"),
    ("Answer: no", ["yes", "no", "maybe"], "no"),
    ("reasoning <answer>maybe", ["yes", "no", "maybe"], "maybe"),  # unclosed tag at the end
    ("yes", ["yes", "no", "maybe"], "yes"),  # a bare choice
    ("<answer>perhaps</answer>", ["yes", "no", "maybe"], None),  # outside the choices: invalid
    ("I do not know.", ["yes", "no", "maybe"], None),
    ("<answer>42 mg</answer>", None, "42 mg"),
])
def test_extract_answer(text, choices, expected):
    assert extract_answer(text, choices) == expected


def test_validity_accuracy_and_recall():
    answers = ["yes", None, "no", "maybe"]
    assert validity_rate(answers) == 0.75
    assert accuracy(answers, ["yes", "yes", "yes", "Maybe"]) == 0.5
    with pytest.raises(ValueError, match="references"):
        accuracy(answers, ["yes"])
    retrieved = [["a", "b", "c"], ["x", "y", "z"], ["q"]]
    gold = [["b", "d"], ["z"], []]  # the last query has no gold passages and is skipped
    assert recall_at_k(retrieved, gold, k=2) == pytest.approx((0.5 + 0.0) / 2)
    assert recall_at_k(retrieved, gold, k=3) == pytest.approx((0.5 + 1.0) / 2)
    assert hit_rate_at_k(retrieved, gold, k=2) == 0.5
    assert hit_rate_at_k(retrieved, gold, k=1) == 0.0


def _hub_rows(n: int) -> list[dict]:
    return [{"pubid": 1000 + i, "question": f"Does treatment {i} work?", "context": {"contexts": [f"Trial {i}."]},
             "long_answer": f"Treatment {i} works.", "final_decision": "yes"} for i in range(n)]


@pytest.fixture
def fake_hub(monkeypatch):
    """``datasets.load_dataset`` answering with PQA-L-shaped rows (no network)."""
    datasets = pytest.importorskip("datasets")
    rows = {"n": 1000}
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list(_hub_rows(rows["n"])))
    return rows


def test_load_pubmedqa_from_the_hub_without_test_ids_gives_an_empty_test_split(fake_hub):
    fake_hub["n"] = 6
    data = load_pubmedqa()
    assert len(data.train) == 6 and len(data.test) == 0
    assert data.test.column_names == data.train.column_names


def test_partial_test_ids_file_is_refused_with_counts(fake_hub, tmp_path):
    ids = [str(1000 + i) for i in range(500)]
    full = tmp_path / "full.json"
    full.write_text(json.dumps({i: "yes" for i in ids}))
    data = load_pubmedqa(test_ids_file=full)
    assert len(data.test) == 500 and len(data.train) == 500
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(ids[:450]))
    with pytest.raises(ValueError, match="lists 450 of the 500 official.*50 test questions would move"):
        load_pubmedqa(test_ids_file=partial)
    data = load_pubmedqa(test_ids_file=partial, allow_partial_test=True)
    assert len(data.test) == 450 and len(data.train) == 550


def test_json_errors_name_the_file(tmp_path, fake_hub):
    (tmp_path / "ori_pqal.json").write_text("{broken")
    (tmp_path / "test_ground_truth.json").write_text("{}")
    with pytest.raises(ValueError, match="ori_pqal.json is not valid JSON"):
        load_pubmedqa(tmp_path)
    bad_ids = tmp_path / "ids.json"
    bad_ids.write_text("[1, 2")
    with pytest.raises(ValueError, match="ids.json is not valid JSON"):
        load_pubmedqa(test_ids_file=bad_ids)


def test_macro_f1_beside_accuracy():
    from sklearn.metrics import f1_score

    gold = ["yes", "yes", "no", "maybe", "no", "yes"]
    pred = ["yes", "no", "no", None, "no", "yes"]
    # the invalid answer counts as wrong for its class and is no class of its own
    expected = f1_score(gold, ["yes", "no", "no", "invalid", "no", "yes"], labels=["maybe", "no", "yes"],
                        average="macro", zero_division=0)
    assert macro_f1(pred, gold) == pytest.approx(expected)
    # always answering "yes" scores the majority share as accuracy but a low macro-F1
    assert accuracy(["yes"] * 6, gold) == 0.5 and macro_f1(["yes"] * 6, gold, labels=["yes", "no", "maybe"]) < 0.23
    assert macro_f1(gold, [g.upper() for g in gold]) == 1.0


def _write_pqal(folder, records: dict) -> None:
    (folder / "ori_pqal.json").write_text(json.dumps(records))
    (folder / "test_ground_truth.json").write_text(json.dumps({}))


def _good_record() -> dict:
    return {"QUESTION": "Does aspirin help?", "CONTEXTS": ["A trial.", "Another trial."],
            "LONG_ANSWER": "It helps.", "final_decision": "yes"}


@pytest.mark.parametrize("field, value, message", [
    ("CONTEXTS", "A trial. Another trial.", "CONTEXTS must be a non-empty list of passage strings, got the string"),
    ("CONTEXTS", ["A trial.", 7], r"CONTEXTS must be a non-empty list of passage strings, got \['A trial.', 7\]"),
    ("final_decision", "banana", r"final_decision must be one of \['yes', 'no', 'maybe'\], got the string 'banana'"),
    ("QUESTION", None, "QUESTION must be a non-empty string, got None"),
    ("LONG_ANSWER", 3, "LONG_ANSWER must be a string, got 3"),
])
def test_a_malformed_local_record_names_its_id_and_field(tmp_path, field, value, message):
    _write_pqal(tmp_path, {"111": _good_record(), "12345": {**_good_record(), field: value}})
    with pytest.raises(ValueError, match=f"PubMedQA record 12345 in .*ori_pqal.json: {message}"):
        load_pubmedqa(tmp_path)


def test_a_local_record_without_a_field_names_it(tmp_path):
    record = _good_record()
    del record["final_decision"]
    _write_pqal(tmp_path, {"12345": record})
    with pytest.raises(ValueError, match=r"PubMedQA record 12345 .* has no field\(s\) \['final_decision'\]"):
        load_pubmedqa(tmp_path)


def test_a_malformed_hub_record_names_its_id_and_field(monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = _hub_rows(3)
    rows[1]["final_decision"] = "banana"
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list(rows))
    with pytest.raises(ValueError, match="PubMedQA record 1001 in qiaojin/PubMedQA.*final_decision must be one of"):
        load_pubmedqa()
