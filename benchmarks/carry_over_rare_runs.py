"""Carry the stored ``rare_knowledge`` runs over a change to ``rare_data`` that leaves their encodings the same.

Any change to ``src/`` changes the code hash in every run identity, so the run store would recompute hours of runs
whose model inputs did not change. A run depends on ``rare_data`` only through what its collators produce, so this
script keeps a stored run when, for that run's data and settings, every collator output (every training batch of
every epoch, every test prompt, original and edited corpus) is the same with the ``rare_data`` of ``--made-at``
(imported from ``git archive``) as with the current one. Only then does it write the current identity into the JSON,
with ``identity_carried_over`` recording the code hash the run was made with. It refuses a run whose identity differs
in anything but the code or whose code is not that of ``--made-at``, and any carry-over when code outside
``src/rare_data/`` changed since. A run whose outputs differ (e.g. RAFT after a change to its sampling) is left
alone: the grid reruns it.

    python -m benchmarks.carry_over_rare_runs benchmarks/rare_knowledge/results/cpu/grid-3ep --made-at 14f9217
"""

from __future__ import annotations

import argparse
import math
import subprocess
import tempfile
from pathlib import Path
from unittest import mock

import torch

import rare_data
from benchmarks.carry_over_runs import code_hash_in, git_archive, save_carried_over
from benchmarks.harness import identity as ident
from benchmarks.harness import models
from benchmarks.harness import store as run_store
from benchmarks.rare_knowledge import data as rkd
from benchmarks.rare_knowledge import runner as rk
from benchmarks.speed.collator import load_baseline
from rare_data import ChoiceScorer

CHANGED_PACKAGE = "src/rare_data/"


def code_hash_at(commit: str) -> str:
    """The run identity's code hash of ``rare_knowledge`` at ``commit``; fails unless only rare_data changed."""
    changed = subprocess.run(["git", "-C", str(ident.REPO_ROOT), "diff", "--name-only", commit, "--",
                              *rk.KNOWLEDGE_CODE], check=True, capture_output=True, text=True).stdout.split()
    outside = [f for f in changed if f.endswith(".py") and "results" not in Path(f).parts
               and not f.startswith(CHANGED_PACKAGE)]
    if outside:
        raise SystemExit(f"code outside {CHANGED_PACKAGE} changed since {commit}: {outside}; rerun the runs instead")
    with tempfile.TemporaryDirectory() as tree:
        git_archive(commit, rk.KNOWLEDGE_CODE, tree)
        return code_hash_in(Path(tree), rk.KNOWLEDGE_CODE)


def replay_encodings(training: str, test: str, args, package=rare_data) -> list:
    """Every collator output the run of (``training``, ``test``) makes, in order, as ``rare_knowledge.main`` makes
    them, with the collator and prompt template of ``package`` (a copy of ``rare_data``)."""
    data, _ = rk.load_or_generate(args)
    test_rows = rk.first(data["test.jsonl"], args.max_test)
    in_test = {r["id"] for r in test_rows}
    edits = [{**e, "flipped": [f for f in e["flipped"] if f["id"] in in_test]} for e in data["edit.jsonl"]]
    corpora = {"original": data["corpus.jsonl"], "edited": rkd.edited_corpus(data["corpus.jsonl"], edits)}
    retrievers = {name: rk.retriever_for(corpus) for name, corpus in corpora.items()}
    questions = {"original": test_rows, "edited": rk.flipped_questions(test_rows, edits, True)}
    tokenizer = models.load_tokenizer(args.model)
    outputs = []

    def encoded(e):
        return None if e is None else (e.input_ids, e.labels, e.prompt_length, e.passage_ids)

    with mock.patch.object(rk, "RAREDataCollator", package.RAREDataCollator), \
            mock.patch.object(rk, "PromptTemplate", package.PromptTemplate):
        setting = rk.TRAININGS[training]
        if setting is not None:
            raft = setting == "raft"
            collator = rk.make_collator(tokenizer, retrievers["original"], args, "retrieval" if raft else setting,
                                        raft)
            rows = rk.with_response(rk.first(data["train.jsonl"], args.max_train), args.response_format)
            kept = [r for r in rows if collator.fits(r)]
            outputs += [encoded(collator.encode(r)) for r in kept]
            for epoch in range(math.ceil(args.epochs)):
                collator.set_epoch(epoch)
                for start in range(0, len(kept), args.batch_size):
                    batch = collator(kept[start:start + args.batch_size])
                    outputs.append({key: value.tolist() for key, value in batch.items()
                                    if isinstance(value, torch.Tensor)})

        collator_setting, corpus, _ = rk.TESTS[test]
        scorer = ChoiceScorer(tokenizer, rk.ANSWERS, prefix="<answer>")
        reserve = (args.rationale_tokens if args.response_format == "rationale-answer" else 0) + scorer.max_new_tokens
        tests = [(corpus, questions[corpus])]
        if corpus == "edited":
            tests.append(("original", rk.flipped_questions(test_rows, edits, False)))
        for corpus_name, rows in tests:
            collator = rk.make_collator(tokenizer, retrievers[corpus_name], args, collator_setting)
            outputs += [encoded(collator.encode_prompt(r, max_new_tokens=reserve)) for r in rows]
    return outputs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="a rare_knowledge result folder")
    parser.add_argument("--made-at", required=True, help="the commit whose code the stored runs were made with")
    args = parser.parse_args(argv)
    old_hash = code_hash_at(args.made_at)
    store = run_store.RunStore(args.folder)
    with tempfile.TemporaryDirectory() as tree:
        git_archive(args.made_at, [CHANGED_PACKAGE], tree)
        old_package = load_baseline(str(Path(tree) / CHANGED_PACKAGE))
        carry_over(store, args.folder, args.made_at, old_hash, old_package)


def carry_over(store: run_store.RunStore, folder: str, made_at: str, old_hash: str, old_package) -> None:
    """Give the current identity to every stored run made at ``made_at`` whose collator outputs ``old_package``
    reproduces."""
    for result in store.load(where=lambda r: "training" in r and ident.IDENTITY_KEY in r):
        run_args = argparse.Namespace(**result["config"], output_dir=folder)
        identity = rk.identity_of(result["training"], result["test"], run_args, result["data_sha256"])
        name = rk.run_name(identity)
        stored = result[ident.IDENTITY_KEY]
        if stored["hash"] == identity["hash"]:
            print(f"current already: {name}")
            continue
        differences = ident.differences(stored["config"], identity["config"])
        if len(differences) != 1 or not differences[0].startswith("code.sha256") or \
                stored["config"]["code"]["sha256"] != old_hash:
            raise SystemExit(f"{name}: not made with the code of {made_at} or not only the code differs: "
                             f"{differences}")
        new = replay_encodings(result["training"], result["test"], run_args)
        if new != replay_encodings(result["training"], result["test"], run_args, old_package):
            print(f"left alone (its collator outputs changed; the grid reruns it): {name}", flush=True)
            continue
        save_carried_over(store, name, result, identity, made_at,
                          f"every collator output of this run ({len(new)}) is the same with the rare_data of "
                          f"{made_at} and the current one (benchmarks/carry_over_rare_runs.py)")
        print(f"carried over: {name} ({len(new)} collator outputs compared)", flush=True)


if __name__ == "__main__":
    main()
