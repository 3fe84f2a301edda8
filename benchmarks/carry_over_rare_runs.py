"""One-off: carry the stored ``rare_knowledge`` runs over the collator's ``encode_batch_fast`` change.

That change alters one file, ``src/rare_data/collator.py``, and there only *how* token ids are computed (the Rust
tokenizer's ``encode_batch_fast`` in place of the tokenizer's ``__call__``). It still changes the code hash in every
run identity, so the run store would recompute hours of runs whose inputs are the same ids. A run depends on the
collator only through those ids, so this script keeps a stored run when, for that run's data and settings, every text
the collator tokenises (every training example of every epoch, every test prompt, original and edited corpus) gets
the same ids both ways. Only then does it write the current identity into the JSON, with ``identity_carried_over``
recording the code hash the run was made with and why. It refuses a run whose identity differs in anything but the
code, whose code is not that of ``--made-at``, and any carry-over when code besides the collator changed since.

    python -m benchmarks.carry_over_rare_runs benchmarks/results/rare_knowledge/cpu/grid-3ep --made-at a3c9f6b
"""

from __future__ import annotations

import argparse
import math
import subprocess
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path
from unittest import mock

from benchmarks import common
from benchmarks import rare_knowledge as rk
from benchmarks import rare_knowledge_data as rkd
from rare_data import ChoiceScorer, RAREDataCollator

CHANGED_FILE = "src/rare_data/collator.py"
NOTE = ("carried over the collator's encode_batch_fast change: every text the collator tokenises for this run gets "
        "the same token ids as with the code it was made with (benchmarks/carry_over_rare_runs.py)")


def code_hash_at(commit: str) -> str:
    """The run identity's code hash of ``rare_knowledge`` at ``commit``; fails unless only the collator changed."""
    git = ["git", "-C", str(common.REPO_ROOT)]
    changed = subprocess.run([*git, "diff", "--name-only", commit, "--", *rk.KNOWLEDGE_CODE], check=True,
                             capture_output=True, text=True).stdout.split()
    changed = [f for f in changed if f.endswith(".py") and "results" not in Path(f).parts]
    if changed != [CHANGED_FILE]:
        raise SystemExit(f"code changed since {commit}: {changed}; this carry-over covers {CHANGED_FILE} only")
    archive = subprocess.run([*git, "archive", commit, *rk.KNOWLEDGE_CODE], check=True, capture_output=True).stdout
    with tempfile.TemporaryDirectory() as tree, tarfile.open(fileobj=BytesIO(archive)) as files:
        files.extractall(tree, filter="data")
        common.code_fingerprint.cache_clear()  # it is cached per path list, and the tree differs here
        try:
            with mock.patch.object(common, "REPO_ROOT", Path(tree)):
                return common.code_fingerprint(rk.KNOWLEDGE_CODE)
        finally:
            common.code_fingerprint.cache_clear()


def replay_encodings(training: str, test: str, args) -> None:
    """Every collator encoding the run of (``training``, ``test``) makes, as ``rare_knowledge.main`` makes them."""
    data, _ = rk.load_or_generate(args)
    test_rows = rk.first(data["test.jsonl"], args.max_test)
    in_test = {r["id"] for r in test_rows}
    edits = [{**e, "flipped": [f for f in e["flipped"] if f["id"] in in_test]} for e in data["edit.jsonl"]]
    corpora = {"original": data["corpus.jsonl"], "edited": rkd.edited_corpus(data["corpus.jsonl"], edits)}
    retrievers = {name: rk.retriever_for(corpus) for name, corpus in corpora.items()}
    questions = {"original": test_rows, "edited": rk.flipped_questions(test_rows, edits, True)}
    tokenizer = common.load_tokenizer(args.model)

    setting = rk.TRAININGS[training]
    if setting is not None:
        raft = setting == "raft"
        collator = rk.make_collator(tokenizer, retrievers["original"], args, "retrieval" if raft else setting, raft)
        rows = rk.with_response(rk.first(data["train.jsonl"], args.max_train), args.response_format)
        kept = [r for r in rows if collator.fits(r)]
        for r in kept:
            collator.encode(r)
        for epoch in range(math.ceil(args.epochs)):
            collator.set_epoch(epoch)
            for start in range(0, len(kept), args.batch_size):
                collator(kept[start:start + args.batch_size])

    collator_setting, corpus, _ = rk.TESTS[test]
    scorer = ChoiceScorer(tokenizer, rk.ANSWERS, prefix="<answer>")
    reserve = (args.rationale_tokens if args.response_format == "rationale-answer" else 0) + scorer.max_new_tokens
    tests = [(corpus, questions[corpus])]
    if corpus == "edited":
        tests.append(("original", rk.flipped_questions(test_rows, edits, False)))
    for corpus_name, rows in tests:
        collator = rk.make_collator(tokenizer, retrievers[corpus_name], args, collator_setting)
        for r in rows:
            collator.encode_prompt(r, max_new_tokens=reserve)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="a rare_knowledge result folder")
    parser.add_argument("--made-at", required=True, help="the commit whose code the stored runs were made with")
    args = parser.parse_args(argv)
    old_hash = code_hash_at(args.made_at)
    store = common.RunStore(args.folder)

    fast_ids = RAREDataCollator._ids_batch
    checked = {"texts": 0}

    def ids_checked_against_the_tokenizer_call(self, texts):
        ids = fast_ids(self, texts)
        if ids != (self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []):
            raise SystemExit("a text gets other token ids than the tokenizer's own call gives: nothing carried over "
                             "from here on; rerun the runs instead")
        checked["texts"] += len(texts)
        return ids

    for result in store.load(where=lambda r: "training" in r and common.IDENTITY_KEY in r):
        run_args = argparse.Namespace(**result["config"], output_dir=args.folder)
        identity = rk.identity_of(result["training"], result["test"], run_args, result["data_sha256"])
        name = rk.run_name(identity)
        stored = result[common.IDENTITY_KEY]
        if stored["hash"] == identity["hash"]:
            print(f"current already: {name}")
            continue
        differences = common._differences(stored["config"], identity["config"])
        if len(differences) != 1 or not differences[0].startswith("code.sha256") or \
                stored["config"]["code"]["sha256"] != old_hash:
            raise SystemExit(f"{name}: not made with the code of {args.made_at} or not only the code differs: "
                             f"{differences}")
        with mock.patch.object(RAREDataCollator, "_ids_batch", ids_checked_against_the_tokenizer_call):
            replay_encodings(result["training"], result["test"], run_args)
        carried = {k: v for k, v in result.items() if k != common.IDENTITY_KEY}
        carried["identity_carried_over"] = {"from_code_sha256": old_hash, "made_at": args.made_at, "why": NOTE}
        store.save(name, carried, identity)
        print(f"carried over: {name} ({checked['texts']} texts checked so far)", flush=True)


if __name__ == "__main__":
    main()
