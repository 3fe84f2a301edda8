"""Chains: the SSMLoRA modules of one type across layers, and the objects that carry their states.

A chain is one module *type* along depth: the module's name with its layer index replaced by `*`, e.g.
`model.layers.*.self_attn.q_proj`. Its modules are ordered by layer index; position 0 starts from a zero state and
position `p` reads the state that position `p - 1` wrote earlier in the same forward call.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


CALL_THE_WHOLE_MODEL = (
    "SSMLoRA layer for adapter {adapter!r} (chain {chain!r}, position {position}) ran outside a forward call of its "
    "model: its incoming state is written by the earlier layers of the same call. Call the whole PEFT model "
    "(`model(...)`) rather than one of its layers."
)

REENTRANT_CHECKPOINTING_REFUSED = (
    "SSMLoRA with state_grad='full' does not support reentrant activation checkpointing: it runs each layer's first "
    "forward without gradients, which would silently cut the gradient along the chain. Use non-reentrant "
    "checkpointing: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}) "
    "(or TrainingArguments(gradient_checkpointing_kwargs={'use_reentrant': False}), or "
    "torch.utils.checkpoint.checkpoint(..., use_reentrant=False)); or use state_grad='detach' (the default), with "
    "which reentrant checkpointing is exact."
)


class ForwardCall:
    """The chain states of one forward call of the model: each module's outgoing state, read by the next one.

    A call opened with gradients on keeps every state for as long as its autograd graph lives: activation
    checkpointing recomputes layers during backward (non-reentrant: from the saved activations; reentrant: the
    whole first forward ran without gradients), and a recomputed layer must read the same incoming state again. A
    call without gradients has no backward, so a state is dropped as soon as the next module has read it.
    """

    def __init__(self) -> None:
        self.with_grad = torch.is_grad_enabled()
        self._states: dict[tuple[str, str, int], torch.Tensor] = {}

    def read(self, adapter: str, link: ChainLink, like: torch.Tensor) -> torch.Tensor | None:
        """The incoming state of the module at `link` (`None` = zeros at the chain start)."""
        if link.position == 0:
            return None
        slot = (adapter, link.chain, link.position - 1)
        state = self._states.get(slot) if self.with_grad else self._states.pop(slot, None)
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

    def has_states(self) -> bool:
        return bool(self._states)

    def holds_state_for(self, adapter: str, link: ChainLink) -> bool:
        """Whether this call ran the module before `link` (so that it may be the call `link` is recomputed for)."""
        return (adapter, link.chain, link.position - 1) in self._states


class ChainContext:
    """Finds the `ForwardCall` an SSMLoRA layer runs in; one per tuner, never saved.

    The tuner's forward pre-hook opens a new call (so every call starts its chains from zeros and results never
    depend on earlier calls) and its forward hook closes it. While a call runs, it is this thread's open call, so
    concurrent forwards of one model from several threads never share states.

    A layer recomputed by activation checkpointing runs inside backward, after its call closed and possibly on
    another thread (autograd runs CUDA backward on its own device threads, and `backward()` may be called from
    any thread): a thread-local cannot find its call there. So closing a call that may be backpropagated hooks the
    autograd nodes of its outputs; when a backward reaches one, the call is registered under that backward's graph
    task id, which the recomputed layer looks up.
    """

    def __init__(self, when_unused: Callable[[], None]) -> None:
        self._local = threading.local()
        self._calls_by_backward: dict[int, list[ForwardCall]] = {}
        self._lock = threading.Lock()
        self._layers: weakref.WeakSet[Any] = weakref.WeakSet()
        self._when_unused = when_unused

    def track(self, layer: Any) -> None:
        """Register an SSMLoRA layer whose states this context carries."""
        self._layers.add(layer)

    def layer_emptied(self) -> None:
        """Called by a layer that lost its last adapter. Once no layer has one, `when_unused` runs (the tuner removes
        its hooks): transformers' `delete_adapter` deletes adapters layer by layer, never through the tuner."""
        if not any(layer.ssmlora_A for layer in self._layers):
            self._when_unused()

    def _open_calls(self) -> list[ForwardCall]:
        if not hasattr(self._local, "calls"):
            self._local.calls = []
        return self._local.calls

    def open_call(self) -> None:
        self._open_calls().append(ForwardCall())

    def close_call(self, outputs: Any) -> None:
        calls = self._open_calls()
        if not calls:  # the forward hook of a call whose pre-hook raised
            return
        call = calls.pop()
        if not call.with_grad or not call.has_states():
            return
        # The hooks hold the call, so its states live exactly as long as the graph that may recompute them.
        for grad_fn in {id(t.grad_fn): t.grad_fn for t in _tensors(outputs) if t.grad_fn is not None}.values():
            grad_fn.register_prehook(lambda grad_outputs, call=call: self._enter_backward(call))

    def _enter_backward(self, call: ForwardCall) -> None:
        task = torch._C._current_graph_task_id()
        with self._lock:
            calls = self._calls_by_backward.get(task)
            if calls is None:
                calls = self._calls_by_backward[task] = []
                torch.autograd.Variable._execution_engine.queue_callback(lambda: self._leave_backward(task))
            if not any(known is call for known in calls):
                calls.append(call)

    def _leave_backward(self, task: int) -> None:
        with self._lock:
            self._calls_by_backward.pop(task, None)

    def incoming_state(self, adapter: str, link: ChainLink, like: torch.Tensor) -> tuple[torch.Tensor | None,
                                                                                         ForwardCall | None]:
        """The incoming state of the layer at `link`, and the call its outgoing state goes to: `None` when the
        layer is recomputed during backward (its original forward wrote that state already)."""
        calls = self._open_calls()
        if calls:
            return calls[-1].read(adapter, link, like), calls[-1]
        task = torch._C._current_graph_task_id()
        if task < 0:  # not inside a backward: the layer was called on its own
            raise RuntimeError(CALL_THE_WHOLE_MODEL.format(adapter=adapter, chain=link.chain, position=link.position))
        if link.position == 0:  # a recomputed chain start reads zeros, whichever call it belongs to
            return None, None
        with self._lock:
            # Only a call that ran this chain can be this layer's (e.g. an encoder's and a decoder's calls).
            candidates = [call for call in self._calls_by_backward.get(task, ()) if call.holds_state_for(adapter, link)]
        if len(candidates) == 1:
            return candidates[0].read(adapter, link, like), None
        if not candidates:
            raise RuntimeError(
                f"SSMLoRA layer for adapter {adapter!r} (chain {link.chain!r}) is recomputed during a backward pass "
                "that did not start from the outputs of the model call that ran it, so SSMLoRA cannot find the "
                "chain states of that call. Backpropagate from the model's outputs (e.g. its loss or logits)."
            )
        raise RuntimeError(
            f"SSMLoRA layer for adapter {adapter!r} (chain {link.chain!r}) is recomputed by activation checkpointing "
            f"during one backward pass through {len(candidates)} forward calls of the model (e.g. the sum of two "
            "calls' losses), so SSMLoRA cannot tell which call's chain states it needs. Run backward once per "
            "forward call (gradients accumulate across calls), or turn activation checkpointing off."
        )


def _tensors(outputs: Any) -> list[torch.Tensor]:
    """The tensors in a model's outputs (a tensor, or tuples, lists and dicts of them, e.g. a `ModelOutput`)."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if isinstance(outputs, (tuple, list)):
        return [t for item in outputs for t in _tensors(item)]
    return []
