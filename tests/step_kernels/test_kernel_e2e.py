"""End to end: a tiny Llama with SSMLoRA gives the same loss and gradients with PEFT_SSMLORA_IMPL=torch and =triton.

Without a GPU the Triton kernels run under the interpreter (conftest sets TRITON_INTERPRET=1 before they load).
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import VOCAB, tiny_llama

from peft_ssmlora import SSMLoRAConfig
from ssmlora_kernels import triton_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(state_grad: str, state_dropout: float):
    model = tiny_llama(layers=2, seed=0)
    config = SSMLoRAConfig(r=8, target_modules=TARGETS, state_grad=state_grad, state_dropout=state_dropout)
    model = get_peft_model(model, config).to(DEVICE)
    # B = C = D = 0 at initialisation would leave the state path inactive: give every adapter weight a value.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ssmlora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _loss_and_grads(model, impl, monkeypatch, seed=0):
    monkeypatch.setenv("PEFT_SSMLORA_IMPL", impl)
    calls = []
    kernel = triton_step.ssmlora_step_triton

    def spy(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(triton_step, "ssmlora_step_triton", spy)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (2, 11), generator=g).to(DEVICE)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    monkeypatch.setattr(triton_step, "ssmlora_step_triton", kernel)
    # Every adapted module went through the selected implementation.
    adapted = sum(1 for m in model.modules() if hasattr(m, "ssmlora_A"))
    assert adapted >= 10 and len(calls) == (adapted if impl == "triton" else 0)
    return loss.detach(), grads


@pytest.mark.parametrize("state_grad", ["detach", "full"])
def test_torch_and_triton_give_the_same_loss_and_gradients(state_grad, monkeypatch):
    model = _model(state_grad, state_dropout=0.0).train()
    loss_t, grads_t = _loss_and_grads(model, "torch", monkeypatch)
    loss_k, grads_k = _loss_and_grads(model, "triton", monkeypatch)
    torch.testing.assert_close(loss_k, loss_t, rtol=1e-5, atol=1e-6)
    assert grads_k.keys() == grads_t.keys()
    adapter = [n for n in grads_t if "ssmlora_" in n]
    assert len(adapter) >= 4 * 2 * 5, "expected A, B, C, D of at least 5 modules in each of 2 layers"
    for name, want in grads_t.items():
        got = grads_k[name]
        scale = want.abs().max().item() or 1.0
        err = (got - want).abs().max().item()
        assert err <= 1e-4 * scale, f"{name}: max abs error {err:.3g} (scale {scale:.3g})"
    # The state path is active: C and D receive non-zero gradients somewhere in the model.
    assert any(grads_t[n].abs().sum() > 0 for n in adapter if "ssmlora_C" in n)


def test_triton_with_state_dropout_is_reproducible_and_matches_in_eval(monkeypatch):
    model = _model("detach", state_dropout=0.3).train()
    loss_a, grads_a = _loss_and_grads(model, "triton", monkeypatch, seed=0)
    loss_b, grads_b = _loss_and_grads(model, "triton", monkeypatch, seed=0)
    loss_c, _ = _loss_and_grads(model, "triton", monkeypatch, seed=1)
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    assert not torch.equal(loss_a, loss_c), "a different seed must draw a different state-dropout mask"
    # Eval mode: no dropout, both implementations agree.
    model.eval()
    loss_t, _ = _loss_and_grads(model, "torch", monkeypatch)
    loss_k, _ = _loss_and_grads(model, "triton", monkeypatch)
    torch.testing.assert_close(loss_k, loss_t, rtol=1e-5, atol=1e-6)
