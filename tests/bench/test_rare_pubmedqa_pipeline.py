"""The RARE-on-PubMedQA runner `benchmarks/rare_pubmedqa/runner.py`, end to end on a tiny randomly initialised Llama.

A handful of PubMedQA-like questions are written in the format of `ori_pqal.json` / `test_ground_truth.json` into
a temporary folder, and a 2-layer Llama with a tiny BPE tokenizer (Llama-3 chat template; conftest's
`tiny_llama_dir`) is loaded from its own folder, so the runner goes through its real command line: loading, BM25
over the passages, Trainer + RAREDataCollator for every trained setting, scored and generated evaluation, one JSON
per run and the table. The other tests check the prompts and loss masks each setting builds, the RAFT passages and
the answer scorer against a brute-force log-likelihood.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from rare_fixtures import make_tokenizer

import benchmarks.rare_pubmedqa.runner as rp
from rare_data import BM25Retriever, load_pubmedqa

# Eight questions, each with a small abstract of 2-3 passages on its own topic (so BM25 finds them).
TOPICS = {
    "101": ("aspirin", "Does aspirin reduce heart attack risk in adults?", "yes"),
    "102": ("insulin", "Does insulin therapy control glucose in children?", "yes"),
    "103": ("vaccine", "Does measles vaccine therapy reduce the risk of outbreaks?", "yes"),
    "104": ("statin", "Do statins increase cancer risk?", "no"),
    "105": ("coffee", "Is coffee associated with higher mortality?", "no"),
    "106": ("sleep", "Is short sleep linked to obesity in adolescents?", "maybe"),
    "107": ("exercise", "Does exercise lower blood pressure in older adults?", "yes"),
    "108": ("smoking", "Does smoking cessation reduce lung cancer mortality?", "no"),
}
TEST_IDS = ["105", "106", "107", "108"]


def _record(topic: str, question: str, decision: str) -> dict:
    contexts = [f"The {topic} cohort study enrolled patients and measured the outcome of {topic} therapy.",
                f"Results: {topic} was associated with a significant change in risk (p<0.05) in the {topic} group.",
                f"The {topic} trial was randomized and placebo controlled."][: 2 + len(topic) % 2]
    return {"QUESTION": question, "CONTEXTS": contexts, "LABELS": ["BACKGROUND"] * len(contexts),
            "MESHES": ["Humans"], "YEAR": "2001", "reasoning_required_pred": decision,
            "reasoning_free_pred": decision, "final_decision": decision,
            "LONG_ANSWER": f"These results suggest that {topic} matters for the outcome."}


@pytest.fixture(scope="module")
def pubmedqa_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pubmedqa")
    raw = {pmid: _record(*spec) for pmid, spec in TOPICS.items()}
    (folder / "ori_pqal.json").write_text(json.dumps(raw))
    (folder / "test_ground_truth.json").write_text(json.dumps({pmid: TOPICS[pmid][2] for pmid in TEST_IDS}))
    return folder


def _argv(data_dir, model_dir, out, *extra) -> list[str]:
    return ["--data-dir", str(data_dir), "--model", str(model_dir), "--output-dir", str(out), "--k", "2",
            "--max-length", "256", "--max-passage-tokens", "64", "--grad-accum", "2", "--threads", "1", *extra]


def test_every_setting_trains_evaluates_and_writes_a_result(pubmedqa_dir, tiny_llama_dir, tmp_path):
    out = tmp_path / "results"
    results = rp.main(_argv(pubmedqa_dir, tiny_llama_dir, out, "--method", "ssmlora"))
    by_setting = {r["setting"]: r for r in results}
    assert list(by_setting) == list(rp.SETTINGS)  # every setting, in the paper's order
    for name, r in by_setting.items():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["test_examples"] == len(TEST_IDS), name
        assert sum(r["predictions"].values()) == len(TEST_IDS) and "invalid" not in r["predictions"]
        assert 0.0 < r["answer_mass"] <= 1.0 and r["validity"] is None  # scored mode: no free-text answers
        assert r["response_format"] == "answer-rationale" and r["eval"] == "scored" and r["method"] == "ssmlora"
        assert r["trained"] == (rp.SETTINGS[name].train is not None)
        assert r["test_label_counts"] == {"no": 2, "maybe": 1, "yes": 1}
        assert [q["id"] for q in r["per_question"]] and all(set(q["scores"]) == set(rp.ANSWERS)
                                                            for q in r["per_question"])
        assert 0.0 <= r["yes_no_auc"] <= 1.0 and r["answer_nll"] > 0
    for name in ("sft_closed", "rare", "rare_raft"):
        r = by_setting[name]
        assert r["train_examples"] == 4 and r["train_steps"] == 2 and r["trainable_parameters"] > 0
        assert r["train_loss_first"] is not None and torch.isfinite(torch.tensor(r["train_loss_mean"]))
    # rare_oracle evaluates the model rare trained (one training run, shared)
    assert by_setting["rare_oracle"]["train_seconds"] == by_setting["rare"]["train_seconds"]
    # passages: none closed-book, k=2 retrieved, the whole (2-3 passage) abstract for the oracle
    assert by_setting["zs_closed"]["eval_passages_per_example"] == 0
    assert by_setting["sft_closed"]["train_tokens_per_example"] < by_setting["rare"]["train_tokens_per_example"]
    assert by_setting["zs_rag"]["eval_passages_per_example"] == 2
    assert by_setting["rare_oracle"]["eval_gold_hit_rate"] == 1.0
    assert by_setting["zs_rag"]["eval_gold_hit_rate"] == 1.0  # each toy question names its own topic
    files = sorted(out.glob("*.json"))
    assert len(files) == len(rp.SETTINGS)
    table = (out / "table.md").read_text().splitlines()
    assert len(table) == 2 + len(rp.SETTINGS) and all(f"| {name} |" in "\n".join(table) for name in rp.SETTINGS)
    # a second invocation finds every JSON and runs nothing (an interrupted grid resumes)
    assert rp.main(_argv(pubmedqa_dir, tiny_llama_dir, out, "--method", "ssmlora")) == []


def test_a_run_is_skipped_only_when_its_whole_config_and_data_are_unchanged(pubmedqa_dir, tiny_llama_dir, tmp_path,
                                                                          capsys):
    """Resume must not answer a changed option or changed data with an old result (it once reported a `--k 3`
    result as done for `--k 1`: the file name left k out)."""
    out, data = tmp_path / "results", tmp_path / "data"
    data.mkdir()
    for f in pubmedqa_dir.iterdir():
        (data / f.name).write_bytes(f.read_bytes())

    def run(*extra):
        return rp.main(_argv(data, tiny_llama_dir, out, "--settings", "zs_rag", *extra))

    assert len(run()) == 1
    assert run() == []  # identical: skipped
    assert len(run("--k", "3")) == 1  # k is not in the file name, but it is in the run's identity
    assert "other settings: arguments.k: 2 -> 3" in capsys.readouterr().err
    raw = json.loads((data / "ori_pqal.json").read_text())
    raw["101"]["CONTEXTS"][0] = "A changed passage about aspirin."
    (data / "ori_pqal.json").write_text(json.dumps(raw))
    assert len(run("--k", "3")) == 1  # same arguments, other data
    assert "data (files or their contents)" in capsys.readouterr().err


def test_a_corrupt_result_file_is_reported_by_name_and_rerun(pubmedqa_dir, tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "results"
    argv = _argv(pubmedqa_dir, tiny_llama_dir, out, "--settings", "zs_closed,zs_rag")
    assert len(rp.main(argv)) == 2
    broken = next(out.glob("zs_rag__*.json"))
    broken.write_text(broken.read_text()[:100])  # an interrupted write of the old, non-atomic runner
    capsys.readouterr()
    rp.main(["--table-only", "--output-dir", str(out)])  # the table still builds, from the readable run
    assert f"corrupt result file {broken}" in capsys.readouterr().err
    table = (out / "table.md").read_text()
    assert "| zs_closed |" in table and "| zs_rag |" not in table
    rerun = rp.main(argv)
    assert [r["setting"] for r in rerun] == ["zs_rag"]
    assert "| zs_rag |" in (out / "table.md").read_text()
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files behind


def test_zero_sized_subsets_are_refused_before_any_work(capsys):
    for flag in ("--max-train", "--max-test", "--k", "--batch-size"):
        with pytest.raises(SystemExit):
            rp.parse_args([flag, "0"])
        assert f"argument {flag}: expected an integer >= 1, got '0'" in capsys.readouterr().err


def test_generated_evaluation_with_rationale_first_and_lora(pubmedqa_dir, tiny_llama_dir, tmp_path):
    results = rp.main(_argv(pubmedqa_dir, tiny_llama_dir, tmp_path, "--method", "lora", "--settings", "zs_rag,rare",
                            "--eval", "generate", "--response-format", "rationale-answer", "--max-new-tokens", "6"))
    assert [r["setting"] for r in results] == ["zs_rag", "rare"]
    for r in results:
        assert 0.0 <= r["validity"] <= 1.0 and r["answer_mass"] is None
        # accuracy counts an invalid generation as wrong, so it never exceeds the validity rate
        assert r["accuracy"] <= r["validity"]
        assert sum(r["predictions"].values()) == len(TEST_IDS)


def test_yes_no_auc():
    def q(gold, yes, no):
        return {"gold": gold, "scores": {"yes": yes, "no": no, "maybe": -9.0}}

    # margins yes - no: gold-yes 1.0 and 0.0, gold-no -1.0 and 0.0 (a tie counts half); maybe questions ignored
    outputs = [q("yes", 0.0, -1.0), q("yes", -1.0, -1.0), q("no", -2.0, -1.0), q("no", -1.0, -1.0), q("maybe", 5, 0)]
    assert rp.yes_no_auc(outputs) == pytest.approx((1 + 1 + 1 + 0.5) / 4)
    assert rp.yes_no_auc([q("yes", 0.0, 0.0)]) is None  # needs both classes


def test_answer_nll_is_the_three_way_cross_entropy():
    uniform = {"gold": "no", "scores": {"yes": -2.0, "no": -2.0, "maybe": -2.0}}
    sure = {"gold": "yes", "scores": {"yes": 0.0, "no": -50.0, "maybe": -50.0}}
    assert rp.answer_nll([uniform]) == pytest.approx(math.log(3))
    assert rp.answer_nll([uniform, sure]) == pytest.approx(math.log(3) / 2, abs=1e-6)


def test_scored_mode_requires_answer_first_format():
    with pytest.raises(SystemExit):
        rp.parse_args(["--eval", "scored", "--response-format", "rationale-answer"])


# ---- prompts and masks ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pieces(pubmedqa_dir):
    data = load_pubmedqa(pubmedqa_dir)
    retriever = BM25Retriever.from_texts(data.passages, ids=data.passage_ids)
    return data, retriever, make_tokenizer()


@pytest.mark.parametrize("response_format", rp.FORMATS)
@pytest.mark.parametrize("setting", ["closed_book", "retrieval", "oracle"])
def test_prompts_and_loss_masks(pieces, setting, response_format):
    data, retriever, tokenizer = pieces
    args = rp.parse_args(["--k", "2", "--max-length", "256", "--response-format", response_format,
                          "--eval", "generate"])
    collator = rp.make_collator(tokenizer, retriever, args, setting)
    example = dict(data.train[0])
    example["response"] = rp.response_text(example["long_answer"], example["answer"], response_format)
    tag = f"<answer>{example['answer']}</answer>"
    assert {"answer-rationale": example["response"].startswith(tag), "rationale-answer":
            example["response"].endswith(tag), "answer-only": example["response"] == tag}[response_format]
    encoded = collator.encode(example)
    prompt = tokenizer.decode(encoded.input_ids[:encoded.prompt_length])
    completion_ids = encoded.input_ids[encoded.prompt_length:]
    # loss on the response and the end-of-turn token only
    assert encoded.labels == [-100] * encoded.prompt_length + completion_ids
    assert completion_ids == tokenizer(example["response"], add_special_tokens=False)["input_ids"] + [
        tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    # the prompt: chat template, instruction matching the response order, question last
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")
    assert prompt.rstrip().endswith("<|start_header_id|>assistant<|end_header_id|>")
    assert f"# Question\n{example['question']}" in prompt
    assert ("First give the final answer" in prompt) == (response_format == "answer-rationale")
    assert ("then give the final answer" in prompt) == (response_format == "rationale-answer")
    gold = list(example["gold_passage_ids"])
    if setting == "closed_book":
        assert encoded.passage_ids == [] and "# Retrieved Documents" not in prompt
    elif setting == "retrieval":
        top = [p.id for p in retriever.search([example["question"]], 2)[0]]
        assert encoded.passage_ids == top and "# Retrieved Documents" in prompt
    else:
        assert encoded.passage_ids == gold  # the whole abstract, in order
    for pid in encoded.passage_ids:
        assert retriever.get_passages([pid])[0].text in prompt
    # the generation-time prompt is the training prompt
    assert collator.encode_prompt(example, max_new_tokens=8).input_ids == encoded.input_ids[:encoded.prompt_length]


def test_raft_passages_are_gold_plus_distractors_from_other_abstracts(pieces):
    data, retriever, tokenizer = pieces
    args = rp.parse_args(["--k", "3", "--num-distractors", "1", "--distractor-pool", "3", "--p-keep-gold", "0.5"])
    collator = rp.make_collator(tokenizer, retriever, args, "retrieval", raft=True)
    kept = dropped = 0
    for example in data.train:
        raft = rp.with_raft_passages(dict(example), retriever, n_gold=2, pool=3)
        own = set(example["gold_passage_ids"])
        assert raft["gold_passage_ids"] and set(raft["gold_passage_ids"]) <= own
        assert len(raft["gold_passage_ids"]) <= 2
        distractors = [p["id"] for p in raft["passages"] if p["id"] not in raft["gold_passage_ids"]]
        assert distractors and not set(distractors) & own  # distractors come from other abstracts only
        for epoch in range(4):
            collator.set_epoch(epoch)
            shown = collator.encode({**raft, "response": example["response"]}).passage_ids
            n_gold = len(set(shown) & own)
            assert n_gold in (0, len(raft["gold_passage_ids"]))
            # as many passages whether the gold ones were kept or replaced by distractors (RAFT)
            assert len(shown) == len(raft["gold_passage_ids"]) + 1
            kept, dropped = kept + (n_gold > 0), dropped + (n_gold == 0)
    assert kept and dropped  # p_keep_gold=0.5 over 16 draws: both cases occur


def _brute_force(model, prompt: list[int], candidates: dict, prefix: list[int]) -> dict:
    """log of the summed probability of each answer's variants after the shared prefix, one full pass each."""
    out = {}
    with torch.no_grad():
        for answer, variants in candidates.items():
            logps = []
            for cand in variants:
                ids = prompt + cand
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
                logps.append(sum(logp[t - 1, ids[t]].item() for t in range(len(prompt) + len(prefix), len(ids))))
            out[answer] = torch.logsumexp(torch.tensor(logps), 0).item()
    return out


def test_answer_scorer_sums_surface_variants_and_matches_brute_force(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    prompt = tokenizer("Does aspirin reduce risk?", add_special_tokens=False)["input_ids"]
    scorer = rp.AnswerScorer(tokenizer)
    decoded = {a: {tokenizer.decode(v[len(scorer.prefix):]) for v in vs} for a, vs in scorer.candidates.items()}
    assert decoded["yes"] == {"yes", " yes", "Yes", " Yes"}  # the surface forms summed for each answer
    # The tiny tokenizer splits "Maybe" in pieces, so the scorer takes one pass per variant ...
    assert not scorer.fast
    scores, mass = scorer.score(model, prompt)
    assert scores == pytest.approx(_brute_force(model, prompt, scorer.candidates, scorer.prefix), abs=1e-4)
    assert 0 < mass <= 1
    # ... and with single-token variants (as SmolLM2's tokenizer gives) the one-pass shortcut is exact too.
    scorer.candidates = {a: [scorer.prefix + [v[len(scorer.prefix)]] for v in vs if len(v) == len(scorer.prefix) + 1]
                         for a, vs in scorer.candidates.items()}
    scorer.fast = True
    fast, fast_mass = scorer.score(model, prompt)
    assert fast == pytest.approx(_brute_force(model, prompt, scorer.candidates, scorer.prefix), abs=1e-4)
    assert fast_mass == pytest.approx(sum(torch.tensor(list(fast.values())).exp().tolist()), rel=1e-5)
    exact = rp.ChoiceScorer(tokenizer, rp.ANSWERS, prefix="<answer>", variants=False)
    assert [len(v) for v in exact.candidates.values()] == [1, 1, 1]


def test_smollm2_answers_are_single_tokens_after_the_tag():
    """The CPU grid relies on the one-pass scorer: yes / no / maybe are one token each after `<answer>`."""
    from rare_fixtures import smollm2_tokenizer

    scorer = rp.AnswerScorer(smollm2_tokenizer())
    assert scorer.fast


def test_collator_benchmark_smoke(pubmedqa_dir, tiny_llama_dir, tmp_path, capsys):
    """`benchmarks/speed/collator.py` end to end on the toy questions: every configuration measured, stored, and
    skipped when rerun with the same identity."""
    import benchmarks.speed.collator as bench_collator

    argv = ["--data-dir", str(pubmedqa_dir), "--model", str(tiny_llama_dir), "--examples", "4", "--batch-size", "2",
            "--repeats", "1", "--workers", "0", "--max-length", "512", "--out-dir", str(tmp_path)]
    result = bench_collator.main(argv)
    assert len(result["rows"]) == 5 and all(r["examples_per_s"] > 0 for r in result["rows"])
    assert "| RAREDataCollator, BM25 k=3 (main process) |" in (tmp_path / "bench_collator.md").read_text()
    capsys.readouterr()
    assert bench_collator.main(argv)["rows"] == result["rows"]
    assert "skip bench_collator: identical run already stored" in capsys.readouterr().err
