"""Compute kernels for the SSMLoRA step: a PyTorch reference (`reference`) and fused Triton kernels."""

from .reference import ssmlora_step_reference

__all__ = ["ssmlora_step_reference"]
