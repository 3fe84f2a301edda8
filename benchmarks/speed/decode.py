"""Serving cost: greedy `generate` with the KV cache, SSMLoRA (which cannot be merged) against the base model (= a
merged LoRA) and peft's LoRA unmerged. Tokens/s and ms/token, prefill and decode apart, batch 1 and 8.

Model: `LlamaForCausalLM` from a config, random weights (speed does not depend on the values), shared by every
method (each wraps a shallow copy whose parameters are the same tensors). Presets: `tiny` and `small` (CPU, float32),
`1b` and `8b` (Llama-3.2-1B / Llama-3-8B shapes; GPU, bf16). Adapters: r = `--rank`, alpha = 2r, weights in the
model's dtype.

Methods:
    base               no adapter: what a merged LoRA costs
    lora               peft LoRA unmerged, its default placement (q_proj and v_proj in every layer)
    lora-half-r        the same at r/2 (LoRA at SSMLoRA's parameter count)
    ssmlora            SSMLoRA at its default placement (q/v staggered: one adapted module per layer), torch step
    ssmlora-triton     the same with the Triton step (CUDA only)
    base-compiled      base with a static KV cache and transformers' compiled decode step (`torch.compile`; on a
                       GPU mode="reduce-overhead", i.e. CUDA graphs; on a CPU inductor's default mode)
    ssmlora-compiled   ssmlora (torch step) the same way

Timing: every method lives in one process; repeats take turns method by method (the order reverses every repeat),
so a change in the machine's load hits them alike. Per repeat and method: `generate` of 1 new token (the prefill
alone) and of N new tokens; prefill = the first, decode ms/token = (second - first) / (N - 1). Medians with 20/80
percentiles over `--repeats` after `--warmup` (compiled methods compile in their warm-up). Ratios are medians of the
per-repeat ratios of two methods measured back to back. "Added ms per adapted module" = (method - base) / the
number of adapted modules; its ratio to LoRA's is the per-module cost goal of issue 30. "Same tokens": a compiled
method's tokens against its eager twin's, ssmlora-triton's against ssmlora's (torch step), same prompt and batch.

    python -m benchmarks.speed decode --preset tiny --threads 1     # CPU presets: tiny, small
    python -m benchmarks.speed decode --preset 8b --batch 1 8       # GPU
    python -m benchmarks.speed decode --count-ops                   # + torch calls / aten ops per adapted module

Writes `decode_<preset>.csv` (long form: one row per method / batch / phase / metric) and `decode_<preset>.md` to
`--out-dir` (default `benchmarks/speed/results/decode/<device>/`), rewritten after every batch size.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from benchmarks.harness.adapters import add_adapter, share_frozen_copy, ssmlora_impl
from benchmarks.harness.cli import non_negative_int, positive_int
from benchmarks.harness.environment import device_name, device_tag, host_info
from benchmarks.harness.report import csv_text, markdown_table
from benchmarks.harness.store import write_text_atomic

# LlamaConfig fields per preset: tiny is issue 30's measurement model (hidden 64, 8 layers); 1b and 8b are
# Llama-3.2-1B and Llama-3-8B shapes.
PRESETS = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 8, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 256},
    "small": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 8, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 4096},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256},
}
GPU_PRESETS = ("1b", "8b")
# preset -> (prompt tokens, new tokens, rank)
DEFAULTS = {"tiny": (16, 64, 8), "small": (32, 64, 8), "1b": (128, 64, 16), "8b": (128, 64, 16)}

# method -> (adapter or None, rank divisor, PEFT_SSMLORA_IMPL while it runs, compiled)
METHODS = {
    "base": (None, 1, None, False),
    "lora": ("lora", 1, None, False),
    "lora-half-r": ("lora", 2, None, False),
    "ssmlora": ("ssmlora", 1, "torch", False),
    "ssmlora-triton": ("ssmlora", 1, "triton", False),
    "base-compiled": (None, 1, None, True),
    "ssmlora-compiled": ("ssmlora", 1, "torch", True),
}
# (method, against): the ratios reported (medians of per-repeat ratios of decode ms/token).
RATIOS = [("ssmlora", "lora"), ("ssmlora-triton", "lora"), ("lora-half-r", "lora"), ("ssmlora", "base"),
          ("lora", "base"), ("ssmlora-compiled", "base-compiled"), ("ssmlora-compiled", "ssmlora")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", choices=list(PRESETS), default=None, help="default: 8b on a GPU, tiny on a CPU")
    p.add_argument("--batch", type=positive_int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=positive_int, default=None, help="prompt tokens (default: by preset)")
    p.add_argument("--new-tokens", type=positive_int, default=None, help="tokens generated, >= 2 (default: 64)")
    p.add_argument("--rank", type=positive_int, default=None, help="default: 8 (CPU presets), 16 (GPU presets)")
    p.add_argument("--methods", default=None,
                   help=f"comma list of {', '.join(METHODS)} (default: every one that runs on the device)")
    p.add_argument("--repeats", type=positive_int, default=12)
    p.add_argument("--warmup", type=non_negative_int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=None, help="CPU: torch threads")
    p.add_argument("--out-dir", default=None, help="default: benchmarks/speed/results/decode/<device>")
    p.add_argument("--count-ops", action="store_true",
                   help="also count, per adapted module, the torch calls and aten ops of one decode step (batch 1)")
    args = p.parse_args(argv)

    gpu = torch.device(args.device).type == "cuda"
    args.preset = args.preset or ("8b" if gpu else "tiny")
    prompt, new_tokens, rank = DEFAULTS[args.preset]
    args.prompt, args.new_tokens, args.rank = args.prompt or prompt, args.new_tokens or new_tokens, args.rank or rank
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2: decode time is the difference of N and 1 new tokens")
    if args.preset in GPU_PRESETS and not gpu:
        p.error(f"preset {args.preset} has billions of parameters: run it on a GPU, or pick tiny / small here")
    methods = args.methods.split(",") if args.methods else [m for m in METHODS if gpu or m != "ssmlora-triton"]
    args.methods = [m.strip() for m in methods if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if "ssmlora-triton" in args.methods and not gpu:
        p.error("ssmlora-triton needs a CUDA device (on a CPU the Triton interpreter's times mean nothing)")
    if "lora-half-r" in args.methods and args.rank < 2:
        p.error("lora-half-r needs --rank >= 2")
    return args


def build_models(args, device, dtype) -> dict:
    """One frozen random Llama of the preset's shape and, per method, a copy sharing its weights (plus an adapter)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(**PRESETS[args.preset], max_position_embeddings=args.prompt + args.new_tokens + 8)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the target dtype directly: 8b shapes in float32 would need 32 GB
    try:
        with torch.device(device):
            base = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    base.requires_grad_(False)
    models = {}
    for method in args.methods:
        adapter, divisor, _, _ = METHODS[method]
        model = share_frozen_copy(base)
        if adapter is not None:
            r = args.rank // divisor
            model = add_adapter(model, adapter, r=r, alpha=2 * r, task_type="CAUSAL_LM", autocast_adapter_dtype=False)
        models[method] = model.eval()
    return models


def adapted_modules(model) -> int:
    return sum(1 for m in model.modules() if getattr(m, "ssmlora_A", None) or getattr(m, "lora_A", None))


def generation_kwargs(method: str, device) -> dict:
    if not METHODS[method][3]:
        return {}
    from transformers import CompileConfig

    gpu = torch.device(device).type == "cuda"
    # dynamic=False: one static graph per batch size (no dynamic-shape recompile when the batch changes).
    compile_config = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead" if gpu else None)
    compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless told
    return {"cache_implementation": "static", "compile_config": compile_config}


def timed_generate(model, input_ids, new_tokens: int, device, **kwargs) -> tuple[float, torch.Tensor]:
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                             **kwargs)
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=10, method="inclusive")
    return statistics.median(values), q[1], q[7]


def measure_batch(models, args, device, batch: int) -> dict:
    """Every method at one batch size, repeats interleaved (order reversed every repeat)."""
    vocab = PRESETS[args.preset]["vocab_size"]
    ids = torch.randint(1, vocab, (batch, args.prompt), generator=torch.Generator().manual_seed(args.seed)).to(device)
    prefill = {m: [] for m in args.methods}
    decode = {m: [] for m in args.methods}
    tokens = {}
    failed = {}
    for repeat in range(args.warmup + args.repeats):
        for method in args.methods if repeat % 2 == 0 else args.methods[::-1]:
            if method in failed:
                continue
            kwargs = generation_kwargs(method, device)
            try:
                with ssmlora_impl(METHODS[method][2]):
                    first, _ = timed_generate(models[method], ids, 1, device, **kwargs)
                    whole, out = timed_generate(models[method], ids, args.new_tokens, device, **kwargs)
            except torch.OutOfMemoryError:
                failed[method] = "out of memory"
                torch.cuda.empty_cache()
                continue
            tokens[method] = out[:, args.prompt:]
            if repeat >= args.warmup:
                prefill[method].append(first)
                decode[method].append((whole - first) / (args.new_tokens - 1))
    result = {"batch": batch, "methods": {}, "ratios": {}}
    for method in args.methods:
        modules = adapted_modules(models[method])
        if method in failed:
            result["methods"][method] = {"status": failed[method], "adapted_modules": modules}
            continue
        reference = "ssmlora" if method.startswith("ssmlora-") else "base" if method == "base-compiled" else None
        result["methods"][method] = {
            "status": "ok", "adapted_modules": modules,
            "prefill_s": quantiles(prefill[method]), "decode_s_per_token": quantiles(decode[method]),
            "tokens_equal_to_twin": (None if reference not in tokens
                                      else bool(torch.equal(tokens[method], tokens[reference]))),
        }
        med = result["methods"][method]["decode_s_per_token"][0] * 1e3
        print(f"{args.preset} batch {batch} {method:17s} decode {med:8.3f} ms/token "
              f"({batch / med * 1e3:9.1f} tokens/s), prefill {quantiles(prefill[method])[0] * 1e3:8.2f} ms", flush=True)
    for method, against in RATIOS:
        if decode.get(method) and decode.get(against):
            result["ratios"][f"{method}/{against}"] = quantiles([a / b for a, b in zip(decode[method], decode[against])])
    # Added decode cost per adapted module, against LoRA's (paired per repeat through the base model's time).
    for method in ("ssmlora", "ssmlora-triton", "lora-half-r"):
        if all(decode.get(m) for m in (method, "lora", "base")):
            n_method = result["methods"][method]["adapted_modules"]
            n_lora = result["methods"]["lora"]["adapted_modules"]
            per_repeat = [((m - b) / n_method) / ((lo - b) / n_lora)
                          for m, lo, b in zip(decode[method], decode["lora"], decode["base"]) if lo > b]
            if per_repeat:
                result["ratios"][f"{method}/lora added per module"] = quantiles(per_repeat)
    return result


class _CallCounter(TorchFunctionMode):
    """Counts the torch functions and tensor methods called from Python (each one a dispatch, on a GPU a launch)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") != "__get__":  # attribute reads (shape, dtype, ...) dispatch nothing
            self.calls += 1
        return func(*args, **(kwargs or {}))


def count_ops(models, args, device) -> dict:
    """Per method, one decode step (batch 1, KV cache of the prompt): torch calls from Python and aten ops (the
    profiler's count), each per adapted module above the base model's. Needs "base" among the methods."""
    from torch.profiler import ProfilerActivity, profile

    vocab = PRESETS[args.preset]["vocab_size"]
    ids = torch.randint(1, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(args.seed)).to(device)
    totals = {}
    for method in ("base", *[m for m in args.methods if m != "base" and not METHODS[m][3]]):
        model = models[method]
        with ssmlora_impl(METHODS[method][2]), torch.inference_mode():
            prefill = model(input_ids=ids, use_cache=True)
            token = prefill.logits[:, -1:].argmax(-1)
            model(input_ids=token, past_key_values=copy.deepcopy(prefill.past_key_values), use_cache=True)  # warm
            with _CallCounter() as counter:
                model(input_ids=token, past_key_values=copy.deepcopy(prefill.past_key_values), use_cache=True)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                model(input_ids=token, past_key_values=copy.deepcopy(prefill.past_key_values), use_cache=True)
        totals[method] = (counter.calls, sum(event.count for event in prof.key_averages()))
    counts = {}
    for method, (calls, aten) in totals.items():
        modules = adapted_modules(models[method])
        if method != "base" and modules:
            counts[method] = {"torch_calls_per_module": (calls - totals["base"][0]) / modules,
                              "aten_ops_per_module": (aten - totals["base"][1]) / modules}
            print(f"{method:15s} one decode step, per adapted module above the base model: "
                  f"{counts[method]['torch_calls_per_module']:.2f} torch calls from Python, "
                  f"{counts[method]['aten_ops_per_module']:.2f} aten ops", flush=True)
    return counts


def csv_rows(record: dict) -> list[dict]:
    """Long form: one row per method / batch / phase / metric."""
    common = {"suite": "speed", "study": "decode", "task": f"llama-{record['preset']}", "device": record["device"],
              "dtype": record["dtype"], "rank": record["rank"], "prompt_tokens": record["prompt"],
              "new_tokens": record["new_tokens"], "repeats": record["repeats"],
              "torch_threads": record["host"]["torch_threads"],
              "load_average_1min": record["host"].get("load_average", [""])[0], "timestamp": record["timestamp"]}
    rows = []

    def add(method, batch, phase, metric, unit, values, status="ok"):
        value, p20, p80 = values if isinstance(values, tuple) else (values, "", "")
        rows.append({**common, "method": method, "batch": batch, "phase": phase, "metric": metric, "unit": unit,
                     "value": value if value in ("", None) else round(value, 6), "p20": p20 if p20 == "" else round(p20, 6),
                     "p80": p80 if p80 == "" else round(p80, 6), "status": status})

    for point in record["points"]:
        batch = point["batch"]
        for method, m in point["methods"].items():
            add(method, batch, "-", "adapted_modules", "count", m["adapted_modules"], m["status"])
            if m["status"] != "ok":
                continue
            add(method, batch, "decode", "ms_per_token", "ms", tuple(v * 1e3 for v in m["decode_s_per_token"]))
            add(method, batch, "decode", "tokens_per_s", "tokens/s", batch / m["decode_s_per_token"][0])
            add(method, batch, "prefill", "ms", "ms", tuple(v * 1e3 for v in m["prefill_s"]))
            add(method, batch, "prefill", "tokens_per_s", "tokens/s", batch * record["prompt"] / m["prefill_s"][0])
            if m["tokens_equal_to_twin"] is not None:
                add(method, batch, "decode", "tokens_equal_to_twin", "bool", int(m["tokens_equal_to_twin"]))
        for method, counts in point.get("op_counts", {}).items():
            for metric, value in counts.items():
                add(method, batch, "decode", metric, "count", value)
        for name, values in point["ratios"].items():
            method, against = name.split("/", 1)
            add(method, batch, "decode", f"ratio_vs_{against.replace(' ', '_')}", "x", values)
    return rows


def markdown(record: dict) -> str:
    host = record["host"]
    lines = [f"# Decode: {record['preset']} preset, r = {record['rank']}, {record['dtype']}, {record['device']}", "",
             f"`python -m benchmarks.speed decode --preset {record['preset']}`: greedy `generate`, prompt "
             f"{record['prompt']} tokens, {record['new_tokens']} new tokens; medians [p20, p80] of {record['repeats']} "
             f"interleaved repeats; {host['torch_threads']} torch thread(s); 1-minute load average "
             f"{host.get('load_average', ['?'])[0]} at the end; {record['timestamp']}.", ""]
    header = ["batch", "method", "adapted modules", "decode ms/token [p20, p80]", "tokens/s", "prefill ms [p20, p80]",
              "same tokens as its twin"]
    rows = []
    for point in record["points"]:
        for method, m in point["methods"].items():
            if m["status"] != "ok":
                rows.append([point["batch"], method, m["adapted_modules"], m["status"], "", "", ""])
                continue
            d, pf = [v * 1e3 for v in m["decode_s_per_token"]], [v * 1e3 for v in m["prefill_s"]]
            same = {None: "–", True: "yes", False: "no"}[m["tokens_equal_to_twin"]]
            rows.append([point["batch"], method, m["adapted_modules"], f"{d[0]:.3f} [{d[1]:.3f}, {d[2]:.3f}]",
                         f"{point['batch'] / d[0] * 1e3:,.1f}", f"{pf[0]:.2f} [{pf[1]:.2f}, {pf[2]:.2f}]", same])
    lines += [markdown_table(header, rows), "", "Ratios of decode ms/token (medians [p20, p80] of per-repeat ratios):",
              ""]
    rows = [[point["batch"], name, f"{v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]"]
            for point in record["points"] for name, v in point["ratios"].items()]
    lines += [markdown_table(["batch", "ratio", "value"], rows), ""]
    counts = [(method, c) for point in record["points"] for method, c in point.get("op_counts", {}).items()]
    if counts:
        lines += ["One decode step (batch 1), per adapted module above the base model (`--count-ops`):", "",
                  markdown_table(["method", "torch calls from Python", "aten ops"],
                                 [[m, f"{c['torch_calls_per_module']:.2f}", f"{c['aten_ops_per_module']:.2f}"]
                                  for m, c in counts]), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.preset in GPU_PRESETS else torch.float32
    out_dir = Path(args.out_dir) if args.out_dir else Path(__file__).resolve().parent / "results" / "decode" / device_tag(device)
    models = build_models(args, device, dtype)
    print(f"{args.preset} preset on {device_name(device)}, {dtype}, r {args.rank}, methods {args.methods}", flush=True)
    record = {"preset": args.preset, "rank": args.rank, "dtype": str(dtype).replace("torch.", ""),
              "device": device_name(device), "prompt": args.prompt, "new_tokens": args.new_tokens,
              "repeats": args.repeats, "methods": args.methods, "points": []}
    op_counts = count_ops(models, args, device) if args.count_ops and "base" in args.methods else {}
    for batch in args.batch:
        record["points"].append(measure_batch(models, args, device, batch))
        if batch == 1 and op_counts:
            record["points"][-1]["op_counts"] = op_counts
        record.update(host=host_info(), timestamp=time.strftime("%Y-%m-%d %H:%M:%S"))
        csv_path = write_text_atomic(out_dir / f"decode_{args.preset}.csv", csv_text(csv_rows(record)))
        md_path = write_text_atomic(out_dir / f"decode_{args.preset}.md", markdown(record))
    print(f"wrote {csv_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
