"""`SSMLoRAModel`: the peft tuner that injects SSMLoRA layers and links them into chains."""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule, check_target_module_exists
from torch import nn
from transformers.pytorch_utils import Conv1D

from .chain import REENTRANT_CHECKPOINTING_REFUSED, ChainContext, assign_chains, layer_index
from .config import DEFAULT_TARGET_MODULES, SSMLoRAConfig
from .layer import MERGE_REFUSED, Linear, SSMLoRALayer


def _name_matches(key: str, name: str) -> bool:
    """peft's rule for a listed module name: the full name, or a suffix after a dot."""
    return key == name or key.endswith("." + name)


def _interval_slot(config: SSMLoRAConfig, key: str) -> int | None:
    """Index k of the interval module that `key` is, or `None` if it is not an interval module."""
    for k, name in enumerate(config.interval_modules or ()):
        if _name_matches(key, name):
            return k
    return None


class SSMLoRAModel(BaseTuner):
    """Creates an SSMLoRA model from a pretrained transformers model (see `SSMLoRAConfig`).

    Besides the layers, the tuner owns a `ChainContext` that carries states between the modules of each chain, and
    makes the module that runs each chain (the wrapped model's layer stack, usually) run every forward as one call
    of it (so every call starts from zero states; see `_install_forward_hooks`), with a forward pre-hook that refuses
    reentrant activation checkpointing for `state_grad="full"`. `unload()` and deleting the last adapter undo both.
    """

    prefix: str = "ssmlora_"
    tuner_layer_cls = SSMLoRALayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    def __init__(self, model: nn.Module, config, adapter_name: str, **kwargs: Any) -> None:
        # Set before `super().__init__`, which injects the first adapter and needs both.
        # One context per model: a second tuner on it (transformers' `add_adapter` makes one per adapter) shares
        # the first one's, as its layers and chain owners do.
        self.chain_context = _chain_context_of(model) or ChainContext()
        self.chain_context.when_unused(self._remove_forward_hooks)
        self._ssmlora_hooks: list[torch.utils.hooks.RemovableHandle] = []
        super().__init__(model, config, adapter_name, **kwargs)

    # ---------------------------------------------------------------- configuration and validation

    def _prepare_adapter_config(self, peft_config: SSMLoRAConfig, model_config: dict) -> SSMLoRAConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            defaults = self.target_module_mapping.get(model_type)
            if defaults is None:
                raise ValueError(
                    f"SSMLoRA has no default target modules for model type {model_type!r}; pass `target_modules` "
                    "(and `interval_modules` for the paper's staggered placement), e.g. "
                    "SSMLoRAConfig(target_modules=['q_proj', 'v_proj'], interval_modules=['q_proj', 'v_proj'])."
                )
            peft_config.target_modules = set(defaults)
            if peft_config.interval_modules is None:
                peft_config.interval_modules = list(defaults)
        return peft_config

    def _validate_against_model(self, config: SSMLoRAConfig, model: nn.Module) -> None:
        """Errors that name the fix, raised before any module is replaced."""
        keys = [key for key, _ in model.named_modules() if key]
        adaptable = sorted(
            {key.rsplit(".", 1)[-1] for key, module in model.named_modules() if isinstance(module, (nn.Linear, Conv1D))}
        )
        if isinstance(config.target_modules, (set, list)):
            missing = sorted(name for name in config.target_modules if not any(_name_matches(k, name) for k in keys))
            if missing:
                raise ValueError(
                    f"SSMLoRA target module(s) {missing} match no module of the model. Linear layers it has: "
                    f"{adaptable}. Fix `target_modules`."
                )
        if config.interval_modules:
            if isinstance(config.target_modules, (set, list)):
                outside = [name for name in config.interval_modules if name not in config.target_modules]
            else:  # a regex or 'all-linear': an interval module must name at least one targeted module
                targeted = [k for k in keys if check_target_module_exists(config, k)]
                outside = [n for n in config.interval_modules if not any(_name_matches(k, n) for k in targeted)]
            if outside:
                raise ValueError(
                    f"`interval_modules` {outside} are not among the targets {config.target_modules}; every interval "
                    "module must also be a target module. Add them to `target_modules` or remove them from "
                    "`interval_modules`."
                )
        if config.layers_pattern:
            patterns = [config.layers_pattern] if isinstance(config.layers_pattern, str) else config.layers_pattern
            if not any(layer_index(k, patterns) is not None for k in keys):
                layer_lists = sorted({re.sub(r"\.\d+$", "", k) for k in keys if re.search(r"\.\d+$", k)})
                raise ValueError(
                    f"`layers_pattern` {config.layers_pattern!r} matches no layer of the model; its numbered layer "
                    f"lists are {layer_lists}. Set `layers_pattern` to the last part of one of them (e.g. 'layers')."
                )

    def _validate_placement(self, config: SSMLoRAConfig, model: nn.Module) -> None:
        """Every listed module must be adapted somewhere. An interval module whose slot no layer of the model has
        (five interval modules on a four-layer model), or a listed target that `layers_to_transform` /
        `exclude_modules` leave nowhere, would otherwise be dropped without a word. (`layers_to_transform` may
        leave out the layers of one interval module: the default placement with `layers_to_transform=[0]` adapts
        only the query, as a saved adapter of that kind must load again.)"""
        candidates = [key for key, module in model.named_modules()
                      if isinstance(module, (nn.Linear, Conv1D, SSMLoRALayer)) and not key.endswith(".base_layer")]
        period = max(2, len(config.interval_modules or ()))
        for slot, name in enumerate(config.interval_modules or ()):
            indices = _layers_having(name, candidates, config.layers_pattern)
            if indices and not any(index % period == slot for index in indices):
                raise ValueError(
                    f"Interval module {name!r} is adapted nowhere: at place {slot} of the "
                    f"{len(config.interval_modules)} `interval_modules` it is adapted in the layers i with "
                    f"i % {period} == {slot}, but the model has it only in layers {indices}. List at most as many "
                    "interval modules as the model has layers, or remove it from `interval_modules`."
                )
        if isinstance(config.target_modules, (set, list)):
            # peft's own matching: names, `layers_to_transform`, `exclude_modules` (before any staggering)
            kept = [key for key in candidates if _is_adapted(check_target_module_exists(config, key))]
            for name in sorted(config.target_modules):
                if not any(_name_matches(key, name) for key in kept):
                    indices = _layers_having(name, candidates, config.layers_pattern)
                    raise ValueError(
                        f"Target module {name!r} is adapted nowhere: the model has it in layers {indices}, and "
                        f"`layers_to_transform` {config.layers_to_transform!r} / `exclude_modules` "
                        f"{config.exclude_modules!r} leave none of them. Remove it from `target_modules` or widen "
                        "`layers_to_transform`."
                    )

    def _check_target_module_exists(self, peft_config: SSMLoRAConfig, key: str):  # type: ignore[override]
        matched = check_target_module_exists(peft_config, key)
        if not matched or isinstance(matched, _ExcludedModule):
            return matched
        slot = _interval_slot(peft_config, key)
        if slot is None:
            return matched
        index = layer_index(key, peft_config.layers_pattern)
        if index is None:
            raise ValueError(
                f"Interval module {peft_config.interval_modules[slot]!r} matched {key!r}, which has no layer index; "
                "only modules inside the layer stack can be staggered. Remove it from `interval_modules`."
            )
        period = max(2, len(peft_config.interval_modules))
        return index % period == slot

    # ---------------------------------------------------------------- injection

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs) -> None:
        if isinstance(target, SSMLoRALayer):
            target.update_layer(adapter_name, config)
            return
        if isinstance(target, BaseTunerLayer):
            raise TypeError(
                f"{current_key!r} is already adapted by another PEFT method ({type(target).__name__}); SSMLoRA "
                "cannot be stacked on it."
            )
        new_module = Linear(target, adapter_name, config)
        if adapter_name not in self.active_adapters:
            # An added adapter is not trainable until it is made active (as in peft's LoRA).
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        config = self.peft_config[adapter_name]
        self._validate_against_model(self._prepare_adapter_config(config, self.get_model_config(model)), model)
        self._validate_placement(config, model)
        super().inject_adapter(model, adapter_name, **kwargs)
        self._link_chains(model, adapter_name)
        self._install_forward_hooks(model)

    def _link_chains(self, model: nn.Module, adapter_name: str) -> None:
        """Give every module of `adapter_name` its chain position (this needs all of them, hence after injection)."""
        layers = {key: module for key, module in model.named_modules()
                  if isinstance(module, SSMLoRALayer) and adapter_name in module.ssmlora_A}
        links = assign_chains(list(layers), self.peft_config[adapter_name].layers_pattern)
        for key, module in layers.items():
            module.ssmlora_chain[adapter_name] = links[key]
            module.ssmlora_context = self.chain_context
            self.chain_context.track(module)

    def _install_forward_hooks(self, model: nn.Module) -> None:
        """Make every chain's owner (the innermost module whose forward runs the whole chain) run its forward as one
        call of the chain context. The wrapped model calls the owners within its own forward; so do code paths
        that call an inner module directly (an encoder-decoder's `generate` runs the encoder alone, fused-loss
        trainers run the decoder stack without its head).

        An owner's class becomes `chain_owner_class(its class)` (`ChainContext.own`) rather than getting a pre-hook
        that opens the call and a forward hook that closes it: torch skips even `always_call` forward hooks for a
        `KeyboardInterrupt`, which would leave the call open for good. A forward pre-hook only checks the
        configuration (refusing reentrant checkpointing for `state_grad="full"`); it raises before anything opens."""
        self._remove_forward_hooks()
        for owner in _chain_owners(model):
            self.chain_context.own(owner)
            self._ssmlora_hooks.append(owner.register_forward_pre_hook(self._check_forward))

    def _check_forward(self, module: nn.Module, args: Any) -> None:
        if module.training and torch.is_grad_enabled() and self._full_state_grad_active():
            _refuse_reentrant_checkpointing(module)

    def _full_state_grad_active(self) -> bool:
        return any(self.peft_config[name].state_grad == "full" for name in self.active_adapters
                   if name in self.peft_config)

    # ---------------------------------------------------------------- LoRA-only operations

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "`add_weighted_adapter` is not supported by SSMLoRA: it mixes adapters by combining their low-rank "
            "matrices, which assumes each module's update is the fixed product B·A. An SSMLoRA module's update also "
            "depends on the state its chain carries through a nonlinear normalisation, so a weighted mix of the "
            "matrices is no mix of the adapters' effects. Train one adapter on the combined data, or switch "
            "adapters with `set_adapter`."
        )

    def subtract_mutated_init(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "`subtract_mutated_init` is not supported by SSMLoRA: it converts PiSSA/OLoRA-initialised LoRA "
            "adapters, and SSMLoRA has no such initialisation. Save the adapter with a plain `save_pretrained(path)`."
        )

    # ---------------------------------------------------------------- merging and unloading

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise NotImplementedError(MERGE_REFUSED)

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(MERGE_REFUSED)

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs: Any) -> nn.Module:
        if merge:
            raise NotImplementedError(MERGE_REFUSED)
        model = super()._unload_and_optionally_merge(merge=False, **kwargs)
        self._remove_forward_hooks()
        return model

    def _remove_forward_hooks(self) -> None:
        while self._ssmlora_hooks:
            self._ssmlora_hooks.pop().remove()
        self.chain_context.release_owners()


def _chain_context_of(model: nn.Module) -> ChainContext | None:
    """The chain context the SSMLoRA layers of `model` already use, if any."""
    for module in model.modules():
        if isinstance(module, SSMLoRALayer) and module.ssmlora_context is not None:
            return module.ssmlora_context
    return None


def _layers_having(name: str, keys: list[str], layers_pattern) -> list[int]:
    """The layer indices of the modules among `keys` that `name` matches."""
    return sorted({layer_index(key, layers_pattern) for key in keys if _name_matches(key, name)} - {None})


def _is_adapted(matched: Any) -> bool:
    """What `_check_target_module_exists` returns for a module that is adapted (a bool or a regex match)."""
    return bool(matched) and not isinstance(matched, _ExcludedModule)


def _chain_owners(model: nn.Module) -> list[nn.Module]:
    """For each chain of each adapter, the innermost module that contains all of its modules and has a forward."""
    chains: dict[tuple[str, str], list[list[str]]] = {}
    for key, module in model.named_modules():
        if isinstance(module, SSMLoRALayer):
            for adapter, link in module.ssmlora_chain.items():
                chains.setdefault((adapter, link.chain), []).append(key.split("."))
    owners: dict[int, nn.Module] = {}
    for keys in chains.values():
        path = os.path.commonprefix(keys)  # common leading name parts, e.g. ["model", "layers"]
        owner = model.get_submodule(".".join(path))
        while isinstance(owner, (nn.ModuleList, nn.ModuleDict)):  # containers are never called
            path = path[:-1]
            owner = model.get_submodule(".".join(path))
        owners[id(owner)] = owner
    return list(owners.values())


def _refuse_reentrant_checkpointing(model: nn.Module) -> None:
    """Reentrant checkpointing runs each layer's first forward under `no_grad`, so with `state_grad="full"` the
    gradient along the chain would be silently cut (the layers refuse that too; this check names the transformers
    flag before any work is done). With `state_grad="detach"` no gradient crosses layers and reentrant checkpointing
    is exact: a recomputed layer reads the incoming state of its original forward."""
    for module in model.modules():
        if not getattr(module, "gradient_checkpointing", False):
            continue
        checkpoint_fn = getattr(module, "_gradient_checkpointing_func", None)
        # torch.utils.checkpoint treats a missing `use_reentrant` as True.
        if getattr(checkpoint_fn, "keywords", {}).get("use_reentrant", True):
            raise RuntimeError(REENTRANT_CHECKPOINTING_REFUSED)
