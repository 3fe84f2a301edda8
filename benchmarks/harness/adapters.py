"""The adapters a benchmark compares, built in one place, and what is counted of them.

    `ADAPTERS`                  method name -> builder of its peft config; add an entry for a new method
    `adapter_config(method, r=, alpha=, task_type=, **options)`   options go to the method's config class
    `add_adapter(model, method, r=, alpha=, task_type=, **options)`   `get_peft_model` with that config
    `count_parameters(model)`   trainable parameters as {"adapter", "head", "total"}
    `share_frozen_copy(model)`  a copy sharing every weight tensor (several adapters on one frozen base in memory)
    `ssmlora_impl("torch" | "triton")`   context manager setting PEFT_SSMLORA_IMPL
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable
from typing import Any


def _lora_config(*, r: int, alpha: float, task_type: str | None, **options):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, task_type=task_type, **options)


def _ssmlora_config(*, r: int, alpha: float, task_type: str | None, **options):
    import peft_ssmlora  # noqa: F401 - registers the tuner with peft
    from peft_ssmlora import SSMLoRAConfig

    return SSMLoRAConfig(r=r, lora_alpha=alpha, task_type=task_type, **options)


# Method name -> builder(r=, alpha=, task_type=, **options) of its peft config. A runner adds its own variants
# here (e.g. LoRA at another placement) so that every method is built in one place.
ADAPTERS: dict[str, Callable[..., Any]] = {"lora": _lora_config, "ssmlora": _ssmlora_config}


def adapter_config(method: str, *, r: int, alpha: float, task_type: str | None = None, **options):
    """The peft config of `method` (a key of `ADAPTERS`); `options` are fields of that method's config class.

    Unset options keep peft's defaults (LoRA: q,v in every layer for known families, dropout 0; SSMLoRA: its
    staggered q/v placement, kaiming A)."""
    if method not in ADAPTERS:
        raise ValueError(f"unknown adapter method {method!r}; choose from {', '.join(ADAPTERS)}")
    return ADAPTERS[method](r=r, alpha=alpha, task_type=task_type, **options)


def add_adapter(model, method: str, *, r: int, alpha: float, task_type: str | None = None,
                autocast_adapter_dtype: bool = True, **options):
    """`get_peft_model(model, adapter_config(...))`, as users build it."""
    from peft import get_peft_model

    config = adapter_config(method, r=r, alpha=alpha, task_type=task_type, **options)
    return get_peft_model(model, config, autocast_adapter_dtype=autocast_adapter_dtype)


@contextlib.contextmanager
def ssmlora_impl(impl: str | None):
    """`PEFT_SSMLORA_IMPL=impl` ("torch" / "triton") inside the block; None leaves the environment alone."""
    from peft_ssmlora.step import IMPL_ENV_VAR

    old = os.environ.get(IMPL_ENV_VAR)
    if impl is not None:
        os.environ[IMPL_ENV_VAR] = impl
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(IMPL_ENV_VAR, None)
        else:
            os.environ[IMPL_ENV_VAR] = old


def is_head_parameter(name: str) -> bool:
    """The classifier head (BERT/RoBERTa `classifier`, decoder `score`, peft's trained copy `modules_to_save`)."""
    parts = name.split(".")
    return "modules_to_save" in parts or "classifier" in parts or "score" in parts


def count_parameters(model) -> dict[str, int]:
    """Trainable parameters split into the method's own (`adapter`) and a classifier head (`head`)."""
    adapter = head = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            if is_head_parameter(name):
                head += p.numel()
            else:
                adapter += p.numel()
    return {"adapter": adapter, "head": head, "total": adapter + head}


def share_frozen_copy(model):
    """A deep copy of `model` that shares every parameter tensor with it (nothing is copied but the module tree).

    For benchmarks that put several adapters on one frozen base model side by side: each copy gets its own adapter
    while the base weights exist once in memory."""
    memo = {id(p): p for p in model.parameters()}
    return copy.deepcopy(model, memo)
