"""PyTorch reference of one SSMLoRA step: the oracle for the Triton kernel and the CPU path of the tuner.

Math (row vectors; weights in peft's `nn.Linear` layout, i.e. `A_w = Aᵀ` of shape `(r, d_in)`, `B_w = Bᵀ` of
shape `(d_out, r)`, `C_w = Cᵀ` and `D_w = Dᵀ` of shape `(r, r)`)::

    u  = x A
    z  = s + s C + u D
    n  = (z - min_r z) / (max_r z - min_r z + eps)        # per token, over the rank axis
    v  = u + leaky_relu(dropout(n), leaky_slope)
    y  = base_out + scaling · v B                          # n is the state handed to the next module of the chain

The state math (`s`, `z`, min/max, `n`, `v`) runs in float32 whatever the input dtype: bf16 rounding wrecks the
min-max normalisation and fp16 flushes `eps = 1e-8` to zero. `min`/`max` route their gradient to the *first*
arg-min/arg-max only (the Triton kernel does the same); `torch.amin/amax` would split it among ties.

The gradient of `n` scales with `1 / (max - min + eps)`: where a token's state is flat across the rank axis (every
chain at initialisation, as B = C = D = 0) that is `1 / eps`, so with `eps = 1e-8` the first updates of D carry
gradients a billion times the usual size and, under global gradient clipping, starve every other parameter. The
backward therefore divides by `max(max - min + eps, grad_floor)` instead (`grad_floor = 1e-3` by default; `0`
gives the exact gradient): the forward is the paper's everywhere, and the gradient is the exact one wherever the
range is at least `grad_floor`; below it, it is the exact gradient scaled by `(max - min + eps) / grad_floor`,
bounded and independent of `eps`. The normalised state lies in `[0, 1]`, so the floor reads in that unit: a
state whose entries span less than 0.1 % of it is treated as flat by the gradient.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def ssmlora_step_reference(
    x: torch.Tensor,
    base_out: torch.Tensor,
    state: torch.Tensor | None,
    A_w: torch.Tensor,
    B_w: torch.Tensor,
    C_w: torch.Tensor,
    D_w: torch.Tensor,
    *,
    scaling: float,
    leaky_slope: float = 0.01,
    eps: float = 1e-8,
    grad_floor: float = 1e-3,
    dropout_mask: torch.Tensor | None = None,
    detach_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SSMLoRA step in plain PyTorch, differentiable by autograd.

    Args:
        x (`torch.Tensor`): input of the frozen layer, shape `(..., d_in)`.
        base_out (`torch.Tensor`): output of the frozen layer for `x`, shape `(..., d_out)`; not modified.
        state (`torch.Tensor` or `None`): incoming state `s`, shape `(..., r)`; `None` means zeros (chain start).
        A_w, B_w, C_w, D_w (`torch.Tensor`): adapter weights in `nn.Linear` layout (see the module docstring).
        scaling (`float`): factor on the low-rank update.
        leaky_slope (`float`): negative slope of the leaky ReLU (only its gradient matters, as `n ≥ 0`).
        eps (`float`): added to `max - min` in the normalisation.
        grad_floor (`float`): the normalisation's backward divides by `max(max - min + eps, grad_floor)`: a
            bounded gradient where the state is (nearly) flat; `0`: the exact gradient, as in the paper. The
            forward does not depend on it.
        dropout_mask (`torch.Tensor` or `None`): multiplicative mask on `n` (entries 0 or `1/(1-p)`), broadcastable
            to `(..., r)`; `None` means no dropout.
        detach_state (`bool`): `True` (the paper): the incoming state carries values but no gradient.

    Returns:
        `(out, new_state)`: `out = base_out + scaling · v B` in `base_out`'s dtype, and the state `n` in float32
        (float64 for float64 inputs).
    """
    u = F.linear(_as_dtype(x, A_w.dtype), A_w)
    # The state path runs in at least float32 (float64 for float64 inputs, so that `torch.autograd.gradcheck` can
    # check this function), and must stay there even under an enclosing autocast region.
    sdt = torch.promote_types(u.dtype, torch.float32)
    with _autocast_off(x.device.type):
        u32 = _as_dtype(u, sdt)
        # A zero state still goes through C, so that C receives a (zero) gradient at a chain start: DDP requires
        # every trainable parameter to take part in the loss.
        s = u32.new_zeros(u32.shape) if state is None else _as_dtype(state, sdt)
        if detach_state:
            s = s.detach()
        z = s + F.linear(s, C_w.to(sdt)) + F.linear(u32, D_w.to(sdt))
        lo = z.gather(-1, z.argmin(dim=-1, keepdim=True))
        hi = z.gather(-1, z.argmax(dim=-1, keepdim=True))
        denominator = hi - lo + eps
        n = (z - lo) / denominator
        if grad_floor > 0 and n.requires_grad:
            # Same value; the gradient times denominator / max(denominator, grad_floor) (exactly 1 at or above the
            # floor), i.e. the backward divides by the floored denominator (see the module docstring).
            grad_scale = (denominator / denominator.clamp_min(grad_floor)).detach()
            n = n.detach() + (n - n.detach()) * grad_scale
        dropped = n if dropout_mask is None else n * dropout_mask.to(n.dtype)
        v = u32 + F.leaky_relu(dropped, negative_slope=leaky_slope)
    delta = F.linear(_as_dtype(v, B_w.dtype), B_w) * scaling
    return base_out + _as_dtype(delta, base_out.dtype), n


def _as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t.to(dtype)` without the call when the dtype already matches (a call per tensor per step adds up at decode)."""
    return t if t.dtype == dtype else t.to(dtype)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled for the block: a real context only where autocast is on (entering one costs microseconds)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def ssmlora_step_inference(
    x: torch.Tensor,
    base_out: torch.Tensor,
    state: torch.Tensor | None,
    A_w: torch.Tensor,
    B_w: torch.Tensor,
    C_w: torch.Tensor,
    D_w: torch.Tensor,
    *,
    scaling: float,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ssmlora_step_reference` without dropout for calls that autograd does not record (generation, evaluation):
    the same values in the same operation order, with about half of the operations.

    What it leaves out changes no value: dtype casts where the dtype already matches; the autocast guard (callers
    take this path only outside autocast); `s + s C` at a chain start (exact zeros); min/max as `aminmax` (the same
    values; only the reference's gradient routing to the first arg-min/arg-max needs `argmin` + `gather`); the leaky
    ReLU (the identity on `n ≥ 0`); fresh tensors for intermediates nothing else reads (updated in place).
    """
    u = F.linear(_as_dtype(x, A_w.dtype), A_w)
    sdt = torch.float64 if u.dtype == torch.float64 else torch.float32  # the reference's promote_types(u, float32)
    u_s = _as_dtype(u, sdt)
    if state is None:
        z = F.linear(u_s, _as_dtype(D_w, sdt))
    else:
        s = _as_dtype(state, sdt)
        # (s + s C) + u D, summed in the reference's order.
        z = F.linear(s, _as_dtype(C_w, sdt)).add_(s).add_(F.linear(u_s, _as_dtype(D_w, sdt)))
    lo, hi = torch.aminmax(z, dim=-1, keepdim=True)
    n = z.sub_(lo).div_(hi.sub_(lo).add_(eps))
    v = u_s.add_(n)  # u itself or its fresh upcast: nothing else reads it
    delta = F.linear(_as_dtype(v, B_w.dtype), B_w).mul_(scaling)
    return base_out + _as_dtype(delta, base_out.dtype), n
