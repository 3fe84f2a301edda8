"""SSMLoRA at inference: the lean step against its oracles, the dispatch that chooses it, the layer's weight access,
and compiled generation (issue 30).

`ssmlora_step_inference` must give the reference's values bitwise (it runs the same operations in the same order,
minus those that change nothing), and the float64 reference and the Triton kernel within their usual tolerances.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from peft import get_peft_model
from tiny_models import VOCAB, tiny_llama

import peft_ssmlora.step as step_module
from peft_ssmlora import SSMLoRAConfig
from ssmlora_kernels.reference import ssmlora_step_inference, ssmlora_step_reference

SCALING, EPS = 2.0, 1e-8


def _inputs(lead, d_in=40, d_out=24, r=8, dtype=torch.float32, weight_dtype=None, with_state=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    wdt = weight_dtype or dtype

    def rnd(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * std).to(dt)

    return {
        "x": rnd(*lead, d_in), "base_out": rnd(*lead, d_out),
        # A previous module's state is a min-max normalised vector in [0, 1].
        "state": torch.rand(*lead, r, generator=g) if with_state else None,
        "A_w": rnd(r, d_in, std=d_in**-0.5, dt=wdt), "B_w": rnd(d_out, r, std=r**-0.5, dt=wdt),
        "C_w": rnd(r, r, std=r**-0.5, dt=wdt), "D_w": rnd(r, r, std=r**-0.5, dt=wdt),
    }


def _both(t):
    with torch.no_grad():
        want = ssmlora_step_reference(*t.values(), scaling=SCALING, eps=EPS)
        got = ssmlora_step_inference(*t.values(), scaling=SCALING, eps=EPS)
    return got, want


@pytest.mark.parametrize("lead", [(8, 1), (2, 7), (5,)], ids=["decode", "prefill", "flat"])
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "chain-start"])
@pytest.mark.parametrize(
    "dtype,weight_dtype",
    [(torch.float32, None), (torch.bfloat16, torch.float32), (torch.bfloat16, None), (torch.float16, None),
     (torch.float64, None)],
    ids=["fp32", "bf16-act-fp32-weights", "bf16", "fp16", "fp64"],
)
@pytest.mark.parametrize("r", [1, 8])
def test_inference_step_equals_reference_bitwise(lead, with_state, dtype, weight_dtype, r):
    t = _inputs(lead, r=r, dtype=dtype, weight_dtype=weight_dtype, with_state=with_state, seed=r)
    (out, n), (want_out, want_n) = _both(t)
    assert out.dtype == want_out.dtype and n.dtype == want_n.dtype
    assert torch.equal(out, want_out) and torch.equal(n, want_n)


def test_inference_step_within_float64_tolerance_of_float64_reference():
    t = _inputs((6, 3), seed=3)
    t64 = {k: None if v is None else v.double() for k, v in t.items()}
    with torch.no_grad():
        out, n = ssmlora_step_inference(*t.values(), scaling=SCALING, eps=EPS)
        want_out, want_n = ssmlora_step_reference(*t64.values(), scaling=SCALING, eps=EPS)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(n.double(), want_n, rtol=1e-5, atol=1e-5)


def test_flat_and_tied_states():
    """A state flat across the rank axis (every chain at initialisation: C = D = 0) and one with ties: the reference's
    argmin/gather and the lean aminmax give the same values."""
    t = _inputs((4, 2), seed=5)
    t["C_w"].zero_()
    t["D_w"].zero_()
    t["state"][0, 0] = 0.5  # flat: max - min = 0, n = 0
    t["state"][1, 0, :4] = 1.0  # ties at the maximum
    t["state"][1, 1, 2:5] = 0.0  # ties at the minimum
    (out, n), (want_out, want_n) = _both(t)
    assert torch.equal(out, want_out) and torch.equal(n, want_n)
    assert torch.equal(n[0, 0], torch.zeros(8))


def test_inference_step_matches_triton_kernel():
    """The Triton kernel (the interpreter on CPU) is the other oracle: its no-grad path against the lean step."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set (tests/conftest.py sets it)")
    from ssmlora_kernels.triton_step import ssmlora_step_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for with_state in (True, False):
        t = {k: None if v is None else v.to(device) for k, v in _inputs((9, 1), with_state=with_state, seed=7).items()}
        with torch.no_grad():
            out, n = ssmlora_step_inference(*t.values(), scaling=SCALING, eps=EPS)
            k_out, k_n = ssmlora_step_triton(
                t["x"], t["base_out"].clone(), t["state"], t["A_w"], t["B_w"], t["C_w"], t["D_w"],
                scaling=SCALING, dropout_p=0.0, leaky_slope=0.01, eps=EPS, detach_state=True,
            )  # fmt: skip
        torch.testing.assert_close(out, k_out, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(n, k_n, rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------------------- the dispatch


@pytest.fixture
def step_calls(monkeypatch):
    """Which of the two torch implementations `ssmlora_step` calls, in order."""
    calls = []
    for name in ("ssmlora_step_inference", "ssmlora_step_reference"):
        original = getattr(step_module, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(step_module, name, spy)
    monkeypatch.setenv(step_module.IMPL_ENV_VAR, "torch")
    return calls


def _step(t, dropout_p=0.0):
    return step_module.ssmlora_step(*t.values(), scaling=SCALING, dropout_p=dropout_p, leaky_slope=0.01, eps=EPS,
                                    detach_state=True)


def test_dispatch_takes_the_lean_step_only_where_nothing_needs_more(step_calls):
    t = _inputs((3, 2))
    with torch.no_grad():
        _step(t)
    with torch.inference_mode():
        _step(t)
    _step(t)  # grad mode on, but no tensor requires a gradient: nothing to record
    assert step_calls == ["ssmlora_step_inference"] * 3
    step_calls.clear()

    with torch.no_grad():
        _step(t, dropout_p=0.2)  # state dropout (training mode under no_grad) needs the mask
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _step(t)  # autocast: the reference keeps the state path out of it
    trainable = dict(t, A_w=t["A_w"].clone().requires_grad_(True))
    out, _ = _step(trainable)  # recorded by autograd: the reference's gradient routing
    assert out.requires_grad
    assert step_calls == ["ssmlora_step_reference"] * 3


def test_impl_setting_is_resolved_once_and_changes_take_effect(monkeypatch):
    resolved = []
    original = step_module._resolve_impl
    monkeypatch.setattr(step_module, "_resolve_impl", lambda s, d: resolved.append(s) or original(s, d))
    monkeypatch.setattr(step_module, "_RESOLVED_IMPLS", {})
    cpu = torch.device("cpu")
    monkeypatch.setenv(step_module.IMPL_ENV_VAR, "torch")
    assert [step_module.selected_impl(cpu) for _ in range(3)] == ["torch"] * 3
    monkeypatch.setenv(step_module.IMPL_ENV_VAR, " Triton ")
    assert step_module.selected_impl(cpu) == "triton"
    monkeypatch.delenv(step_module.IMPL_ENV_VAR)
    assert step_module.selected_impl(cpu) == "torch"  # auto on a CPU
    assert resolved == ["torch", " Triton ", "auto"]
    monkeypatch.setenv(step_module.IMPL_ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="PEFT_SSMLORA_IMPL='cuda' is not one of"):
        step_module.selected_impl(cpu)


# ---------------------------------------------------------------------------------------------------- the model


def _ssmlora_llama(layers=4, seed=0):
    config = SSMLoRAConfig(r=4, lora_alpha=8, init_weights=False)
    return get_peft_model(tiny_llama(layers=layers, seed=seed), config).eval()


def test_eval_logits_with_and_without_autograd_are_equal(monkeypatch):
    """The lean path (no_grad) against the reference path (grad mode, trainable adapters) through a whole model."""
    monkeypatch.setenv(step_module.IMPL_ENV_VAR, "torch")
    model = _ssmlora_llama()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lean = model(input_ids=ids).logits
    recorded = model(input_ids=ids).logits
    assert recorded.requires_grad
    assert torch.equal(lean, recorded.detach())


def test_weight_hooks_still_run(monkeypatch):
    """The layer reads an unhooked weight directly, but calls a hooked one (FSDP, DeepSpeed ZeRO-3 gather weights in
    hooks): a forward hook that zeroes B's weight turns that module's update off."""
    monkeypatch.setenv(step_module.IMPL_ENV_VAR, "torch")
    model = _ssmlora_llama(layers=2)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(1, 3, 32)

    def run():  # the layer alone, inside one call of the model's chain context
        with torch.no_grad():
            return model.base_model.chain_context.run_call(layer, x)

    parameters = [getattr(layer, name)["default"].weight for name in layer.adapter_layer_names]
    assert all(w is p for w, p in zip(layer._adapter_weights("default"), parameters))  # unhooked: the parameters
    adapted = run()
    handle = layer.ssmlora_B["default"].register_forward_hook(lambda module, args, out: torch.zeros_like(out))
    try:
        hooked = run()
    finally:
        handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(hooked, layer.base_layer(x), rtol=0, atol=0)
    assert not torch.equal(adapted, hooked)


# ---------------------------------------------------------------------------------------------------- compiled


def _generate(model, ids, **kwargs):
    with torch.inference_mode():
        return model.generate(input_ids=ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
                              **kwargs)


def _compiled_generate(backend):
    """Greedy generation with a static KV cache and transformers' compiled decode step (`fullgraph=True`: a graph
    break is an error), twice; returns eager's tokens, both compiled runs' tokens and the number of graphs."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    torch._dynamo.reset()
    counters.clear()  # reset() keeps them: graphs compiled by earlier tests would count
    model = _ssmlora_llama()
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    eager = _generate(model, ids)
    compile_config = CompileConfig(fullgraph=True, backend=backend, mode=None)
    compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless told
    first = _generate(model, ids, cache_implementation="static", compile_config=compile_config)
    graphs = counters["stats"]["unique_graphs"]
    second = _generate(model, ids.flip(0), cache_implementation="static", compile_config=compile_config)
    return eager, first, second.flip(0), graphs, counters["stats"]["unique_graphs"]


def test_compiled_decode_has_one_graph_and_eager_tokens(monkeypatch):
    """Dynamo's capture (backend "eager": the captured graph run as is, ~5 s): no graph break, one graph for every
    decode step (no recompile per token or per call), the tokens of eager generation."""
    monkeypatch.setenv(step_module.IMPL_ENV_VAR, "torch")
    eager, first, second, graphs_after_first, graphs_after_second = _compiled_generate("eager")
    assert graphs_after_first == 1 and graphs_after_second == 1
    assert torch.equal(first, eager) and torch.equal(second, eager)


def test_inductor_compiled_decode_has_one_graph_and_eager_tokens(monkeypatch):
    """The same with inductor, what users compile with (~20 s on an idle 2-core CPU with a cold cache)."""
    monkeypatch.setenv(step_module.IMPL_ENV_VAR, "torch")
    start = time.perf_counter()
    eager, first, second, graphs_after_first, graphs_after_second = _compiled_generate("inductor")
    print(f"inductor: {time.perf_counter() - start:.0f} s")
    assert graphs_after_first == 1 and graphs_after_second == 1
    assert torch.equal(first, eager) and torch.equal(second, eager)
