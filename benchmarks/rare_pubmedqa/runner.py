"""RARE on PubMedQA (PQA-L): does retrieval-augmented training beat closed-book training?

Trains a causal LM on the 500 non-test PubMedQA questions and evaluates it on the official 500-question test
split, in the settings of the RARE paper (Wang et al., arXiv 2503.23513):

    zs_closed     zero-shot, no passages                 (no training)
    zs_rag        zero-shot with BM25 passages (RAG)     (no training)
    sft_closed    fine-tuned and evaluated closed-book   (vanilla SFT: -log p(y | x))
    rare          fine-tuned and evaluated with passages (RARE: -log p(y | x, R(x)))
    rare_raft     RARE trained with RAFT distractors (gold kept with probability p), evaluated with passages
    rare_oracle   the RARE model evaluated with the question's own abstract (gold passages): the ceiling

Knowledge base: all 3358 abstract passages of PQA-L, BM25 (``rare_data.BM25Retriever``), top k = 3. The response
to learn is the abstract's conclusion (``LONG_ANSWER``, a human rationale) and the answer tag, in the order
``--response-format`` says (``answer-only``, no rationale at all, is a diagnostic: it puts the whole loss on the
answer token). Training is the standard ``transformers.Trainer`` fed raw records through
``rare_data.RAREDataCollator``.

Evaluation (``--eval``):
  scored    one forward pass per question: the log-likelihood of ``yes`` / ``no`` / ``maybe`` right after the
            ``<answer>`` tag that opens the response. Needs ``--response-format answer-rationale`` (the answer
            comes first, so its position is known without generating the rationale). Cheap enough for a CPU.
  generate  greedy generation of the whole response, answer extracted with ``rare_data.extract_answer``;
            reports the validity rate (share of generations with an extractable yes/no/maybe).

Examples::

    # the CPU grid of benchmarks/RESULTS.md (offline SmolLM2-135M-Instruct): benchmarks/rare_pubmedqa/grids/rare_pubmedqa.sh
    python -m benchmarks.rare_pubmedqa --data-dir ../shared/data/pubmedqa --method ssmlora \\
        --max-train 128 --max-test 150 --eval scored --response-format answer-rationale
    python -m benchmarks.rare_pubmedqa --table-only

Each setting's run writes one JSON into ``--output-dir`` (default ``benchmarks/rare_pubmedqa/results/<device>``)
through the run store of ``benchmarks.harness``: a rerun skips a setting only when its stored run has the same
identity (every argument, the model, the data files' contents, package versions, a hash of the code), so an interrupted
grid resumes and a changed option is never answered with an old result. ``table.md`` is rebuilt from all JSON
files after every run; an unreadable JSON is reported by name and rerun.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import set_seed

from benchmarks.harness import stats
from benchmarks.harness.adapters import add_adapter, count_parameters
from benchmarks.harness.cli import non_negative_int, positive_float, positive_int
from benchmarks.harness.environment import device_tag, host_info
from benchmarks.harness.identity import arguments_of, run_identity
from benchmarks.harness.models import load_causal_lm, load_tokenizer, model_short_name, require_model
from benchmarks.harness.report import markdown_table
from benchmarks.harness.store import RunStore, write_text_atomic
from rare_data import (
    BM25Retriever,
    ChoiceScorer,
    PromptTemplate,
    RAREDataCollator,
    RAREEpochCallback,
    accuracy,
    extract_answer,
    load_pubmedqa,
    macro_f1,
    progress,
    pubmedqa_response,
    validity_rate,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"

ANSWERS = ("yes", "no", "maybe")
METHODS = ("ssmlora", "lora", "full")
# answer-only is a diagnostic (not RARE): no rationale, so the whole loss falls on the answer token.
FORMATS = ("rationale-answer", "answer-rationale", "answer-only")
# Arguments that do not change a run's result (they are not part of its identity).
NOT_IDENTITY = ("settings", "table_only", "output_dir")


@dataclass(frozen=True)
class Setting:
    """One row of the comparison: how the model is trained (None: not at all) and which passages it sees at test."""

    train: str | None  # None, "closed_book", "retrieval" or "raft"
    eval: str  # a RAREDataCollator setting: "closed_book", "retrieval" or "oracle"
    description: str


SETTINGS = {
    "zs_closed": Setting(None, "closed_book", "zero-shot, closed-book"),
    "zs_rag": Setting(None, "retrieval", "zero-shot, BM25 passages (RAG)"),
    "sft_closed": Setting("closed_book", "closed_book", "fine-tuned closed-book (vanilla SFT)"),
    "rare": Setting("retrieval", "retrieval", "fine-tuned with BM25 passages (RARE)"),
    "rare_raft": Setting("raft", "retrieval", "RARE trained with RAFT distractors"),
    "rare_oracle": Setting("retrieval", "oracle", "RARE model, gold passages at test (ceiling)"),
}

# The answer-first layout needs its own instruction: the package's "yes_no_maybe" template asks for reasoning
# first, and a prompt that contradicts the response order would handicap the zero-shot rows.
ANSWER_FIRST = PromptTemplate(
    instruction=("Answer the biomedical research question using the retrieved documents. First give the final "
                 "answer, one of yes, no or maybe, inside <answer></answer>, then explain it."),
    closed_book_instruction=("Answer the biomedical research question. First give the final answer, one of yes, "
                             "no or maybe, inside <answer></answer>, then explain it."),
)

ANSWER_ONLY = PromptTemplate(
    instruction=("Answer the biomedical research question using the retrieved documents. Give the answer, one of "
                 "yes, no or maybe, inside <answer></answer>."),
    closed_book_instruction=("Answer the biomedical research question. Give the answer, one of yes, no or maybe, "
                             "inside <answer></answer>."),
)


# ---- data ------------------------------------------------------------------------------------------------------
def response_text(long_answer: str, answer: str, response_format: str) -> str:
    """The response to learn: the human rationale (LONG_ANSWER) and the answer tag, in the chosen order
    (``rationale-answer`` is RARE's own, ``rare_data.pubmedqa_response``)."""
    if response_format == "rationale-answer":
        return pubmedqa_response(long_answer, answer)
    tag = f"<answer>{answer}</answer>"
    return tag if response_format == "answer-only" else f"{tag}\n{long_answer.strip()}"


def template_for(response_format: str):
    return {"rationale-answer": "yes_no_maybe", "answer-rationale": ANSWER_FIRST}.get(response_format, ANSWER_ONLY)


def subsample(dataset, n: int | None, seed: int):
    """A seeded random subset of ``n`` rows (all rows when ``n`` is None or too large)."""
    if n is None or n >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(n))


def with_raft_passages(example: dict, retriever, *, n_gold: int, pool: int) -> dict:
    """Give a training example the passages RAFT samples from.

    In PubMedQA the gold passages are the question's whole abstract (1-9 passages), and every other passage of the
    same abstract would count as a "distractor" for the collator if only some gold ids were listed. So the example
    gets explicit ``passages``: its ``n_gold`` best BM25-ranked gold passages (listed as ``gold_passage_ids``) plus
    the top ``pool`` BM25 passages from *other* abstracts (hard distractors). The collator then keeps the gold
    with probability ``p_keep_gold`` and samples ``num_distractors`` of the others, so a RAFT prompt shows as many
    passages as a RARE prompt (``n_gold + num_distractors = k``).
    """
    gold = set(example["gold_passage_ids"])
    ranked = retriever.search([example["question"]], pool + len(gold))[0]
    gold_ranked = [p.id for p in ranked if p.id in gold]
    gold_ranked += [g for g in example["gold_passage_ids"] if g not in gold_ranked]  # gold BM25 missed, in order
    gold_ids = gold_ranked[:n_gold]
    others = [p for p in ranked if p.id not in gold][:pool]
    passages = [{"id": p.id, "text": p.text} for p in retriever.get_passages(gold_ids)]
    passages += [{"id": p.id, "text": p.text} for p in others]
    return {**example, "passages": passages, "gold_passage_ids": gold_ids}


# ---- model -----------------------------------------------------------------------------------------------------
def wrap_for_training(model, method: str, rank: int, alpha: float, ssmlora_init: str):
    """SSMLoRA (Llama default: q_proj / v_proj staggered over the layers) or LoRA on q_proj/v_proj, or full
    fine-tuning."""
    if method == "full":
        return model
    if method == "ssmlora":
        return add_adapter(model, "ssmlora", r=rank, alpha=alpha, task_type="CAUSAL_LM", init_weights=ssmlora_init)
    return add_adapter(model, "lora", r=rank, alpha=alpha, task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"])


# ---- collators -------------------------------------------------------------------------------------------------
def make_collator(tokenizer, retriever, args, setting: str, raft: bool = False) -> RAREDataCollator:
    """One collator per passage setting; the same options (template, k, lengths) for training and test prompts."""
    kwargs = {}
    if raft:
        kwargs = {"num_distractors": args.num_distractors, "p_keep_gold": args.p_keep_gold, "shuffle_passages": True}
    return RAREDataCollator(tokenizer, retriever=retriever, k=args.k, max_length=args.max_length,
                            max_passage_tokens=args.max_passage_tokens, passage_fit=args.passage_fit,
                            template=template_for(args.response_format),
                            on_overflow="drop", setting=setting, seed=args.seed, **kwargs)


# ---- training --------------------------------------------------------------------------------------------------
def train(model, tokenizer, retriever, train_set, args, train_setting: str) -> dict:
    """Fine-tune in place with the standard Trainer; returns training statistics."""
    from transformers import Trainer, TrainingArguments

    raft = train_setting == "raft"
    collator = make_collator(tokenizer, retriever, args, "retrieval" if raft else train_setting, raft=raft)
    if raft:
        train_set = train_set.map(with_raft_passages, fn_kwargs={"retriever": retriever, "n_gold": args.k -
                                                                 args.num_distractors, "pool": args.distractor_pool})
    n_before = len(train_set)
    train_set = train_set.filter(collator.fits)  # drop examples whose question + response alone overflow
    lengths = [len(e.input_ids) for e in (collator.encode(ex) for ex in train_set) if e is not None]
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum, num_train_epochs=args.epochs, learning_rate=args.lr,
            lr_scheduler_type="linear", warmup_steps=args.warmup_steps, weight_decay=0.0, logging_steps=1,
            save_strategy="no", report_to=[], remove_unused_columns=False, use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0, seed=args.seed, disable_tqdm=not sys.stderr.isatty())
        trainer = Trainer(model=model, args=targs, train_dataset=train_set, data_collator=collator,
                          callbacks=[RAREEpochCallback(collator)])
        start = time.time()
        result = trainer.train()
        seconds = time.time() - start
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return {"train_examples": len(train_set), "train_dropped_too_long": n_before - len(train_set),
            "train_tokens_per_example": sum(lengths) / max(len(lengths), 1), "train_seconds": round(seconds, 1),
            "train_steps": result.global_step, "train_loss_first": losses[0] if losses else None,
            "train_loss_last": losses[-1] if losses else None, "train_loss_mean": result.training_loss}


# ---- evaluation ------------------------------------------------------------------------------------------------
class AnswerScorer(ChoiceScorer):
    """yes / no / maybe scored right after the ``<answer>`` tag that opens an answer-first response.

    ``rare_data.ChoiceScorer``: each answer's score sums its surface variants ("yes", " yes", "Yes", " Yes"), so the
    zero-shot rows do not depend on which spelling the base model prefers.
    """

    def __init__(self, tokenizer):
        super().__init__(tokenizer, ANSWERS, prefix="<answer>")


@torch.no_grad()
def evaluate(model, tokenizer, retriever, test_set, args, eval_setting: str) -> dict:
    """Accuracy on ``test_set`` with the passages ``eval_setting`` selects (scored or generated answers)."""
    model.eval()
    collator = make_collator(tokenizer, retriever, args, eval_setting)
    scorer = AnswerScorer(tokenizer) if args.eval == "scored" else None
    reserve = scorer.max_new_tokens if scorer else args.max_new_tokens
    # one sequence per generate call, so nothing is padded; generate only wants an id (warns without one)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers, references, prompt_lengths, shown, gold_shown, masses, outputs = [], [], [], [], [], [], []
    start = time.time()
    for example in progress(test_set, desc=f"evaluating ({eval_setting})"):
        encoded = collator.encode_prompt(example, max_new_tokens=reserve)
        if encoded is None:  # counted as a wrong answer, never silently skipped
            answers.append(None)
            references.append(example["answer"])
            outputs.append({"id": example["id"], "gold": example["answer"], "pred": None, "dropped": True})
            continue
        prompt_lengths.append(encoded.prompt_length)
        shown.append(len(encoded.passage_ids))
        gold_shown.append(bool(set(encoded.passage_ids) & set(example["gold_passage_ids"])))
        if scorer is not None:
            scores, mass = scorer.score(model, encoded.input_ids)
            answers.append(max(scores, key=scores.get))
            masses.append(mass)
            output = {"scores": {a: round(v, 4) for a, v in scores.items()}}
        else:
            ids = torch.tensor([encoded.input_ids], device=model.device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=args.max_new_tokens, pad_token_id=pad_token_id)
            text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            answers.append(extract_answer(text, choices=ANSWERS))
            output = {"output": text}
        references.append(example["answer"])
        outputs.append({"id": example["id"], "gold": example["answer"], "pred": answers[-1], **output})
    seconds = time.time() - start
    print(f"[{eval_setting}] passages: {collator.truncation_report()}", flush=True)
    return {
        "accuracy": accuracy(answers, references),
        "macro_f1": macro_f1(answers, references, labels=ANSWERS),
        "eval_truncation": dict(collator.stats),
        "validity": validity_rate(answers) if args.eval == "generate" else None,
        "answer_mass": sum(masses) / len(masses) if masses else None,
        "predictions": dict(Counter(a if a is not None else "invalid" for a in answers)),
        "test_examples": len(test_set), "test_dropped_too_long": collator.num_dropped,
        "eval_prompt_tokens_per_example": sum(prompt_lengths) / max(len(prompt_lengths), 1),
        "eval_passages_per_example": sum(shown) / max(len(shown), 1),
        # share of questions shown at least one passage of their own abstract (retrieval quality at test)
        "eval_gold_hit_rate": sum(gold_shown) / len(gold_shown) if gold_shown and eval_setting != "closed_book" else None,
        "yes_no_auc": yes_no_auc(outputs) if scorer else None,
        "answer_nll": answer_nll(outputs) if scorer else None,
        "eval_seconds": round(seconds, 1), "per_question": outputs,
    }


def yes_no_auc(outputs: list[dict]) -> float | None:
    """ROC AUC of the score margin log p(yes) - log p(no) between gold-yes and gold-no questions.

    Accuracy mostly measures a small model's bias towards one answer; the AUC asks whether its preference moves in
    the right direction question by question (0.5: no signal), whatever the bias.
    """
    scored = [o for o in outputs if o.get("scores") and o["gold"] in ("yes", "no")]
    return stats.auc([o["scores"]["yes"] - o["scores"]["no"] for o in scored], [o["gold"] == "yes" for o in scored])


def answer_nll(outputs: list[dict]) -> float | None:
    """Mean negative log-probability of the gold answer, renormalised over yes / no / maybe (lower is better).

    A smoother measure than accuracy: it moves when the model's belief moves, even if the argmax stays "yes".
    """
    nll = []
    for o in outputs:
        if o.get("scores"):
            log_z = torch.logsumexp(torch.tensor(list(o["scores"].values())), 0).item()
            nll.append(log_z - o["scores"][o["gold"]])
    return sum(nll) / len(nll) if nll else None


# ---- results ---------------------------------------------------------------------------------------------------
def method_label(run: dict) -> str:
    if not run["trained"]:
        return "–"
    if run["method"] != "ssmlora":
        return run["method"]
    return f"ssmlora ({run['config']['ssmlora_init']} A)"


def run_name(setting: str, args) -> str:
    name = (f"{setting}__{args.method}__{args.response_format}__{args.eval}__train{args.max_train or 'all'}"
            f"__test{args.max_test or 'all'}__lr{args.lr:g}__ep{args.epochs:g}__seed{args.seed}")
    if args.method == "ssmlora" and SETTINGS[setting].train is not None:
        name += f"__init-{args.ssmlora_init}"  # trained SSMLoRA rows depend on A's init (zero-shot rows do not)
    return name


TABLE_HEADER = ["setting", "model", "method", "lr", "epochs", "format", "eval", "train n", "test n", "accuracy",
                "yes/no AUC", "answer NLL", "validity", "answer mass", "predicted yes/no/maybe",
                "tokens/ex (train / test)", "gold shown at test", "wall s (train + eval)"]


def write_table(output_dir: Path) -> Path:
    """Markdown table of every run JSON in ``output_dir`` (rows grouped by budget, settings in paper order)."""
    runs = RunStore(output_dir).load(where=lambda r: "setting" in r and "accuracy" in r)
    order = list(SETTINGS)
    runs.sort(key=lambda r: (r["model_short"], r["method"], r["config"].get("ssmlora_init", ""), r["response_format"],
                             r["eval"], r["test_examples"], r["train_examples_requested"] or 0, r["config"]["lr"],
                             r["config"]["epochs"], r["seed"], order.index(r["setting"])))
    rows = []
    for r in runs:
        p = r["predictions"]
        train_tok = f"{r['train_tokens_per_example']:.0f}" if r.get("train_tokens_per_example") else "–"
        hit = f"{r['eval_gold_hit_rate']:.2f}" if r.get("eval_gold_hit_rate") is not None else "–"
        validity = "–" if r["validity"] is None else f"{100 * r['validity']:.0f}%"
        mass = "–" if r["answer_mass"] is None else f"{r['answer_mass']:.2f}"
        auc = "–" if r.get("yes_no_auc") is None else f"{r['yes_no_auc']:.2f}"
        nll = answer_nll(r.get("per_question", []))
        nll = "–" if nll is None else f"{nll:.3f}"
        epochs = r["config"]["epochs"] if r["trained"] else "–"
        rows.append([
            r["setting"], r["model_short"], method_label(r), r["config"]["lr"] if r["trained"] else "–", epochs,
            r["response_format"], r["eval"], r.get("train_examples", 0) if r["trained"] else 0, r["test_examples"],
            f"{100 * r['accuracy']:.1f}", auc, nll, validity, mass,
            f"{p.get('yes', 0)}/{p.get('no', 0)}/{p.get('maybe', 0)}",
            f"{train_tok} / {r['eval_prompt_tokens_per_example']:.0f}", hit,
            f"{r.get('train_seconds', 0):.0f} + {r['eval_seconds']:.0f}"])
    return write_text_atomic(output_dir / "table.md", markdown_table(TABLE_HEADER, rows) + "\n")


def data_files(args) -> list[Path]:
    """The local files a run reads (their contents are part of its identity); none when data come from the Hub."""
    files = [Path(args.test_ids_file)] if args.test_ids_file else []
    if args.data_dir:
        files += [Path(args.data_dir) / "ori_pqal.json", Path(args.data_dir) / "test_ground_truth.json"]
    return [f for f in files if f.is_file()]


def identity_of(setting: str, args) -> dict:
    return run_identity({**arguments_of(args, NOT_IDENTITY), "setting": setting}, model=args.model,
                        data_files=data_files(args), runner=__spec__.name)


# ---- command line ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {', '.join(SETTINGS)}")
    p.add_argument("--model", default=None, help="Hub id or folder (default: offline SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--data-dir", default=None, help="folder with ori_pqal.json + test_ground_truth.json "
                                                    "(default: the Hub, qiaojin/PubMedQA)")
    p.add_argument("--test-ids-file", default=None, help="with the Hub: the official test_ground_truth.json")
    p.add_argument("--method", default="ssmlora", choices=METHODS)
    p.add_argument("--ssmlora-init", default="kaiming", choices=["kaiming", "gaussian"],
                   help="SSMLoRA's init of A: peft LoRA's kaiming-uniform or the paper's N(0, 1/r)")
    p.add_argument("--response-format", default="answer-rationale", choices=FORMATS)
    p.add_argument("--eval", default="scored", choices=["scored", "generate"])
    p.add_argument("--max-train", type=positive_int, default=None, help="random subset of the 500 training questions")
    p.add_argument("--max-test", type=positive_int, default=None, help="random subset of the 500 test questions")
    p.add_argument("--k", type=positive_int, default=3, help="passages per prompt (BM25 top k)")
    p.add_argument("--max-length", type=positive_int, default=1024, help="tokens per example (prompt + response)")
    p.add_argument("--max-passage-tokens", type=lambda v: None if v.lower() == "none" else positive_int(v),
                   default=None, help="fixed cap on each passage's tokens ('none': the cap is sized from --max-length)")
    p.add_argument("--passage-fit", default="shorten", choices=["shorten", "drop"],
                   help="passages too long for --max-length: cut to a common budget-sized cap, or dropped whole")
    p.add_argument("--num-distractors", type=non_negative_int, default=1, help="RAFT: distractors per prompt")
    p.add_argument("--p-keep-gold", type=float, default=0.8, help="RAFT: probability of keeping the gold passages")
    p.add_argument("--distractor-pool", type=positive_int, default=5,
                   help="RAFT: top BM25 non-gold passages to sample from")
    p.add_argument("--rank", type=positive_int, default=8)
    p.add_argument("--alpha", type=positive_float, default=16.0)
    p.add_argument("--lr", type=positive_float, default=None, help="default: 1e-3 for adapters, 2e-5 for full")
    p.add_argument("--epochs", type=positive_float, default=1.0)
    p.add_argument("--batch-size", type=positive_int, default=1, help="per step; 1 avoids padding on a CPU")
    p.add_argument("--grad-accum", type=positive_int, default=8)
    p.add_argument("--warmup-steps", type=non_negative_int, default=2)
    p.add_argument("--max-new-tokens", type=positive_int, default=160, help="generation budget (--eval generate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (share a CPU fairly)")
    p.add_argument("--output-dir", default=None, help="default: benchmarks/rare_pubmedqa/results/<device>")
    p.add_argument("--table-only", action="store_true", help="only rebuild table.md from the JSON files")
    args = p.parse_args(argv)
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        p.error(f"unknown settings {unknown}: choose from {list(SETTINGS)}")
    if args.eval == "scored" and args.response_format == "rationale-answer":
        p.error("--eval scored reads the answer at the start of the response: use --response-format answer-rationale "
                "(or the answer-only diagnostic)")
    if args.lr is None:
        args.lr = 2e-5 if args.method == "full" else 1e-3
    if args.num_distractors >= args.k:
        p.error("--num-distractors must be smaller than --k (the rest of the k passages are gold)")
    if not 0.0 <= args.p_keep_gold <= 1.0:
        p.error(f"--p-keep-gold is a probability, got {args.p_keep_gold}")
    if args.output_dir is None:
        args.output_dir = str(RESULTS_DIR / device_tag())
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.table_only:
        print(write_table(output_dir).read_text())
        return []
    if args.threads:
        torch.set_num_threads(args.threads)
    args.model = require_model(args.model, "smollm2")  # resolved first: the model is part of a run's identity
    store = RunStore(output_dir)
    todo = [s for s in args.settings if store.needs_run(run_name(s, args), identity_of(s, args))]
    if not todo:
        print("every requested run is stored with these settings already; table:", write_table(output_dir))
        return []

    data = load_pubmedqa(args.data_dir, test_ids_file=args.test_ids_file)
    train_set = subsample(data.train, args.max_train, args.seed)
    test_set = subsample(data.test, args.max_test, args.seed)
    train_set = train_set.map(lambda ex: {"response": response_text(ex["long_answer"], ex["answer"],
                                                                    args.response_format)})
    retriever = BM25Retriever.from_texts(data.passages, ids=data.passage_ids)
    model_name = args.model
    base, tokenizer = load_causal_lm(model_name, dtype=torch.float32), load_tokenizer(model_name)
    print(f"train {len(train_set)} / test {len(test_set)} questions; test labels {dict(Counter(test_set['answer']))}",
          flush=True)

    # Settings that share a training recipe share the trained model (rare and rare_oracle).
    trained: dict[str | None, tuple] = {None: (base, {})}
    results = []
    for setting_name in todo:
        setting = SETTINGS[setting_name]
        if setting.train not in trained:
            set_seed(args.seed)  # the adapter's random init must not depend on which settings ran before
            model = wrap_for_training(copy.deepcopy(base), args.method, args.rank, args.alpha, args.ssmlora_init)
            n_trainable = count_parameters(model)["total"]
            print(f"[{setting_name}] training ({setting.train}, {args.method}, {n_trainable} trainable)", flush=True)
            stats = train(model, tokenizer, retriever, train_set, args, setting.train)
            trained[setting.train] = (model, {**stats, "trainable_parameters": n_trainable})
        model, train_stats = trained[setting.train]
        print(f"[{setting_name}] evaluating ({setting.eval}, {args.eval})", flush=True)
        metrics = evaluate(model, tokenizer, retriever, test_set, args, setting.eval)
        result = {
            "setting": setting_name, "description": setting.description, "train_setting": setting.train,
            "eval_setting": setting.eval, "trained": setting.train is not None, **metrics, **train_stats,
            "model": model_name, "model_short": model_short_name(model_name), "method": args.method,
            "response_format": args.response_format, "eval": args.eval, "seed": args.seed,
            "train_examples_requested": args.max_train, "test_examples_requested": args.max_test,
            "test_label_counts": dict(Counter(test_set["answer"])),
            "config": arguments_of(args, NOT_IDENTITY),
            "host": host_info(),
        }
        store.save(run_name(setting_name, args), result, identity_of(setting_name, args))
        write_table(output_dir)
        print(f"[{setting_name}] accuracy {100 * result['accuracy']:.1f}  macro-F1 {100 * result['macro_f1']:.1f}  "
              f"predictions {result['predictions']}  "
              f"train {train_stats.get('train_seconds', 0)} s  eval {metrics['eval_seconds']} s", flush=True)
        results.append(result)
        if all(SETTINGS[s].train != setting.train for s in todo[todo.index(setting_name) + 1:]) and setting.train:
            del trained[setting.train]  # free the fine-tuned copy once no later setting needs it
    return results


if __name__ == "__main__":
    main()
