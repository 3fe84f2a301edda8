"""RARE where the knowledge must be retrieved: invented drugs, targets and diseases (issue 13).

PubMedQA could not tell whether RARE's idea works at this scale (a 135M model cannot read its evidence). Here the
answer provably lives only in the knowledge base: a seeded synthetic world (``rare_knowledge_data.py``) of invented
entities with a two-hop structure, drug -> inhibits target -> target drives disease, plus same-style distractor
passages. Test questions are about entities that never occur in a training question, so memorising training answers
cannot help; a model that learned to *use* its context can.

Training settings (one adapter each, same model, adapter and budget):

    zs            no training (zero-shot)
    sft_closed    fine-tuned closed-book (vanilla SFT: -log p(y | x))
    rare          fine-tuned with the BM25 top-k passages in the prompt (RARE: -log p(y | x, R(x)))
    rare_raft     RARE with RAFT distractors (the gold pair kept with probability p, plus k - 2 distractors; a
                  dropped gold pair is replaced by distractors, so every prompt shows k passages)

Test conditions (every trained model is evaluated in each; one JSON per (training setting, test condition)):

    closed_book     no passages
    bm25            BM25 top-k over the corpus
    oracle          the question's two gold passages
    bm25_edited     after the knowledge edit, BM25 over the edited corpus, on the questions whose answer flipped
    oracle_edited   after the edit, the (edited) gold passages, on the flipped questions

Responses: ``answer-rationale`` (default; ``<answer>X</answer>`` then the templated rationale that chains the gold
facts) is scored in one forward pass: log p(yes) vs log p(no) right after the ``<answer>`` tag, each summed over its
surface variants ("yes", " yes", "Yes", " Yes": ``rare_data.ChoiceScorer``). ``rationale-answer``
(RARE's own order) lets the model write its rationale greedily (up to ``--rationale-tokens``, stopping at the
``<answer>`` tag; the tag is appended when the model does not write it) and then scores yes / no after the tag.

Retrieval is deliberately imperfect: a question names only its drug and disease, and each of them also has
same-style distractor passages, so with the default data BM25's top 4 holds both gold passages for about 65 % of the
test questions and at least one for all of them (seed 0); the ``oracle`` condition separates using the knowledge
from finding it.

Metrics: accuracy and yes/no AUC (margin log p(yes) - log p(no)) with bootstrap 95 % intervals over questions, the
share of questions shown both / at least one gold passage, and on the edited corpus the accuracy against the new
answers (with the accuracy on the same questions before the edit beside it: a model that ignores its context gets
``before + after = 1`` on flipped questions).

Examples::

    python -m benchmarks.rare_knowledge --write-data /tmp/rk0 --seed 0      # the data files + README
    python -m benchmarks.rare_knowledge --seed 0 --method ssmlora            # every setting (data from the seed)
    python -m benchmarks.rare_knowledge --table-only

Without ``--data-dir`` the data is generated in memory from ``--seed`` (the same rows ``--write-data`` writes), so
the seed sets data and adapter init together. Each (training setting, test condition) is one JSON in the run store
of ``benchmarks.harness`` (default folder ``benchmarks/rare_knowledge/results/<device>``). Its identity holds every
argument that changes the result (a zero-shot row leaves out the training arguments, a non-RAFT row the RAFT ones),
the model, the sha256 of the data (read or generated), the package versions and a hash of the code; a stored result is
reused only when the identity is identical, so a rerun with other settings, data or code never picks up a stale
result. The file is named by setting, method, format, seed and a short hash of the arguments and model, so results
of other settings stay beside each other in the table, while a result of older code or data is rerun in place. An
unreadable JSON is reported by name and rerun.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList, set_seed

from benchmarks.harness.adapters import add_adapter, count_parameters
from benchmarks.harness.cli import non_negative_int, positive_float, positive_int
from benchmarks.harness.environment import device_tag, host_info
from benchmarks.harness.identity import arguments_of, run_identity
from benchmarks.harness.models import load_causal_lm, load_tokenizer, model_short_name, require_model
from benchmarks.harness.report import markdown_table
from benchmarks.harness.stats import auc  # the one AUC of every runner (scikit-learn's)
from benchmarks.harness.store import RunStore, write_text_atomic
from benchmarks.rare_knowledge import data as rkd
from rare_data import BM25Retriever, ChoiceScorer, PromptTemplate, RAREDataCollator, RAREEpochCallback

RESULTS_DIR = Path(__file__).resolve().parent / "results"

TRAININGS = {
    "zs": None,
    "sft_closed": "closed_book",
    "rare": "retrieval",
    "rare_raft": "raft",
}
# test condition -> (collator setting, corpus, questions)
TESTS = {
    "closed_book": ("closed_book", "original", "all"),
    "bm25": ("retrieval", "original", "all"),
    "oracle": ("oracle", "original", "all"),
    "bm25_edited": ("retrieval", "edited", "flipped"),
    "oracle_edited": ("oracle", "edited", "flipped"),
}
FORMATS = ("answer-rationale", "rationale-answer")
ANSWERS = ("yes", "no")

_RULE = ("A drug can treat a disease only if it inhibits the target that drives that disease; every disease has "
         "exactly one driver target.")
_ORDER = {
    "answer-rationale": "First give the final answer, yes or no, inside <answer></answer>, then explain it.",
    "rationale-answer": "Reason step by step, then give the final answer, yes or no, inside <answer></answer>.",
}


def template_for(response_format: str) -> PromptTemplate:
    """The prompt's instruction states the rule and the response order (so zero-shot rows get a fair prompt)."""
    return PromptTemplate(instruction=f"Answer the question using the retrieved documents. {_RULE} "
                                      f"{_ORDER[response_format]}",
                          closed_book_instruction=f"Answer the question. {_RULE} {_ORDER[response_format]}")


def response_text(answer: str, rationale: str, response_format: str) -> str:
    tag = f"<answer>{answer}</answer>"
    return f"{tag}\n{rationale}" if response_format == "answer-rationale" else f"{rationale}\n{tag}"


# ---- data ------------------------------------------------------------------------------------------------------
def load_or_generate(args) -> tuple[dict[str, list[dict]], str]:
    """The data files (from ``--data-dir``, else generated from ``--seed``) and their sha256 fingerprint."""
    if args.data_dir:
        return rkd.load_data(args.data_dir), rkd.data_fingerprint(args.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        rkd.write_data(tmp, args.seed, recipe_of(args))
        return rkd.load_data(tmp), rkd.data_fingerprint(tmp)


def recipe_of(args) -> rkd.Recipe:
    try:
        return rkd.Recipe(train_drugs=args.train_drugs, test_drugs=args.test_drugs,
                          drugs_per_target=args.drugs_per_target, edit_fraction=args.edit_fraction)
    except ValueError as error:
        raise SystemExit(f"bad data recipe: {error}") from None


def retriever_for(corpus: list[dict]) -> BM25Retriever:
    return BM25Retriever.from_texts([p["text"] for p in corpus], ids=[p["id"] for p in corpus])


def flipped_questions(test: list[dict], edits: list[dict], after_edit: bool) -> list[dict]:
    """The test questions the edit flips, with their answers and rationales before or after the edit."""
    by_id = {q["id"]: q for q in test}
    rows = []
    for edit in edits:
        for flip in edit["flipped"]:
            row = dict(by_id[flip["id"]])
            if after_edit:
                row.update(answer=flip["answer"], rationale=flip["rationale"])
            rows.append(row)
    return rows


def first(rows: list[dict], n: int | None) -> list[dict]:
    """The first ``n`` rows (the generator shuffles each drug's yes/no pair, so any prefix of pairs is balanced)."""
    return rows if n is None else rows[:n]


# ---- training --------------------------------------------------------------------------------------------------
def with_adapter(model, args):
    """The method's adapter at its default placement (Llama: LoRA on q_proj / v_proj of every layer, SSMLoRA on
    q_proj / v_proj staggered over the layers), SSMLoRA with the chosen init of A."""
    options = {"init_weights": args.ssmlora_init} if args.method == "ssmlora" else {}
    return add_adapter(model, args.method, r=args.rank, alpha=args.alpha, task_type="CAUSAL_LM", **options)


def make_collator(tokenizer, retriever, args, setting: str, raft: bool = False) -> RAREDataCollator:
    """One collator per passage setting, with the same template, k and lengths for training and test prompts.

    RAFT shows the gold pair (kept with probability ``--p-keep-gold``) plus ``k - 2`` distractors sampled from the
    top ``--distractor-pool`` BM25 passages, shuffled.
    """
    kwargs = {}
    if raft:
        kwargs = {"num_distractors": args.k - 2, "p_keep_gold": args.p_keep_gold,
                  "distractor_pool": args.distractor_pool, "shuffle_passages": True}
    return RAREDataCollator(tokenizer, retriever=retriever, k=args.k, max_length=args.max_length,
                            max_passage_tokens=args.max_passage_tokens, template=template_for(args.response_format),
                            on_overflow="drop", setting=setting, seed=args.seed, **kwargs)


def with_response(rows: list[dict], response_format: str) -> list[dict]:
    return [{**r, "response": response_text(r["answer"], r["rationale"], response_format)} for r in rows]


def gold_shown_stats(encoded: list, rows: list[dict]) -> dict:
    """Share of prompts showing both / at least one gold passage, and passages per prompt."""
    pairs = [(set(e.passage_ids), set(r["gold_passage_ids"])) for e, r in zip(encoded, rows) if e is not None]
    n = max(len(pairs), 1)
    return {"gold_all_shown": sum(g <= s for s, g in pairs) / n,
            "gold_any_shown": sum(bool(g & s) for s, g in pairs) / n,
            "passages_per_example": sum(len(s) for s, _ in pairs) / n}


def train(model, tokenizer, retriever, rows: list[dict], args, train_setting: str) -> dict:
    """Fine-tune in place with the standard Trainer fed raw records through RAREDataCollator."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    raft = train_setting == "raft"
    collator = make_collator(tokenizer, retriever, args, "retrieval" if raft else train_setting, raft=raft)
    rows = with_response(rows, args.response_format)
    kept = [r for r in rows if collator.fits(r)]  # question + response alone must fit; counted, never cut
    encoded = [collator.encode(r) for r in kept]  # the epoch-0 prompts, for the statistics below
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
            num_train_epochs=args.epochs, learning_rate=args.lr, lr_scheduler_type="linear",
            warmup_steps=args.warmup_steps, weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[],
            remove_unused_columns=False, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
            seed=args.seed, disable_tqdm=True)
        trainer = Trainer(model=model, args=targs, train_dataset=Dataset.from_list(kept), data_collator=collator,
                          callbacks=[RAREEpochCallback(collator)])
        start = time.time()
        result = trainer.train()
        seconds = time.time() - start
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    shown = gold_shown_stats(encoded, kept)
    return {"train_examples": len(kept), "train_dropped_too_long": len(rows) - len(kept),
            "train_tokens_per_example": sum(len(e.input_ids) for e in encoded if e) / max(len(kept), 1),
            "train_passages_per_example": shown["passages_per_example"],
            "train_gold_all_shown": shown["gold_all_shown"] if train_setting != "closed_book" else None,
            "train_seconds": round(seconds, 1),
            "train_examples_per_second": round(len(kept) * args.epochs / seconds, 3),
            "train_steps": result.global_step, "train_loss_first": losses[0] if losses else None,
            "train_loss_last": losses[-1] if losses else None, "train_loss_mean": result.training_loss}


# ---- evaluation ------------------------------------------------------------------------------------------------
class _StopAtTag(StoppingCriteria):
    """Per-row stop once the generated tokens contain the ``<answer>`` tag's token ids (or the end of turn)."""

    def __init__(self, tag: list[int], stop_ids: set[int], prompt_length: int):
        self.tag, self.stop_ids, self.prompt_length = tag, stop_ids, prompt_length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.tensor([find(row[self.prompt_length:].tolist(), self.tag) is not None
                             or row[-1].item() in self.stop_ids for row in input_ids], device=input_ids.device)


def end_of_turn_ids(model, tokenizer) -> set[int]:
    """Tokens that end the model's turn: the tokenizer's EOS and the generation config's EOS ids (chat models
    often list their end-of-turn token there)."""
    configured = model.generation_config.eos_token_id
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    return {t for t in [tokenizer.eos_token_id, *configured] if t is not None}


def find(sequence: list[int], pattern: list[int]) -> int | None:
    """Index of the first occurrence of ``pattern`` in ``sequence``."""
    for i in range(len(sequence) - len(pattern) + 1):
        if sequence[i:i + len(pattern)] == pattern:
            return i
    return None


@torch.no_grad()
def greedy_rationales(model, prompts: list[list[int]], tag: list[int], stop_ids: set[int], pad_id: int,
                      max_new_tokens: int, batch_size: int) -> list[tuple[list[int], bool]]:
    """Greedy continuation of each prompt up to the ``<answer>`` tag: ([rationale ids], whether the model wrote it).

    Batched with left padding. Without the tag the whole continuation up to the end-of-turn token is kept and the
    caller appends the tag itself.
    """
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
        generated = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                                   pad_token_id=pad_id, stopping_criteria=StoppingCriteriaList(
                                       [_StopAtTag(tag, stop_ids, width)]))
        for row in generated[:, width:].tolist():
            at = find(row, tag)
            if at is not None:
                out.append((row[:at], True))
                continue
            end = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
            out.append((row[:end], False))
    return out


@torch.no_grad()
def evaluate(model, tokenizer, retriever, rows: list[dict], args, collator_setting: str) -> dict:
    """Scored yes/no answers on ``rows`` with the passages ``collator_setting`` selects."""
    model.eval()
    collator = make_collator(tokenizer, retriever, args, collator_setting)
    scorer = ChoiceScorer(tokenizer, ANSWERS, prefix="<answer>")
    rationale_first = args.response_format == "rationale-answer"
    reserve = (args.rationale_tokens if rationale_first else 0) + scorer.max_new_tokens
    encoded = [collator.encode_prompt(r, max_new_tokens=reserve) for r in rows]
    start = time.time()
    kept = [(e, r) for e, r in zip(encoded, rows) if e is not None]
    rationales = [([], False)] * len(kept)
    if rationale_first and kept:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        rationales = greedy_rationales(model, [e.input_ids for e, _ in kept], scorer.prefix,
                                       end_of_turn_ids(model, tokenizer), pad_id, args.rationale_tokens,
                                       args.eval_batch_size)
    per_question = {}
    for (e, r), (rationale_ids, wrote_tag) in zip(kept, rationales):
        scores, _ = scorer.score(model, e.input_ids + rationale_ids)
        row = {"id": r["id"], "gold": r["answer"], "pred": max(scores, key=scores.get),
               "margin": scores["yes"] - scores["no"], "passage_ids": e.passage_ids,
               "gold_all_shown": set(r["gold_passage_ids"]) <= set(e.passage_ids),
               "gold_any_shown": bool(set(r["gold_passage_ids"]) & set(e.passage_ids))}
        if rationale_first:
            row.update(rationale=tokenizer.decode(rationale_ids, skip_special_tokens=True), wrote_tag=wrote_tag)
        per_question[r["id"]] = row
    # an example too long even without passages is counted as wrong, never silently skipped
    outputs = [per_question.get(r["id"], {"id": r["id"], "gold": r["answer"], "pred": None, "dropped": True})
               for r in rows]
    seconds = time.time() - start
    correct = np.array([o["pred"] == o["gold"] for o in outputs], dtype=float)
    scored = [o for o in outputs if o["pred"] is not None]
    margins = np.array([o["margin"] for o in scored])
    labels = np.array([o["gold"] == "yes" for o in scored])
    shown = scored if collator_setting != "closed_book" else []  # gold hit rates mean nothing closed-book
    return {
        "accuracy": float(correct.mean()) if len(correct) else None,
        "accuracy_ci95": bootstrap_ci(correct, lambda idx: correct[idx].mean(), args.bootstrap),
        "yes_no_auc": auc(margins, labels),
        "yes_no_auc_ci95": bootstrap_ci(margins, lambda idx: auc(margins[idx], labels[idx]), args.bootstrap),
        "predictions": dict(Counter(o["pred"] or "dropped" for o in outputs)),
        "test_examples": len(rows), "test_labels": dict(Counter(r["answer"] for r in rows)),
        "test_dropped_too_long": collator.num_dropped,
        "eval_prompt_tokens_per_example": float(np.mean([len(e.input_ids) for e, _ in kept])) if kept else None,
        "eval_passages_per_example": float(np.mean([len(e.passage_ids) for e, _ in kept])) if kept else None,
        "gold_all_shown": float(np.mean([o["gold_all_shown"] for o in shown])) if shown else None,
        "gold_any_shown": float(np.mean([o["gold_any_shown"] for o in shown])) if shown else None,
        "answer_tag_rate": float(np.mean([w for _, w in rationales])) if rationale_first and kept else None,
        "eval_seconds": round(seconds, 1), "per_question": outputs,
    }


def bootstrap_ci(values: np.ndarray, statistic, n_resamples: int, seed: int = 0) -> list[float] | None:
    """Percentile 95 % interval of ``statistic(indices)`` over questions resampled with replacement.

    The resampling seed is fixed (not the run's seed) so the interval of a given result is reproducible.
    """
    if len(values) == 0 or n_resamples <= 0:
        return None
    rng = np.random.default_rng(seed)
    stats = [statistic(rng.integers(0, len(values), len(values))) for _ in range(n_resamples)]
    stats = [s for s in stats if s is not None]
    if not stats:
        return None
    low, high = np.percentile(stats, [2.5, 97.5])
    return [round(float(low), 4), round(float(high), 4)]


# ---- run identity and result names -----------------------------------------------------------------------------
# Arguments that never change a result (where results go, what to run, threads, table mode), and those the identity
# holds in another form: the data's sha256 covers --data-dir and the recipe; the model is the identity's own key.
NOT_IDENTITY = ("output_dir", "table_only", "trainings", "tests", "threads", "write_data", "data_dir", "model",
                "train_drugs", "test_drugs", "drugs_per_target", "edit_fraction")
# Arguments that only matter once something is trained.
TRAINING_ONLY = ("method", "rank", "alpha", "lr", "epochs", "batch_size", "grad_accum", "warmup_steps", "max_train",
                 "ssmlora_init")
RAFT_ONLY = ("p_keep_gold", "distractor_pool")


def identity_of(training: str, test: str, args, data_sha256: str) -> dict:
    """The run store's identity of one (training setting, test condition): the result-changing arguments (a
    zero-shot row leaves out the training ones, so it is not rerun when only those change), the data's sha256, the
    model, package versions and a hash of the code."""
    exclude = [*NOT_IDENTITY, *(TRAINING_ONLY if TRAININGS[training] is None else ()),
               *(RAFT_ONLY if TRAININGS[training] != "raft" else ())]
    arguments = {**arguments_of(args, exclude), "training": training, "test": test, "data_sha256": data_sha256}
    return run_identity(arguments, model=args.model, runner=__spec__.name)


def run_name(identity: dict) -> str:
    """``<training>@<test>__<method>__<format>__seed<S>__<hash of the arguments and model>``: runs of other settings
    get their own file; a run of the same settings with other code or package versions is rerun in its place."""
    config = identity["config"]
    a = config["arguments"]
    digest = hashlib.sha256(json.dumps([a, config["model"]], sort_keys=True).encode()).hexdigest()[:10]
    return f"{a['training']}@{a['test']}__{a.get('method', 'base')}__{a['response_format']}__seed{a['seed']}__{digest}"


# ---- table -----------------------------------------------------------------------------------------------------
def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _ci(interval, scale: float = 100.0, digits: int = 1) -> str:
    return "–" if not interval else f"[{scale * interval[0]:.{digits}f}, {scale * interval[1]:.{digits}f}]"


TABLE_HEADER = ["training", "test", "method", "format", "config", "seed", "n", "accuracy", "95% CI", "yes/no AUC",
                "95% CI", "gold both / any shown", "pred yes/no", "before edit", "train s", "eval s"]
MEAN_HEADER = ["training", "test", "method", "format", "config", "seeds", "accuracy", "yes/no AUC", "before edit"]


def write_table(output_dir: Path) -> Path:
    """``table.md``: one row per run, then the mean over seeds of each configuration (unreadable JSONs are reported
    by name and left out)."""
    runs = RunStore(output_dir).load(where=lambda r: "training" in r and "accuracy" in r)
    order_t, order_e = list(TRAININGS), list(TESTS)
    runs.sort(key=lambda r: (r["method_label"], r["response_format"], r["config_label"], order_t.index(r["training"]),
                             order_e.index(r["test"]), r["seed"]))
    rows = []
    for r in runs:
        p = r["predictions"]
        hit = "–" if r["gold_all_shown"] is None else f"{r['gold_all_shown']:.2f} / {r['gold_any_shown']:.2f}"
        auc_value = "–" if r["yes_no_auc"] is None else f"{r['yes_no_auc']:.2f}"
        rows.append([r["training"], r["test"], r["method_label"], r["response_format"], r["config_label"], r["seed"],
                     r["test_examples"], _pct(r["accuracy"]), _ci(r["accuracy_ci95"]), auc_value,
                     _ci(r["yes_no_auc_ci95"], 1, 2), hit, f"{p.get('yes', 0)}/{p.get('no', 0)}",
                     _pct(r.get("accuracy_before_edit")), f"{r.get('train_seconds', 0):.0f}",
                     f"{r['eval_seconds']:.0f}"])
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["training"], r["test"], r["method_label"], r["response_format"], r["config_label"]),
                          []).append(r)
    means = []
    for key, members in groups.items():
        cells = []
        for field, scale, digits in (("accuracy", 100, 1), ("yes_no_auc", 1, 2), ("accuracy_before_edit", 100, 1)):
            values = [m[field] * scale for m in members if m.get(field) is not None]
            sd = f" ± {np.std(values, ddof=1):.{digits}f}" if len(values) > 1 else ""
            cells.append(f"{np.mean(values):.{digits}f}{sd}" if values else "–")
        means.append([*key, len(members), *cells])
    text = "\n\n".join([markdown_table(TABLE_HEADER, rows),
                         "Mean over seeds (± sample standard deviation across seeds):",
                         markdown_table(MEAN_HEADER, means)])
    return write_text_atomic(output_dir / "table.md", text + "\n")


def config_label(args) -> str:
    """The budget in a few characters, for the table (the full configuration is in each JSON)."""
    return (f"k{args.k} r{args.rank} lr{args.lr:g} ep{args.epochs:g} bs{args.batch_size}x{args.grad_accum} "
            f"train{args.max_train or 'all'}")


# ---- command line ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--write-data", metavar="DIR", default=None, help="write the data files for --seed and exit")
    p.add_argument("--data-dir", default=None, help="read the data from here (default: generate it from --seed)")
    p.add_argument("--train-drugs", type=int, default=rkd.Recipe.train_drugs, help="--write-data: training drugs "
                                                                                   "(2 questions each)")
    p.add_argument("--test-drugs", type=int, default=rkd.Recipe.test_drugs, help="--write-data: test drugs")
    p.add_argument("--drugs-per-target", type=int, default=rkd.Recipe.drugs_per_target)
    p.add_argument("--edit-fraction", type=float, default=rkd.Recipe.edit_fraction,
                   help="--write-data: share of test drugs re-assigned by the knowledge edit")
    p.add_argument("--trainings", default=",".join(TRAININGS), help=f"comma list of {', '.join(TRAININGS)}")
    p.add_argument("--tests", default=",".join(TESTS), help=f"comma list of {', '.join(TESTS)}")
    p.add_argument("--model", default=None, help="Hub id or folder (default: offline SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--method", default="ssmlora", choices=["ssmlora", "lora"])
    p.add_argument("--ssmlora-init", default="kaiming", choices=["kaiming", "gaussian"])
    p.add_argument("--response-format", default="answer-rationale", choices=FORMATS)
    p.add_argument("--rationale-tokens", type=positive_int, default=48,
                   help="rationale-answer: greedy tokens the model may write before the <answer> tag")
    p.add_argument("--eval-batch-size", type=positive_int, default=16,
                   help="rationale-answer: prompts generated together")
    p.add_argument("--max-train", type=positive_int, default=None, help="first N training questions (default: all)")
    p.add_argument("--max-test", type=positive_int, default=None, help="first N test questions (default: all)")
    p.add_argument("--k", type=positive_int, default=4,
                   help="passages per prompt (BM25 top k; RAFT: 2 gold + k-2 others)")
    p.add_argument("--max-length", type=positive_int, default=512, help="tokens per example (prompt + response)")
    p.add_argument("--max-passage-tokens", type=positive_int, default=64, help="each passage cut to this many tokens")
    p.add_argument("--p-keep-gold", type=float, default=0.8, help="RAFT: probability of keeping the gold passages")
    p.add_argument("--distractor-pool", type=positive_int, default=8,
                   help="RAFT: top BM25 passages distractors come from")
    p.add_argument("--rank", type=positive_int, default=8)
    p.add_argument("--alpha", type=positive_float, default=16.0)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--epochs", type=positive_float, default=1.0)
    p.add_argument("--batch-size", type=positive_int, default=1, help="per step; 1 avoids padding on a CPU")
    p.add_argument("--grad-accum", type=positive_int, default=8)
    p.add_argument("--warmup-steps", type=non_negative_int, default=2)
    p.add_argument("--bootstrap", type=non_negative_int, default=1000,
                   help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--seed", type=int, default=0, help="data (without --data-dir) and adapter init")
    p.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (share a CPU fairly)")
    p.add_argument("--output-dir", default=None, help="default: benchmarks/rare_knowledge/results/<device>")
    p.add_argument("--table-only", action="store_true", help="only rebuild table.md from the JSON files")
    args = p.parse_args(argv)
    args.trainings = [s.strip() for s in args.trainings.split(",") if s.strip()]
    args.tests = [s.strip() for s in args.tests.split(",") if s.strip()]
    for given, known, flag in ((args.trainings, TRAININGS, "--trainings"), (args.tests, TESTS, "--tests")):
        unknown = [s for s in given if s not in known]
        if unknown:
            p.error(f"{flag}: unknown {unknown}; choose from {list(known)}")
    if args.k < 2:
        p.error("--k must be >= 2: every question needs its two gold passages")
    if not 0.0 <= args.p_keep_gold <= 1.0:
        p.error(f"--p-keep-gold is a probability, got {args.p_keep_gold}")
    if args.output_dir is None:
        args.output_dir = str(RESULTS_DIR / device_tag())
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.write_data:
        print("wrote", rkd.write_data(args.write_data, args.seed, recipe_of(args)))
        return []
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.table_only:
        print(write_table(output_dir).read_text())
        return []
    if args.threads:
        torch.set_num_threads(args.threads)

    data, data_sha256 = load_or_generate(args)
    args.model = model_name = require_model(args.model, "smollm2")  # resolved first: part of every identity
    store = RunStore(output_dir)
    plan = [(t, e) for t in args.trainings for e in args.tests]
    identities = {pair: identity_of(*pair, args, data_sha256) for pair in plan}
    todo = [pair for pair in plan if store.needs_run(run_name(identities[pair]), identities[pair])]
    if not todo:
        print("every requested run is stored with these settings already; table:", write_table(output_dir))
        return []

    train_rows = first(data["train.jsonl"], args.max_train)
    test_rows = first(data["test.jsonl"], args.max_test)
    in_test = {r["id"] for r in test_rows}
    edits = [{**e, "flipped": [f for f in e["flipped"] if f["id"] in in_test]} for e in data["edit.jsonl"]]
    corpora = {"original": data["corpus.jsonl"], "edited": rkd.edited_corpus(data["corpus.jsonl"], edits)}
    retrievers = {name: retriever_for(corpus) for name, corpus in corpora.items()}
    questions = {("original", "all"): test_rows, ("edited", "flipped"): flipped_questions(test_rows, edits, True)}
    before_edit = flipped_questions(test_rows, edits, False)
    base, tokenizer = load_causal_lm(model_name, dtype=torch.float32), load_tokenizer(model_name)
    print(f"train {len(train_rows)} / test {len(test_rows)} questions, {len(questions['edited', 'flipped'])} flipped "
          f"by the edit; corpus {len(corpora['original'])} passages", flush=True)

    results = []
    for training in dict.fromkeys(t for t, _ in todo):
        model, train_stats = base, {}
        if TRAININGS[training] is not None:
            set_seed(args.seed)  # the adapter's init must not depend on which settings ran before
            model = with_adapter(copy.deepcopy(base), args)
            n_trainable = count_parameters(model)["total"]
            print(f"[{training}] training ({args.method}, {n_trainable} trainable parameters)", flush=True)
            train_stats = train(model, tokenizer, retrievers["original"], train_rows, args, TRAININGS[training])
            train_stats["trainable_parameters"] = n_trainable
        for test in [e for t, e in todo if t == training]:
            collator_setting, corpus, subset = TESTS[test]
            print(f"[{training}@{test}] evaluating", flush=True)
            metrics = evaluate(model, tokenizer, retrievers[corpus], questions[corpus, subset], args, collator_setting)
            if corpus == "edited":  # the same questions, original corpus, original answers
                before = evaluate(model, tokenizer, retrievers["original"], before_edit, args, collator_setting)
                metrics["accuracy_before_edit"] = before["accuracy"]
                metrics["eval_seconds"] += before["eval_seconds"]
            identity = identities[training, test]
            result = {
                "training": training, "test": test, **metrics, **train_stats,
                "trained": TRAININGS[training] is not None, "seed": args.seed,
                "method": args.method if TRAININGS[training] else None,
                "method_label": args.method if TRAININGS[training] else "–", "response_format": args.response_format,
                "config_label": config_label(args) if TRAININGS[training] else f"k{args.k}",
                "model": model_name, "model_short": model_short_name(model_name), "data_dir": args.data_dir,
                "data_sha256": data_sha256, "config": arguments_of(args, ("output_dir",)), "host": host_info(),
            }
            store.save(run_name(identity), result, identity)
            write_table(output_dir)
            print(f"[{training}@{test}] accuracy {_pct(metrics['accuracy'])} {_ci(metrics['accuracy_ci95'])}  AUC "
                  f"{metrics['yes_no_auc']}  predictions {metrics['predictions']}  train "
                  f"{train_stats.get('train_seconds', 0)} s  eval {metrics['eval_seconds']} s", flush=True)
            results.append(result)
        del model
    return results


if __name__ == "__main__":
    main()
