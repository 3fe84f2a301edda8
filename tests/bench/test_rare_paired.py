"""`benchmarks/rare_knowledge/paired.py`: accuracy differences between knowledge-benchmark runs on the same questions."""

from __future__ import annotations

import json

import pytest

from benchmarks.rare_knowledge import paired as rp

CURRENT = rp.current_code_and_versions()


def _result(right, training="rare", test="bm25", method="ssmlora", seed=0, response_format="answer-rationale",
            first_id=0):
    """A run of this checkout's code that answered questions q<first_id>, q<first_id + 1>, ... right where
    ``right`` is 1."""
    return {"training": training, "test": test, "method_label": method, "seed": seed,
            "response_format": response_format, "accuracy": sum(right) / len(right),
            "per_question": [{"id": f"q{first_id + i}", "gold": "yes", "pred": "yes" if ok else "no"}
                             for i, ok in enumerate(right)],
            "run_identity": {"config": CURRENT}}


def _write(folder, results):
    for i, result in enumerate(results):
        (folder / f"run{i}.json").write_text(json.dumps(result))


def test_paired_differences_pool_the_seeds():
    results = [_result([1, 1, 0, 0], seed=0), _result([1, 1, 1, 1], seed=0, method="lora"),
               _result([1, 1, 1, 1], seed=1), _result([1, 1, 1, 1], seed=1, method="lora")]
    group = ("training", "test", "seed")
    rows = rp.paired_differences(results, "method_label", "ssmlora", "lora", group, 200)
    assert [r[:4] for r in rows] == [["rare", "bm25", "0", "4"], ["rare", "bm25", "1", "4"],
                                     ["rare", "bm25", "all", "8"]]
    assert rows[0][4].startswith("-50.0 [") and rows[1][4].startswith("+0.0 [") and rows[2][4].startswith("-25.0 [")
    # one seed only: nothing to pool
    assert len(rp.paired_differences(results[:2], "method_label", "ssmlora", "lora", group, 200)) == 1


def test_only_the_questions_both_runs_answered_are_paired():
    # the second run answered q2..q5; q2 and q3 are shared: right in the first, wrong in the second
    results = [_result([1, 1, 1, 1]), _result([0, 0, 1, 1], method="lora", first_id=2)]
    rows = rp.paired_differences(results, "method_label", "ssmlora", "lora", ("seed",), 200)
    assert rows[0][:2] == ["0", "2"] and rows[0][2].startswith("+100.0 [")


def test_every_comparison_holds_the_other_fields_equal(tmp_path):
    _write(tmp_path, [
        _result([1, 1, 1, 0]),                                  # RARE, BM25 at test
        _result([1, 0, 0, 0], training="sft_closed"),           # closed-book SFT, BM25 at test
        _result([1, 1, 0, 0], training="rare_raft"),            # RAFT, BM25 at test
        _result([0, 1, 0, 0], test="closed_book"),              # the RARE model without passages
        _result([1, 1, 1, 1], test="oracle"),                   # ... and with the gold passages
        _result([0, 0, 0, 0], response_format="rationale-answer"),  # another format: pairs with nothing
    ])
    text = rp.main([str(tmp_path)])
    assert (tmp_path / "paired.md").read_text() == text

    def differences(title):
        lines = text.split(title + ", on the same questions:")[1].split("\n\n")[1].splitlines()[2:]
        return [line.split("|")[-2].split(" [")[0].strip() for line in lines]

    assert "SSMLoRA minus peft LoRA" not in text  # one adapter only
    assert differences("RARE minus closed-book SFT") == ["+50.0"]
    assert differences("RARE with RAFT distractors minus plain RARE") == ["-25.0"]
    assert differences("BM25 passages minus closed-book at test") == ["+50.0"]
    assert differences("oracle passages minus BM25 at test") == ["+25.0"]
    assert "| answer-rationale | bm25 | ssmlora | 0 | 4 | +50.0 [" in text


def test_the_accuracy_matrix_has_a_row_per_setting_and_a_column_per_test():
    results = [_result([1, 1, 0, 0], seed=0), _result([1, 1, 1, 1], seed=1),   # RARE, BM25: 50 and 100
               _result([1, 0, 0, 0], test="closed_book"),                      # RARE, closed-book: 25
               _result([0, 0, 0, 0], training="zs", method="–"),              # zero-shot, BM25: 0
               _result([1, 1, 1, 1], training="sft_closed", test="oracle", response_format="rationale-answer")]
    text = rp.accuracy_matrix(results)
    first, second = text.split("Accuracy (%), ")[1:]
    assert first.startswith("answer-rationale") and second.startswith("rationale-answer")
    assert "| training | adapter | closed_book | bm25 |\n" in first  # tests in the benchmark's order
    # rows in the benchmark's order (zero-shot first); two seeds give mean ± sample std, one seed "(1)"
    assert "| zs | – | – | 0.0 (1) |\n| rare | ssmlora | 25.0 (1) | 75.0 ± 35.4 (2) |" in first
    assert "| sft_closed | ssmlora | 100.0 (1) |" in second and "bm25" not in second


def test_a_folder_without_pairs_is_refused(tmp_path):
    _write(tmp_path, [_result([1, 0]), _result([1, 1], response_format="rationale-answer")])
    with pytest.raises(SystemExit, match="no two current runs that differ in one compared field"):
        rp.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="is not a folder"):
        rp.main([str(tmp_path / "missing")])


def test_runs_of_other_code_or_package_versions_are_named_and_left_out(tmp_path):
    stale_code = _result([0, 0, 0, 0], training="sft_closed")
    modules = {**CURRENT["code"]["modules"], "benchmarks.rare_knowledge.runner": "0" * 64}
    stale_code["run_identity"] = {"config": {**CURRENT, "code": {**CURRENT["code"], "modules": modules}}}
    stale_versions = _result([0, 0, 0, 0], training="rare_raft")
    stale_versions["run_identity"] = {"config": {**CURRENT, "versions": {**CURRENT["versions"], "torch": "0.1"}}}
    no_identity = _result([0, 0, 0, 0], test="closed_book")
    del no_identity["run_identity"]
    _write(tmp_path, [_result([1, 1, 1, 0]), _result([1, 0, 0, 0], method="lora"),
                      stale_code, stale_versions, no_identity])
    text = rp.main([str(tmp_path)])
    assert text.startswith("**Left out: 3 run(s) made with other code or package versions")
    assert "- `run2.json`: made with other code (benchmarks.rare_knowledge.runner)\n" in text
    assert "- `run3.json`: made with other package versions\n" in text
    assert "- `run4.json`: made with other code (no code identity by import) and package versions\n" in text
    # only the two current runs are compared: no SFT, RAFT or closed-book column or comparison
    assert "SSMLoRA minus peft LoRA" in text and "RARE minus closed-book SFT" not in text
    assert "sft_closed" not in text.split("Left out")[1].split("\n\n", 2)[2] and "closed_book |" not in text


def test_test_conditions_scored_after_two_trainings_of_one_model_are_marked(tmp_path):
    # the closed-book run of this RARE model came from a retraining whose floats differ (e.g. another machine)
    losses = {"trained": True, "train_loss_first": 1.6138934, "train_loss_last": 0.0159, "train_loss_mean": 0.2355}
    retrained = {**losses, "train_loss_first": 1.6139004}
    bm25 = {**_result([1, 1, 1, 0]), **losses}
    same_training = {**_result([0, 1, 0, 0], test="closed_book"), **losses}
    other_training = {**_result([0, 1, 0, 0], test="closed_book"), **retrained}
    group = ("training", "method_label", "seed")
    rows = rp.paired_differences([bm25, same_training], "test", "bm25", "closed_book", group, 200)
    assert not rows[0][-1].endswith("‡")
    rows = rp.paired_differences([bm25, other_training], "test", "bm25", "closed_book", group, 200)
    assert rows[0][-1].startswith("+50.0 [") and rows[0][-1].endswith("‡")
    # two adapters are always two trainings: nothing to mark there
    lora = {**_result([1, 1, 1, 1], method="lora"), **retrained}
    rows = rp.paired_differences([bm25, lora], "method_label", "ssmlora", "lora", ("training", "test", "seed"), 200)
    assert not rows[0][-1].endswith("‡")
    # the pooled row carries the mark of any seed in it, and the report explains the mark
    seed1 = [{**_result([1, 1], seed=1), **losses}, {**_result([0, 0], test="closed_book", seed=1), **losses}]
    _write(tmp_path, [bm25, other_training, *seed1])
    text = rp.main([str(tmp_path)])
    assert "| answer-rationale | rare | ssmlora | 1 | 2 | +100.0 [+100.0, +100.0] |" in text
    # seed "all": the mean of the per-seed differences (+50, +100), a t-interval over the 2 seeds
    assert "| answer-rationale | rare | ssmlora | all | 6 | +75.0 [-242.7, +392.7] (t over 2 seeds;" in text
    pooled = next(line for line in text.splitlines() if "| ssmlora | all | 6 |" in line)
    assert pooled.endswith("‡ |") and "‡ the two runs come from two trainings" in text
