"""Fused Triton kernels for one SSMLoRA step, forward and backward.

Layering (as in Liger-Kernel): private `@triton.jit` kernels, host functions that reshape to 2-D, choose block
sizes and launch, a `torch.autograd.Function` on top, and `ssmlora_step_triton`, the entry point
`peft_ssmlora.step.ssmlora_step` calls. The math is `ssmlora_kernels.reference.ssmlora_step_reference`'s (the
oracle); see `ssmlora-method.md` for the backward formulas.

Forward (one pass over `x`, one GEMM epilogue over `(tokens, d_out)`)::

    kernel:   u = x A ; z = s + s C + u D ; n = minmax(z) ; v = u + dropout(n)      -> n (fp32), u (fp32), v
    torch:    base_out.addmm_(v, B_w.t(), alpha=scaling)                          # in place, cuBLAS epilogue

Backward::

    torch:    dv = G B_w                                                          # (tokens, r)
    kernel:   recompute z, n from u, s ; dn, dz, du, ds_prev, scaling·v ; partial dC, dD per program
    torch:    dB = Gᵀ (scaling·v) ; dA = duᵀ x ; dx = du A_w ; dC, dD = sum of partials (host, deterministic)

Only `x`, `u` (float32, `(tokens, r)`) and the incoming state are saved; `z`, `n`, the arg-min/arg-max and the
dropout mask are recomputed in the backward kernel (the mask from a seed, with the same counter-based RNG).
Forward and backward use the same block configuration and the same `_state_update` code, so that the recomputed
`z` is meant to be bit-identical to the forward one (and so are the arg-min/arg-max that route the gradient); the
kernel tests (exact ties included) pass under the interpreter and on an H100.

Precision: the state path (`s`, `z`, min/max, `n`, `v`, `dz`) is float32 whatever the input dtype. The `(tokens,
d)` matmuls run in the activation dtype (as under autocast): `x`'s dtype for `A`, `base_out`'s for `B`; weights of
another dtype are cast (they are small). Inside the kernels every load is upcast to float32 before arithmetic
(required under `TRITON_INTERPRET=1`, where bf16 values are raw bits), except that on a GPU the `x A` product of
16-bit `x` and `A` of the same dtype runs natively on tensor cores with float32 accumulation, and the float32
products (rank-r state products, float32 `x A`) use 3xTF32 on Ampere and newer (float32-level accuracy; IEEE FMA
dots made ptxas spill kilobytes per thread at r = 64). The interpreter computes all dots in IEEE float32.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError as _err:  # pragma: no cover - triton is a dependency on Linux
    raise ImportError(
        "The SSMLoRA Triton kernels need the `triton` package, which is not installed. Set PEFT_SSMLORA_IMPL=torch "
        "to use the PyTorch implementation, or install triton and run on CUDA tensors."
    ) from _err

__all__ = ["ssmlora_dropout_mask", "ssmlora_step_triton"]

# `triton.jit` decides at decoration time whether kernels run in the interpreter, so what matters is the value of
# TRITON_INTERPRET when this module was imported, not its value now.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------------------------------------------
# Device helpers (`@triton.jit`, inlined into the kernels)
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_rr_t(W, stride_w0, stride_w1, R, R_PAD: tl.constexpr):
    """Load `W` (r, r) transposed and zero-padded to (R_PAD, R_PAD), float32: tile[i, j] = W[j, i]."""
    i = tl.arange(0, R_PAD)
    mask = (i[:, None] < R) & (i[None, :] < R)
    ptrs = W + i[None, :].to(tl.int64) * stride_w0 + i[:, None].to(tl.int64) * stride_w1
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_rr(W, stride_w0, stride_w1, R, R_PAD: tl.constexpr):
    """Load `W` (r, r) zero-padded to (R_PAD, R_PAD), float32: tile[i, j] = W[i, j]."""
    i = tl.arange(0, R_PAD)
    mask = (i[:, None] < R) & (i[None, :] < R)
    ptrs = W + i[:, None].to(tl.int64) * stride_w0 + i[None, :].to(tl.int64) * stride_w1
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _keep_scale(seed, rows, cols, R, p, keep_scale):
    """Inverted-dropout multiplier (0 or `keep_scale`) for elements (rows, cols) of the (tokens, r) state.

    The Philox counter is the element's flat index `row * r + col` (int64), so the mask depends only on the seed and
    the element, never on block sizes or the launch grid: forward, backward and `ssmlora_dropout_mask` agree.
    """
    offs = rows[:, None] * R + cols[None, :]
    keep = tl.rand(seed, offs) >= p
    return tl.where(keep, keep_scale, 0.0)


@triton.jit
def _state_update(u, s, ct, dt, cols, R, eps, HAS_STATE: tl.constexpr, DOT_PREC: tl.constexpr):
    """z = s + s C + u D and its per-row min-max normalisation; returns (n, lo_index, hi_index, denominator).

    Padded rank columns are excluded from min/max (±inf) and give n = 0. min/max return the FIRST arg-min/arg-max
    on ties (`tie_break_left`), as the reference's `argmin`/`argmax` do.
    """
    z = tl.dot(u, dt, input_precision=DOT_PREC)
    if HAS_STATE:
        z += s + tl.dot(s, ct, input_precision=DOT_PREC)
    col_ok = (cols < R)[None, :]
    lo, i_lo = tl.min(
        tl.where(col_ok, z, float("inf")), axis=1, return_indices=True, return_indices_tie_break_left=True
    )
    hi, i_hi = tl.max(
        tl.where(col_ok, z, float("-inf")), axis=1, return_indices=True, return_indices_tie_break_left=True
    )
    den = hi - lo + eps
    # A true division (not a multiply by 1/den) keeps n bit-compatible with the reference's `(z - lo) / den`.
    n = tl.where(col_ok, (z - lo[:, None]) / den[:, None], 0.0)
    return n, i_lo, i_hi, den


# --------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _ssmlora_fwd_kernel(
    X, A, S, C, D,  # inputs: x (M, K), A_w (r, K), state (M, r), C_w (r, r), D_w (r, r)
    N, U, V,  # outputs: new state (M, r) fp32, u (M, r) fp32 (if STORE_U), v (M, r) in the B-side dtype
    M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr,
    stride_c0, stride_c1, stride_d0, stride_d1,
    stride_nm, stride_um, stride_vm,
    seed, p, keep_scale, eps,
    HAS_STATE: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_U: tl.constexpr, DOT_NATIVE: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
):  # fmt: skip
    """One program per BLOCK_M rows: reads its rows of `x` once and writes n, u and v for them."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < M
    cols = tl.arange(0, R_PAD).to(tl.int64)
    col_ok = cols < R
    ks = tl.arange(0, BLOCK_K).to(tl.int64)

    # u = x A, streaming x and A_w over K. A_w is (r, K): its (BLOCK_K, R_PAD) tile is the transposed slice.
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < K
        x = tl.load(
            X + rows[:, None] * stride_xm + kk[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        a = tl.load(
            A + cols[None, :] * stride_ar + kk[:, None] * stride_ak, mask=col_ok[None, :] & k_ok[:, None], other=0.0
        )
        if DOT_NATIVE:
            acc = tl.dot(x, a, acc)
        else:
            acc = tl.dot(x.to(tl.float32), a.to(tl.float32), acc, input_precision=DOT_PREC)
    u = acc

    ct = _load_rr_t(C, stride_c0, stride_c1, R, R_PAD)
    dt = _load_rr_t(D, stride_d0, stride_d1, R, R_PAD)
    s = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    if HAS_STATE:
        s = tl.load(
            S + rows[:, None] * stride_sm + cols[None, :] * stride_sr,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
    n, _, _, _ = _state_update(u, s, ct, dt, cols, R, eps, HAS_STATE, DOT_PREC)

    # leaky_relu is the identity in the forward: dropout(n) >= 0.
    if HAS_DROPOUT:
        v = u + n * _keep_scale(seed, rows, cols, R, p, keep_scale)
    else:
        v = u + n

    out_mask = row_ok[:, None] & col_ok[None, :]
    tl.store(N + rows[:, None] * stride_nm + cols[None, :], n, mask=out_mask)
    if STORE_U:
        tl.store(U + rows[:, None] * stride_um + cols[None, :], u, mask=out_mask)
    tl.store(V + rows[:, None] * stride_vm + cols[None, :], v.to(V.dtype.element_ty), mask=out_mask)


@triton.jit
def _ssmlora_bwd_kernel(
    DV, U, S, C, D, DN_NEXT,  # inputs: G B_w (M, r), u (M, r) fp32, state, C_w, D_w, grad of new state (M, r)
    DU, DS, VS, DC_PART, DD_PART,  # outputs: du (M, r), d(state) (M, r) fp32, scaling·v (M, r), partials (P, R_PAD, R_PAD)
    M, R, NUM_BLOCKS,
    stride_dvm, stride_dvr, stride_um, stride_sm, stride_sr,
    stride_c0, stride_c1, stride_d0, stride_d1, stride_gnm, stride_gnr,
    stride_dum, stride_dsm, stride_vsm,
    seed, p, keep_scale, scaling, slope, eps, grad_floor,
    HAS_STATE: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_DN_NEXT: tl.constexpr, STORE_DS: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, R_PAD: tl.constexpr,
):  # fmt: skip
    """Programs stride over row blocks, accumulating dC_w = Σ dzᵀ s and dD_w = Σ dzᵀ u in registers.

    Each program writes its float32 partial sums once; the host adds the partials in a fixed order, so the weight
    gradients are deterministic (no atomics).
    """
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    cols = tl.arange(0, R_PAD).to(tl.int64)
    col_ok = cols < R
    is_col = cols[None, :]

    ct = _load_rr_t(C, stride_c0, stride_c1, R, R_PAD)
    dt = _load_rr_t(D, stride_d0, stride_d1, R, R_PAD)
    d_mat = _load_rr(D, stride_d0, stride_d1, R, R_PAD)
    dc_acc = tl.zeros((R_PAD, R_PAD), dtype=tl.float32)
    dd_acc = tl.zeros((R_PAD, R_PAD), dtype=tl.float32)

    for blk in range(pid, NUM_BLOCKS, num_progs):
        rows = tl.cast(blk, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]

        u = tl.load(U + rows[:, None] * stride_um + cols[None, :], mask=mask, other=0.0)
        s = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        if HAS_STATE:
            s = tl.load(S + rows[:, None] * stride_sm + cols[None, :] * stride_sr, mask=mask, other=0.0).to(tl.float32)
        n, i_lo, i_hi, den = _state_update(u, s, ct, dt, cols, R, eps, HAS_STATE, DOT_PREC)

        dv = tl.load(DV + rows[:, None] * stride_dvm + cols[None, :] * stride_dvr, mask=mask, other=0.0).to(tl.float32)
        dv = dv * scaling
        # dn = dv ⊙ m ⊙ leaky_relu'(m ⊙ n): slope where the dropped state is 0 (the arg-min, and dropped entries).
        if HAS_DROPOUT:
            m = _keep_scale(seed, rows, cols, R, p, keep_scale)
            nd = n * m
            dn = dv * m * tl.where(nd > 0, 1.0, slope)
        else:
            nd = n
            dn = dv * tl.where(n > 0, 1.0, slope)
        if HAS_DN_NEXT:
            dn += tl.load(DN_NEXT + rows[:, None] * stride_gnm + cols[None, :] * stride_gnr, mask=mask, other=0.0).to(
                tl.float32
            )
        dn = tl.where(mask, dn, 0.0)

        # Backward of n = (z - z[i_lo]) / (z[i_hi] - z[i_lo] + eps), gradient routed to the first arg-min/max; the
        # denominator floored at grad_floor (0: exact), so that a flat state does not get a 1/eps gradient.
        s1 = tl.sum(dn, axis=1)
        s2 = tl.sum(dn * n, axis=1)
        dz = dn - tl.where(is_col == i_lo[:, None], (s1 - s2)[:, None], 0.0)
        dz = dz - tl.where(is_col == i_hi[:, None], s2[:, None], 0.0)
        dz = dz / tl.maximum(den, grad_floor)[:, None]
        dz = tl.where(mask, dz, 0.0)

        du = dv + tl.dot(dz, d_mat, input_precision=DOT_PREC)
        tl.store(DU + rows[:, None] * stride_dum + cols[None, :], du.to(DU.dtype.element_ty), mask=mask)
        if STORE_DS:
            ds = dz + tl.dot(dz, _load_rr(C, stride_c0, stride_c1, R, R_PAD), input_precision=DOT_PREC)
            tl.store(DS + rows[:, None] * stride_dsm + cols[None, :], ds, mask=mask)
        vs = (u + nd) * scaling
        tl.store(VS + rows[:, None] * stride_vsm + cols[None, :], vs.to(VS.dtype.element_ty), mask=mask)

        dz_t = tl.trans(dz)
        dd_acc += tl.dot(dz_t, u, input_precision=DOT_PREC)
        if HAS_STATE:
            dc_acc += tl.dot(dz_t, s, input_precision=DOT_PREC)

    i = tl.arange(0, R_PAD).to(tl.int64)
    offs = pid.to(tl.int64) * R_PAD * R_PAD + i[:, None] * R_PAD + i[None, :]
    tl.store(DC_PART + offs, dc_acc)
    tl.store(DD_PART + offs, dd_acc)


@triton.jit
def _dropout_mask_kernel(OUT, M, R, seed, p, keep_scale, BLOCK_M: tl.constexpr, R_PAD: tl.constexpr):
    """Materialise the state-dropout multipliers the step kernels use for `seed` (for tests and debugging)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.arange(0, R_PAD).to(tl.int64)
    m = _keep_scale(seed, rows, cols, R, p, keep_scale)
    tl.store(OUT + rows[:, None] * R + cols[None, :], m, mask=(rows < M)[:, None] & (cols < R)[None, :])


# --------------------------------------------------------------------------------------------------------------
# Host functions
# --------------------------------------------------------------------------------------------------------------


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and _INTERPRET:
        return
    if t.device.type == "cpu":
        raise RuntimeError(
            "The SSMLoRA Triton kernels got CPU tensors but the Triton interpreter is off (TRITON_INTERPRET=1 must "
            "be set before `ssmlora_kernels.triton_step` is imported). Set PEFT_SSMLORA_IMPL=torch to use the "
            "PyTorch implementation on CPU, or run on CUDA tensors."
        )
    raise RuntimeError(
        f"The SSMLoRA Triton kernels run on CUDA tensors only, got device {t.device}. Set PEFT_SSMLORA_IMPL=torch "
        "to use the PyTorch implementation."
    )


@functools.cache
def _cuda_info(index: int) -> tuple[int, int]:
    """(multiprocessor count, compute-capability major) of a CUDA device, cached: the query costs host time on
    every step, and the step is launch-bound at small token counts."""
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, props.major


def _block_config(M: int, K: int, r: int, device: torch.device, native_dot: bool = True) -> dict:
    """Small block-size heuristic (no autotuning: multi-config autotune cannot run under the interpreter).

    `tl.dot` needs every dimension >= 16, so r is padded to a power of two >= 16. Forward and backward share
    BLOCK_M (see the module docstring). On a GPU, BLOCK_M is the largest of 64/32/16 that still gives about two
    programs per SM (the forward streams `x`, so occupancy matters more than tile reuse; A_w is small and stays in
    L2), capped by r: the backward keeps about a dozen (BLOCK_M, R_PAD) float32 tiles and the (R_PAD, R_PAD)
    weight tiles and accumulators live, and ptxas (sm_90, Triton 3.9) reports heavy spills beyond BLOCK_M = 64 at
    R_PAD = 16, 32 at R_PAD = 32 and 16 at R_PAD = 64. The rank-r products use 3xTF32 on Ampere and newer
    (float32-level accuracy on tensor cores; IEEE FMA dots spill kilobytes per thread at r = 64).
    Under the interpreter, blocks are small so that tests with a few hundred rows still cover several blocks and
    partial blocks, and dots are IEEE float32.
    """
    r_pad = max(16, triton.next_power_of_2(r))
    if device.type != "cuda":
        return {"BLOCK_M": 32, "BLOCK_K": 64, "R_PAD": r_pad, "num_warps": 4, "bwd_programs": 3, "DOT_PREC": "ieee"}
    sms, major = _cuda_info(device.index if device.index is not None else torch.cuda.current_device())
    max_block_m = {16: 64, 32: 32}.get(r_pad, 16)
    block_m = 16
    for cand in (64, 32):
        if cand <= max_block_m and triton.cdiv(M, cand) >= 2 * sms:
            block_m = cand
            break
    # float32 x goes through 3xTF32 (three MMAs on split operands): smaller K tiles keep it out of spills.
    block_k = (128 if r_pad <= 32 else 64) if native_dot else 32
    block_k = min(block_k, max(16, triton.next_power_of_2(K)))
    num_warps = 8 if block_m * r_pad >= 1024 else 4
    prec = "tf32x3" if major >= 8 else "ieee"
    return {
        "BLOCK_M": block_m, "BLOCK_K": block_k, "R_PAD": r_pad, "num_warps": num_warps,
        "bwd_programs": 4 * sms, "DOT_PREC": prec,
    }  # fmt: skip


def _alloc(shape, device, dtype) -> torch.Tensor:
    """Uninitialised output buffer (one place, so that tests can poison every buffer the kernels must write)."""
    return torch.empty(shape, device=device, dtype=dtype)


def _rows_view(t: torch.Tensor) -> torch.Tensor | None:
    """`t` as a 2-D `(rows, last)` view sharing its storage, or `None` when its strides do not allow one."""
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return None


def _dropout_args(dropout_p: float) -> tuple[bool, float, float]:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return dropout_p > 0.0, float(dropout_p), 1.0 / (1.0 - dropout_p) if dropout_p > 0.0 else 1.0


def _draw_seed() -> int:
    """A dropout seed from torch's global CPU generator.

    Drawing it on the CPU avoids a GPU sync, and `torch.manual_seed` reproduces it, hence the mask. The seed is kept
    on the autograd node (not in a saved tensor), so the backward regenerates the forward's mask even when
    non-reentrant activation checkpointing recomputes the saved tensors.
    """
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _ssmlora_forward(x2, base2, s2, A_w, B_w, C_w, D_w, scaling, dropout_p, eps, seed, store_u):
    """Launch the forward kernel and add `scaling · v B` onto `base2` in place; returns `(n, u)` (u None if not stored).

    `x2` (M, K), `base2` (M, d_out) view of base_out (modified in place), `s2` (M, r) or None.
    """
    M, K = x2.shape
    r = A_w.shape[0]
    has_dropout, p, keep_scale = _dropout_args(dropout_p)
    n = _alloc((M, r), device=x2.device, dtype=torch.float32)
    u = _alloc((M, r), device=x2.device, dtype=torch.float32) if store_u else None
    v = _alloc((M, r), device=x2.device, dtype=base2.dtype)
    if M == 0:
        return n, u
    # On a GPU, 16-bit x and A of the same dtype go to tensor cores natively (exact products, fp32 accumulation).
    dot_native = x2.device.type == "cuda" and x2.dtype in (torch.float16, torch.bfloat16) and A_w.dtype == x2.dtype
    cfg = _block_config(M, K, r, x2.device, dot_native)
    has_state = s2 is not None
    s_arg = s2 if has_state else n  # never read when HAS_STATE is False
    grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
    _ssmlora_fwd_kernel[grid](
        x2, A_w, s_arg, C_w, D_w,
        n, u if store_u else n, v,
        M, K, r,
        x2.stride(0), x2.stride(1), A_w.stride(0), A_w.stride(1), s_arg.stride(0), s_arg.stride(1),
        C_w.stride(0), C_w.stride(1), D_w.stride(0), D_w.stride(1),
        n.stride(0), (u if store_u else n).stride(0), v.stride(0),
        seed, p, keep_scale, eps,
        HAS_STATE=has_state, HAS_DROPOUT=has_dropout, STORE_U=store_u, DOT_NATIVE=dot_native, DOT_PREC=cfg["DOT_PREC"],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], R_PAD=cfg["R_PAD"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    # The only pass over the (tokens, d_out) output: cuBLAS's epilogue adds alpha·(v B) onto base_out in place.
    base2.addmm_(v, B_w.to(base2.dtype).t(), alpha=scaling)
    return n, u


def _ssmlora_backward(
    g2, gn2, x2, u, s2, A_w, B_w, C_w, D_w, scaling, dropout_p, leaky_slope, eps, grad_floor, seed, need_ds, needs,
    x_shape,
):
    """Gradients `(dx, dA, dB, dC, dD, ds2)` from `g2 = dL/d out` (M, d_out) and `gn2 = dL/d new_state` or None;
    `dx` has `x_shape`.

    `needs` = (x, A, B, C, D) flags: matmuls for gradients nobody needs are skipped.
    """
    M, K = x2.shape
    r = A_w.shape[0]
    need_x, need_a, need_b, need_c, need_d = needs
    has_dropout, p, keep_scale = _dropout_args(dropout_p)
    cfg = _block_config(M, K, r, x2.device)
    r_pad = cfg["R_PAD"]
    num_blocks = triton.cdiv(M, cfg["BLOCK_M"])
    programs = max(1, min(num_blocks, cfg["bwd_programs"]))

    dv = torch.mm(g2, B_w.to(g2.dtype))  # (M, r): reads G once; the kernel applies `scaling`
    du = _alloc((M, r), device=x2.device, dtype=x2.dtype)
    vs = _alloc((M, r), device=x2.device, dtype=g2.dtype)
    ds = _alloc((M, r), device=x2.device, dtype=torch.float32) if need_ds else None
    dc_part = _alloc((programs, r_pad, r_pad), device=x2.device, dtype=torch.float32)
    dd_part = _alloc((programs, r_pad, r_pad), device=x2.device, dtype=torch.float32)
    has_state = s2 is not None
    s_arg = s2 if has_state else u
    gn_arg = gn2 if gn2 is not None else u
    if M > 0:
        _ssmlora_bwd_kernel[(programs,)](
            dv, u, s_arg, C_w, D_w, gn_arg,
            du, ds if need_ds else du, vs, dc_part, dd_part,
            M, r, num_blocks,
            dv.stride(0), dv.stride(1), u.stride(0), s_arg.stride(0), s_arg.stride(1),
            C_w.stride(0), C_w.stride(1), D_w.stride(0), D_w.stride(1), gn_arg.stride(0), gn_arg.stride(1),
            du.stride(0), (ds if need_ds else du).stride(0), vs.stride(0),
            seed, p, keep_scale, scaling, leaky_slope, eps, grad_floor,
            HAS_STATE=has_state, HAS_DROPOUT=has_dropout, HAS_DN_NEXT=gn2 is not None, STORE_DS=need_ds, DOT_PREC=cfg["DOT_PREC"],
            BLOCK_M=cfg["BLOCK_M"], R_PAD=r_pad, num_warps=cfg["num_warps"],
        )  # fmt: skip
    else:
        dc_part.zero_()
        dd_part.zero_()

    dx = None
    if need_x:
        # Allocated in x's shape and written through a 2-D view, never returned as a view: autograd adds the frozen
        # layer's input gradient onto a returned gradient in place only when it is not a view (a view costs one
        # more (tokens, d_in) buffer at the backward's peak memory).
        dx = _alloc(x_shape, device=x2.device, dtype=du.dtype)
        torch.mm(du, A_w.to(du.dtype), out=dx.view(M, K))
    dA = torch.mm(du.t(), x2).to(A_w.dtype) if need_a else None
    dB = torch.mm(g2.t(), vs).to(B_w.dtype) if need_b else None
    # Deterministic reduction of the per-program partials (a fixed-order sum on the device, no atomics).
    dC = dc_part.sum(0)[:r, :r].to(C_w.dtype) if need_c else None
    dD = dd_part.sum(0)[:r, :r].to(D_w.dtype) if need_d else None
    return dx, dA, dB, dC, dD, ds


# --------------------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------------------


class _SSMLoRAStepFunction(torch.autograd.Function):
    """`(out, new_state)` with `out` = `base_out` updated in place (marked dirty); both outputs differentiable."""

    @staticmethod
    def forward(ctx, x, base_out, state, A_w, B_w, C_w, D_w, scaling, dropout_p, leaky_slope, eps, grad_floor, seed):
        lead = x.shape[:-1]
        r = A_w.shape[0]
        x2 = x.reshape(-1, x.shape[-1])
        s2 = None if state is None else state.reshape(-1, r)
        base2 = _rows_view(base_out)
        with torch.autocast(device_type=x.device.type, enabled=False):
            if base2 is not None:
                n, u = _ssmlora_forward(x2, base2, s2, A_w, B_w, C_w, D_w, scaling, dropout_p, eps, seed, True)
            else:
                # Strides that allow no 2-D view: add through a contiguous copy (one extra pass, rare).
                tmp = base_out.reshape(-1, base_out.shape[-1]).clone()
                n, u = _ssmlora_forward(x2, tmp, s2, A_w, B_w, C_w, D_w, scaling, dropout_p, eps, seed, True)
                base_out.copy_(tmp.view(base_out.shape))
        ctx.mark_dirty(base_out)
        ctx.out_dtype = base_out.dtype
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x2, u, s2, A_w, B_w, C_w, D_w)
        ctx.cfg = (scaling, dropout_p, leaky_slope, eps, grad_floor, seed, lead, x.shape, None if state is None else state.shape)
        return base_out, n.view(*lead, r)

    @staticmethod
    def backward(ctx, grad_out, grad_state):
        x2, u, s2, A_w, B_w, C_w, D_w = ctx.saved_tensors
        scaling, dropout_p, leaky_slope, eps, grad_floor, seed, lead, x_shape, state_shape = ctx.cfg
        r = A_w.shape[0]
        d_out = B_w.shape[0]
        if grad_out is None:
            grad_out = torch.zeros((*lead, d_out), device=x2.device, dtype=ctx.out_dtype)
        g2 = grad_out.reshape(-1, d_out)
        gn2 = None if grad_state is None else grad_state.reshape(-1, r)
        need_ds = s2 is not None and ctx.needs_input_grad[2]
        needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[3:7])
        with torch.autocast(device_type=x2.device.type, enabled=False):
            dx, dA, dB, dC, dD, ds = _ssmlora_backward(
                g2, gn2, x2, u, s2, A_w, B_w, C_w, D_w, scaling, dropout_p, leaky_slope, eps, grad_floor, seed,
                need_ds, needs, x_shape,
            )
        dstate = None if ds is None else ds.view(state_shape)
        # base_out's gradient is G itself (out = base_out + delta); it flows on into the frozen layer.
        return dx, grad_out, dstate, dA, dB, dC, dD, None, None, None, None, None, None


def ssmlora_step_triton(
    x: torch.Tensor,
    base_out: torch.Tensor,
    state: torch.Tensor | None,
    A_w: torch.Tensor,
    B_w: torch.Tensor,
    C_w: torch.Tensor,
    D_w: torch.Tensor,
    *,
    scaling: float,
    dropout_p: float,
    leaky_slope: float,
    eps: float,
    detach_state: bool,
    grad_floor: float = 1e-3,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SSMLoRA step with the fused Triton kernels; same math as `ssmlora_step_reference`.

    Unlike the reference, `base_out` is updated IN PLACE and returned as `out` (no extra pass over `(tokens,
    d_out)`); it must not be needed elsewhere in its old value.

    Args:
        x (`torch.Tensor`): input of the frozen layer, `(..., d_in)`, any float dtype and strides.
        base_out (`torch.Tensor`): output of the frozen layer, `(..., d_out)`; modified in place.
        state (`torch.Tensor` or `None`): incoming state `(..., r)` (any float dtype), `None` at a chain start.
        A_w, B_w, C_w, D_w (`torch.Tensor`): adapter weights in `nn.Linear` layout: `(r, d_in)`, `(d_out, r)`,
            `(r, r)`, `(r, r)`.
        scaling (`float`): factor on the low-rank update.
        dropout_p (`float`): state-dropout probability to apply now (0 in eval mode), in `[0, 1)`.
        leaky_slope (`float`): negative slope of the leaky ReLU.
        eps (`float`): added to `max - min` in the normalisation.
        detach_state (`bool`): `True`: no gradient flows into `state`; `False`: `state`'s gradient is returned.
        grad_floor (`float`): the normalisation's backward divides by `max(max - min + eps, grad_floor)`; `0`: the
            exact gradient (see `ssmlora_kernels.reference`). The forward does not depend on it.
        seed (`int`, *optional*): dropout seed; drawn from torch's global CPU generator when `None`. With the same
            seed, `ssmlora_dropout_mask` materialises the mask used.

    Returns:
        `(out, new_state)`: `out` is `base_out` (updated), `new_state` the float32 state `(..., r)`.
    """
    for t in (x, base_out, A_w):
        _check_device(t)
    # Python floats only: Triton would type an int `scaling` (e.g. raw alpha = 16) as i32 and specialise the value 1.
    scaling, leaky_slope, eps, grad_floor = float(scaling), float(leaky_slope), float(eps), float(grad_floor)
    if state is not None and detach_state:
        state = state.detach()
    if dropout_p > 0.0 and seed is None:
        seed = _draw_seed()
    seed = 0 if seed is None else int(seed)
    if x.device.type == "cuda":
        with torch.cuda.device(x.device):
            return _dispatch(
                x, base_out, state, A_w, B_w, C_w, D_w, scaling, dropout_p, leaky_slope, eps, grad_floor, seed
            )
    return _dispatch(x, base_out, state, A_w, B_w, C_w, D_w, scaling, dropout_p, leaky_slope, eps, grad_floor, seed)


def _dispatch(x, base_out, state, A_w, B_w, C_w, D_w, scaling, dropout_p, leaky_slope, eps, grad_floor, seed):
    tensors = (x, base_out, state, A_w, B_w, C_w, D_w)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _SSMLoRAStepFunction.apply(
            x, base_out, state, A_w, B_w, C_w, D_w, scaling, dropout_p, leaky_slope, eps, grad_floor, seed
        )
    # Inference: no autograd node, no saved u.
    r = A_w.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    s2 = None if state is None else state.reshape(-1, r)
    base2 = _rows_view(base_out)
    with torch.autocast(device_type=x.device.type, enabled=False):
        if base2 is None:
            tmp = base_out.reshape(-1, base_out.shape[-1]).clone()
            n, _ = _ssmlora_forward(x2, tmp, s2, A_w, B_w, C_w, D_w, scaling, dropout_p, eps, seed, False)
            base_out.copy_(tmp.view(base_out.shape))
        else:
            n, _ = _ssmlora_forward(x2, base2, s2, A_w, B_w, C_w, D_w, scaling, dropout_p, eps, seed, False)
    return base_out, n.view(*x.shape[:-1], r)


def ssmlora_dropout_mask(
    seed: int, dropout_p: float, shape: tuple[int, ...], device: torch.device | str
) -> torch.Tensor:
    """The state-dropout multipliers (0 or `1/(1-p)`, float32, `shape` = `(..., r)`) the kernels use for `seed`.

    Feeding this mask to `ssmlora_step_reference(dropout_mask=...)` reproduces the Triton step under dropout.
    """
    device = torch.device(device)
    has_dropout, p, keep_scale = _dropout_args(dropout_p)
    out = _alloc(shape, device=device, dtype=torch.float32)
    if not has_dropout:
        return out.fill_(1.0)
    _check_device(out)
    r = shape[-1]
    M = out.numel() // max(r, 1)
    if M == 0:
        return out
    r_pad = max(16, triton.next_power_of_2(r))
    grid = (triton.cdiv(M, 32),)
    if device.type == "cuda":
        with torch.cuda.device(device):
            _dropout_mask_kernel[grid](out, M, r, int(seed), p, keep_scale, BLOCK_M=32, R_PAD=r_pad)
    else:
        _dropout_mask_kernel[grid](out, M, r, int(seed), p, keep_scale, BLOCK_M=32, R_PAD=r_pad)
    return out
