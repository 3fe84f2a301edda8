"""Throughput of RAREDataCollator (BM25 retrieval, 3 passages, SmolLM2 tokenizer) against a plain floor.

The floor is transformers' ``DataCollatorForSeq2Seq`` on examples tokenised ahead of time (what a
pre-processed SFT data set costs per batch). The RARE collator does everything at batch time: BM25 search,
prompt rendering through the chat template, tokenisation, masking and padding.

Usage::

    python -m benchmarks.speed collator --data-dir ../shared/data/pubmedqa [--batch-size 8] [--workers 2]
    # against an older rare_data, timed in the same process (same load, same examples), batches checked equal:
    git archive <commit> src/rare_data | tar -x -C /tmp/old
    python -m benchmarks.speed collator --baseline-src /tmp/old/src/rare_data

Prints examples/s for each configuration; the goal is that with 2 DataLoader workers the collator produces
batches faster than a training step consumes them. The measurement is stored through the run store
(`benchmarks/speed/results/collator/<device>/bench_collator.json`, skipped when rerun with the same identity unless
`--force`; the baseline's source files are part of the identity) and written as `bench_collator.md` beside it.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorForSeq2Seq

from benchmarks.harness.cli import non_negative_int, positive_int
from benchmarks.harness.environment import device_tag, host_info
from benchmarks.harness.identity import arguments_of, run_identity
from benchmarks.harness.models import load_tokenizer, require_model
from benchmarks.harness.report import markdown_table
from benchmarks.harness.store import RunStore, write_text_atomic
from rare_data import BM25Retriever, RAREDataCollator, load_pubmedqa

RESULTS_DIR = Path(__file__).resolve().parent / "results"

RUN = "bench_collator"


def throughput(fn, examples, batch_size, repeats, warmup=True):
    """Examples per second of ``fn(batch)`` over ``repeats`` passes (best pass, after one warm-up batch)."""
    if warmup:
        fn(examples[:batch_size])
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(examples), batch_size):
            fn(examples[i:i + batch_size])
        best = max(best, len(examples) / (time.perf_counter() - start))
    return best


def load_baseline(src: str):
    """Import another copy of the ``rare_data`` package (e.g. an older commit's) as ``rare_data_baseline``."""
    init = Path(src) / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--baseline-src {src} is not a rare_data package folder (no __init__.py)")
    spec = importlib.util.spec_from_file_location("rare_data_baseline", init, submodule_search_locations=[src])
    module = importlib.util.module_from_spec(spec)
    sys.modules["rare_data_baseline"] = module
    spec.loader.exec_module(module)
    return module


def compare_encodings(new, old, examples, retriever) -> tuple[int, int]:
    """(examples encoded identically, examples that differ only because the old collator showed a passage text
    twice -- the new one shows each text once); any other difference aborts the comparison."""
    same = duplicates = 0
    for ex in examples:
        a, b = new.encode(ex), old.encode(ex)
        if a.input_ids == b.input_ids and a.labels == b.labels:
            same += 1
            continue
        texts = [p.text for p in retriever.get_passages(b.passage_ids)]
        if len(set(texts)) == len(texts):
            raise SystemExit(f"the baseline collator encodes example {ex.get('id')!r} differently and not because of a "
                             "repeated passage: the comparison would be meaningless")
        duplicates += 1
    return same, duplicates


def loader_throughput(collator, examples, batch_size, workers):
    """Examples per second of a DataLoader with ``workers`` processes (includes worker start-up)."""
    loader = DataLoader(examples, batch_size=batch_size, collate_fn=collator, num_workers=workers)
    start = time.perf_counter()
    n = sum(batch["input_ids"].shape[0] for batch in loader)
    return n / (time.perf_counter() - start)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared/data/pubmedqa"),
                        help="PubMedQA folder with ori_pqal.json and test_ground_truth.json")
    parser.add_argument("--model", default=None, help="tokenizer (default: the offline SmolLM2-135M-Instruct)")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--examples", type=positive_int, default=400)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--workers", type=non_negative_int, default=2)
    parser.add_argument("--max-length", type=positive_int, default=2048)
    parser.add_argument("--baseline-src", default=None,
                        help="folder of another rare_data package to time in the same run (e.g. from git archive)")
    parser.add_argument("--out-dir", default=None, help="default: benchmarks/speed/results/collator/<device>")
    parser.add_argument("--force", action="store_true", help="measure again even when stored with this identity")
    return parser.parse_args(argv)


def measure(args) -> dict:
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(args.model)
    data = load_pubmedqa(args.data_dir)
    examples = [dict(ex) for ex in data.train.select(range(min(args.examples, len(data.train))))]
    t0 = time.perf_counter()
    retriever = BM25Retriever.from_texts(data.passages, ids=data.passage_ids)
    index_s = time.perf_counter() - t0

    rare = RAREDataCollator(tokenizer, retriever=retriever, k=3, max_length=args.max_length, template="yes_no_maybe")
    # Pre-tokenised floor: the very same token ids, produced once ahead of time.
    pretokenised = []
    for ex in examples:
        enc = rare.encode(ex)
        pretokenised.append({"input_ids": enc.input_ids, "attention_mask": [1] * len(enc.input_ids),
                             "labels": enc.labels})
    seq2seq = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    given = [dict(ex, passages=[{"id": p.id, "text": p.text} for p in hits])
             for ex, hits in zip(examples, retriever.search([ex["question"] for ex in examples], 3))]
    tokens = sum(len(p["input_ids"]) for p in pretokenised) / len(pretokenised)

    baseline, comparison = None, None
    if args.baseline_src:
        old = load_baseline(args.baseline_src)
        baseline = old.RAREDataCollator(tokenizer, retriever=retriever, k=3, max_length=args.max_length,
                                        template="yes_no_maybe")
        same, duplicates = compare_encodings(rare, baseline, examples, retriever)
        comparison = {"src": args.baseline_src, "identical": same, "differ_by_repeated_passage_only": duplicates}
        print(f"baseline {args.baseline_src}: identical input_ids and labels on {same} of {len(examples)} examples; "
              f"{duplicates} differ only because the baseline showed one passage text twice")

    rows = [
        ("DataCollatorForSeq2Seq, pre-tokenised (floor)", throughput(seq2seq, pretokenised, args.batch_size,
                                                                     args.repeats)),
        ("BM25 search only (k=3)", throughput(lambda b: retriever.search([e["question"] for e in b], 3), examples,
                                              args.batch_size, args.repeats)),
        ("RAREDataCollator, passages given (no search)", throughput(rare, given, args.batch_size, args.repeats)),
        ("RAREDataCollator, BM25 k=3 (main process)", throughput(rare, examples, args.batch_size, args.repeats)),
    ]
    if baseline is not None:
        # timed right after the new collator, on the same examples; the new one first pays its cache misses
        fresh = RAREDataCollator(tokenizer, retriever=retriever, k=3, max_length=args.max_length,
                                 template="yes_no_maybe")
        rows += [
            ("baseline RAREDataCollator, BM25 k=3 (main process)", throughput(baseline, examples, args.batch_size,
                                                                              args.repeats)),
            ("RAREDataCollator, BM25 k=3, first pass (empty passage cache)", throughput(fresh, examples,
                                                                                       args.batch_size, 1,
                                                                                       warmup=False)),
            ("RAREDataCollator, BM25 k=3 (main process, again)", throughput(rare, examples, args.batch_size,
                                                                           args.repeats)),
        ]
    rows += [
        (f"RAREDataCollator, BM25 k=3, DataLoader {args.workers} workers",
         loader_throughput(rare, examples, args.batch_size, args.workers)),
    ]
    return {"rows": [{"configuration": name, "examples_per_s": rate} for name, rate in rows],
            "examples": len(examples), "mean_tokens_per_example": tokens, "passages": len(data.passages),
            "index_seconds": index_s, "batch_size": args.batch_size, "baseline": comparison, "host": host_info()}


def report(result: dict) -> str:
    rows = [[r["configuration"], f"{r['examples_per_s']:.1f}", f"{1000 * result['batch_size'] / r['examples_per_s']:.2f}"]
            for r in result["rows"]]
    host = result["host"]
    return (f"{result['examples']} PubMedQA train examples, batch {result['batch_size']}, mean "
            f"{result['mean_tokens_per_example']:.0f} tokens/example, BM25 index of {result['passages']} passages "
            f"built in {result['index_seconds']:.2f} s; {host['device']}, {host['cpus']} CPUs, torch threads 1, "
            f"load average {host.get('load_average', '?')}.\n\n"
            + (f"Baseline `{result['baseline']['src']}`: identical input_ids and labels on "
               f"{result['baseline']['identical']} of {result['examples']} examples, "
               f"{result['baseline']['differ_by_repeated_passage_only']} differ only by a passage text the baseline "
               "showed twice.\n\n" if result.get("baseline") else "")
            + markdown_table(["configuration", "examples/s", f"ms / batch of {result['batch_size']}"], rows,
                             align=["", "r", "r"]) + "\n")


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.model = require_model(args.model, "smollm2")
    store = RunStore(args.out_dir or RESULTS_DIR / "collator" / device_tag("cpu"))
    data_files = [Path(args.data_dir) / name for name in ("ori_pqal.json", "test_ground_truth.json")]
    if args.baseline_src:  # the baseline's code decides its timings: its source files are part of the identity
        data_files += sorted(Path(args.baseline_src).rglob("*.py"))
    identity = run_identity(arguments_of(args, ("out_dir", "force")), model=args.model,
                            data_files=[f for f in data_files if f.is_file()], runner=__spec__.name)
    if args.force or store.needs_run(RUN, identity):
        store.save(RUN, measure(args), identity)
    result = store.get(RUN)
    text = report(result)
    write_text_atomic(store.folder / f"{RUN}.md", "# RAREDataCollator throughput (`python -m benchmarks.speed collator`)"
                      "\n\n" + text)
    print(text)
    return result


if __name__ == "__main__":
    main()
