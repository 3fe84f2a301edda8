"""Benchmark of the SSMLoRA step and of a whole SSMLoRA-adapted linear layer (prints numbers; not a test).

Providers
    step  (`kind=step`, the adapter update alone, given `base_out`):
        eager      `ssmlora_step_reference` (+ state-dropout mask drawn with torch.rand)
        compile    `torch.compile` of the same function
        triton     `ssmlora_step_triton` (GPU only; in place on base_out)
        lora_p0    LoRA's update alone, `base_out + s·B(A x)` (peft's formula, dropout 0), for scale
    layer (`kind=layer`, frozen `nn.Linear` + adapter):
        eager, compile (whole layer compiled), triton   SSMLoRA layer, mid-chain (an incoming float32 state)
        lora_p0, lora_p0.1                              peft's LoRA `Linear` (lora_dropout 0 and 0.1)
        linear                                          the frozen `nn.Linear` alone (the floor)

Modes: forward, backward (of a retained graph), full (forward + backward). Median and 20/80 percentiles in ms
(`triton.testing.do_bench` on GPU, a timer loop on CPU), and on GPU the peak memory of one full step above the
inputs (`peak_mb`) and the memory held between forward and backward (`saved_mb`).

On a GPU the Triton path is first checked against the reference at every (d, r) of the grid; if any check fails
the Triton timings are not taken and the script exits with status 1 (no speed-up is ever reported for a kernel
that is wrong).

Usage::

    python benchmarks/bench_step.py                    # GPU: bf16, d {1024, 4096}, r {8, 16, 64}, tokens {4k, 16k, 32k}
    python benchmarks/bench_step.py --quick            # GPU: the target shape only (d 4096, r 16, tokens 4k..32k)
    python benchmarks/bench_step.py --device cpu       # CPU: small fp32 shapes, eager vs compile vs LoRA
    TRITON_INTERPRET=1 python benchmarks/bench_step.py --device cpu --smoke   # exercises every code path, tiny

Results go to `--out-dir` (default `benchmarks/results`): `bench_step_<device-tag>.csv` (one row per measurement,
with the device name) and `bench_step_<device-tag>.md` (full-mode table with speed-ups).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch._functorch.config as torch_functorch_config
import torch.nn as nn

from ssmlora_kernels.reference import ssmlora_step_reference

SCALING = 2.0
SLOPE = 0.01
EPS = 1e-8


# --------------------------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------------------------


def _dropout_mask(shape, p, device):
    keep = torch.rand(shape, device=device, dtype=torch.float32) >= p
    return keep.float() / (1.0 - p)


def reference_step(x, base_out, state, A_w, B_w, C_w, D_w, p: float):
    """The eager step as the tuner's torch path runs it (mask drawn with torch.rand when p > 0)."""
    mask = _dropout_mask((*x.shape[:-1], A_w.shape[0]), p, x.device) if p > 0 else None
    return ssmlora_step_reference(
        x, base_out, state, A_w, B_w, C_w, D_w, scaling=SCALING, leaky_slope=SLOPE, eps=EPS, dropout_mask=mask
    )


def reference_layer(x, W, bias, state, A_w, B_w, C_w, D_w, p: float):
    """Frozen linear + eager step, as a function of its tensors (one `torch.compile` serves every shape)."""
    return reference_step(x, torch.nn.functional.linear(x, W, bias), state, A_w, B_w, C_w, D_w, p)[0]


def lora_update(x, base_out, A_w, B_w):
    return base_out + (x @ A_w.t()) @ B_w.t() * SCALING


class SSMLoRABenchLayer(nn.Module):
    """A frozen `nn.Linear` plus one SSMLoRA adapter, mid-chain (fixed incoming state), with a chosen step impl."""

    def __init__(self, base: nn.Linear, r: int, impl: str, p: float, state: torch.Tensor, adapter_dtype):
        super().__init__()
        self.base = base
        dev, dt = base.weight.device, adapter_dtype
        d_out, d_in = base.weight.shape
        self.A = nn.Parameter(torch.randn(r, d_in, device=dev, dtype=dt) * r**-0.5)
        # Non-zero B, C, D (as after some training) so that no path is trivially zero.
        self.B = nn.Parameter(torch.randn(d_out, r, device=dev, dtype=dt) * 0.02)
        self.C = nn.Parameter(torch.randn(r, r, device=dev, dtype=dt) * 0.1)
        self.D = nn.Parameter(torch.randn(r, r, device=dev, dtype=dt) * 0.1)
        self.impl, self.p, self.state = impl, p, state

    def forward(self, x):
        y = self.base(x)
        if self.impl == "triton":
            from ssmlora_kernels.triton_step import ssmlora_step_triton

            y, _ = ssmlora_step_triton(
                x, y, self.state, self.A, self.B, self.C, self.D,
                scaling=SCALING, dropout_p=self.p, leaky_slope=SLOPE, eps=EPS, detach_state=True,
            )  # fmt: skip
            return y
        y, _ = reference_step(x, y, self.state, self.A, self.B, self.C, self.D, self.p)
        return y


def peft_lora_layer(base: nn.Linear, r: int, p: float, adapter_dtype) -> nn.Module:
    """peft's LoRA `Linear` around `base`, built through `get_peft_model` as users build it.

    `get_peft_model` upcasts 16-bit adapter weights to float32 by default (`autocast_adapter_dtype=True`, so LoRA
    then runs its matmuls in float32); with `adapter_dtype` equal to the model's dtype that upcast is switched off.
    """
    from peft import LoraConfig, get_peft_model

    wrapper = nn.Sequential(base)
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["0"])
    upcast = adapter_dtype == torch.float32 and base.weight.dtype != torch.float32
    model = get_peft_model(wrapper, config, autocast_adapter_dtype=upcast)
    assert model.base_model.model[0].lora_A["default"].weight.dtype == adapter_dtype
    layer = model.base_model.model[0]
    nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    return layer.train()


# --------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    median: float
    p20: float
    p80: float


def _time_cpu(fn, grad_to_none, min_time_s: float, min_reps: int, max_reps: int) -> Timing:
    fn()  # warm-up (and compilation)
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time_s and len(times) < max_reps):
        for t in grad_to_none:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return Timing(statistics.median(times), q[1], q[7])


def _time_gpu(fn, grad_to_none, rep_ms: int) -> Timing:
    import triton.testing

    fn()  # compile / autotune outside the measurement
    torch.cuda.synchronize()
    med, p20, p80 = triton.testing.do_bench(
        fn, warmup=max(10, rep_ms // 4), rep=rep_ms, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8]
    )
    return Timing(med, p20, p80)


def _memory(run_forward, grads, device) -> tuple[float, float]:
    """(peak MB of one forward+backward above the live inputs, MB held between forward and backward)."""
    if device.type != "cuda":
        return math.nan, math.nan
    for t in grads:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out, g = run_forward()
    saved = torch.cuda.memory_allocated() - base
    out.backward(g)
    del out
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for t in grads:
        t.grad = None
    return peak / 2**20, saved / 2**20


# --------------------------------------------------------------------------------------------------------------
# Correctness gate (GPU)
# --------------------------------------------------------------------------------------------------------------


def check_triton(d: int, r: int, tokens: int, dtype, wdt, device: torch.device, p: float) -> str | None:
    """Compare the Triton step with the float32 reference on the same values; returns an error string or None."""
    from ssmlora_kernels.triton_step import ssmlora_dropout_mask, ssmlora_step_triton

    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*s, std=1.0, dt=dtype):
        return (torch.randn(*s, generator=g) * std).to(device=device, dtype=dt)

    t = {
        "x": rnd(tokens, d), "base": rnd(tokens, d), "A": rnd(r, d, std=d**-0.5, dt=wdt),
        "B": rnd(d, r, std=r**-0.5, dt=wdt), "C": rnd(r, r, std=r**-0.5, dt=wdt), "D": rnd(r, r, std=r**-0.5, dt=wdt),
    }  # fmt: skip
    state = torch.rand(tokens, r, generator=g).to(device)
    G = rnd(tokens, d)
    Gn = torch.randn(tokens, r, generator=g).to(device)
    tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    for detach in (True, False):
        res = {}
        for impl in ("reference", "triton"):
            leaves = {
                k: (v.float() if impl == "reference" else v).detach().clone().requires_grad_() for k, v in t.items()
            }
            s = state.clone().requires_grad_()
            base = leaves["base"] * 1
            args = (leaves["x"], base, s, leaves["A"], leaves["B"], leaves["C"], leaves["D"])
            if impl == "reference":
                mask = ssmlora_dropout_mask(1234, p, (tokens, r), device) if p > 0 else None
                out, n = ssmlora_step_reference(
                    *args, scaling=SCALING, leaky_slope=SLOPE, eps=EPS, dropout_mask=mask, detach_state=detach
                )
            else:
                out, n = ssmlora_step_triton(
                    *args, scaling=SCALING, dropout_p=p, leaky_slope=SLOPE, eps=EPS, detach_state=detach, seed=1234
                )
            ((out.float() * G.float()).sum() + (n * Gn).sum()).backward()
            res[impl] = {"out": out.detach().float(), "state": n.detach()}
            res[impl].update({"d" + k: v.grad.float() for k, v in leaves.items()})
            if not detach:
                res[impl]["ds"] = s.grad
        for k, want in res["reference"].items():
            got = res["triton"][k]
            err = (got - want).abs().max().item()
            scale = want.abs().max().item() or 1.0
            if not math.isfinite(err) or err > tol * scale:
                return f"d={d} r={r} tokens={tokens} detach={detach}: {k} max err {err:.3g} > {tol} * {scale:.3g}"
    return None


# --------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def _providers(kind: str, device: torch.device, use_triton: bool, use_compile: bool) -> list[str]:
    if kind == "step":
        names = ["eager", "compile", "triton", "lora_p0"]
    else:
        names = ["eager", "compile", "triton", "lora_p0", "lora_p0.1", "linear"]
    return [n for n in names if (n != "triton" or use_triton) and (n != "compile" or use_compile)]


def _build(kind, provider, x, d, r, dtype, wdt, device, p, state, compiled_cache):
    """Returns (forward() -> (out, grad), params needing .grad reset)."""
    g_out = torch.randn(x.shape[0], d, device=device, dtype=dtype)
    if kind == "step":
        base_out = torch.randn(x.shape[0], d, device=device, dtype=dtype)
        A = torch.randn(r, d, device=device, dtype=wdt) * r**-0.5
        B = torch.randn(d, r, device=device, dtype=wdt) * 0.02
        C = torch.randn(r, r, device=device, dtype=wdt) * 0.1
        D = torch.randn(r, r, device=device, dtype=wdt) * 0.1
        params = [t.requires_grad_(True) for t in (A, B, C, D)]
        if provider == "eager":
            return (lambda: (reference_step(x, base_out, state, A, B, C, D, p)[0], g_out)), [x, *params]
        if provider == "compile":
            # dynamic=True: one compiled graph for all shapes (a recompile per shape would cost minutes).
            fn = compiled_cache.setdefault("step", torch.compile(reference_step, dynamic=True))
            return (lambda: (fn(x, base_out, state, A, B, C, D, p)[0], g_out)), [x, *params]
        if provider == "triton":
            from ssmlora_kernels.triton_step import ssmlora_step_triton

            def run():
                # base_out is updated in place and becomes part of the graph: hand in a fresh alias each call (as
                # a layer hands in its fresh frozen output), or calls would chain through each other's graphs.
                out, _ = ssmlora_step_triton(
                    x, base_out.detach(), state, A, B, C, D,
                    scaling=SCALING, dropout_p=p, leaky_slope=SLOPE, eps=EPS, detach_state=True,
                )  # fmt: skip
                return out, g_out

            return run, [x, *params]
        if provider == "lora_p0":
            return (lambda: (lora_update(x, base_out, A, B), g_out)), [x, A, B]
        raise ValueError(provider)

    base = nn.Linear(d, d, device=device, dtype=dtype).requires_grad_(False)
    if provider in ("eager", "compile", "triton"):
        impl = "triton" if provider == "triton" else "eager"
        layer = SSMLoRABenchLayer(base, r, impl, p, state, wdt)
        params = [layer.A, layer.B, layer.C, layer.D]
        if provider == "compile":
            fn = compiled_cache.setdefault("layer", torch.compile(reference_layer, dynamic=True))
            A, B, C, D = params
            return (lambda: (fn(x, base.weight, base.bias, state, A, B, C, D, p), g_out)), [x, *params]
    elif provider.startswith("lora_p"):
        layer = peft_lora_layer(base, r, float(provider[len("lora_p") :]), wdt)
        params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    elif provider == "linear":
        layer, params = base, []
    else:
        raise ValueError(provider)
    return (lambda: (layer(x), g_out)), [x, *params]


def bench_one(kind, provider, mode, x, d, r, dtype, wdt, device, p, state, args, compiled_cache):
    run_forward, grads = _build(kind, provider, x, d, r, dtype, wdt, device, p, state, compiled_cache)
    if mode == "forward":
        fn = run_forward
    elif mode == "full":

        def fn():
            out, g = run_forward()
            out.backward(g)

    else:  # backward of one retained graph
        out, g = run_forward()

        def fn():
            out.backward(g, retain_graph=True)

    if device.type == "cuda":
        timing = _time_gpu(fn, grads, args.rep_ms)
    else:
        timing = _time_cpu(fn, grads, args.min_time_s, args.min_reps, args.max_reps)
    peak, saved = _memory(run_forward, grads, device) if mode == "full" else (math.nan, math.nan)
    for t in grads:
        t.grad = None
    return timing, peak, saved


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--tag", default=None, help="file name tag (default: derived from the device)")
    ap.add_argument("--label", default="", help="appended to the device name, e.g. '2-core shared VM'")
    ap.add_argument("--quick", action="store_true", help="GPU: only d=4096, r=16 (the target shape)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, every provider, for checking the script")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument(
        "--adapter-dtype",
        default="model",
        choices=["model", "float32"],
        help="adapter weights of every method in the model's dtype (peft's autocast_adapter_dtype=False), or in "
        "float32 (get_peft_model's default upcast on 16-bit models)",
    )
    ap.add_argument("--dims", type=int, nargs="*", default=None)
    ap.add_argument("--ranks", type=int, nargs="*", default=None)
    ap.add_argument("--tokens", type=int, nargs="*", default=None)
    ap.add_argument("--kinds", nargs="*", default=["step", "layer"], choices=["step", "layer"])
    ap.add_argument("--modes", nargs="*", default=["forward", "backward", "full"])
    ap.add_argument("--state-dropout", type=float, default=0.1, help="SSMLoRA state dropout (training default 0.1)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU: torch threads (use 1 on a shared machine: oversubscribed "
        "OpenMP threads turn sub-ms ops into 100 ms stalls)",
    )
    ap.add_argument("--rep-ms", type=int, default=50, help="GPU: do_bench measuring time per point")
    ap.add_argument("--min-time-s", type=float, default=0.4, help="CPU: measuring time per point")
    ap.add_argument("--min-reps", type=int, default=5)
    ap.add_argument("--max-reps", type=int, default=50)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    # The "backward" mode replays one retained graph; compiled backwards with donated buffers forbid that.
    torch_functorch_config.donated_buffer = False
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = device.type == "cuda"
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if args.smoke:
        dims, ranks, tokens, dtype = [64], [8], [96], torch.float32
    elif gpu:
        dims = [4096] if args.quick else [1024, 4096]
        ranks = [16] if args.quick else [8, 16, 64]
        tokens, dtype = [4096, 16384, 32768], torch.bfloat16
    else:
        dims, ranks, tokens, dtype = [1024], [8, 16], [1024, 4096], torch.float32
    dims, ranks, tokens = args.dims or dims, args.ranks or ranks, args.tokens or tokens
    if args.dtype:
        dtype = getattr(torch, args.dtype)
    # Adapter weights: in the model's dtype, or float32 as `get_peft_model` leaves them by default on 16-bit models.
    wdt = torch.float32 if args.adapter_dtype == "float32" else dtype
    # The Triton path runs on GPUs; on CPU only under the interpreter (`--smoke`), where its timings mean nothing.
    use_triton = gpu or (interp and args.smoke)
    use_compile = not args.no_compile
    name = _device_name(device) + (f", {args.label}" if args.label else "")
    tag = args.tag or ("smoke" if args.smoke else (name.replace(" ", "-").lower() if gpu else "cpu"))
    print(
        f"device: {name}; dtype {dtype}; adapter weights {wdt}; dims {dims}; ranks {ranks}; tokens {tokens}; "
        f"state dropout {args.state_dropout}"
    )

    exit_code = 0
    if use_triton:
        failures = []
        for d in dims:
            for r in ranks:
                err = check_triton(d, r, min(tokens), dtype, wdt, device, args.state_dropout)
                print(f"correctness d={d} r={r}: {'OK' if err is None else 'FAILED: ' + err}")
                if err:
                    failures.append(err)
        if failures:
            print("The Triton step does not match the reference: its timings are NOT taken, no speed-up is reported.")
            use_triton, exit_code = False, 1

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"bench_step_{tag}.csv"
    csv_path.unlink(missing_ok=True)
    rows = []
    compiled_cache: dict = {}
    torch.manual_seed(0)
    for d in dims:
        for r in ranks:
            for n_tok in tokens:
                x = torch.randn(n_tok, d, device=device, dtype=dtype, requires_grad=True)
                state = torch.rand(n_tok, r, device=device, dtype=torch.float32)
                for kind in args.kinds:
                    for provider in _providers(kind, device, use_triton, use_compile):
                        for mode in args.modes:
                            timing, peak, saved = bench_one(
                                kind, provider, mode, x, d, r, dtype, wdt, device, args.state_dropout, state, args,
                                compiled_cache,
                            )  # fmt: skip
                            row = {
                                "device": name, "kind": kind, "provider": provider, "mode": mode,
                                "dtype": str(dtype).replace("torch.", ""),
                                "adapter_dtype": str(wdt).replace("torch.", ""), "tokens": n_tok, "d_in": d, "d_out": d,
                                "r": r, "state_dropout": args.state_dropout if provider in ("eager", "compile", "triton") else "",
                                "median_ms": round(timing.median, 4), "p20_ms": round(timing.p20, 4),
                                "p80_ms": round(timing.p80, 4),
                                "peak_mb": "" if math.isnan(peak) else round(peak, 1),
                                "saved_mb": "" if math.isnan(saved) else round(saved, 1),
                            }  # fmt: skip
                            rows.append(row)
                            # Appended row by row, so that a run cut off by a time limit keeps what it measured.
                            with open(csv_path, "a", newline="") as f:
                                w = csv.DictWriter(f, fieldnames=list(row))
                                if len(rows) == 1:
                                    w.writeheader()
                                w.writerow(row)
                            print(
                                f"{kind:5s} {provider:9s} {mode:8s} tokens={n_tok:6d} d={d:5d} r={r:3d}: "
                                f"{timing.median:9.3f} ms [{timing.p20:.3f}, {timing.p80:.3f}]"
                                + (f"  peak {peak:.0f} MB saved {saved:.0f} MB" if not math.isnan(peak) else ""),
                                flush=True,
                            )
                del x, state

    md_path = out_dir / f"bench_step_{tag}.md"
    md_path.write_text(_markdown(rows, name, args, interp and args.smoke))
    print(f"wrote {csv_path} and {md_path}")
    return exit_code


def _markdown(rows, name, args, interp) -> str:
    lines = [
        f"# SSMLoRA step benchmark: {name}",
        "",
        f"Command: `python benchmarks/bench_step.py {' '.join(sys.argv[1:])}`; torch {torch.__version__}. "
        f"SSMLoRA state dropout {args.state_dropout}; adapter weights (both methods): {args.adapter_dtype}. "
        "Times: median ms [p20, p80]; `a/b` columns are ratios of medians (> 1: b is faster).",
    ]
    if not name.startswith(("NVIDIA", "AMD")) and hasattr(os, "getloadavg"):
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
        lines.append(f"CPU load average at the end of the run: {load} (shared machine: CPU times are indicative).")
    if interp:
        lines.append("**Triton ran under TRITON_INTERPRET=1: its times are meaningless (this is a smoke run).**")
    for mode in ("full", "forward", "backward"):
        sel = [r for r in rows if r["mode"] == mode]
        if not sel:
            continue
        lines += ["", f"## {mode}", ""]
        for kind in ("step", "layer"):
            ks = [r for r in sel if r["kind"] == kind]
            if not ks:
                continue
            provs = list(dict.fromkeys(r["provider"] for r in ks))
            fast = "triton" if "triton" in provs else "eager"
            pairs = [("eager", "triton"), ("compile", "triton"), ("lora_p0", "triton")]
            if fast == "eager":
                pairs = [("eager", "compile"), ("lora_p0", "eager")]
            if kind == "layer":
                pairs.append(("linear", fast))
            head = (
                f"| {kind}: tokens | d | r | " + " | ".join(provs) + " | " + " | ".join(f"{a}/{b}" for a, b in pairs)
            )
            lines += [head + " |", "|" + "---|" * (head.count("|"))]
            shapes = list(dict.fromkeys((r["tokens"], r["d_in"], r["r"]) for r in ks))
            for tk, d, rr in shapes:
                cell = {r["provider"]: r for r in ks if (r["tokens"], r["d_in"], r["r"]) == (tk, d, rr)}
                vals = []
                for p in provs:
                    c = cell.get(p)
                    txt = f"{c['median_ms']:.3f} [{c['p20_ms']:.3f}, {c['p80_ms']:.3f}]" if c else "-"
                    if c and c["peak_mb"] != "":
                        txt += f" ({c['peak_mb']:.0f} MB)"
                    vals.append(txt)
                ratios = [
                    f"{cell[a]['median_ms'] / cell[b]['median_ms']:.2f}x" if a in cell and b in cell else "-"
                    for a, b in pairs
                ]
                lines.append(f"| {tk} | {d} | {rr} | " + " | ".join(vals + ratios) + " |")
    lines += [
        "",
        "Memory (GPU, full mode, in parentheses): peak MB of one forward+backward above the live inputs.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
