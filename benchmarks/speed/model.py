"""Whole-model training step, SSMLoRA vs peft LoRA, on a Llama-shaped model: tokens/s, step-time ratio, peak memory.

The per-layer microbenchmark (`speed/step.py`) is not what a user feels; this is: one optimizer step (forward,
backward, AdamW) of a whole decoder with each method's adapter, at tokens-per-step from 2k to 64k.

Model: `LlamaForCausalLM` built from a config with random weights (speed does not depend on the values), frozen and
shared by every method (each method wraps its own shallow copy whose parameters are the same tensors, so the base
weights exist once in memory). Presets: `8b` (Llama-3-8B shapes), `1b` (Llama-3.2-1B), `cpu` (a small 4-layer
model for a CPU), `tiny` (tests). bf16 on a GPU, float32 on a CPU.

Methods (r = `--rank`, alpha = 2r for all, so the scale is the same):
    lora             peft LoRA at its default placement (q_proj and v_proj in every layer), dropout 0
    lora-half-r      the same at r/2: LoRA at SSMLoRA's parameter count (the same-parameters comparison)
    ssmlora-torch    SSMLoRA at its default placement (q/v staggered), PEFT_SSMLORA_IMPL=torch
    ssmlora-triton   the same with PEFT_SSMLORA_IMPL=triton (CUDA only; the default `auto` picks it on a GPU)
SSMLoRA's default (`auto`) is `ssmlora-triton` on a GPU and `ssmlora-torch` on a CPU; each record says which.

Timing: all methods live in one process and take turns step by step (the order reverses every step), so a change
in the machine's load hits them alike; medians and 20/80 percentiles over `--steps` steps after `--warmup`. Peak
memory (CUDA): the most memory allocated during a step above what was allocated before it (activations, gradients,
optimizer transients; the shared base weights are not in it). Each (tokens, checkpointing) point is one run in the
run store (`benchmarks.harness.store.RunStore`): a rerun with the same identity skips it (`--force` measures again).

    python -m benchmarks.speed model                        # GPU: 8b shapes, 2k..64k tokens, with/without checkpointing
    python -m benchmarks.speed model --preset 1b --tokens 4096 16384
    python -m benchmarks.speed model --preset cpu --threads 1   # CPU: small preset, 512 and 2048 tokens

Writes to `--out-dir` (default `benchmarks/speed/results/model/<device>`): one JSON per point, and rebuilt from all
of them after every point `bench_model_<tag>.csv` (long form, one row per method / mode / tokens / metric, like
Liger-Kernel's benchmark CSV) and `bench_model_<tag>.md` (tables with ratios against LoRA).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness.adapters import add_adapter, count_parameters, share_frozen_copy, ssmlora_impl
from benchmarks.harness.cli import non_negative_int, positive_int
from benchmarks.harness.environment import device_name, device_tag, host_info
from benchmarks.harness.identity import arguments_of, run_identity
from benchmarks.harness.report import csv_text, markdown_table
from benchmarks.harness.store import RunStore, write_text_atomic

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# LlamaConfig fields per preset (Llama-3-8B and Llama-3.2-1B shapes; `cpu` and `tiny` are small stand-ins).
PRESETS = {
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True},
    "cpu": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 4096},
    "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 128},
}
DEFAULT_TOKENS = {"8b": [2048, 4096, 8192, 16384, 32768, 65536], "1b": [2048, 4096, 8192, 16384, 32768, 65536],
                  "cpu": [512, 2048], "tiny": [64]}
DEFAULT_SEQ_LEN = {"8b": 2048, "1b": 2048, "cpu": 512, "tiny": 32}

# method -> (adapter, rank divisor, PEFT_SSMLORA_IMPL while it runs)
METHODS = {
    "lora": ("lora", 1, None),
    "lora-half-r": ("lora", 2, None),
    "ssmlora-torch": ("ssmlora", 1, "torch"),
    "ssmlora-triton": ("ssmlora", 1, "triton"),
}
# Arguments that do not change a measurement.
NOT_IDENTITY = ("out_dir", "force", "tag")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: 8b on a GPU, cpu on a CPU")
    p.add_argument("--tokens", type=positive_int, nargs="+", default=None,
                   help="tokens per optimizer step (batch x sequence); default: by preset")
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help="sequence length (default: by preset, at most the tokens); batch = tokens / seq-len")
    p.add_argument("--rank", type=positive_int, default=16)
    p.add_argument("--methods", default=None, help=f"comma list of {', '.join(METHODS)} (default: all that run here)")
    p.add_argument("--checkpointing", choices=["off", "on", "both"], default="both",
                   help="activation checkpointing (non-reentrant) off, on, or each in turn")
    p.add_argument("--adapter-dtype", choices=["model", "float32"], default="model",
                   help="adapter weights in the model's dtype, or float32 (get_peft_model's default upcast)")
    p.add_argument("--steps", type=positive_int, default=5, help="timed steps per method")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps per method first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=None, help="CPU: torch threads")
    p.add_argument("--out-dir", default=None, help="default: benchmarks/speed/results/model/<device>")
    p.add_argument("--tag", default=None, help="file name tag of the CSV/MD (default: the preset)")
    p.add_argument("--force", action="store_true", help="measure points again even when stored with this identity")
    args = p.parse_args(argv)

    gpu = torch.device(args.device).type == "cuda"
    args.preset = args.preset or ("8b" if gpu else "cpu")
    args.tokens = args.tokens or DEFAULT_TOKENS[args.preset]
    methods = args.methods.split(",") if args.methods else [m for m in METHODS if gpu or m != "ssmlora-triton"]
    methods = [m.strip() for m in methods if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if "ssmlora-triton" in methods and not gpu:
        p.error("ssmlora-triton needs a CUDA device (on a CPU the Triton interpreter's times mean nothing)")
    if any(METHODS[m][1] == 2 for m in methods) and args.rank < 2:
        p.error("lora-half-r needs --rank >= 2")
    args.methods = methods
    seq_len = args.seq_len or DEFAULT_SEQ_LEN[args.preset]
    bad = [t for t in args.tokens if t % min(seq_len, t)]
    if bad:
        p.error(f"--tokens {bad} are not multiples of the sequence length {seq_len} (batch = tokens / seq-len)")
    args.seq_len = seq_len
    return args


def build_models(args, device, dtype) -> tuple[dict, dict]:
    """One frozen random Llama of the preset's shape, and per method a copy sharing its weights plus an adapter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(**PRESETS[args.preset], max_position_embeddings=max(args.tokens), use_cache=False)
    with torch.device(device):
        base = LlamaForCausalLM(config).to(dtype)
    base.requires_grad_(False)
    upcast = args.adapter_dtype == "float32"
    models, optimizers = {}, {}
    for method in args.methods:
        adapter, divisor, _ = METHODS[method]
        r = args.rank // divisor
        # ssmlora: its default placement (q/v staggered); lora: peft's default for Llama (q_proj, v_proj everywhere)
        model = add_adapter(share_frozen_copy(base), adapter, r=r, alpha=2 * r, task_type="CAUSAL_LM",
                            autocast_adapter_dtype=upcast).train()
        models[method] = model
        optimizers[method] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return models, optimizers


def set_checkpointing(model, on: bool) -> None:
    """Non-reentrant activation checkpointing of every decoder layer on or off (transformers 5.x renamed the
    methods from gradient_* to activation_*; both spellings are handled)."""
    lm = model.get_base_model()
    kwargs = {"use_reentrant": False}
    new_api = hasattr(lm, "activation_checkpointing_enable")
    if on and new_api:
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif on:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif new_api:
        lm.activation_checkpointing_disable()
    else:
        lm.gradient_checkpointing_disable()


def train_step(model, optimizer, batch, device) -> tuple[float, float]:
    """(seconds, peak MB above the memory allocated before the step; NaN on a CPU) of one optimizer step."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20 if cuda else math.nan
    return seconds, peak


def measure_point(models, optimizers, args, device, tokens: int, checkpointing: bool) -> dict:
    """Every method at one tokens-per-step, steps interleaved (order reversed every step)."""
    seq = min(args.seq_len, tokens)
    vocab = PRESETS[args.preset]["vocab_size"]
    batch = torch.randint(vocab, (tokens // seq, seq), generator=torch.Generator().manual_seed(args.seed)).to(device)
    times: dict[str, list[float]] = {m: [] for m in args.methods}
    peaks: dict[str, list[float]] = {m: [] for m in args.methods}
    failed: dict[str, str] = {}
    for model in models.values():
        set_checkpointing(model, checkpointing)
    for step in range(args.warmup + args.steps):
        order = args.methods if step % 2 == 0 else args.methods[::-1]
        for method in order:
            if method in failed:
                continue
            try:
                with ssmlora_impl(METHODS[method][2]):
                    seconds, peak = train_step(models[method], optimizers[method], batch, device)
            except torch.OutOfMemoryError:
                failed[method] = "out of memory"
                optimizers[method].zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                continue
            if step >= args.warmup:
                times[method].append(seconds)
                peaks[method].append(peak)
    out = {}
    for method in args.methods:
        params = count_parameters(models[method])["total"]
        if method in failed:
            out[method] = {"status": failed[method], "trainable_params": params}
            continue
        ts = sorted(times[method])
        q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else [ts[0]] * 9
        median = statistics.median(ts)
        out[method] = {"status": "ok", "trainable_params": params, "median_step_s": median, "p20_step_s": q[1],
                       "p80_step_s": q[7], "tokens_per_s": tokens / median,
                       "peak_step_mb": None if math.isnan(max(peaks[method])) else max(peaks[method])}
        print(f"tokens {tokens:6d} checkpointing {'on ' if checkpointing else 'off'} {method:15s} "
              f"{median * 1e3:9.1f} ms  {tokens / median:10.0f} tokens/s"
              + (f"  peak {max(peaks[method]):.0f} MB" if device.type == "cuda" else ""), flush=True)
    return {"tokens": tokens, "batch": tokens // seq, "seq_len": seq, "checkpointing": checkpointing,
            "methods": out}


def ratio(point: dict, method: str, against: str) -> float | None:
    a, b = point["methods"].get(method, {}), point["methods"].get(against, {})
    if a.get("status") != "ok" or b.get("status") != "ok":
        return None
    return a["median_step_s"] / b["median_step_s"]


def csv_rows(record: dict) -> list[dict]:
    """Long-form rows (Liger-Kernel style): one per method / mode / tokens / metric."""
    rows = []
    for point in record["points"]:
        mode = "checkpointing" if point["checkpointing"] else "no_checkpointing"
        for method, m in point["methods"].items():
            metrics = [("trainable_params", "count", m["trainable_params"], None, None)]
            if m["status"] == "ok":
                metrics += [
                    ("step_time", "ms", m["median_step_s"] * 1e3, m["p20_step_s"] * 1e3, m["p80_step_s"] * 1e3),
                    ("tokens_per_s", "tokens/s", m["tokens_per_s"], None, None),
                    ("step_time_ratio_vs_lora", "x", ratio(point, method, "lora"), None, None),
                    ("step_time_ratio_vs_lora_half_r", "x", ratio(point, method, "lora-half-r"), None, None),
                    ("peak_memory", "MB", m["peak_step_mb"], None, None),
                ]
            for name, unit, y50, y20, y80 in metrics:
                rows.append({"benchmark": "llama_train_step", "provider": method, "mode": mode,
                             "x_name": "tokens_per_step", "x_value": point["tokens"], "metric_name": name,
                             "metric_unit": unit, "y_50": "" if y50 is None else round(y50, 4),
                             "y_20": "" if y20 is None else round(y20, 4), "y_80": "" if y80 is None else round(y80, 4),
                             "status": m["status"], "preset": record["preset"], "rank": record["rank"],
                             "dtype": record["dtype"], "batch": point["batch"], "seq_len": point["seq_len"],
                             "device": record["device"], "timestamp": record["timestamp"]})
    return rows


def markdown(records: list[dict]) -> str:
    """One table per (preset, rank, dtype, device): every stored point, without then with checkpointing."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault((record["preset"], record["rank"], record["dtype"], record["device"]), []).append(record)
    header = ["tokens (batch x seq)", "checkpointing", "method", "trainable params", "step ms [p20, p80]",
              "tokens/s", "step / LoRA", "step / LoRA r/2", "peak MB"]
    lines = []
    for (preset, rank, dtype, device), group in groups.items():
        loads = [str(r["host"].get("load_average", ["?"])[0]) for r in group]
        lines += [f"## {preset} preset, r = {rank}, {dtype}, {device}", "",
                  f"{group[0]['model_params']:,} frozen base parameters; {group[0]['host']['torch_threads']} torch "
                  f"threads; 1-minute load average after each point: {', '.join(loads)}; measured "
                  f"{min(r['timestamp'] for r in group)} to {max(r['timestamp'] for r in group)}.", ""]
        points = sorted((p for r in group for p in r["points"]), key=lambda p: (p["checkpointing"], p["tokens"]))
        rows = []
        for point in points:
            shape = f"{point['tokens']} ({point['batch']} x {point['seq_len']})"
            ckpt = "on" if point["checkpointing"] else "off"
            for method, m in point["methods"].items():
                if m["status"] != "ok":
                    rows.append([shape, ckpt, method, f"{m['trainable_params']:,}", m["status"], "", "", "", ""])
                    continue
                r1, r2 = ratio(point, method, "lora"), ratio(point, method, "lora-half-r")
                rows.append([shape, ckpt, method, f"{m['trainable_params']:,}",
                             f"{m['median_step_s'] * 1e3:.1f} [{m['p20_step_s'] * 1e3:.1f}, {m['p80_step_s'] * 1e3:.1f}]",
                             f"{m['tokens_per_s']:,.0f}", "–" if r1 is None else f"{r1:.2f}",
                             "–" if r2 is None else f"{r2:.2f}",
                             "–" if m["peak_step_mb"] is None else f"{m['peak_step_mb']:,.0f}"])
        lines += [markdown_table(header, rows), ""]
    return "\n".join(lines)


def write_tables(store: RunStore, tag: str) -> tuple[Path, Path]:
    records = store.load(where=lambda r: r.get("tag") == tag and "points" in r)
    rows = [row for record in records for row in csv_rows(record)]
    csv_path = write_text_atomic(store.folder / f"bench_model_{tag}.csv", csv_text(rows))
    title = "# Whole-model training step: SSMLoRA vs peft LoRA (`python -m benchmarks.speed model`)\n\n"
    md_path = write_text_atomic(store.folder / f"bench_model_{tag}.md", title + markdown(records))
    return csv_path, md_path


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tag = args.tag or args.preset
    store = RunStore(args.out_dir or RESULTS_DIR / "model" / device_tag(device))
    settings = {**arguments_of(args, NOT_IDENTITY), "device_name": device_name(device), "dtype": str(dtype)}
    checkpointing = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    todo = []
    for tokens in args.tokens:
        for ckpt in checkpointing:
            name = f"{tag}-t{tokens}-{'ckpt' if ckpt else 'nockpt'}"
            identity = run_identity({**settings, "point_tokens": tokens, "point_checkpointing": ckpt},
                                    runner=__spec__.name)
            if args.force or store.needs_run(name, identity):
                todo.append((name, identity, tokens, ckpt))
    if todo:
        models, optimizers = build_models(args, device, dtype)
        model_params = sum(p.numel() for p in next(iter(models.values())).parameters() if not p.requires_grad)
        print(f"{args.preset} preset on {device_name(device)}: {model_params:,} frozen parameters, {dtype}, "
              f"methods {args.methods}", flush=True)
        for name, identity, tokens, ckpt in todo:
            point = measure_point(models, optimizers, args, device, tokens, ckpt)
            record = {"tag": tag, "preset": args.preset, "rank": args.rank, "dtype": str(dtype).replace("torch.", ""),
                      "device": device_name(device), "model_params": model_params,
                      "default_ssmlora_impl": "triton" if device.type == "cuda" else "torch",
                      "points": [point], "host": host_info(), "timestamp": time.strftime("%Y-%m-%d %H:%M:%S")}
            store.save(name, record, identity)
            write_tables(store, tag)
    csv_path, md_path = write_tables(store, tag)
    print(f"wrote {csv_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
