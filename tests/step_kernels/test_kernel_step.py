"""The fused Triton SSMLoRA step against the PyTorch reference (run by the Triton interpreter when there is no GPU).

Every case draws fresh random inputs, runs the reference (float32 internals, on the float32 upcast of the very
values the kernel sees) and the Triton step, and compares the output, the new state and every gradient (x, base_out,
A, B, C, D and, with `detach_state=False`, the incoming state). Each buffer the kernels allocate is poisoned with
NaN first, so an element a kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

from ssmlora_kernels import triton_step
from ssmlora_kernels.reference import ssmlora_step_reference
from ssmlora_kernels.triton_step import ssmlora_dropout_mask, ssmlora_step_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCALING = 2.0
SLOPE = 0.01
EPS = 1e-8

# Tolerance on max|kernel - reference| relative to max|reference| per tensor. Low-precision cases round dv = G B,
# du, v and the output to 16 bits (the reference sees the same 16-bit inputs but computes in float32).
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def poison_kernel_buffers(monkeypatch):
    """Every buffer the Triton host code allocates starts as NaN (or an absurd integer), so gaps fail loudly."""

    def poisoned(shape, device, dtype):
        t = torch.empty(shape, device=device, dtype=dtype)
        return t.fill_(float("nan")) if dtype.is_floating_point else t.fill_(-123456)

    monkeypatch.setattr(triton_step, "_alloc", poisoned)


def _inputs(tokens, d_in, d_out, r, dtype, *, with_state=True, weight_dtype=None, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    wdt = weight_dtype or dtype
    shape = (*lead, d_in) if lead else (tokens, d_in)
    rows = shape[:-1]

    def rnd(*s, std=1.0, dt=dtype):
        return (torch.randn(*s, generator=g) * std).to(device=DEVICE, dtype=dt)

    t = {
        "x": rnd(*shape),
        "base": rnd(*rows, d_out),
        "A": rnd(r, d_in, std=d_in**-0.5, dt=wdt),
        "B": rnd(d_out, r, std=r**-0.5, dt=wdt),
        "C": rnd(r, r, std=r**-0.5, dt=wdt),
        "D": rnd(r, r, std=r**-0.5, dt=wdt),
        # A previous module's state is a min-max normalised vector in [0, 1].
        "s": torch.rand(*rows, r, generator=g).to(DEVICE) if with_state else None,
        "G": rnd(*rows, d_out),
        "Gn": torch.randn(*rows, r, generator=g).to(DEVICE),
    }
    return t


def _run(impl, t, *, detach, dropout_p=0.0, seed=7, state_grad=True, upcast=False, dropout_mask=None, grad_floor=1e-3):
    """Forward + backward of one implementation; returns a dict of output, new state and gradients (float32)."""
    cast = (lambda v: v.float()) if upcast else (lambda v: v)
    # detach() (not clone()) keeps the strides of non-contiguous test inputs.
    leaves = {k: cast(t[k]).detach().requires_grad_(True) for k in ("x", "base", "A", "B", "C", "D")}
    s = None if t["s"] is None else t["s"].detach().requires_grad_(True)
    base = leaves["base"] * 1  # a non-leaf, as the frozen layer's output is (the Triton step writes into it)
    args = (leaves["x"], base, s, leaves["A"], leaves["B"], leaves["C"], leaves["D"])
    if impl == "reference":
        out, n = ssmlora_step_reference(
            *args, scaling=SCALING, leaky_slope=SLOPE, eps=EPS, dropout_mask=dropout_mask, detach_state=detach,
            grad_floor=grad_floor,
        )
    else:
        out, n = ssmlora_step_triton(
            *args, scaling=SCALING, dropout_p=dropout_p, leaky_slope=SLOPE, eps=EPS, detach_state=detach, seed=seed,
            grad_floor=grad_floor,
        )
        assert out is base, "the Triton step must return base_out itself (updated in place)"
    assert n.dtype == torch.float32
    loss = (out.float() * t["G"].float()).sum()
    if state_grad:
        loss = loss + (n * t["Gn"]).sum()
    loss.backward()
    res = {"out": out.detach().float(), "new_state": n.detach().float()}
    for k, v in leaves.items():
        res["d" + k] = v.grad.float()
    if s is not None:
        res["ds"] = s.grad
    return res


def _compare(got, want, tol):
    assert got.keys() == want.keys()
    for k in want:
        w, g = want[k], got[k]
        if w is None or g is None:
            assert w is None and g is None, f"{k}: one implementation has no gradient"
            continue
        assert g.shape == w.shape, k
        assert torch.isfinite(g).all(), f"{k}: non-finite values (unwritten or NaN)"
        scale = w.abs().max().item() or 1.0
        err = (g - w).abs().max().item()
        assert err <= tol * scale, f"{k}: max abs error {err:.3g} > {tol:g} * {scale:.3g}"


def _check(t, dtype, *, detach, dropout_p=0.0, state_grad=True, tol=None, grad_floor=1e-3):
    shape = (*t["x"].shape[:-1], t["A"].shape[0])
    mask = ssmlora_dropout_mask(7, dropout_p, shape, DEVICE) if dropout_p > 0 else None
    want = _run(
        "reference", t, detach=detach, upcast=True, dropout_mask=mask, state_grad=state_grad, grad_floor=grad_floor
    )
    got = _run("triton", t, detach=detach, dropout_p=dropout_p, seed=7, state_grad=state_grad, grad_floor=grad_floor)
    if t["s"] is not None and detach:
        assert want["ds"] is None and got["ds"] is None
    _compare(got, want, tol or TOL[dtype])
    return got, want


@pytest.mark.parametrize("r", [1, 8, 16, 64])
@pytest.mark.parametrize("tokens", [5, 70, 257])
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_float32_matches_reference(tokens, r, detach, dropout_p):
    # d_in = 100 spans two K blocks (the second partial); d_out != d_in.
    t = _inputs(tokens, 100, 48, r, torch.float32, seed=tokens * 131 + r)
    _check(t, torch.float32, detach=detach, dropout_p=dropout_p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("r", [8, 64])
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_half_precision_matches_reference(dtype, r, detach, dropout_p):
    t = _inputs(70, 40, 56, r, dtype, seed=r)
    _check(t, dtype, detach=detach, dropout_p=dropout_p)


def test_16bit_activations_with_float32_weights():
    # As under autocast with float32 master weights: the (tokens, d) matmuls run in the activation dtype.
    t = _inputs(70, 40, 56, 8, torch.bfloat16, weight_dtype=torch.float32, seed=3)
    got, _ = _check(t, torch.bfloat16, detach=False, dropout_p=0.1)


@pytest.mark.parametrize("detach", [True, False])
def test_chain_start_without_state(detach):
    t = _inputs(70, 40, 24, 8, torch.float32, with_state=False, seed=11)
    got, _ = _check(t, torch.float32, detach=detach)
    # The reference routes a zero state through C: C gets an exact zero gradient, not None.
    assert torch.equal(got["dC"], torch.zeros_like(got["dC"]))


def test_new_state_unused_gives_no_state_gradient_path():
    t = _inputs(70, 40, 24, 8, torch.float32, seed=12)
    _check(t, torch.float32, detach=False, state_grad=False)


def test_batched_and_non_contiguous_inputs():
    g = torch.Generator().manual_seed(5)
    b, q, d_in, d_out, r = 3, 23, 40, 24, 8
    t = _inputs(None, d_in, d_out, r, torch.float32, lead=(b, q), seed=5)
    # x: every other column of a wider tensor, seen through a transpose of the two leading dims (no 2-D view).
    wide = torch.randn(q, b, 2 * d_in, generator=g).to(DEVICE)
    t["x"] = wide[..., ::2].transpose(0, 1)
    assert not t["x"].is_contiguous()
    # state: a strided slice.
    t["s"] = torch.rand(b, q, 2 * r, generator=g).to(DEVICE)[..., 1::2]
    # A_w as the transpose of a (d_in, r) tensor.
    t["A"] = (torch.randn(d_in, r, generator=g).to(DEVICE) * d_in**-0.5).t()
    for detach in (True, False):
        _check(t, torch.float32, detach=detach, dropout_p=0.2)


@pytest.mark.parametrize("layout", ["sliced", "transposed"])
def test_base_out_updated_in_place(layout):
    t = _inputs(70, 40, 24, 8, torch.float32, seed=21)
    want = _run("reference", t, detach=True, upcast=True)
    x, s = t["x"], t["s"]
    if layout == "sliced":  # a view with a 2-D row view: the GEMM epilogue writes straight into it
        storage = torch.zeros(70, 30, device=DEVICE)
        base = storage[:, 3:27]
    else:  # no 2-D row view: the fallback through a copy must still update base_out itself
        storage = torch.zeros(10, 7, 24, device=DEVICE)
        base = storage.transpose(0, 1)
        x = x.view(10, 7, 40).transpose(0, 1)
        s = s.view(10, 7, 8).transpose(0, 1)
    base.copy_(t["base"].view(base.shape) if layout == "sliced" else t["base"].view(10, 7, 24).transpose(0, 1))
    with torch.no_grad():
        out, n = ssmlora_step_triton(
            x, base, s, t["A"], t["B"], t["C"], t["D"],
            scaling=SCALING, dropout_p=0.0, leaky_slope=SLOPE, eps=EPS, detach_state=True,
        )  # fmt: skip
    assert out is base
    got = base if layout == "sliced" else base.transpose(0, 1).reshape(70, 24)
    got_n = n if layout == "sliced" else n.transpose(0, 1).reshape(70, 8)
    torch.testing.assert_close(got, want["out"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_n, want["new_state"], rtol=1e-5, atol=1e-6)
    if layout == "sliced":  # the columns around the view are untouched
        assert not storage[:, :3].any() and not storage[:, 27:].any()


def test_expanded_upstream_gradient():
    # `out.sum()` hands the backward a stride-0 gradient.
    t = _inputs(40, 40, 24, 8, torch.float32, seed=31)
    res = {}
    for impl in ("reference", "triton"):
        x = t["x"].clone().requires_grad_(True)
        A = t["A"].clone().requires_grad_(True)
        base = t["base"].clone()
        args = (x, base, t["s"], A, t["B"], t["C"], t["D"])
        if impl == "reference":
            out, _ = ssmlora_step_reference(*args, scaling=SCALING, leaky_slope=SLOPE, eps=EPS)
        else:
            out, _ = ssmlora_step_triton(
                *args, scaling=SCALING, dropout_p=0.0, leaky_slope=SLOPE, eps=EPS, detach_state=True
            )
        out.sum().backward()
        res[impl] = (x.grad, A.grad)
    for got, want in zip(res["triton"], res["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_input_gradient_is_not_a_view():
    # Autograd adds the frozen layer's gradient of x onto the step's dx in place only when dx is not a view;
    # a view (as `dx2.view(x.shape)` gave) costs one more (tokens, d_in) buffer at the backward's peak (seen on
    # an H100: 512 MB instead of 384 MB for 16k tokens x 4096 in bf16).
    t = _inputs(None, 40, 40, 8, torch.float32, seed=37, lead=(3, 13))
    x = t["x"].clone().requires_grad_(True)
    A = t["A"].clone().requires_grad_(True)
    base = torch.nn.functional.linear(x, torch.eye(40, device=DEVICE))
    out, _ = ssmlora_step_triton(
        x, base, t["s"], A, t["B"], t["C"], t["D"], scaling=SCALING, dropout_p=0.0, leaky_slope=SLOPE, eps=EPS,
        detach_state=True,
    )  # fmt: skip
    seen = []  # facts only: holding the tensor itself would also block the in-place accumulation
    out.grad_fn.register_hook(lambda grad_in, grad_out: seen.append((grad_in[0]._base is None, grad_in[0].data_ptr())))
    out.backward(t["G"])
    ((not_a_view, dx_ptr),) = seen
    assert not_a_view
    assert x.grad.data_ptr() == dx_ptr, "the frozen layer's gradient was not accumulated in place"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_floored_normalisation_gradient_matches_reference(dtype, detach, dropout_p):
    # grad_floor = 10 lies above every row's max - min (< 3 here), so every row takes the floored backward.
    t = _inputs(37, 40, 24, 8, dtype, seed=1000 + 7 * int(detach) + int(dropout_p > 0))
    got, _ = _check(t, dtype, detach=detach, dropout_p=dropout_p, grad_floor=10.0)
    exact = _run("triton", t, detach=detach, dropout_p=dropout_p, grad_floor=0.0)
    assert torch.equal(got["out"], exact["out"]) and torch.equal(got["new_state"], exact["new_state"])
    assert (got["dD"] - exact["dD"]).abs().max() > 0.1 * exact["dD"].abs().max(), "the floor must be in effect"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("detach", [True, False])
def test_nearly_flat_states_match_reference(dtype, detach):
    # What training meets right after initialisation: C and D tiny, a chain-start (zero) or flat incoming state, so
    # max - min of z is far below the default floor (1e-3) but mostly above eps.
    t = _inputs(45, 40, 24, 8, dtype, seed=2000 + int(detach))
    t["C"] = t["C"] * 1e-5
    t["D"] = t["D"] * 1e-5
    t["s"] = torch.full_like(t["s"], 0.25)
    t["s"][:5] = 0.0
    # Loss-sized upstream gradients, so that float16 weight gradients (max 65504) stay finite.
    t["G"] = t["G"] * 0.01
    _, want = _check(t, dtype, detach=detach)
    exact = _run("reference", t, detach=detach, upcast=True, grad_floor=0.0)
    assert want["dD"].abs().max() * 5 < exact["dD"].abs().max(), "the floor must be in effect"


@pytest.mark.parametrize("detach", [True, False])
def test_ties_route_gradient_to_first_argmin_and_argmax(detach):
    # Integer-valued data: every product and sum is exact in float32, so the ties below are exact in both
    # implementations whatever their summation order.
    g = torch.Generator().manual_seed(0)
    tokens, d_in, d_out, r = 40, 32, 24, 8
    t = {
        "x": torch.randint(-2, 3, (tokens, d_in), generator=g).float(),
        "base": torch.randn(tokens, d_out, generator=g),
        "A": torch.randint(-1, 2, (r, d_in), generator=g).float(),
        "B": torch.randn(d_out, r, generator=g),
        "C": torch.randint(-1, 2, (r, r), generator=g).float(),
        "s": torch.randint(0, 3, (tokens, r), generator=g).float(),
        "G": torch.randn(tokens, d_out, generator=g),
        "Gn": torch.randn(tokens, r, generator=g),
    }
    D = torch.randint(-1, 2, (r, r), generator=g).float()
    D[5] = D[2]  # z[:, 5] == z[:, 2] wherever s[:, 5] == s[:, 2] and C[5] == C[2]
    D[6] = D[1]
    t["C"][5] = t["C"][2]
    t["C"][6] = t["C"][1]
    t["s"][:, 5] = t["s"][:, 2]
    t["s"][:, 6] = t["s"][:, 1]
    t["D"] = D
    t = {k: v.to(DEVICE) for k, v in t.items()}
    D = t["D"]
    z = t["s"] + t["s"] @ t["C"].T + (t["x"] @ t["A"].T) @ D.T
    lo, hi = z.min(-1, keepdim=True).values, z.max(-1, keepdim=True).values
    assert ((z == lo).sum(-1) > 1).sum() >= 5, "the data must contain tied minima"
    assert ((z == hi).sum(-1) > 1).sum() >= 5, "the data must contain tied maxima"
    got, want = _check(t, torch.float32, detach=detach)
    # The test is sensitive to the routing: amin/amax (which split the gradient among ties) give another dD.
    D_split = D.clone().requires_grad_(True)
    u = t["x"] @ t["A"].T
    z = t["s"] + t["s"] @ t["C"].T + u @ D_split.T
    lo, hi = z.amin(-1, keepdim=True), z.amax(-1, keepdim=True)
    n = (z - lo) / (hi - lo + EPS)
    v = u + torch.nn.functional.leaky_relu(n, SLOPE)
    loss = ((t["base"] + SCALING * v @ t["B"].T) * t["G"]).sum() + (n * t["Gn"]).sum()
    loss.backward()
    assert (D_split.grad - got["dD"]).abs().max() > 1e-3 * got["dD"].abs().max()


def test_dropout_mask_is_a_function_of_the_seed():
    shape = (70, 8)
    m1 = ssmlora_dropout_mask(123, 0.25, shape, DEVICE)
    m2 = ssmlora_dropout_mask(123, 0.25, shape, DEVICE)
    m3 = ssmlora_dropout_mask(124, 0.25, shape, DEVICE)
    assert torch.equal(m1, m2)
    assert not torch.equal(m1, m3)
    kept = m1[m1 != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / 0.75))
    frac = (m1 == 0).float().mean().item()
    assert 0.15 < frac < 0.35, frac
    # The mask of an element depends on its (row, column) only, not on the shape it was launched with.
    assert torch.equal(ssmlora_dropout_mask(123, 0.25, (10, 7, 8), DEVICE).view(70, 8), m1)


def _step_out(t, seed, p=0.3):
    with torch.no_grad():
        out, n = ssmlora_step_triton(
            t["x"], t["base"].clone(), t["s"], t["A"], t["B"], t["C"], t["D"],
            scaling=SCALING, dropout_p=p, leaky_slope=SLOPE, eps=EPS, detach_state=True, seed=seed,
        )  # fmt: skip
    return out


def test_dropout_same_seed_same_result_and_global_generator():
    t = _inputs(70, 40, 24, 8, torch.float32, seed=41)
    assert torch.equal(_step_out(t, 5), _step_out(t, 5))
    assert not torch.equal(_step_out(t, 5), _step_out(t, 6))
    # seed=None draws from torch's global generator: torch.manual_seed reproduces the mask.
    torch.manual_seed(0)
    a = _step_out(t, None)
    torch.manual_seed(0)
    b = _step_out(t, None)
    c = _step_out(t, None)
    assert torch.equal(a, b)
    assert not torch.equal(b, c)
    # Without dropout the seed is irrelevant.
    assert torch.equal(_step_out(t, 5, p=0.0), _step_out(t, 6, p=0.0))


def test_dropout_mask_regenerated_in_backward_matches_forward():
    # Forward and backward must use the same mask: with seed drawn from the global generator between two
    # unrelated draws, gradients still match the reference fed the mask of the recorded seed.
    t = _inputs(70, 40, 24, 8, torch.float32, seed=43)
    torch.manual_seed(3)
    seed = triton_step._draw_seed()
    mask = ssmlora_dropout_mask(seed, 0.3, (70, 8), DEVICE)
    want = _run("reference", t, detach=False, upcast=True, dropout_mask=mask)
    torch.manual_seed(3)
    got = _run("triton", t, detach=False, dropout_p=0.3, seed=None)
    _compare(got, want, TOL[torch.float32])


def test_no_tokens():
    t = _inputs(0, 40, 24, 8, torch.float32, seed=1)
    got = _run("triton", t, detach=False)
    assert got["out"].shape == (0, 24) and got["new_state"].shape == (0, 8)
    assert torch.equal(got["dA"], torch.zeros_like(got["dA"]))
    assert torch.equal(got["dC"], torch.zeros_like(got["dC"]))


def test_inference_path_matches_and_saves_nothing():
    t = _inputs(70, 40, 24, 16, torch.float32, seed=51)
    want = _run("reference", t, detach=True, upcast=True)
    with torch.no_grad():
        out, n = ssmlora_step_triton(
            t["x"], t["base"].clone(), t["s"], t["A"], t["B"], t["C"], t["D"],
            scaling=SCALING, dropout_p=0.0, leaky_slope=SLOPE, eps=EPS, detach_state=True,
        )  # fmt: skip
    assert out.grad_fn is None and n.grad_fn is None
    _compare({"out": out, "new_state": n}, {k: want[k] for k in ("out", "new_state")}, TOL[torch.float32])


def test_cpu_tensors_without_interpreter_raise_an_actionable_error(monkeypatch):
    monkeypatch.setattr(triton_step, "_INTERPRET", False)
    t = _inputs(8, 16, 16, 4, torch.float32)
    cpu = {k: (v.cpu() if v is not None else None) for k, v in t.items()}
    with pytest.raises(RuntimeError, match="PEFT_SSMLORA_IMPL=torch"):
        ssmlora_step_triton(
            cpu["x"], cpu["base"], cpu["s"], cpu["A"], cpu["B"], cpu["C"], cpu["D"],
            scaling=1.0, dropout_p=0.0, leaky_slope=SLOPE, eps=EPS, detach_state=True,
        )  # fmt: skip


def test_dispatch_through_ssmlora_step(monkeypatch):
    from peft_ssmlora.step import ssmlora_step

    t = _inputs(70, 40, 24, 8, torch.float32, seed=61)
    kwargs = dict(scaling=SCALING, dropout_p=0.0, leaky_slope=SLOPE, eps=EPS, detach_state=True)
    outs = {}
    for impl in ("torch", "triton"):
        monkeypatch.setenv("PEFT_SSMLORA_IMPL", impl)
        with torch.no_grad():
            outs[impl] = ssmlora_step(t["x"], t["base"].clone(), t["s"], t["A"], t["B"], t["C"], t["D"], **kwargs)
    torch.testing.assert_close(outs["triton"][0], outs["torch"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["triton"][1], outs["torch"][1], rtol=1e-5, atol=1e-6)
    # Forced onto CPU tensors without the interpreter, the dispatch surfaces the kernel's actionable error.
    monkeypatch.setattr(triton_step, "_INTERPRET", False)
    if DEVICE == "cpu":
        with pytest.raises(RuntimeError, match="PEFT_SSMLORA_IMPL=torch"):
            ssmlora_step(t["x"], t["base"].clone(), t["s"], t["A"], t["B"], t["C"], t["D"], **kwargs)


@pytest.mark.parametrize("preserve_rng_state", [True, False])
def test_activation_checkpointing_uses_the_forward_dropout_mask(preserve_rng_state):
    # Non-reentrant checkpointing keeps the autograd node (and the seed stored on it) and recomputes only saved
    # tensors (x, u, state, which do not depend on the mask): the backward uses the forward's mask whether or not
    # the RNG state is restored, and the gradients equal those of a plain run.
    from torch.utils.checkpoint import checkpoint

    t = _inputs(70, 40, 24, 8, torch.float32, seed=71)
    W = torch.randn(24, 40, generator=torch.Generator().manual_seed(0)).to(DEVICE)

    def layer(x, A, B, C, D):
        out, n = ssmlora_step_triton(
            x, x @ W.T, t["s"], A, B, C, D,
            scaling=SCALING, dropout_p=0.3, leaky_slope=SLOPE, eps=EPS, detach_state=True,
        )  # fmt: skip
        return out, n

    grads = []
    for use_ckpt in (False, True):
        leaves = [t[k].clone().requires_grad_(True) for k in ("x", "A", "B", "C", "D")]
        torch.manual_seed(9)
        if use_ckpt:
            out, n = checkpoint(layer, *leaves, use_reentrant=False, preserve_rng_state=preserve_rng_state)
        else:
            out, n = layer(*leaves)
        torch.manual_seed(1234)  # the RNG moves on before backward, as it would in training
        ((out * t["G"]).sum() + (n * t["Gn"]).sum()).backward()
        grads.append([v.grad for v in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
