"""Chains: the SSMLoRA modules of one type across layers, and the objects that carry their states.

A chain is one module *type* along depth: the module's name with its layer index replaced by `*`, e.g.
`model.layers.*.self_attn.q_proj`. Its modules are ordered by layer index; position 0 starts from a zero state and
position `p` reads the state that position `p - 1` wrote earlier in the same forward call.
"""

from __future__ import annotations

import functools
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
        # The graph tasks (backward passes) now running through this call's outputs; see `ChainContext`.
        self.backward_tasks: set[int] = set()

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
    """Finds the `ForwardCall` an SSMLoRA layer runs in; one per model, its calls never saved (a copy of the model
    gets a context of its own, with no calls: see `__getstate__`).

    Each chain owner (the module whose forward runs whole chains) runs its forward through `run_call`, which opens
    a new call (so every call starts its chains from zeros and results never depend on earlier calls) and closes it
    in a `finally`, whatever the forward raised: a `KeyboardInterrupt` too, which torch's `always_call` forward hooks
    do not see. While a call runs, it is this thread's innermost open call, so concurrent forwards of one model from
    several threads never share states.

    A layer recomputed by activation checkpointing runs inside backward, after its call closed and possibly on
    another thread (autograd runs CUDA backward on its own device threads, and `backward()` may be called from
    any thread): a thread-local cannot find its call there. So a closing call that may be backpropagated hooks the
    autograd nodes of its outputs; when a backward reaches one, the call records that backward's graph task id,
    which the recomputed layer looks for. The context holds such calls only weakly: a call lives exactly as long as
    the graph that may recompute it, also when a backward fails midway and never finishes.
    """

    def __init__(self) -> None:
        self._layers: weakref.WeakSet[Any] = weakref.WeakSet()
        self._owners: list[torch.nn.Module] = []
        self._when_unused: list[Callable[[], None]] = []
        self._reset_calls()

    def _reset_calls(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._calls_with_graph: weakref.WeakSet[ForwardCall] = weakref.WeakSet()

    def __getstate__(self) -> dict[str, Any]:
        # A copy (deepcopy, pickle, torch.save of the model) gets its own calls, none of the original's. The layers
        # go as a list: the copy's WeakSet is rebuilt from the copied layers.
        return {"layers": list(self._layers), "owners": self._owners, "when_unused": self._when_unused}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._layers = weakref.WeakSet(state["layers"])
        self._owners = state["owners"]
        self._when_unused = state["when_unused"]
        self._reset_calls()

    def track(self, layer: Any) -> None:
        """Register an SSMLoRA layer whose states this context carries."""
        self._layers.add(layer)

    def when_unused(self, callback: Callable[[], None]) -> None:
        """Run `callback` (a tuner removing its hooks) once no tracked layer has an adapter left."""
        if callback not in self._when_unused:
            self._when_unused.append(callback)

    def layer_emptied(self) -> None:
        """Called by a layer that lost its last adapter. Once no layer has one, the chain owners get their classes
        back and the `when_unused` callbacks run: transformers' `delete_adapter` deletes adapters layer by layer,
        never through the tuner."""
        if not any(layer.ssmlora_A for layer in self._layers):
            self.release_owners()
            for callback in self._when_unused:
                callback()

    def own(self, owner: torch.nn.Module) -> None:
        """Make `owner` (a module whose forward runs whole chains) run each forward as one call of this context."""
        owner._ssmlora_chain_context = self
        if not isinstance(owner, _ChainOwnerMixin):
            owner.__class__ = chain_owner_class(type(owner))
        if not any(known is owner for known in self._owners):
            self._owners.append(owner)

    def release_owners(self) -> None:
        """Give every owner its class back."""
        while self._owners:
            owner = self._owners.pop()
            if type(owner) is chain_owner_class(owner._ssmlora_base_class):
                owner.__class__ = owner._ssmlora_base_class
                del owner._ssmlora_chain_context
            # else a wrapper subclassed it since (e.g. FSDP2's `fully_shard`): it keeps running calls, which stay
            # empty once no layer has an adapter.

    def _open_calls(self) -> list[ForwardCall]:
        if not hasattr(self._local, "calls"):
            self._local.calls = []
        return self._local.calls

    def count_open_calls(self) -> int:
        """How many calls are open on this thread (0 outside a forward of the model)."""
        return len(self._open_calls())

    def count_calls_with_graph(self) -> int:
        """How many closed calls are kept for a backward pass (their autograd graphs are alive)."""
        with self._lock:
            return len(self._calls_with_graph)

    def open_call(self) -> ForwardCall:
        """Open a call on this thread that stays open (for benchmarks that run one layer on its own); the model's
        own forward calls go through `run_call`."""
        call = ForwardCall()
        self._open_calls().append(call)
        return call

    def run_call(self, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a chain owner's `forward` as one call."""
        calls = self._open_calls()
        depth = len(calls)
        try:
            call = ForwardCall()
            calls.append(call)
            outputs = forward(*args, **kwargs)
        finally:
            # Closed whatever happened, also if the interrupt came before `forward` ran. Every call opened inside
            # this one closed in its own `finally` already.
            del calls[depth:]
        if call.with_grad and call.has_states():
            self._keep_for_backward(call, outputs)
        return outputs

    def _keep_for_backward(self, call: ForwardCall, outputs: Any) -> None:
        # The hooks hold the call, so its states live exactly as long as the graph that may recompute them.
        grad_fns = {id(t.grad_fn): t.grad_fn for t in _tensors(outputs) if t.grad_fn is not None}
        for grad_fn in grad_fns.values():
            grad_fn.register_prehook(lambda grad_outputs, call=call: self._enter_backward(call))
        if grad_fns:
            with self._lock:
                self._calls_with_graph.add(call)

    def _enter_backward(self, call: ForwardCall) -> None:
        task = torch._C._current_graph_task_id()
        if task in call.backward_tasks:  # another output node of the same call
            return
        call.backward_tasks.add(task)
        # Runs when this backward finishes. One that raises midway never runs it: its task id stays in the set, but
        # ids are never reused, and the set goes with the call when the graph is freed.
        torch.autograd.Variable._execution_engine.queue_callback(lambda: call.backward_tasks.discard(task))

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
            candidates = [call for call in self._calls_with_graph
                          if task in call.backward_tasks and call.holds_state_for(adapter, link)]
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


class _ChainOwnerMixin:
    """Marks the classes made by `chain_owner_class`."""

    _ssmlora_base_class: type[torch.nn.Module]


_OWNER_CLASSES: dict[type, type] = {}


def chain_owner_class(base: type[torch.nn.Module]) -> type[torch.nn.Module]:
    """`base` with a forward that runs as one `ForwardCall` of the context in the module's `_ssmlora_chain_context`.

    The tuner sets a chain owner's class to this subclass rather than hooking it: a `finally` runs whatever the
    forward raises, and a method gets the module it runs on (torch's `DataParallel` calls replicas of it). The name,
    repr and signature stay `base`'s; pickling and copying go through `base` (see `__reduce_ex__`), so a saved model
    loads where this class was never made.
    """
    owner_class = _OWNER_CLASSES.get(base)
    if owner_class is not None:
        return owner_class

    class ChainOwner(base, _ChainOwnerMixin):  # type: ignore[misc, valid-type]
        _ssmlora_base_class = base

        @functools.wraps(base.forward)
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return self._ssmlora_chain_context.run_call(super().forward, *args, **kwargs)

        def __reduce_ex__(self, protocol: int) -> Any:
            # As `base` would reduce, but rebuilt by `_new_chain_owner` (the state restores the context attribute).
            _, _, state, *rest = super().__reduce_ex__(protocol)
            return (_new_chain_owner, (base,), state, *rest)

    ChainOwner.__name__, ChainOwner.__qualname__, ChainOwner.__module__ = base.__name__, base.__qualname__, \
        base.__module__
    _OWNER_CLASSES[base] = ChainOwner
    return ChainOwner


def _new_chain_owner(base: type[torch.nn.Module]) -> torch.nn.Module:
    """An uninitialised instance of `chain_owner_class(base)`; unpickling and `copy` then restore its state."""
    owner_class = chain_owner_class(base)
    return owner_class.__new__(owner_class)


def _tensors(outputs: Any) -> list[torch.Tensor]:
    """The tensors in a model's outputs (a tensor, or tuples, lists and dicts of them, e.g. a `ModelOutput`)."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if isinstance(outputs, (tuple, list)):
        return [t for item in outputs for t in _tensors(item)]
    return []
