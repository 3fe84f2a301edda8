"""Each forward call owns its chain states: concurrent forwards from several threads, backward (and the activation
checkpointing recomputation inside it) on another thread, layers called on their own, and reentrant checkpointing."""

from __future__ import annotations

import threading

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from test_ssmlora_training import gradients, step_losses, training_args
from tiny_models import VOCAB, tiny_gpt2, tiny_llama
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import T5Config, T5ForConditionalGeneration, Trainer

from peft_ssmlora import SSMLoRAConfig

THREADS, CALLS = 4, 40


def batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    """Inputs of different shapes, so that a state read from another call would also show up as a shape error."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (1 + i % 3, 4 + i % 5), generator=g) for i in range(n)]


def run_in_threads(*targets) -> None:
    """Run the targets concurrently and re-raise the first error any of them raised."""
    errors: list[BaseException] = []

    def guarded(target):
        try:
            target()
        except BaseException as error:  # noqa: BLE001 - handed to the test thread below
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(target,)) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


@pytest.fixture
def one_intra_op_thread():
    """Several Python threads each running multi-threaded kernels oversubscribe small CI machines many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lm(**config) -> nn.Module:
    return get_peft_model(tiny_llama(), SSMLoRAConfig(r=4, init_weights=False, **config))


def test_concurrent_forwards_from_several_threads_give_the_single_thread_outputs(one_intra_op_thread):
    model = lm(state_dropout=0.0)
    model.eval()
    inputs = batches(CALLS)
    with torch.no_grad():
        expected = [model(input_ids=ids).logits for ids in inputs]
    results: dict[tuple[int, int], torch.Tensor] = {}

    def serve(thread: int):
        with torch.no_grad():
            for call in range(CALLS):
                i = (call + thread * 7) % CALLS  # each thread walks the inputs in its own order
                results[thread, call] = model(input_ids=inputs[i]).logits

    run_in_threads(*[lambda t=t: serve(t) for t in range(THREADS)])
    assert len(results) == THREADS * CALLS
    for (thread, call), got in results.items():
        assert torch.equal(got, expected[(call + thread * 7) % CALLS]), (thread, call)


def test_training_in_one_thread_while_another_evaluates(one_intra_op_thread):
    """Training recomputes layers in backward (non-reentrant checkpointing) while the other thread's calls open and
    close: neither may see the other's states."""
    model = lm(state_dropout=0.0)  # no random masks: the two threads share torch's global generator
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # the evaluating thread cannot switch the shared model to eval mode; it evaluates under no_grad
    train_inputs, eval_inputs = batches(10, seed=1), batches(CALLS, seed=2)
    expected_grads = [gradients(model, ids) for ids in train_inputs]
    with torch.no_grad():
        expected_logits = [model(input_ids=ids).logits for ids in eval_inputs]
    got_grads, got_logits = [], []

    def train():
        for ids in train_inputs:
            got_grads.append(gradients(model, ids))

    def evaluate():
        with torch.no_grad():
            for ids in eval_inputs:
                got_logits.append(model(input_ids=ids).logits)

    run_in_threads(train, evaluate)
    for got, expected in zip(got_logits, expected_logits, strict=True):
        assert torch.equal(got, expected)
    for got, expected in zip(got_grads, expected_grads, strict=True):
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[name], expected[name]) for name in expected)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_backward_on_another_thread_recomputes_with_the_states_of_its_own_call(use_reentrant):
    """As on CUDA, where autograd's device threads run backward and hence the checkpointing recomputation: the
    recomputed layers must read the states of their own forward call, even after another call ran."""
    model = lm()
    model.train()
    first = batches(1, seed=3)[0]
    second = first.flip(0)  # the same token shape: a mix-up of the two calls' states could not fail on shapes
    torch.manual_seed(5)
    expected = gradients(model, first)

    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.enable_input_require_grads()  # reentrant checkpointing needs inputs that require grad, as for peft's LoRA
    model.zero_grad()
    torch.manual_seed(11)  # the masks `gradients` draws
    loss = model(input_ids=first, labels=first).loss
    later = model(input_ids=second, labels=second)  # a later call with gradients, its graph kept alive
    run_in_threads(loss.backward)
    assert later.loss.isfinite()
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_a_layer_called_on_its_own_after_a_forward_is_an_error(grad):
    model = lm()
    model.train()
    ids = batches(1)[0]
    with torch.set_grad_enabled(grad):
        out = model(input_ids=ids, labels=ids)  # kept alive: its graph still holds the call's states
        value_in_layer_3 = model.base_model.model.model.layers[3].self_attn.v_proj
        with pytest.raises(RuntimeError, match="ran outside a forward call of its model.*Call the whole PEFT model"):
            value_in_layer_3(torch.randn(*ids.shape, 32))
    assert out.loss.isfinite()


def test_an_inner_module_that_runs_whole_chains_can_be_called_directly():
    """Fused-loss trainers run the decoder stack without its head; it owns the chains, so it opens its own call."""
    model = lm()
    model.eval()
    ids = batches(1)[0]
    with torch.no_grad():
        expected = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        decoder_stack = model.base_model.model.model
        assert torch.equal(decoder_stack(input_ids=ids).last_hidden_state, expected)


def test_encoder_decoder_generate_runs_the_encoder_alone():
    torch.manual_seed(0)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = get_peft_model(T5ForConditionalGeneration(config), SSMLoRAConfig(r=4, init_weights=False,
                                                                            target_modules=["q", "v"]))
    model.eval()
    ids = batches(1, seed=8)[0]
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with_cache = model.generate(input_ids=ids, use_cache=True, **kwargs)
    assert torch.equal(with_cache, model.generate(input_ids=ids, use_cache=False, **kwargs))
    with model.disable_adapter():
        assert not torch.equal(with_cache, model.generate(input_ids=ids, use_cache=True, **kwargs))


def test_several_calls_in_one_checkpointed_backward_are_refused_clearly():
    """Which call a recomputed layer belongs to is known per backward pass; one pass through two calls' graphs is
    refused rather than guessed (without checkpointing nothing is recomputed and it works)."""
    model = lm()
    model.train()
    first, second = batches(2, seed=4)
    (model(input_ids=first, labels=first).loss + model(input_ids=second, labels=second).loss).backward()
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    both = model(input_ids=first, labels=first).loss + model(input_ids=second, labels=second).loss
    with pytest.raises(RuntimeError, match="through 2 forward calls.*Run backward once per forward call"):
        both.backward()


# ---------------------------------------------------------------- reentrant activation checkpointing


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_transformers_reentrant_checkpointing_is_exact_with_detached_states(make_model):
    """DeepSpeed ZeRO-3 and TRL force `use_reentrant=True` for peft models."""
    model = get_peft_model(make_model(), SSMLoRAConfig(r=4, init_weights=False, target_modules=["c_attn", "c_fc"]
                                                        if make_model is tiny_gpt2 else ["q_proj", "v_proj", "down_proj"]))
    model.train()
    ids = batches(1, seed=6)[0]
    torch.manual_seed(0)
    plain_loss = model(input_ids=ids, labels=ids).loss.item()
    plain = gradients(model, ids)
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    torch.manual_seed(0)
    assert model(input_ids=ids, labels=ids).loss.item() == plain_loss
    checkpointed = gradients(model, ids)
    assert plain.keys() == checkpointed.keys() and any("ssmlora_C" in name for name in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_trainer_with_reentrant_checkpointing_trains_exactly_as_without(tmp_path):
    """What DeepSpeed ZeRO-3 and TRL set up: `gradient_checkpointing=True` with `use_reentrant=True`."""
    ids = torch.randint(1, VOCAB, (16, 8), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    losses, weights = {}, {}
    for run, checkpointing in {"plain": {}, "reentrant": dict(
            gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})}.items():
        torch.manual_seed(0)
        model = lm()
        trainer = Trainer(model=model, train_dataset=data,
                          args=training_args(tmp_path / run, num_train_epochs=1, **checkpointing))
        trainer.train()
        assert model.base_model.model.is_gradient_checkpointing == (run == "reentrant")
        losses[run] = step_losses(trainer)
        weights[run] = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert len(losses["plain"]) == 4 and losses["reentrant"] == losses["plain"]
    for name, trained in weights["plain"].items():
        torch.testing.assert_close(weights["reentrant"][name], trained, rtol=1e-5, atol=1e-7, msg=name)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.proj(x))


class Stack(nn.Module):
    """A user's model that checkpoints its layers itself with `torch.utils.checkpoint`."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Block() for _ in range(4))
        self.use_reentrant: bool | None = None  # None: no checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.use_reentrant is None:
                x = layer(x)
            else:
                x = checkpoint(layer, x, use_reentrant=self.use_reentrant)
        return x


def stack_gradients(model: nn.Module, x: torch.Tensor, use_reentrant: bool | None) -> dict[str, torch.Tensor]:
    model.base_model.model.use_reentrant = use_reentrant
    model.zero_grad()
    torch.manual_seed(11)  # the same state-dropout masks in every run
    model(x.requires_grad_()).square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_user_level_reentrant_checkpointing_is_exact_with_detached_states():
    model = get_peft_model(Stack(), SSMLoRAConfig(r=4, init_weights=False, target_modules=["proj"]))
    model.train()
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
    plain = stack_gradients(model, x, use_reentrant=None)
    for use_reentrant in (True, False):
        checkpointed = stack_gradients(model, x, use_reentrant=use_reentrant)
        assert checkpointed.keys() == plain.keys()
        for name in plain:
            torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_reentrant_checkpointing_with_full_state_gradients_is_refused_with_the_reentrant_message():
    model = get_peft_model(Stack(), SSMLoRAConfig(r=4, target_modules=["proj"], state_grad="full"))
    model.train()
    x = torch.randn(3, 5, 16)
    stack_gradients(model, x, use_reentrant=False)  # non-reentrant is exact in full mode too
    with pytest.raises(RuntimeError, match="state_grad='full' does not support reentrant activation checkpointing"):
        stack_gradients(model, x, use_reentrant=True)
