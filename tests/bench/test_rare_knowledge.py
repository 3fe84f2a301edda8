"""The knowledge benchmark `benchmarks/rare_knowledge/runner.py`: its generated data, its metrics and its whole pipeline.

The data tests check the properties the benchmark's conclusions rest on: the files are a pure function of the seed,
no test entity occurs in a training question, each question needs its two gold passages (both in the corpus), and the
knowledge edit's new answers are what the edited corpus's own text implies. The pipeline tests run every training
setting and test condition end to end on a tiny random Llama (conftest's `tiny_llama_dir`) through the real command
line, including the run store's resume rules.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest

from benchmarks.harness.store import RunStore
from benchmarks.rare_knowledge import data as rkd
from benchmarks.rare_knowledge import runner as rk

SMALL = ["--train-drugs", "8", "--test-drugs", "2", "--drugs-per-target", "1", "--edit-fraction", "0.5"]


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict]]:
    """The default-size data of seed 0, as the runner generates it."""
    return rkd.generate(0)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_write_data_is_deterministic_per_seed(tmp_path):
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        assert rk.main(["--write-data", str(tmp_path / name), "--seed", seed]) == []
    first, again, other = (_files(tmp_path / n) for n in "abc")
    assert sorted(first) == sorted([*rkd.DATA_FILES, "README.md"])
    assert first == again  # byte-identical
    for name in rkd.DATA_FILES:
        assert first[name] != other[name], name
    readme = first["README.md"].decode()
    assert "seed 7" in readme and "Rationales are the gold facts chained in order" in readme


def _names(row: dict) -> set[str]:
    return {row["drug"], row["disease"], row["target"], row["disease_target"]}


def test_test_entities_never_occur_in_training_questions(data):
    train_words = set(re.findall(r"\w+", " ".join(q["question"] + " " + q["rationale"] for q in data["train.jsonl"])))
    train_names = set().union(*(_names(q) for q in data["train.jsonl"]))
    for q in data["test.jsonl"]:
        for name in _names(q):
            assert name not in train_names and name not in train_words, name
    # ... and the edit only re-wires test-world entities
    for edit in data["edit.jsonl"]:
        assert {edit["drug"], edit["old_target"], edit["new_target"]}.isdisjoint(train_names)


def test_questions_are_balanced_and_need_both_gold_passages_from_the_corpus(data):
    corpus = {p["id"]: p["text"] for p in data["corpus.jsonl"]}
    for split in ("train.jsonl", "test.jsonl"):
        rows = data[split]
        assert sum(q["answer"] == "yes" for q in rows) * 2 == len(rows)
        assert len({q["id"] for q in rows}) == len(rows)
        for q in rows:
            drug_passage, disease_passage = q["gold_passage_ids"]
            assert drug_passage in corpus and disease_passage in corpus and drug_passage != disease_passage
            assert q["drug"] in corpus[drug_passage] and q["target"] in corpus[drug_passage]
            assert q["disease"] in corpus[disease_passage] and q["disease_target"] in corpus[disease_passage]
            assert q["target"] not in q["question"] and q["disease_target"] not in q["question"]
    # no single passage names both a question's drug and its disease: one passage never answers a question
    for q in data["test.jsonl"] + data["train.jsonl"]:
        assert not any(q["drug"] in text and q["disease"] in text for text in corpus.values()), q["id"]


def _facts_from_text(corpus: list[dict], drugs: set[str], targets: set[str], diseases: set[str]):
    """(drug -> target, disease -> driver target) read from the passage *texts* alone (not their metadata)."""
    def mentioned(text, names):
        return [n for n in names if re.search(rf"\b{re.escape(n)}\b", text)]

    inhibits, driver = {}, {}
    for passage in corpus:
        d, t, s = (mentioned(passage["text"], names) for names in (drugs, targets, diseases))
        if d and t:
            assert len(d) == 1 and len(t) == 1 and d[0] not in inhibits, passage
            inhibits[d[0]] = t[0]
        if s and t:
            assert len(s) == 1 and len(t) == 1 and s[0] not in driver, passage
            driver[s[0]] = t[0]
    return inhibits, driver


def test_edit_flips_exactly_the_answers_the_edited_corpus_implies(data):
    test, edits = data["test.jsonl"], data["edit.jsonl"]
    drugs = {q["drug"] for q in test}
    targets = {q["target"] for q in test} | {q["disease_target"] for q in test}
    diseases = {q["disease"] for q in test}
    test_world = [p for p in data["corpus.jsonl"] if p["world"] == "test"]

    def answers(corpus):
        inhibits, driver = _facts_from_text(corpus, drugs, targets, diseases)
        return {q["id"]: "yes" if inhibits[q["drug"]] == driver[q["disease"]] else "no" for q in test}

    assert answers(test_world) == {q["id"]: q["answer"] for q in test}  # the original answers are right
    after = answers(rkd.edited_corpus(test_world, edits))
    flipped = {f["id"]: f for e in edits for f in e["flipped"]}
    changed = {qid for qid, a in after.items() if a != next(q["answer"] for q in test if q["id"] == qid)}
    assert set(flipped) == changed and changed  # every flip listed, nothing else changes
    for qid, flip in flipped.items():
        assert flip["answer"] == after[qid] != flip["old_answer"]
    assert sum(f["answer"] == "yes" for f in flipped.values()) * 2 == len(flipped)
    assert len(edits) == round(rkd.Recipe().edit_fraction * rkd.Recipe().test_drugs)
    corpus_ids = {p["id"] for p in data["corpus.jsonl"]}
    assert all(e["passage_id"] in corpus_ids and e["text"] != e["old_text"] for e in edits)


def test_auc_and_bootstrap_interval():
    margins = np.array([1.0, 0.0, -1.0, 0.0, 2.0])
    labels = np.array([True, True, False, False, False])
    # pairs (yes, no): (1,-1) win, (1,0) win, (1,2) loss, (0,-1) win, (0,0) tie, (0,2) loss
    assert rk.auc(margins, labels) == pytest.approx(3.5 / 6)
    assert rk.auc(margins[:2], labels[:2]) is None
    correct = np.array([1.0] * 30 + [0.0] * 10)
    ci = rk.bootstrap_ci(correct, lambda idx: correct[idx].mean(), 500)
    assert ci == rk.bootstrap_ci(correct, lambda idx: correct[idx].mean(), 500)  # reproducible
    assert 0.5 < ci[0] < 0.75 < ci[1] < 0.95


def _identity(training="rare", test="bm25", argv=(), model="m", data="sha") -> dict:
    args = rk.parse_args(list(argv))
    args.model = model
    return rk.identity_of(training, test, args, data)


def test_run_identity_covers_what_changes_a_result():
    ident = _identity()
    for changed in (["--lr", "2e-3"], ["--k", "3"], ["--rank", "4"], ["--epochs", "2"], ["--grad-accum", "4"],
                    ["--max-length", "256"], ["--method", "lora"], ["--seed", "1"], ["--alpha", "8"],
                    ["--ssmlora-init", "gaussian"], ["--max-passage-tokens", "32"], ["--max-train", "10"]):
        other = _identity(argv=changed)
        assert other["hash"] != ident["hash"] and rk.run_name(other) != rk.run_name(ident), changed
    for other in (_identity(data="other-data"), _identity(model="other-model"), _identity(test="oracle"),
                  _identity(training="rare_raft")):
        assert other["hash"] != ident["hash"] and rk.run_name(other) != rk.run_name(ident)
    raft = _identity(training="rare_raft")
    assert _identity(training="rare_raft", argv=["--p-keep-gold", "0.5"])["hash"] != raft["hash"]
    assert _identity(argv=["--p-keep-gold", "0.5"]) == ident  # RAFT's options do not change a plain RARE row
    # code or package versions: the same file name (rerun in place), another identity (never reused)
    assert ident["config"]["versions"]["peft"] and len(ident["config"]["code"]["sha256"]) == 64
    newer = copy.deepcopy(ident)
    newer["config"]["versions"]["peft"] = "99.0"
    assert rk.run_name(newer) == rk.run_name(ident)
    # a zero-shot row does not depend on training arguments, so it is not rerun when only those change
    assert _identity("zs", argv=["--lr", "2e-3", "--rank", "4"]) == _identity("zs")
    # where results go and what else runs are not part of a result
    assert _identity(argv=["--output-dir", "x", "--threads", "2", "--tests", "oracle"]) == ident


# ---- the pipeline on a tiny random Llama ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("rare_knowledge_data")
    rk.main(["--write-data", str(folder), "--seed", "1", *SMALL])
    return folder


def _argv(data_dir, model_dir, out, *extra) -> list[str]:
    return ["--data-dir", str(data_dir), "--model", str(model_dir), "--output-dir", str(out), "--k", "3",
            "--max-length", "768", "--grad-accum", "4", "--threads", "1", "--bootstrap", "50", *extra]


def test_every_setting_trains_evaluates_and_writes_a_result(small_data, tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "results"
    results = rk.main(_argv(small_data, tiny_llama_dir, out, "--p-keep-gold", "0.5"))
    got = {(r["training"], r["test"]): r for r in results}
    assert list(got) == [(t, e) for t in rk.TRAININGS for e in rk.TESTS]
    n_test, n_flipped = 4, 2  # 2 test drugs x 2 questions; 1 edited drug x 2 flipped questions
    for (training, test), r in got.items():
        assert r["test_examples"] == (n_flipped if test.endswith("_edited") else n_test)
        assert 0.0 <= r["accuracy"] <= 1.0 and r["accuracy_ci95"][0] <= r["accuracy"] <= r["accuracy_ci95"][1]
        assert 0.0 <= r["yes_no_auc"] <= 1.0 and "dropped" not in r["predictions"]
        assert r["test_labels"] == {"yes": r["test_examples"] // 2, "no": r["test_examples"] // 2}
        assert r["trained"] == (training != "zs") and r["method"] == (None if training == "zs" else "ssmlora")
        assert (r.get("accuracy_before_edit") is not None) == test.endswith("_edited")
        passages = r["eval_passages_per_example"]
        if test == "closed_book":
            assert passages == 0 and r["gold_all_shown"] is None
        elif test.startswith("oracle"):
            assert passages == 2 and r["gold_all_shown"] == 1.0
        else:
            assert passages == 3 and 0.0 <= r["gold_all_shown"] <= r["gold_any_shown"] <= 1.0
    for training in ("sft_closed", "rare", "rare_raft"):
        r = got[training, "bm25"]
        assert r["train_examples"] == 16 and r["train_steps"] == 4 and r["trainable_parameters"] > 0
        assert np.isfinite(r["train_loss_mean"])
    assert got["sft_closed", "bm25"]["train_passages_per_example"] == 0
    assert got["rare", "bm25"]["train_passages_per_example"] == 3
    # RAFT: the gold pair kept or replaced by distractors, k passages either way (the prompt length gives nothing away)
    assert got["rare_raft", "bm25"]["train_passages_per_example"] == 3
    assert got["rare_raft", "bm25"]["train_gold_all_shown"] < 1.0
    # the edited rows read the edited passages: the oracle shows each flipped question's new "inhibits" fact
    flipped = [o["id"] for o in got["zs", "oracle_edited"]["per_question"]]
    edits = rkd.read_jsonl(small_data / "edit.jsonl")
    assert sorted(flipped) == sorted(f["id"] for e in edits for f in e["flipped"])
    assert len(list(out.glob("*.json"))) == len(got)
    table = (out / "table.md").read_text()
    assert all(f"| {t} | {e} |" in table for t, e in got)
    # the same command finds every result; another learning rate reruns the trained rows only
    assert rk.main(_argv(small_data, tiny_llama_dir, out, "--p-keep-gold", "0.5")) == []
    rerun = rk.main(_argv(small_data, tiny_llama_dir, out, "--p-keep-gold", "0.5", "--lr", "5e-4", "--tests", "bm25",
                          "--trainings", "zs,sft_closed"))
    assert [r["training"] for r in rerun] == ["sft_closed"]
    assert len(list(out.glob("*.json"))) == len(got) + 1  # a new file, the old result kept
    # a truncated result is reported by name and rerun (the table leaves it out instead of failing)
    zs_argv = _argv(small_data, tiny_llama_dir, out, "--trainings", "zs", "--tests", "closed_book")
    stored = [p for p in out.glob("zs@closed_book__*.json")]
    assert len(stored) == 1
    stored[0].write_text(stored[0].read_text()[:50])
    capsys.readouterr()
    assert [(r["training"], r["test"]) for r in rk.main(zs_argv)] == [("zs", "closed_book")]
    assert f"corrupt result file {stored[0]}" in capsys.readouterr().err
    assert RunStore(out).get(stored[0].stem)["accuracy"] == got["zs", "closed_book"]["accuracy"]
    # a stored result of other data or code (same settings, so the same file name) is rerun, not reused
    other = RunStore(out).get(stored[0].stem)
    other["run_identity"]["hash"] = "made-with-other-data"
    RunStore(out).save(stored[0].stem, other, other["run_identity"])
    assert len(rk.main(zs_argv)) == 1 and rk.main(zs_argv) == []


def test_rationale_first_format_with_lora(small_data, tiny_llama_dir, tmp_path):
    results = rk.main(_argv(small_data, tiny_llama_dir, tmp_path, "--method", "lora", "--trainings", "zs,rare",
                            "--tests", "bm25,bm25_edited", "--response-format", "rationale-answer",
                            "--rationale-tokens", "6", "--eval-batch-size", "3"))
    assert [(r["training"], r["test"]) for r in results] == [("zs", "bm25"), ("zs", "bm25_edited"),
                                                             ("rare", "bm25"), ("rare", "bm25_edited")]
    for r in results:
        assert r["response_format"] == "rationale-answer" and 0.0 <= r["answer_tag_rate"] <= 1.0
        assert all("rationale" in o and o["pred"] in rk.ANSWERS for o in r["per_question"])
    assert results[0]["test_examples"] == 4 and results[2]["method"] == "lora"
    # the training prompts asked for the rationale first and the response ended with the answer tag
    assert "Reason step by step" in rk.template_for("rationale-answer").instruction
    assert rk.response_text("yes", "R.", "rationale-answer") == "R.\n<answer>yes</answer>"


def test_table_only_writes_the_table(tmp_path, capsys):
    result = {"training": "rare", "test": "bm25", "method_label": "ssmlora",
              "response_format": "answer-rationale", "config_label": "k4", "test_examples": 10,
              "accuracy_ci95": [0.4, 0.9], "yes_no_auc": 0.7, "yes_no_auc_ci95": [0.5, 0.9],
              "gold_all_shown": 0.5, "gold_any_shown": 1.0, "predictions": {"yes": 5, "no": 5}, "eval_seconds": 1}
    for s, acc in ((0, 0.6), (1, 0.8)):
        RunStore(tmp_path).save(f"r{s}", {**result, "seed": s, "accuracy": acc}, {"hash": str(s), "config": {}})
    (tmp_path / "broken.json").write_text("{")  # reported by name and skipped, not fatal
    assert rk.main(["--table-only", "--output-dir", str(tmp_path)]) == []
    assert f"corrupt result file {tmp_path / 'broken.json'}" in capsys.readouterr().err
    table = (tmp_path / "table.md").read_text()
    assert "| rare | bm25 | ssmlora | answer-rationale | k4 | 2 | 70.0 ± 14.1 | 0.70 ± 0.00 | – |" in table


@pytest.mark.parametrize("argv, message", [
    (["--write-data", "unused", "--test-drugs", "3"], "bad data recipe: each world needs at least two targets"),
    (["--write-data", "unused", "--edit-fraction", "1.5"], "bad data recipe: edit_fraction"),
])
def test_bad_recipe_is_a_clear_error(argv, message, tmp_path):
    argv[1] = str(tmp_path / "data")
    with pytest.raises(SystemExit, match=message):
        rk.main(argv)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("argv", [["--k", "1"], ["--trainings", "rare,bogus"], ["--tests", "edited"],
                                  ["--max-test", "0"], ["--max-train", "0"], ["--lr", "0"], ["--p-keep-gold", "1.5"]])
def test_bad_arguments_are_rejected(argv):
    with pytest.raises(SystemExit):
        rk.parse_args(argv)


def test_missing_data_files_name_the_fix(tmp_path):
    with pytest.raises(SystemExit, match="lacks corpus.jsonl.*--write-data"):
        rkd.load_data(tmp_path)
