"""Benchmark of the SSMLoRA step and of the real SSMLoRA-adapted linear layer (prints numbers; not a test).

Providers
    step  (`kind=step`, the adapter update alone, given `base_out`):
        eager      `ssmlora_step_reference` (+ state-dropout mask drawn with torch.rand)
        compile    `torch.compile` of the same function
        triton     `ssmlora_step_triton` (GPU only; in place on base_out)
        lora_p0    LoRA's update alone, `base_out + s·B(A x)` (peft's formula, dropout 0), for scale
    layer (`kind=layer`, frozen `nn.Linear` + adapter, both methods built by `get_peft_model` as users build them):
        eager, compile, triton   `peft_ssmlora.Linear` mid-chain (position 1 of a 3-layer chain, reading the float32
                                 state its predecessor wrote), with `PEFT_SSMLORA_IMPL=torch` (eager; `compile`:
                                 the layer under `torch.compile`) or `=triton`. This is the layer users run, with its
                                 per-call overhead (chain context, implementation lookup).
        lora_p0, lora_p0.1       peft's LoRA `Linear` (lora_dropout 0 and 0.1)
        linear                   the frozen `nn.Linear` alone (the floor)

Modes: forward, backward (of a retained graph), full (forward + backward). Median and 20/80 percentiles in ms
(`triton.testing.do_bench` on GPU, a timer loop on CPU), and on GPU the peak memory of one full step above the
inputs (`peak_mb`) and the memory held between forward and backward (`saved_mb`).

On a GPU the Triton path is first checked against the reference at every (d, r) of the grid; if any check fails
the Triton timings are not taken and the script exits with status 1 (no speed-up is ever reported for a kernel
that is wrong).

Usage::

    python -m benchmarks.speed step                    # GPU: bf16, d {1024, 4096}, r {8, 16, 64}, tokens {4k, 16k, 32k}
    python -m benchmarks.speed step --quick            # GPU: the target shape only (d 4096, r 16, tokens 4k..32k)
    python -m benchmarks.speed step --device cpu       # CPU: small fp32 shapes, eager vs compile vs LoRA
    TRITON_INTERPRET=1 python -m benchmarks.speed step --device cpu --smoke   # exercises every code path, tiny

Results go to `--out-dir` (default `benchmarks/speed/results/step/<device>`): one run-store JSON per shape
(d, r, tokens) named `<tag>-d<d>-r<r>-t<tokens>.json` (a rerun with the same identity skips the shape, so a run cut
off by a time limit continues where it stopped; `--force` measures again), and, rebuilt after every shape from all
of the tag's JSONs, `bench_step_<tag>.csv` (long form: one row per kind/provider/mode/shape, with the device) and
`bench_step_<tag>.md` (tables with speed-ups).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch._functorch.config as torch_functorch_config
import torch.nn as nn

from benchmarks.harness.adapters import add_adapter, ssmlora_impl
from benchmarks.harness.cli import positive_int
from benchmarks.harness.environment import device_name, device_tag, host_info
from benchmarks.harness.identity import arguments_of, run_identity
from benchmarks.harness.report import csv_text
from benchmarks.harness.store import RunStore, write_text_atomic
from ssmlora_kernels.reference import ssmlora_step_reference

RESULTS_DIR = Path(__file__).resolve().parent / "results"

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


def lora_update(x, base_out, A_w, B_w):
    return base_out + (x @ A_w.t()) @ B_w.t() * SCALING


class LinearStack(nn.Module):
    """`layers.0 .. layers.{n-1}`: frozen square `nn.Linear`s applied in turn (one chain for SSMLoRA)."""

    def __init__(self, d: int, n: int, device, dtype):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d, device=device, dtype=dtype) for _ in range(n))
        self.requires_grad_(False)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def adapted_layer(method: str, d: int, r: int, p: float, x: torch.Tensor, adapter_dtype) -> nn.Module:
    """The middle layer of a 3-layer stack adapted by `method` ("lora" or "ssmlora") through `get_peft_model`.

    For SSMLoRA a forward call of the model is opened (what the model's pre-hook does) and left open, and the first
    layer runs in it, so that every timed call of the middle layer reads the float32 state its predecessor wrote
    (an open call with gradients on keeps it), exactly as inside a model: a layer called outside a forward call of
    its model is refused. `get_peft_model` upcasts 16-bit adapter
    weights to float32 by default (`autocast_adapter_dtype=True`); with `adapter_dtype` equal to the model's dtype
    that upcast is switched off, for both methods.
    """
    stack = LinearStack(d, 3, x.device, x.dtype)
    upcast = adapter_dtype == torch.float32 and x.dtype != torch.float32
    targets = r"layers\.\d+"
    if method == "lora":
        model = add_adapter(stack, "lora", r=r, alpha=2 * r, lora_dropout=p, target_modules=targets,
                            autocast_adapter_dtype=upcast)
        layer = model.base_model.model.layers[1]
        nn.init.normal_(layer.lora_B["default"].weight, std=0.02)  # non-zero B, as after some training
        weight = layer.lora_A["default"].weight
    else:
        # init_weights=False: B, C, D random too (as after some training), so that no path is trivially zero
        model = add_adapter(stack, "ssmlora", r=r, alpha=2 * r, state_dropout=p, target_modules=targets,
                            init_weights=False, autocast_adapter_dtype=upcast)
        layer = model.base_model.model.layers[1]
        weight = layer.ssmlora_A["default"].weight
        with torch.no_grad():
            for name in ("ssmlora_B", "ssmlora_C", "ssmlora_D"):
                getattr(layer, name)["default"].weight.mul_(0.1)  # moderate values: no overflow in bf16
    assert weight.dtype == adapter_dtype, (weight.dtype, adapter_dtype)
    model.train()
    if method == "ssmlora":
        model.base_model.chain_context.open_call()
        model.base_model.model.layers[0](x.detach())  # writes the state the middle layer reads
    return layer


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
        return device_name(device)
    return f"{device_name(device)} ({torch.get_num_threads()} threads)"


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

    if provider == "compile":
        # One compiled layer per shape, shared by the modes (each new module would be compiled again).
        key = ("layer", d, r, tuple(x.shape), wdt, p)
        if key not in compiled_cache:
            layer = adapted_layer("ssmlora", d, r, p, x, wdt)
            compiled_cache[key] = (torch.compile(layer), [w for w in layer.parameters() if w.requires_grad])
        layer, params = compiled_cache[key]
    elif provider in ("eager", "triton"):
        layer = adapted_layer("ssmlora", d, r, p, x, wdt)
        params = [w for w in layer.parameters() if w.requires_grad]
    elif provider.startswith("lora_p"):
        layer = adapted_layer("lora", d, r, float(provider[len("lora_p") :]), x, wdt)
        params = [w for w in layer.parameters() if w.requires_grad]
    elif provider == "linear":
        layer, params = nn.Linear(d, d, device=device, dtype=dtype).requires_grad_(False), []
    else:
        raise ValueError(provider)
    return (lambda: (layer(x), g_out)), [x, *params]


# The SSMLoRA layer providers and the step implementation each one runs.
LAYER_IMPL = {"eager": "torch", "compile": "torch", "triton": "triton"}


def bench_one(kind, provider, mode, x, d, r, dtype, wdt, device, p, state, args, compiled_cache):
    with ssmlora_impl(LAYER_IMPL.get(provider) if kind == "layer" else None):
        return _bench_one(kind, provider, mode, x, d, r, dtype, wdt, device, p, state, args, compiled_cache)


def _bench_one(kind, provider, mode, x, d, r, dtype, wdt, device, p, state, args, compiled_cache):
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
    ap.add_argument("--out-dir", default=None, help="default: benchmarks/speed/results/step/<device>")
    ap.add_argument("--force", action="store_true", help="measure shapes again even when stored with this identity")
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
    ap.add_argument("--dims", type=positive_int, nargs="*", default=None)
    ap.add_argument("--ranks", type=positive_int, nargs="*", default=None)
    ap.add_argument("--tokens", type=positive_int, nargs="*", default=None)
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
    tag = args.tag or ("smoke" if args.smoke else device_tag(device))
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

    out_dir = Path(args.out_dir or RESULTS_DIR / "step" / device_tag(device))
    store = RunStore(out_dir)
    settings = arguments_of(args, NOT_IDENTITY)
    settings.update(device_name=name, dtype=str(dtype), adapter_dtype=str(wdt), use_triton=use_triton,
                    use_compile=use_compile)
    compiled_cache: dict = {}
    for d in dims:
        for r in ranks:
            for n_tok in tokens:
                run = f"{tag}-d{d}-r{r}-t{n_tok}"
                identity = run_identity({**settings, "d": d, "r": r, "tokens": n_tok}, runner=__spec__.name)
                if not args.force and not store.needs_run(run, identity):
                    continue
                torch.manual_seed(0)
                x = torch.randn(n_tok, d, device=device, dtype=dtype, requires_grad=True)
                state = torch.rand(n_tok, r, device=device, dtype=torch.float32)
                rows = [measure(kind, provider, mode, x, d, r, dtype, wdt, device, state, name, args, compiled_cache)
                        for kind in args.kinds for provider in _providers(kind, device, use_triton, use_compile)
                        for mode in args.modes]
                del x, state
                # Stored shape by shape, so that a run cut off by a time limit keeps (and later skips) what it measured.
                store.save(run, {"tag": tag, "rows": rows, "host": host_info()}, identity)
                write_tables(store, tag, name, args, interp and args.smoke)
    csv_path, md_path = write_tables(store, tag, name, args, interp and args.smoke)
    print(f"wrote {csv_path} and {md_path}")
    return exit_code


# Arguments that do not change a measurement (where it is written, whether to redo it).
NOT_IDENTITY = ("out_dir", "force")


def measure(kind, provider, mode, x, d, r, dtype, wdt, device, state, name, args, compiled_cache) -> dict:
    """One long-form CSV row: the timing (and on GPU the memory) of one provider in one mode at one shape."""
    timing, peak, saved = bench_one(kind, provider, mode, x, d, r, dtype, wdt, device, args.state_dropout, state,
                                    args, compiled_cache)
    n_tok = x.shape[0]
    print(f"{kind:5s} {provider:9s} {mode:8s} tokens={n_tok:6d} d={d:5d} r={r:3d}: "
          f"{timing.median:9.3f} ms [{timing.p20:.3f}, {timing.p80:.3f}]"
          + (f"  peak {peak:.0f} MB saved {saved:.0f} MB" if not math.isnan(peak) else ""), flush=True)
    return {
        "device": name, "kind": kind, "provider": provider, "mode": mode, "dtype": str(dtype).replace("torch.", ""),
        "adapter_dtype": str(wdt).replace("torch.", ""), "tokens": n_tok, "d_in": d, "d_out": d, "r": r,
        "state_dropout": args.state_dropout if provider in ("eager", "compile", "triton") else "",
        "median_ms": round(timing.median, 4), "p20_ms": round(timing.p20, 4), "p80_ms": round(timing.p80, 4),
        "peak_mb": "" if math.isnan(peak) else round(peak, 1), "saved_mb": "" if math.isnan(saved) else round(saved, 1),
    }


def write_tables(store: RunStore, tag: str, name: str, args, interp: bool) -> tuple[Path, Path]:
    """`bench_step_<tag>.csv` and `.md` from every stored shape of this tag (atomically)."""
    rows = [row for run in store.load(where=lambda run: run.get("tag") == tag) for row in run["rows"]]
    csv_path = write_text_atomic(store.folder / f"bench_step_{tag}.csv", csv_text(rows))
    md_path = write_text_atomic(store.folder / f"bench_step_{tag}.md", _markdown(rows, name, args, interp))
    return csv_path, md_path


def _markdown(rows, name, args, interp) -> str:
    lines = [
        f"# SSMLoRA step benchmark: {name}",
        "",
        f"Command: `python -m benchmarks.speed step {' '.join(sys.argv[1:])}`; torch {torch.__version__}. "
        f"SSMLoRA state dropout {args.state_dropout}; adapter weights (both methods): {args.adapter_dtype}. "
        "Layer rows: the real `peft_ssmlora.Linear` and peft's LoRA `Linear`, both built by `get_peft_model`. "
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
