"""Every number that README's "Measured so far" and RESULTS.md's verdicts and 30-second table quote, recomputed from
the stored run JSONs with `benchmarks.harness.stats`, each with the kind of its interval.

    python -m benchmarks.harness.claims            # ~1 minute on one core; prints one block per study

Conventions (as in RESULTS.md): "mean ± sd" is over seeds (sample standard deviation); a difference is
"first minus second, paired per seed" with a t 95 % interval over the seeds (primary) and the bootstrap 95 %
interval over test examples with the trained models fixed beside it; a one-seed result has the latter only.
The stored scores are checked against the per-example outputs they came from.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.harness import stats

ROOT = Path(__file__).resolve().parents[2]
MINUS = "−"


def results_dir(*candidates: str) -> Path:
    """The first of `candidates` (repository-relative: a suite's new results folder first, then older places) that
    exists."""
    for candidate in candidates:
        if (ROOT / candidate).is_dir():
            return ROOT / candidate
    raise SystemExit(f"none of these result folders exists: {', '.join(candidates)}; run from a full checkout")


def suite_dir(suite: str, relative: str, before_suites: str) -> Path:
    """A study folder of a suite, current or archived, or where it was before the suites layout
    (`benchmarks/results/<before_suites>`)."""
    return results_dir(f"benchmarks/{suite}/results/{relative}", f"benchmarks/{suite}/results/archive/{relative}",
                       f"benchmarks/results/{before_suites}")


def established(comparison: stats.Comparison) -> str:
    return "  ESTABLISHED (every interval excludes 0)" if comparison.established() else ""


def mean_sd(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}" if len(values) > 1 else f"{values.mean():.2f} (1 seed)"


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


# ---- GLUE ablations -----------------------------------------------------------------------------------------------

GLUE_STUDIES = [("SST-2, 20,000 train examples", "ablation-sst2-20k"), ("CoLA, full train set, 3 epochs", "ablation-cola"),
                ("MRPC, full train set, 3 epochs", "ablation-mrpc"), ("RTE, full train set, 10 epochs", "ablation-rte-10ep"),
                ("SST-2, 6,000 train examples (history)", "ablation-sst2"), ("RTE, 3 epochs (history)", "ablation-rte")]
GLUE_METHODS = ("ssmlora", "lora", "lora-sparse", "lora-half")


def glue_study(title: str, study: str) -> None:
    folder = suite_dir("glue", f"cpu/{study}", f"glue/cpu/{study}")
    runs = defaultdict(dict)  # method -> seed -> (run, predictions, labels)
    for path in sorted(folder.glob("*.json")):
        run = _load(path)
        if "dev_predictions" not in run or run["config"].get("holdout_fraction") is not None:
            continue
        (predictions,), (labels,) = run["dev_predictions"].values(), run["dev_labels"].values()
        predictions, labels = np.asarray(predictions), np.asarray(labels)
        metrics = tuple(run["metrics"])
        recomputed = float(stats.score(predictions, labels, metrics))
        if abs(recomputed - run["score"]) > 1e-9:
            raise SystemExit(f"{path}: stored score {run['score']} but its dev predictions give {recomputed}")
        runs[run["config"]["method"]][run["config"]["seed"]] = (run, predictions, labels)
    any_run = next(iter(runs["ssmlora"].values()))[0]
    print(f"\n## GLUE {title} ({folder.relative_to(ROOT)}): {'/'.join(any_run['metrics'])}, "
          f"majority class {any_run['majority_score']:.2f}")
    for method in GLUE_METHODS:
        by_seed = runs[method]
        scores = [by_seed[s][0]["score"] for s in sorted(by_seed)]
        first = by_seed[min(by_seed)][0]
        params, lr = first["trainable_params"]["adapter"], first["config"]["lr"]
        print(f"  {method:<12} {params:>7,} adapter params  lr {lr:g}  seeds {' / '.join(f'{x:.2f}' for x in scores)}  "
              f"mean ± sd {mean_sd(scores)}")
    for other in GLUE_METHODS[1:]:
        seeds = sorted(runs["ssmlora"].keys() & runs[other].keys())
        pairs = [(runs["ssmlora"][s][1], runs[other][s][1], runs["ssmlora"][s][2]) for s in seeds]
        comparison = stats.paired_comparison(pairs, tuple(any_run["metrics"]), same_examples=True, resamples=1000)
        print(f"  ssmlora − {other:<11} per seed {', '.join(f'{d:+.2f}' for d in comparison.per_seed)}  "
              f"{comparison.text(minus=MINUS)}{established(comparison)}")
    if study == "ablation-rte-10ep":
        rte_details(folder, runs)


def rte_details(folder: Path, runs: dict) -> None:
    """The training-loss and held-out facts RESULTS.md states about the RTE grid."""
    print("  last-epoch mean training loss (the losses logged in the last tenth of the steps):")
    for method in GLUE_METHODS:
        for seed, (run, _, _) in sorted(runs[method].items()):
            steps = run["loss_curve"][-1][0]
            last = [loss for step, loss in run["loss_curve"] if step > steps * 0.9]
            print(f"    {method} seed {seed}: {np.mean(last):.3f}")
    held_out = _load(next((folder / "lr-select").glob("rte-lora-*.json")))
    counts = np.bincount(held_out["dev_labels"]["holdout"])
    print(f"  held-out selection slice: {counts.sum()} pairs, entailment (label 0) {counts[0]}, not entailment "
          f"{counts[1]}: always 'entailment' (the train set's majority class) scores "
          f"{held_out['majority_score']:.2f}, always 'not entailment' {100 * counts[1] / counts.sum():.2f}")


def glue_other() -> None:
    cola = _load(next((suite_dir("glue", "cpu/ablation-cola", "glue/cpu/ablation-cola") / "lr-select").glob("*.json")))
    print(f"\n## GLUE selection slices: CoLA held out {cola['dev_examples']['holdout']} sentences "
          f"(of a {cola['train_examples'] + cola['dev_examples']['holdout']}-sentence subset)")
    throughput = _load(suite_dir("glue", "cpu/ablation-sst2", "glue/cpu/ablation-sst2") / "throughput-sst2-r8.json")["methods"]
    ratio = throughput["ssmlora"]["median_step_s"] / throughput["lora"]["median_step_s"]
    print(f"  SST-2 training step, methods interleaved (median of 25 steps): SSMLoRA / LoRA {ratio:.2f}")
    runs = [_load(p) for p in suite_dir("glue", "cpu/lr2e-3-large-kaiming", "glue/cpu/lr2e-3-large-kaiming").glob("*.json")]
    for method in ("ssmlora", "lora"):
        per_task = defaultdict(list)
        for run in runs:
            if run.get("config", {}).get("method") == method:
                per_task[run["config"]["task"]].append(run["score"])
        print(f"  grid C′ mean task score {method}: {np.mean([np.mean(v) for v in per_task.values()]):.2f} "
              f"({len(per_task)} tasks, {max(map(len, per_task.values()))} seeds)")


def glue_init() -> None:
    """SST-2, 800 train examples, one epoch, lr 2e-3 (grid B and the investigation): SSMLoRA with the paper's A
    (seeds 0-1 in grid B, 2-3 in more-seeds/) against kaiming A (init-kaiming/)."""
    def accuracies(*studies: str, method: str = "ssmlora") -> str:
        runs = {}
        for study in studies:
            for path in suite_dir("glue", f"cpu/{study}", f"glue/cpu/{study}").glob(f"sst2-{method}-r8-seed*.json"):
                run = _load(path)
                runs[run["config"]["seed"]] = run["score"]
        return " / ".join(f"{runs[seed]:.2f}" for seed in sorted(runs))
    print("\n## GLUE init of A, SST-2, 800 train examples, 1 epoch, seeds 0-3 (majority 50.92): SSMLoRA paper init "
          f"{accuracies('lr2e-3', 'investigate/more-seeds')}; kaiming {accuracies('investigate/init-kaiming')}; "
          f"LoRA {accuracies('lr2e-3', 'investigate/more-seeds', method='lora')}")


# ---- RARE knowledge -----------------------------------------------------------------------------------------------

def rare_runs(folder: Path) -> dict:
    runs = {}
    for path in sorted(folder.glob("*.json")):
        run = _load(path)
        if run.get("per_question"):
            runs[run["response_format"], run["training"], run["test"], run["method_label"], run["seed"]] = run
    return runs


def losses(run: dict) -> tuple:
    return tuple(run.get(k) for k in ("train_loss_first", "train_loss_last", "train_loss_mean"))


def right(run: dict) -> dict:
    return {q["id"]: float(q["pred"] == q["gold"]) for q in run["per_question"]}


def rare_paired(runs: dict, title: str, first: tuple, second: tuple, method: str, fmt="rationale-answer") -> None:
    """first / second: (training, test); paired per seed over the questions both answered."""
    pairs, marks = [], []
    for seed in sorted({k[4] for k in runs}):
        a, b = runs.get((fmt, *first, method, seed)), runs.get((fmt, *second, method, seed))
        if a is None or b is None:
            continue
        ra, rb = right(a), right(b)
        ids = sorted(ra.keys() & rb.keys())
        pairs.append((np.array([ra[i] for i in ids]), np.array([rb[i] for i in ids]), np.ones(len(ids))))
        if first[0] == second[0] and losses(a) != losses(b):  # two test conditions of one setting: one training?
            marks.append(seed)
    comparison = stats.paired_comparison(pairs)
    mark = f"  ‡ two trainings in seeds {marks}" if marks else ""
    print(f"  {title} ({method}, {sum(len(a) for a, _, _ in pairs)} questions): per seed {', '.join(f'{d:+.1f}' for d in comparison.per_seed)}  "
          f"{comparison.text(digits=1, minus=MINUS)}{established(comparison)}{mark}")


def knowledge_edit(runs: dict, training: str, method: str) -> list[np.ndarray]:
    """On the questions the edit flipped: right before (original corpus, BM25), answers that follow the edit among
    those right before, and right both before and after (returned per seed, question by question in id order)."""
    both_per_seed, counts, both_right = [], np.zeros(4, dtype=int), []
    for seed in sorted({k[4] for k in runs}):
        before = runs[("rationale-answer", training, "bm25", method, seed)]
        after = runs[("rationale-answer", training, "bm25_edited", method, seed)]
        was = {q["id"]: q for q in before["per_question"]}
        flipped = after["per_question"]
        right_before = [q for q in flipped if was[q["id"]]["pred"] == was[q["id"]]["gold"]]
        follows = [q for q in right_before if q["pred"] == q["gold"]]
        changed = [q for q in flipped if q["pred"] != was[q["id"]]["pred"]]
        counts += [len(flipped), len(right_before), len(follows), len(changed)]
        both_per_seed.append(100 * len(follows) / len(flipped))
        following = {q["id"] for q in follows}
        both_right.append(np.array([float(q["id"] in following) for q in sorted(flipped, key=lambda q: q["id"])]))
    n, before, follows, changed = counts
    print(f"  edit, {training} {method}: {n} flipped questions; answer changed on {changed}; right before "
          f"{before}; of those, follow the edit {follows} ({100 * follows / before:.1f} %); right before and after "
          f"{follows}/{n} = {100 * follows / n:.1f} % pooled, per seed {' / '.join(f'{x:.1f}' for x in both_per_seed)}"
          f" (mean ± sd {mean_sd(both_per_seed)})")
    return both_right


def rare_knowledge() -> None:
    folder = suite_dir("rare_knowledge", "cpu/grid-3ep", "rare_knowledge/cpu/grid-3ep")
    runs = rare_runs(folder)
    print(f"\n## RARE knowledge ({folder.relative_to(ROOT)}), rationale first, 3 epochs: accuracy %, mean ± sd over "
          "seeds (100 questions per seed)")
    for training in ("zs", "sft_closed", "rare", "rare_raft"):
        for method in (("–",) if training == "zs" else ("ssmlora", "lora")):
            cells = []
            for test in ("closed_book", "bm25", "oracle"):
                values = [100 * r["accuracy"] for k, r in runs.items()
                          if k[:4] == ("rationale-answer", training, test, method)]
                cells.append(f"{test} {mean_sd(values)}")
            print(f"  {training:<10} {method:<8} " + "; ".join(cells))
    for method in ("ssmlora", "lora"):
        rare_paired(runs, "RARE − SFT, BM25 at test", ("rare", "bm25"), ("sft_closed", "bm25"), method)
        rare_paired(runs, "RARE − SFT, oracle at test", ("rare", "oracle"), ("sft_closed", "oracle"), method)
        rare_paired(runs, "RAFT − RARE, BM25 at test", ("rare_raft", "bm25"), ("rare", "bm25"), method)
        rare_paired(runs, "RARE: BM25 − closed-book at test", ("rare", "bm25"), ("rare", "closed_book"), method)
        rare_paired(runs, "RARE: oracle − BM25 at test", ("rare", "oracle"), ("rare", "bm25"), method)
    pairs = []
    for seed in (0, 1, 2):
        a = right(runs[("rationale-answer", "rare", "bm25", "ssmlora", seed)])
        b = right(runs[("rationale-answer", "rare", "bm25", "lora", seed)])
        ids = sorted(a.keys() & b.keys())
        pairs.append((np.array([a[i] for i in ids]), np.array([b[i] for i in ids]), np.ones(len(ids))))
    comparison = stats.paired_comparison(pairs)
    print(f"  SSMLoRA − LoRA, RARE, BM25: per seed {', '.join(f'{d:+.1f}' for d in comparison.per_seed)}  "
          f"{comparison.text(digits=1, minus=MINUS)}")
    for method in ("ssmlora", "lora"):
        rare, sft = (knowledge_edit(runs, training, method) for training in ("rare", "sft_closed"))
        comparison = stats.paired_comparison([(a, b, np.ones(len(a))) for a, b in zip(rare, sft)])
        print(f"  edit, RARE − SFT right before and after ({method}): per seed "
              f"{', '.join(f'{d:+.1f}' for d in comparison.per_seed)}  {comparison.text(digits=1, minus=MINUS)}"
              f"{established(comparison)}")
    print("  which training scored each test condition of RARE (same first/last/mean training loss as the BM25 row?):")
    for method in ("ssmlora", "lora"):
        for seed in (0, 1, 2):
            bm25 = losses(runs[("rationale-answer", "rare", "bm25", method, seed)])
            same = {t: losses(runs[("rationale-answer", "rare", t, method, seed)]) == bm25
                    for t in ("closed_book", "oracle", "bm25_edited", "oracle_edited")}
            print(f"    {method} seed {seed}: " + ", ".join(f"{t} {'same' if s else 'OTHER'}" for t, s in same.items()))
    rerun = suite_dir("rare_knowledge", "cpu/grid-3ep/rerun-seed2-other-machine",
                      "rare_knowledge/cpu/grid-3ep/rerun-seed2-other-machine")
    for (fmt, training, test, method, seed), run in sorted(rare_runs(rerun).items()):
        matches = losses(run) == losses(runs[(fmt, training, "closed_book", method, seed)])
        print(f"  seed-2 retraining ({rerun.name}): {training} {method} {test} {100 * run['accuracy']:.1f} "
              f"(first training {100 * runs[(fmt, training, test, method, seed)]['accuracy']:.1f}); "
              f"the closed-book row's training: {'this one' if matches else 'not this one'}")
    for method in ("ssmlora", "lora"):
        pairs = []
        for seed in (0, 1, 2):
            closed = runs[("rationale-answer", "rare", "closed_book", method, seed)]
            candidates = [runs[("rationale-answer", "rare", "bm25", method, seed)],
                          *[r for k, r in rare_runs(rerun).items() if k[2:] == ("bm25", method, seed)]]
            (bm25,) = [r for r in candidates if losses(r) == losses(closed)]
            a, b = right(bm25), right(closed)
            pairs.append((np.array([a[i] for i in sorted(a)]), np.array([b[i] for i in sorted(a)]), np.ones(len(a))))
        comparison = stats.paired_comparison(pairs)
        print(f"  RARE: BM25 − closed-book at test, both rows from one training in every seed (seed 2: the "
              f"retraining's BM25 row) ({method}): per seed {', '.join(f'{d:+.1f}' for d in comparison.per_seed)}  "
              f"{comparison.text(digits=1, minus=MINUS)}{established(comparison)}")
    print("  answer first (seed 0; one seed: examples only):")
    for method in ("ssmlora", "lora"):
        rare_paired(runs, "RARE − SFT, BM25 at test", ("rare", "bm25"), ("sft_closed", "bm25"), method,
                    fmt="answer-rationale")


# ---- speed --------------------------------------------------------------------------------------------------------

H100_RUNS = ("h100_run1_quick.csv", "h100_run2_bf16w.csv", "h100_run3_bf16w.csv")


def h100_step() -> None:
    folder = suite_dir("speed", "step/nvidia-h100-80gb-hbm3", "bench_step/nvidia-h100-80gb-hbm3")
    ms = defaultdict(dict)  # tokens -> (run, provider) -> median ms
    for name in H100_RUNS:
        for row in csv.DictReader((folder / name).open()):
            if (row["kind"], row["mode"], row["dtype"], row["d_in"], row["r"]) == ("step", "full", "bfloat16", "4096",
                                                                                   "16"):
                ms[int(row["tokens"])][name, row["provider"]] = float(row["median_ms"])
    print(f"\n## Step kernel, H100 ({folder.relative_to(ROOT)}; d 4096, r 16, bf16, forward + backward): eager / "
          f"Triton, median over the {len(H100_RUNS)} runs [range]")
    for tokens in (4096, 16384, 32768):
        ratios = [ms[tokens][name, "eager"] / ms[tokens][name, "triton"] for name in H100_RUNS]
        compiled = ms[tokens][H100_RUNS[0], "compile"] / ms[tokens][H100_RUNS[0], "triton"]
        print(f"  {tokens:>6} tokens: {np.median(ratios):.2f}× [{min(ratios):.2f}–{max(ratios):.2f}]  "
              f"(runs: {', '.join(f'{x:.2f}' for x in ratios)}); torch.compile / Triton, run 1 only: {compiled:.2f}×")


def cpu_model_step() -> None:
    folder = suite_dir("speed", "model/cpu", "bench_model/cpu")
    points = {(row["x_value"], row["mode"]): float(row["y_50"])
              for row in csv.DictReader((folder / "bench_model_cpu.csv").open())
              if row["provider"] == "ssmlora-torch" and row["metric_name"] == "step_time_ratio_vs_lora"}
    print(f"\n## Whole training step, CPU small preset ({folder.relative_to(ROOT)}): SSMLoRA / LoRA step time "
          f"{min(points.values()):.2f}–{max(points.values()):.2f} (medians of 9 interleaved steps): "
          + ", ".join(f"{tokens} tokens {mode} {ratio:.2f}" for (tokens, mode), ratio in sorted(points.items())))


# ---- PubMedQA -----------------------------------------------------------------------------------------------------

def pubmedqa() -> None:
    folder = suite_dir("rare_pubmedqa", "cpu", "rare_pubmedqa/cpu")
    print(f"\n## PubMedQA ({folder.relative_to(ROOT)}), SmolLM2-135M + SSMLoRA, 150 test questions, one seed: "
          "accuracy %, RARE − SFT (examples only)")
    for init in ("gaussian", "kaiming"):
        runs = {}
        for training in ("rare", "sft_closed"):
            (path,) = folder.glob(f"{training}__ssmlora__answer-rationale__scored__*__init-{init}.json")
            runs[training] = _load(path)
        a, b = right(runs["rare"]), right(runs["sft_closed"])
        ids = sorted(a)
        comparison = stats.paired_comparison([(np.array([a[i] for i in ids]), np.array([b[i] for i in ids]),
                                               np.ones(len(ids)))])
        labels = [q["gold"] for q in runs["rare"]["per_question"]]
        majority = max(labels.count(x) for x in set(labels)) / len(labels)
        print(f"  init {init} ({'the paper' if init == 'gaussian' else 'the current default'}'s A): RARE "
              f"{100 * runs['rare']['accuracy']:.1f}, SFT {100 * runs['sft_closed']['accuracy']:.1f}, majority class "
              f"{100 * majority:.1f}; RARE − SFT {comparison.text(digits=1, minus=MINUS)}")


    for path in sorted(folder.glob("*.json")):
        run = _load(path)
        scored = [q for q in run["per_question"] if q.get("scores") and q["gold"] in ("yes", "no")]
        value = stats.auc([q["scores"]["yes"] - q["scores"]["no"] for q in scored], [q["gold"] == "yes" for q in scored])
        print(f"  {path.stem}: accuracy {100 * run['accuracy']:.1f}, yes/no AUC {value:.2f}")


def main() -> None:
    for title, study in GLUE_STUDIES:
        glue_study(title, study)
    glue_other()
    glue_init()
    rare_knowledge()
    h100_step()
    cpu_model_step()
    pubmedqa()


if __name__ == "__main__":
    main()
