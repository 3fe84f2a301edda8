"""Exact after any fault: a `KeyboardInterrupt` (a `BaseException`, which torch's `always_call` forward hooks do not
see) raised inside a forward, inside `generate` or inside a backward, with and without activation checkpointing,
leaves no open call, kept call or state behind, and the next training step equals a fresh model's bitwise."""

from __future__ import annotations

import gc

import pytest
import torch
from peft import get_peft_model
from tiny_models import VOCAB, tiny_llama
from torch import nn

from peft_ssmlora import SSMLoRAConfig
from peft_ssmlora.chain import ForwardCall

CHECKPOINTING = {"plain": None, "non-reentrant": False, "reentrant": True}
IDS = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


def lm(checkpointing: str) -> nn.Module:
    """The same SSMLoRA model every time (seeded weights, random B, C, D so that every path carries signal)."""
    model = get_peft_model(tiny_llama(), SSMLoRAConfig(r=4, init_weights=False))
    use_reentrant = CHECKPOINTING[checkpointing]
    if use_reentrant is not None:
        model.base_model.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:
        model.enable_input_require_grads()  # reentrant checkpointing needs it, as for peft's LoRA
    return model.train()


def training_step(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    torch.manual_seed(11)  # the same state-dropout masks in every run
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def decoder_layer(model: nn.Module, index: int) -> nn.Module:
    return model.base_model.model.model.layers[index]


class Interrupt:
    """Raises a `KeyboardInterrupt` (as Ctrl-C does) from inside the model, at the `at`-th time it is reached."""

    def __init__(self, at: int = 1) -> None:
        self.at, self.reached = at, 0

    def __call__(self, *args) -> None:
        self.reached += 1
        if self.reached == self.at:
            raise KeyboardInterrupt


def interrupt_forward(model: nn.Module) -> None:
    """Ctrl-C in the middle of a training forward: layers 0 and 1 ran and wrote their chain states."""
    handle = decoder_layer(model, 2).register_forward_pre_hook(Interrupt())
    try:
        with pytest.raises(KeyboardInterrupt):
            model(input_ids=IDS, labels=IDS)
    finally:
        handle.remove()


def interrupt_generate(model: nn.Module) -> None:
    """Ctrl-C during `generate`, in layer 1 of the third decoding step (a one-token call with a KV cache)."""
    model.eval()
    handle = decoder_layer(model, 1).register_forward_pre_hook(Interrupt(at=3))
    try:
        with pytest.raises(KeyboardInterrupt):
            model.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=5, min_new_tokens=5,
                           do_sample=False)
    finally:
        handle.remove()
        model.train()


def interrupt_backward(model: nn.Module) -> None:
    """Ctrl-C in the middle of a backward: the gradient reaches layer 1's output after layers 3 and 2 ran their
    backward (and, with checkpointing, their recomputation)."""
    interrupt = Interrupt()

    def hook_output(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.requires_grad:  # not in the first forward of reentrant checkpointing (run without gradients)
            hidden.register_hook(interrupt)

    handle = decoder_layer(model, 1).register_forward_hook(hook_output)
    try:
        loss = model(input_ids=IDS, labels=IDS).loss
        with pytest.raises(KeyboardInterrupt):
            loss.backward()
    finally:
        handle.remove()
    assert interrupt.reached == 1


FAULTS = {"forward": interrupt_forward, "generate": interrupt_generate, "backward": interrupt_backward}


def live_calls() -> int:
    """`ForwardCall`s anything still holds (each holds its chain states)."""
    gc.collect()
    return sum(isinstance(obj, ForwardCall) for obj in gc.get_objects())


def assert_a_layer_alone_is_refused(model: nn.Module) -> None:
    value_in_layer_3 = decoder_layer(model, 3).self_attn.v_proj
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match="ran outside a forward call"):
            value_in_layer_3(torch.randn(*IDS.shape, 32))


@pytest.mark.parametrize("checkpointing", CHECKPOINTING)
@pytest.mark.parametrize("fault", FAULTS)
def test_the_step_after_a_keyboard_interrupt_equals_a_fresh_models(fault, checkpointing):
    expected_loss, expected_grads = training_step(lm(checkpointing))
    model = lm(checkpointing)
    FAULTS[fault](model)
    assert_a_layer_alone_is_refused(model)
    loss, grads = training_step(model)
    assert torch.equal(loss, expected_loss)
    assert grads.keys() == expected_grads.keys() and any("ssmlora_C" in name for name in grads)
    for name, grad in expected_grads.items():
        assert torch.equal(grads[name], grad), name
    assert_a_layer_alone_is_refused(model)


@pytest.mark.parametrize("fault", FAULTS)
def test_nothing_is_left_behind_after_100_faults(fault):
    """With non-reentrant checkpointing (a training forward keeps its chain states for the recomputation)."""
    model = lm("non-reentrant")
    context = model.base_model.chain_context
    for _ in range(100):
        FAULTS[fault](model)
    assert live_calls() == 0
    assert context.count_open_calls() == 0 and context.count_calls_with_graph() == 0
    assert_a_layer_alone_is_refused(model)
    expected_loss, expected_grads = training_step(lm("non-reentrant"))
    loss, grads = training_step(model)
    assert torch.equal(loss, expected_loss)
    assert all(torch.equal(grads[name], grad) for name, grad in expected_grads.items())


def test_a_kept_graph_holds_its_call_until_it_is_freed():
    """The calls kept for a backward live exactly as long as their graphs: the counts are not just always zero."""
    model = lm("non-reentrant")
    context = model.base_model.chain_context
    loss = model(input_ids=IDS, labels=IDS).loss
    assert context.count_calls_with_graph() == 1 and live_calls() == 1
    interrupt_backward(model)  # a second graph, whose backward fails midway: freed with it
    assert live_calls() == 1 and context.count_calls_with_graph() == 1
    loss.backward()  # the first graph's recomputation still finds its states
    del loss
    assert live_calls() == 0 and context.count_calls_with_graph() == 0


def test_an_adapter_added_through_transformers_is_exact_after_an_interrupted_forward():
    """`model.add_adapter(SSMLoRAConfig(...))`: no PEFT model (and no tuner) is in the call path, only the chain
    owner (the decoder stack) itself."""

    def transformers_model():
        model = tiny_llama()
        model.add_adapter(SSMLoRAConfig(r=4, init_weights=False))
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model.train()

    expected_loss, expected_grads = training_step(transformers_model())
    model = transformers_model()
    handle = model.model.layers[2].register_forward_pre_hook(Interrupt())
    with pytest.raises(KeyboardInterrupt):
        model(input_ids=IDS, labels=IDS)
    handle.remove()
    with pytest.raises(RuntimeError, match="ran outside a forward call"):
        model.model.layers[3].self_attn.v_proj(torch.randn(*IDS.shape, 32))
    loss, grads = training_step(model)
    assert torch.equal(loss, expected_loss)
    assert grads.keys() == expected_grads.keys()
    assert all(torch.equal(grads[name], grad) for name, grad in expected_grads.items())
