"""SSMLoRA layers: the per-adapter weights wrapped around a frozen linear layer, and their forward."""

from __future__ import annotations

import math
from typing import Any

import torch
from peft.import_utils import is_bnb_4bit_available, is_bnb_available
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn.modules import module as _module_hooks
from transformers.pytorch_utils import Conv1D

from .chain import REENTRANT_CHECKPOINTING_REFUSED, ChainContext, ChainLink
from .config import SSMLoRAConfig
from .step import ssmlora_step

MERGE_REFUSED = (
    "SSMLoRA cannot be merged into the base weights: its update depends on a state carried from earlier layers "
    "through a nonlinear min-max normalisation, so it is not a fixed weight delta. Use `unload()` to get the base "
    "model back, or keep the PEFT model for inference."
)


def bitsandbytes_linear_types() -> tuple[type[nn.Module], ...]:
    """bitsandbytes' quantized linear layers (QLoRA bases), or `()` when it is not installed; imported only when
    installed, as peft does."""
    if not is_bnb_available():
        return ()
    import bitsandbytes as bnb

    return (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit) if is_bnb_4bit_available() else (bnb.nn.Linear8bitLt,)


class SSMLoRAWeight(nn.Module):
    """One SSMLoRA matrix in `nn.Linear` layout (`weight` has shape `(out_features, in_features)`); calling the module
    returns its weight.

    The layer calls these modules instead of reading `.weight`: FSDP1 (with peft's `fsdp_auto_wrap_policy`, which
    Trainer installs for every peft model) makes each trainable leaf module its own FSDP unit, whose weight is
    gathered only while that unit runs and is freed again right after. The saved key (`ssmlora_A.<adapter>.weight`)
    is the one `nn.Linear` had.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        # The layer initialises the weight itself (`reset_ssmlora_parameters`); drawing nn.Linear's init first
        # keeps the random stream, and so every seeded result, as it was when these were `nn.Linear` modules.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self) -> torch.Tensor:
        weight = self.weight
        if isinstance(weight, nn.Parameter):  # plain module, DDP, FSDP2: the parameter itself, no copy
            return weight
        # Inside an FSDP1 unit the weight is a plain view of the gathered flat parameter, which FSDP frees right
        # after this call: copy it (r·d values) for the backward pass; the gradient flows through the copy into the
        # sharded parameter.
        return weight.clone()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class SSMLoRALayer(BaseTunerLayer):
    """Mixin holding one frozen `base_layer` and the SSMLoRA weights of each adapter.

    Per adapter, in `nn.Linear` layout (so `ssmlora_A.weight` is Aᵀ): `ssmlora_A` (d_in → r), `ssmlora_B` (r → d_out),
    `ssmlora_C` and `ssmlora_D` (r → r). Trainable per module: r·(d_in + d_out) + 2r².
    """

    adapter_layer_names = ("ssmlora_A", "ssmlora_B", "ssmlora_C", "ssmlora_D")
    other_param_names = ("r", "scaling", "state_dropout", "leaky_slope", "norm_eps", "norm_grad_floor", "detach_state", "ssmlora_chain")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.state_dropout: dict[str, float] = {}
        self.leaky_slope: dict[str, float] = {}
        self.norm_eps: dict[str, float] = {}
        self.norm_grad_floor: dict[str, float] = {}
        self.detach_state: dict[str, bool] = {}
        # Filled by the tuner once every module of the adapter exists (positions need the whole chain).
        self.ssmlora_chain: dict[str, ChainLink] = {}
        self.ssmlora_context: ChainContext | None = None
        self.ssmlora_A = nn.ModuleDict({})
        self.ssmlora_B = nn.ModuleDict({})
        self.ssmlora_C = nn.ModuleDict({})
        self.ssmlora_D = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs

        base = self.get_base_layer()
        # bitsandbytes' Linear8bitLt / Linear4bit subclass nn.Linear and keep its in/out features (their packed
        # weights do not have that shape).
        self.quantized_base = isinstance(base, bitsandbytes_linear_types())
        if isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
        elif isinstance(base, Conv1D):
            # transformers' Conv1D (GPT-2) stores its weight as (in, out), the transpose of nn.Linear.
            self.in_features, self.out_features = base.weight.shape
        else:
            raise TypeError(
                f"SSMLoRA supports torch.nn.Linear (bitsandbytes' 4-bit and 8-bit layers included) and transformers' "
                f"Conv1D layers, not {type(base).__name__}; remove this module from `target_modules`."
            )

    def update_layer(self, adapter_name: str, config: SSMLoRAConfig) -> None:
        """Create (or re-create) the weights of `adapter_name` from `config`."""
        r = config.r
        self.r[adapter_name] = r
        self.scaling[adapter_name] = config.scaling
        self.state_dropout[adapter_name] = config.state_dropout
        self.leaky_slope[adapter_name] = config.leaky_slope
        self.norm_eps[adapter_name] = config.norm_eps
        self.norm_grad_floor[adapter_name] = config.norm_grad_floor
        self.detach_state[adapter_name] = config.state_grad == "detach"
        self.ssmlora_A[adapter_name] = SSMLoRAWeight(self.in_features, r)
        self.ssmlora_B[adapter_name] = SSMLoRAWeight(r, self.out_features)
        self.ssmlora_C[adapter_name] = SSMLoRAWeight(r, r)
        self.ssmlora_D[adapter_name] = SSMLoRAWeight(r, r)
        self.reset_ssmlora_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if not self.ssmlora_A and self.ssmlora_context is not None:
            self.ssmlora_context.layer_emptied()

    @torch.no_grad()
    def reset_ssmlora_parameters(self, adapter_name: str, init_weights: bool | str) -> None:
        A = self.ssmlora_A[adapter_name].weight
        others = [self.ssmlora_B[adapter_name].weight, self.ssmlora_C[adapter_name].weight,
                  self.ssmlora_D[adapter_name].weight]
        if A.device.type == "meta":
            return
        if init_weights == "gaussian":
            # The paper: A ~ N(0, 1/r), i.e. standard deviation 1/sqrt(r).
            nn.init.normal_(A, std=1.0 / math.sqrt(self.r[adapter_name]))
        else:
            # peft LoRA's A (standard deviation 1/sqrt(3 d_in)), the default: with the paper's much larger A,
            # SSMLoRA failed to learn SST-2 on 2 of 4 seeds where it learns on all 4 with this one
            # (benchmarks/RESULTS.md, "What we learned from SSMLoRA's SST-2 losses").
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        for weight in others:
            if init_weights is False:
                # Not a no-op from the start: only for tests and debugging.
                nn.init.normal_(weight, std=0.1)
            else:
                nn.init.zeros_(weight)


class Linear(nn.Module, SSMLoRALayer):
    """SSMLoRA around a frozen `nn.Linear` (or bitsandbytes' `Linear8bitLt` / `Linear4bit`) or `Conv1D`."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SSMLoRAConfig, **kwargs: Any) -> None:
        super().__init__()
        SSMLoRALayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(MERGE_REFUSED)

    def unmerge(self) -> None:
        raise NotImplementedError(MERGE_REFUSED)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        raise NotImplementedError(MERGE_REFUSED)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        if self.quantized_base:
            # bitsandbytes may return a view of its own autograd output, which autograd forbids the Triton step
            # (it adds the update in place) to modify; peft's LoRA copies 4-bit outputs for the same reason.
            result = result.clone()
        for adapter in self.active_adapters:
            if adapter not in self.ssmlora_A:
                continue
            link = self.ssmlora_chain.get(adapter)
            if link is None or self.ssmlora_context is None:
                raise RuntimeError(
                    f"SSMLoRA layer for adapter {adapter!r} is not part of a chain; create SSMLoRA layers through "
                    "`get_peft_model` / `add_adapter`, not by hand."
                )
            state, call = self.ssmlora_context.incoming_state(adapter, link, x)
            if call is not None and call.with_grad and not torch.is_grad_enabled() and not self.detach_state[adapter]:
                # A layer run without gradients inside a call with gradients: reentrant checkpointing's first
                # forward (or a `no_grad` block in the model), which would cut the gradient along the chain.
                raise RuntimeError(REENTRANT_CHECKPOINTING_REFUSED)
            A_w, B_w, C_w, D_w = self._adapter_weights(adapter)
            result, new_state = ssmlora_step(
                x,
                result,
                state,
                A_w,
                B_w,
                C_w,
                D_w,
                scaling=self.scaling[adapter],
                dropout_p=self.state_dropout[adapter] if self.training else 0.0,
                leaky_slope=self.leaky_slope[adapter],
                eps=self.norm_eps[adapter],
                grad_floor=self.norm_grad_floor[adapter],
                detach_state=self.detach_state[adapter],
            )
            if self.detach_state[adapter] and new_state.requires_grad:
                # The next module would detach it anyway; detaching here frees this step's graph sooner.
                new_state = new_state.detach()
            if call is not None:  # None: a recomputation, whose original forward wrote this state already
                call.write(adapter, link, new_state)
        return result

    def _adapter_weights(self, adapter: str) -> list[torch.Tensor]:
        """A, B, C and D of `adapter`, as calling their modules returns them (see `SSMLoRAWeight`: FSDP gathers each
        one only while it runs). A module that nothing wraps or hooks hands over its parameter directly: at decode,
        four module calls cost as much as the step's arithmetic."""
        weights = []
        for name in self.adapter_layer_names:
            module = self._modules[name]._modules[adapter]
            weight = module._parameters.get("weight") if type(module) is SSMLoRAWeight else None
            if type(weight) is nn.Parameter and _runs_unhooked(module):
                weights.append(weight)
            else:
                weights.append(module())
        return weights

    def __repr__(self) -> str:
        return "ssmlora." + super().__repr__()


def _runs_unhooked(module: nn.Module) -> bool:
    """Whether calling `module` runs its forward alone: no hook of its own and no global module hook (the check
    `nn.Module.__call__` makes before its fast path)."""
    return not (module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks
                or module._backward_hooks or _module_hooks._global_forward_pre_hooks
                or _module_hooks._global_forward_hooks or _module_hooks._global_backward_pre_hooks
                or _module_hooks._global_backward_hooks)
