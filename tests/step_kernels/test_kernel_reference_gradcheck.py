"""The PyTorch reference step (the kernels' oracle) against finite differences in float64 (`gradcheck`).

The reference's hand-written parts (first arg-min/arg-max routing through `gather`, the dropout mask, the leaky
ReLU of a non-negative input, the detached state) must give the true derivative of the function it computes.
Random data keeps min/max away from ties, so the function is smooth around the test point.
"""

from __future__ import annotations

import pytest
import torch

from ssmlora_kernels.reference import ssmlora_step_reference


def _inputs(tokens=6, d_in=5, d_out=4, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    return {
        "x": rnd(tokens, d_in),
        "base": rnd(tokens, d_out),
        "state": torch.rand(tokens, r, generator=g, dtype=torch.float64),
        "A": rnd(r, d_in),
        "B": rnd(d_out, r),
        "C": rnd(r, r),
        "D": rnd(r, r),
    }


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("with_state", [True, False])
def test_reference_gradcheck(detach, dropout, with_state):
    t = _inputs(seed=int(detach) + 2 * int(dropout))
    mask = None
    if dropout:
        mask = torch.tensor([[0.0, 2.0, 2.0], [2.0, 0.0, 2.0], [2.0, 2.0, 0.0]] * 2, dtype=torch.float64)
    names = ["x", "base", "A", "B", "C", "D"]
    # A detached state has no gradient by design, so it is an input only in full-backprop mode.
    if with_state and not detach:
        names.append("state")
    leaves = {k: t[k].clone().requires_grad_(True) for k in names}

    def fn(*args):
        v = dict(zip(names, args))
        state = v.get("state", t["state"] if with_state else None)
        out, n = ssmlora_step_reference(
            v["x"], v["base"], state, v["A"], v["B"], v["C"], v["D"],
            scaling=1.5, leaky_slope=0.01, eps=1e-8, dropout_mask=mask, detach_state=detach,
        )  # fmt: skip
        assert out.dtype == torch.float64 and n.dtype == torch.float64
        return out, n

    assert torch.autograd.gradcheck(fn, tuple(leaves[k] for k in names), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_detached_state_gets_no_gradient_but_full_mode_does():
    t = _inputs(seed=9)
    for detach in (True, False):
        state = t["state"].clone().requires_grad_(True)
        A = t["A"].clone().requires_grad_(True)
        out, n = ssmlora_step_reference(
            t["x"], t["base"], state, A, t["B"], t["C"], t["D"], scaling=1.5, detach_state=detach
        )
        (out.sum() + n.sum()).backward()
        assert A.grad is not None
        if detach:
            assert state.grad is None
        else:
            assert state.grad is not None and state.grad.abs().sum() > 0
