"""Copyable and picklable models: `copy.deepcopy`, a pickle round trip and `torch.save(model)` / `torch.load` give a
model with its own chain context and bitwise the original's outputs; `AveragedModel` (SWA / EMA) works."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from peft import get_peft_model
from test_ssmlora_faults import IDS, lm, training_step
from tiny_models import VOCAB
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from transformers import T5Config, T5ForConditionalGeneration

from peft_ssmlora import SSMLoRAConfig
from peft_ssmlora import chain as chain_module
from peft_ssmlora.layer import SSMLoRALayer


def torch_save_and_load(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda model: pickle.loads(pickle.dumps(model)),
          "torch.save": torch_save_and_load}


def eval_logits(model: nn.Module) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    model.train(was_training)
    return logits


def assert_owns_its_context(copied: nn.Module, original: nn.Module) -> None:
    context = copied.base_model.chain_context
    assert context is not original.base_model.chain_context
    layers = [m for m in copied.modules() if isinstance(m, SSMLoRALayer)]
    owners = [m for m in copied.modules() if "_ssmlora_chain_context" in vars(m)]
    assert layers and owners
    assert all(m.ssmlora_context is context for m in layers)
    assert all(m._ssmlora_chain_context is context for m in owners)


# transformers' `gradient_checkpointing_enable` installs a hook that is a local function, which pickle refuses
# (peft's LoRA models too): checkpointed models are deep-copied only.
@pytest.mark.parametrize(("how", "checkpointing"), [*[(how, "plain") for how in COPIES], ("deepcopy", "non-reentrant")])
def test_a_copy_gives_the_originals_outputs_and_gradients_bitwise(how, checkpointing, monkeypatch):
    original = lm(checkpointing)
    expected_logits = eval_logits(original)
    expected_loss, expected_grads = training_step(original)
    # As in a new process, where the chain owner classes were never made: loading makes them.
    monkeypatch.setattr(chain_module, "_OWNER_CLASSES", {}, raising=False)
    copied = COPIES[how](original)
    assert_owns_its_context(copied, original)
    assert torch.equal(eval_logits(copied), expected_logits)
    loss, grads = training_step(copied)
    assert torch.equal(loss, expected_loss)
    assert grads.keys() == expected_grads.keys()
    assert all(torch.equal(grads[name], grad) for name, grad in expected_grads.items())


def test_a_copy_changes_nothing_of_the_originals():
    """Copied while the original's checkpointed graph is alive (its call kept for the recomputation); the copy
    trains a step and is unloaded; then the original's backward, weights and context are as if no copy existed."""
    expected_loss, expected_grads = training_step(lm("non-reentrant"))
    original = lm("non-reentrant")
    context = original.base_model.chain_context
    weights = {n: p.detach().clone() for n, p in original.named_parameters()}
    torch.manual_seed(11)
    loss = original(input_ids=IDS, labels=IDS).loss
    assert context.count_calls_with_graph() == 1

    copied = copy.deepcopy(original)
    assert_owns_its_context(copied, original)
    copy_loss, _ = training_step(copied)
    assert torch.equal(copy_loss, expected_loss)
    torch.optim.SGD([p for p in copied.parameters() if p.requires_grad], lr=1.0).step()
    assert copied.base_model.chain_context.count_calls_with_graph() == 0
    assert context.count_calls_with_graph() == 1 and context.count_open_calls() == 0
    copied.unload()

    assert all(p.grad is None for p in original.parameters())
    assert all(torch.equal(p, weights[n]) for n, p in original.named_parameters())
    loss.backward()
    assert torch.equal(loss.detach(), expected_loss)
    assert all(torch.equal(p.grad, expected_grads[n]) for n, p in original.named_parameters() if p.requires_grad)
    assert torch.equal(eval_logits(original), eval_logits(lm("non-reentrant")))


def test_a_copied_encoder_decoder_generates_as_the_original():
    """Two chain owners (the encoder and decoder stacks), and `generate` calls the encoder on its own."""
    torch.manual_seed(0)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = get_peft_model(T5ForConditionalGeneration(config), SSMLoRAConfig(r=4, init_weights=False,
                                                                            target_modules=["q", "v"])).eval()
    kwargs = dict(input_ids=IDS, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    expected = model.generate(**kwargs)
    for how, make_copy in COPIES.items():
        assert torch.equal(make_copy(model).generate(**kwargs), expected), how


@pytest.mark.parametrize("average", ["swa", "ema"])
def test_averaged_model_of_an_ssmlora_model_trains_and_evaluates(average):
    """SWA / EMA as `torch.optim.swa_utils.AveragedModel` runs them (it deep-copies the model): training the model
    with checkpointing while the average evaluates gives the steps of a model trained alone, and the average
    computes what an SSMLoRA model with the averaged weights computes."""
    model, alone = lm("non-reentrant"), lm("non-reentrant")
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5) if average == "ema" else None)
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (model, alone)]
    snapshots = []
    for _ in range(3):
        loss, grads = training_step(model)
        optimizers[0].step()
        averaged.update_parameters(model)
        averaged_logits = eval_logits(averaged)
        expected_loss, expected_grads = training_step(alone)
        optimizers[1].step()
        assert torch.equal(loss, expected_loss)
        assert all(torch.equal(grads[name], grad) for name, grad in expected_grads.items())
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    for name in snapshots[0]:
        steps = [snapshot[name] for snapshot in snapshots]
        if average == "swa":
            expected = sum(steps) / 3
        else:  # the first update copies, then average = 0.5 * average + 0.5 * weights
            expected = 0.5 * (0.5 * steps[0] + 0.5 * steps[1]) + 0.5 * steps[2]
        torch.testing.assert_close(averaged.module.get_parameter(name), expected, msg=name)
    assert not torch.equal(averaged_logits, eval_logits(model))  # the average differs from the last weights

    reference = lm("non-reentrant")
    reference.load_state_dict(averaged.module.state_dict())
    assert torch.equal(averaged_logits, eval_logits(reference))
