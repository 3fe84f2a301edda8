"""The SSMLoRA module against an independent float64 implementation of the paper's math, written here.

A toy model of residual blocks, each with two adapted linears of different shapes (`q`: d → d+3, `v`: d+3 → d), so
that the q chain and the v chain run along depth side by side. The independent implementation follows
`ssmlora-method.md` literally (right-multiplied A, B, C, D; amin/amax on tie-free data) in float64.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

import peft_ssmlora
from peft_ssmlora import SSMLoRAConfig

D_MODEL, LAYERS = 12, 4


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(D_MODEL, D_MODEL + 3)
        self.v = nn.Linear(D_MODEL + 3, D_MODEL)

    def forward(self, x):
        return x + torch.tanh(self.v(torch.tanh(self.q(x))))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def independent_forward(model, x, *, scaling, masks, detach, eps=1e-8, interval=False):
    """float64 SSMLoRA forward of the toy model; `masks[(name, layer)]` is the state dropout mask (or absent)."""
    x = x.double()
    states = {"q": None, "v": None}

    def frozen(linear, h):
        base = getattr(linear, "base_layer", linear)
        return h @ base.weight.double().T + base.bias.double()

    def adapted(name, i, linear, h):
        out = frozen(linear, h)
        A = linear.ssmlora_A["default"].weight.double().T  # d_in × r
        B = linear.ssmlora_B["default"].weight.double().T  # r × d_out
        C = linear.ssmlora_C["default"].weight.double().T
        D = linear.ssmlora_D["default"].weight.double().T
        u = h @ A
        s = states[name] if states[name] is not None else torch.zeros_like(u)
        if detach:
            s = s.detach()
        z = s + s @ C + u @ D
        lo, hi = z.amin(-1, keepdim=True), z.amax(-1, keepdim=True)
        n = (z - lo) / (hi - lo + eps)
        m = masks.get((name, i))
        dropped = n if m is None else n * m.double()
        v = u + torch.nn.functional.leaky_relu(dropped, 0.01)
        states[name] = n
        return out + scaling * (v @ B)

    for i, block in enumerate(model.layers):
        q_on = not interval or i % 2 == 0
        v_on = not interval or i % 2 == 1
        hq = torch.tanh(adapted("q", i, block.q, x) if q_on else frozen(block.q, x))
        hv = adapted("v", i, block.v, hq) if v_on else frozen(block.v, hq)
        x = x + torch.tanh(hv)
    return x


@pytest.mark.parametrize("state_grad", ["detach", "full"])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("interval", [False, True])
def test_module_matches_float64_implementation(monkeypatch, state_grad, dropout, interval):
    torch.manual_seed(1234)
    config = SSMLoRAConfig(
        r=5, lora_alpha=10, target_modules=["q", "v"], interval_modules=["q", "v"] if interval else None,
        state_grad=state_grad, state_dropout=0.3 if dropout else 0.0, init_weights=False,
    )
    model = get_peft_model(Toy(), config).base_model.model
    model.train()

    # Replace the random state-dropout mask by fixed masks, recorded in call order (q0, v0, q1, v1, ...).
    order = [(name, i) for i in range(LAYERS) for name in ("q", "v") if not interval or (i % 2 == (name == "v"))]
    masks = {key: (torch.rand(3, 7, 5) >= 0.3).float() / 0.7 for key in order}
    calls = iter(order)
    monkeypatch.setattr(peft_ssmlora.step, "make_dropout_mask", lambda shape, p, device: masks[next(calls)])

    x = torch.randn(3, 7, D_MODEL, requires_grad=True)
    out = model(x)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()

    x64 = x.detach().double().requires_grad_(True)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all("ssmlora_" in n for n in params)
    expected = independent_forward(model, x64, scaling=2.0, masks=masks if dropout else {},
                                   detach=state_grad == "detach", interval=interval)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)

    expected_grads = torch.autograd.grad((expected * weights.double()).sum(), [x64, *params.values()],
                                         allow_unused=True)
    torch.testing.assert_close(x.grad.double(), expected_grads[0], rtol=1e-4, atol=1e-5)
    for (name, p), g in zip(params.items(), expected_grads[1:]):
        g = torch.zeros_like(p, dtype=torch.float64) if g is None else g
        assert p.grad is not None, f"{name} got no gradient"
        torch.testing.assert_close(p.grad.double(), g.double(), rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"gradient of {name}: {m}")


class CutResidualToy(Toy):
    """Detaches the residual stream between blocks, so that only the chain links one layer to the next."""

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = layer(x).detach()
        return self.layers[-1](x)


def test_full_mode_gradient_flows_along_the_chain_and_detach_blocks_it():
    """In `full` mode, a loss on the last layer's output reaches an earlier module's C and D only through the chain."""
    grads = {}
    for mode in ("detach", "full"):
        torch.manual_seed(0)
        model = get_peft_model(CutResidualToy(), SSMLoRAConfig(r=4, target_modules=["q"], state_grad=mode,
                                                               state_dropout=0.0, init_weights=False)).base_model.model
        x = torch.randn(2, 3, D_MODEL)
        model(x).sum().backward()
        grads[mode] = model.layers[2].q.ssmlora_D["default"].weight.grad
    assert grads["detach"] is None or torch.count_nonzero(grads["detach"]) == 0
    assert torch.count_nonzero(grads["full"]) > 0
