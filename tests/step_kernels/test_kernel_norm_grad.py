"""The min-max normalisation's gradient where a state is flat across the rank axis (issue 28, item 4).

At initialisation (B = C = D = 0) every chain's state z is constant over the rank axis, so the exact gradient of
n = (z - min z) / (max z - min z + eps) is of size 1 / eps: one SGD step later D's gradient was ~1e11 times A's at
eps = 1e-8. The backward divides by max(max - min + eps, grad_floor) instead; the forward is unchanged.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import tiny_llama

from peft_ssmlora import SSMLoRAConfig
from ssmlora_kernels.reference import ssmlora_step_reference

EPS_VALUES = (1e-8, 1e-6, 1e-4, 1e-3)


def max_grads_after_one_sgd_step(norm_eps: float, **config) -> dict[str, float]:
    """max |grad| of every adapter matrix type (A, B, C, D) of a tiny Llama after one SGD step from initialisation.

    The first step only moves A and B (dv = G Bᵀ is 0 while B = 0); the second backward is the one that meets the
    flat states with a non-zero B.
    """
    model = tiny_llama(layers=4, seed=0)
    torch.manual_seed(0)
    config = SSMLoRAConfig(
        r=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], interval_modules=["q_proj", "v_proj"],
        state_dropout=0.0, norm_eps=norm_eps, **config,
    )  # fmt: skip
    model = get_peft_model(model, config)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    for step in range(2):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        if step == 0:
            optimizer.step()
    return {
        k: max(p.grad.abs().max().item() for name, p in model.named_parameters() if f".ssmlora_{k}." in name)
        for k in "ABCD"
    }


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_gradient_at_initialisation_does_not_depend_on_norm_eps(impl, monkeypatch):
    monkeypatch.setenv("PEFT_SSMLORA_IMPL", impl)
    # The Triton interpreter is slow on CPU: the two ends of the range there.
    eps_values = EPS_VALUES if impl == "torch" or torch.cuda.is_available() else EPS_VALUES[::3]
    grads = {eps: max_grads_after_one_sgd_step(eps) for eps in eps_values}
    first = grads[eps_values[0]]
    assert first["D"] > 0, "D must receive a gradient at the second step, or the test shows nothing"
    for eps, g in grads.items():
        for k in "ABCD":
            assert g[k] <= 1.1 * first[k] and first[k] <= 1.1 * g[k], (
                f"max |grad {k}| at norm_eps={eps:g} is {g[k]:.3g}, at {eps_values[0]:g} {first[k]:.3g}"
            )
    # And D's gradient is of the size of the others' (it was ~1e3 against A's ~2e-3 at eps = 1e-8).
    assert first["D"] < 10 * max(first["A"], first["B"])


def test_exact_gradient_still_available():
    # norm_grad_floor=0 is the paper's exact gradient: the 1/eps growth this module guards against.
    small, large = (max_grads_after_one_sgd_step(eps, norm_grad_floor=0.0)["D"] for eps in (1e-6, 1e-4))
    assert 50 < small / large < 200


def _step(x, state, A, B, C, D, grad_floor, eps=1e-8, detach=True):
    base = torch.zeros(x.shape[0], B.shape[0], dtype=x.dtype)
    return ssmlora_step_reference(
        x, base, state, A, B, C, D, scaling=2.0, eps=eps, grad_floor=grad_floor, detach_state=detach
    )


def _weights(r=6, d_in=5, d_out=4, seed=0, state_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) * scale for shape, scale in (
        ((3, d_in), 1.0), ((3, r), state_scale), ((r, d_in), 1.0), ((d_out, r), 1.0), ((r, r), state_scale),
        ((r, r), state_scale),
    )]  # fmt: skip


def test_forward_does_not_depend_on_grad_floor():
    for state_scale in (1.0, 1e-6):  # ranges of z ~1, and ~1e-6 (far below the floor, far above eps)
        x, s, A, B, C, D = _weights(seed=1, state_scale=state_scale)
        x[2], s[2] = 0.0, 0.0  # token 2: z exactly flat, as at a chain start at initialisation
        outs = [_step(x, s, A, B, C, D, floor) for floor in (0.0, 1e-3, 10.0)]
        for out, n in outs[1:]:
            assert torch.equal(out, outs[0][0]) and torch.equal(n, outs[0][1])


def _grads(tensors, grad_floor, detach):
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    out, n = _step(*leaves, grad_floor, detach=detach)
    (out.sum() + (n * torch.linspace(-1, 1, n.shape[-1], dtype=n.dtype)).sum()).backward()
    return {k: t.grad for k, t in zip("xsABCD", leaves)}


@pytest.mark.parametrize("detach", [True, False])
def test_gradient_is_exact_above_the_floor(detach):
    tensors = _weights(seed=2)
    assert (_z_range(*tensors) > 1e-3).all()
    exact, floored = _grads(tensors, 0.0, detach), _grads(tensors, 1e-3, detach)
    for k, g in exact.items():
        assert (g is None and floored[k] is None) or torch.equal(g, floored[k]), k


@pytest.mark.parametrize("detach", [True, False])
def test_gradient_below_the_floor_is_the_exact_one_scaled(detach):
    x, s, A, B, C, D = _weights(seed=3, state_scale=1e-6)
    z_range = _z_range(x, s, A, B, C, D)
    assert (z_range < 1e-4).all() and (z_range > 1e-7).all()
    # One token at a time, so that each gradient comes from one range: C's, D's and (full-backprop mode) the
    # state's gradient is the exact one times (range + eps) / floor.
    for row in range(x.shape[0]):
        tensors = (x[row : row + 1], s[row : row + 1], A, B, C, D)
        exact, floored = _grads(tensors, 0.0, detach), _grads(tensors, 1e-3, detach)
        factor = (z_range[row] + 1e-8) / 1e-3
        for k in ("C", "D") + (() if detach else ("s",)):
            torch.testing.assert_close(floored[k], exact[k] * factor, rtol=1e-9, atol=0)
        assert exact["D"].abs().max() > 10 * floored["D"].abs().max()


def _z_range(x, s, A, B, C, D):
    u = x @ A.T
    z = s + s @ C.T + u @ D.T
    return z.max(-1).values - z.min(-1).values


def test_config_rejects_a_negative_floor_and_saves_the_floor(tmp_path):
    with pytest.raises(ValueError, match="norm_grad_floor"):
        SSMLoRAConfig(norm_grad_floor=-1e-3)
    SSMLoRAConfig(norm_grad_floor=0.0, target_modules=["q_proj"]).save_pretrained(tmp_path)
    assert SSMLoRAConfig.from_pretrained(tmp_path).norm_grad_floor == 0.0
