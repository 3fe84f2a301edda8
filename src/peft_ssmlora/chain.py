"""Chains: the SSMLoRA modules of one type across layers, and the object that carries their states.

A chain is one module *type* along depth: the module's name with its layer index replaced by `*`, e.g.
`model.layers.*.self_attn.q_proj`. Its modules are ordered by layer index; position 0 starts from a zero state and
position `p` reads the state that position `p - 1` wrote earlier in the same forward call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ChainLink:
    """Where one adapted module sits: its chain, its position in it and the chain's length."""

    chain: str
    position: int
    length: int


def _layer_index_match(key: str, layers_pattern: str | list[str] | None) -> re.Match[str] | None:
    if layers_pattern:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        for pattern in patterns:
            match = re.search(rf"(?:^|\.){pattern}\.(?P<idx>\d+)(?=\.|$)", key)
            if match:
                return match
        return None
    # Without a pattern the first all-digit segment is the layer index (nested indices such as MoE experts come
    # later in the name), as in peft's `layers_to_transform` matching.
    return re.search(r"(?:^|\.)(?P<idx>\d+)(?=\.|$)", key)


def layer_index(key: str, layers_pattern: str | list[str] | None = None) -> int | None:
    """The layer index in a module's name, or `None` for modules outside the layer stack (e.g. a classifier)."""
    match = _layer_index_match(key, layers_pattern)
    return int(match.group("idx")) if match else None


def chain_name(key: str, layers_pattern: str | list[str] | None = None) -> str:
    """The chain a module belongs to: its name with the layer index replaced by `*`."""
    match = _layer_index_match(key, layers_pattern)
    if match is None:
        return key
    start, end = match.span("idx")
    return key[:start] + "*" + key[end:]


def assign_chains(keys: list[str], layers_pattern: str | list[str] | None = None) -> dict[str, ChainLink]:
    """Group adapted module names into chains ordered by layer index."""
    chains: dict[str, list[tuple[int, str]]] = {}
    for key in keys:
        index = layer_index(key, layers_pattern)
        chains.setdefault(chain_name(key, layers_pattern), []).append((-1 if index is None else index, key))
    links = {}
    for chain, members in chains.items():
        members.sort()
        indices = [index for index, _ in members]
        if len(set(indices)) != len(indices):
            raise ValueError(
                f"SSMLoRA chain {chain!r} has several modules in one layer ({[key for _, key in members]}); set "
                "`layers_pattern` to the name of the model's layer list so that each module gets its layer index."
            )
        for position, (_, key) in enumerate(members):
            links[key] = ChainLink(chain=chain, position=position, length=len(members))
    return links


class ChainContext:
    """Carries each chain's state from one module to the next within one forward call.

    A plain object owned by the tuner (not an `nn.Module`, never saved). The tuner clears it at the start of every
    forward of the model, so the chain restarts from zeros each call: results never depend on earlier batches.

    States stay here until the next forward when gradients are on: non-reentrant activation checkpointing
    recomputes a layer during backward and must read the same incoming state again. Under `no_grad` (evaluation,
    generation) a state is dropped as soon as the next module has read it.
    """

    def __init__(self) -> None:
        self._states: dict[tuple[str, str, int], torch.Tensor] = {}

    def reset(self) -> None:
        self._states.clear()

    def read(self, adapter: str, link: ChainLink, like: torch.Tensor) -> torch.Tensor | None:
        """The incoming state of the module at `link` (`None` = zeros at the chain start)."""
        if link.position == 0:
            return None
        slot = (adapter, link.chain, link.position - 1)
        state = self._states.get(slot) if torch.is_grad_enabled() else self._states.pop(slot, None)
        if state is None:
            raise RuntimeError(
                f"SSMLoRA chain {link.chain!r} (adapter {adapter!r}): position {link.position} ran before position "
                f"{link.position - 1} in this forward call. SSMLoRA needs every layer of the model to run, in order, "
                "within one call of the PEFT model; call the whole model rather than one of its layers."
            )
        if state.shape[:-1] != like.shape[:-1]:
            raise RuntimeError(
                f"SSMLoRA chain {link.chain!r}: the incoming state has token shape {tuple(state.shape[:-1])} but this "
                f"module's input has {tuple(like.shape[:-1])}. The model changed the token layout between layers, "
                "which SSMLoRA's per-token states cannot follow; do not adapt modules on both sides of that change."
            )
        return state

    def write(self, adapter: str, link: ChainLink, state: torch.Tensor) -> None:
        # The last module's state has no reader: do not keep it alive.
        if link.position + 1 < link.length:
            self._states[(adapter, link.chain, link.position)] = state
