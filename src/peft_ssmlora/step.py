"""The one function an SSMLoRA layer calls per adapter: `ssmlora_step`, and the choice of its implementation.

`PEFT_SSMLORA_IMPL` selects the implementation: `torch` (the PyTorch reference, any device), `triton` (the fused
Triton kernel; CUDA tensors, or CPU tensors under `TRITON_INTERPRET=1`) or `auto` (default: Triton for CUDA
tensors when it is importable, otherwise torch). The choice is resolved once per setting and device type; a
changed setting (a test's `monkeypatch.setenv`, `benchmarks`' `ssmlora_impl`) takes effect at the next call.

With torch, a call that autograd does not record (`no_grad` / `inference_mode`, or no tensor requiring a gradient)
without state dropout and outside autocast takes `ssmlora_step_inference`: the reference's values with about half
of its operations (generation pays this step for every token, as SSMLoRA cannot be merged).
"""

from __future__ import annotations

import os

import torch

from ssmlora_kernels.reference import ssmlora_step_inference, ssmlora_step_reference

IMPL_ENV_VAR = "PEFT_SSMLORA_IMPL"
_IMPLS = ("auto", "torch", "triton")
# (setting, device type) -> "torch" / "triton": resolved once, so a call pays one dict lookup.
_RESOLVED_IMPLS: dict[tuple[str, str], str] = {}


def selected_impl(device: torch.device) -> str:
    """The implementation (`"torch"` or `"triton"`) that `ssmlora_step` uses for tensors on `device`."""
    return _impl_for(device.type)


def _impl_for(device_type: str) -> str:
    setting = os.environ.get(IMPL_ENV_VAR, "auto")
    impl = _RESOLVED_IMPLS.get((setting, device_type))
    if impl is None:
        impl = _RESOLVED_IMPLS[(setting, device_type)] = _resolve_impl(setting, device_type)
    return impl


def _resolve_impl(setting: str, device_type: str) -> str:
    impl = setting.strip().lower() or "auto"
    if impl not in _IMPLS:
        raise ValueError(f"{IMPL_ENV_VAR}={impl!r} is not one of {_IMPLS}; unset it or pick one of those.")
    if impl == "auto":
        return "triton" if device_type == "cuda" and _triton_available() else "torch"
    return impl


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def make_dropout_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Inverted-dropout mask for the state (entries 0 or `1/(1-p)`), drawn from torch's global generator.

    A separate function so that tests can replace it by a fixed mask.
    """
    keep = torch.rand(shape, device=device, dtype=torch.float32) >= p
    return keep.float() / (1.0 - p)


def _recorded_by_autograd(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def ssmlora_step(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add one SSMLoRA update to `base_out` and return `(out, new_state)`; see `ssmlora_kernels.reference`.

    `dropout_p` is the state dropout probability to apply now (0 in eval mode); `state=None` starts a chain;
    `grad_floor` floors the normalisation's denominator in the backward only (0: the exact gradient).
    """
    device_type = x.device.type
    if _impl_for(device_type) == "triton":
        from ssmlora_kernels.triton_step import ssmlora_step_triton

        return ssmlora_step_triton(
            x, base_out, state, A_w, B_w, C_w, D_w,
            scaling=scaling, dropout_p=dropout_p, leaky_slope=leaky_slope, eps=eps, detach_state=detach_state,
            grad_floor=grad_floor,
        )
    if (not _recorded_by_autograd(x, base_out, state, A_w, B_w, C_w, D_w) and dropout_p == 0
            and not torch.is_autocast_enabled(device_type)):
        return ssmlora_step_inference(x, base_out, state, A_w, B_w, C_w, D_w, scaling=scaling, eps=eps)
    mask = None
    if dropout_p > 0:
        mask = make_dropout_mask((*x.shape[:-1], A_w.shape[0]), dropout_p, x.device)
    return ssmlora_step_reference(
        x, base_out, state, A_w, B_w, C_w, D_w,
        scaling=scaling, leaky_slope=leaky_slope, eps=eps, dropout_mask=mask, detach_state=detach_state,
        grad_floor=grad_floor,
    )
