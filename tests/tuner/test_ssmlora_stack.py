"""SSMLoRA in the LLM fine-tuning stack: FSDP, transformers' own adapter API, bitsandbytes (QLoRA) and TRL."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training, set_peft_model_state_dict
from tiny_models import VOCAB, tiny_llama
from transformers import AutoModelForCausalLM

from peft_ssmlora import SSMLoRAConfig
from ssmlora_kernels.reference import ssmlora_step_reference

TESTS = Path(__file__).parent
IDS = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits


# ---------------------------------------------------------------- FSDP


def test_fsdp_two_processes_match_one_process(tmp_path):
    """FSDP1 with peft's wrap policy (each SSMLoRA matrix its own FSDP unit, as under Trainer) and FSDP2, on the
    PyTorch and the Triton step: two gloo processes give one process's losses and weights (tests/tuner/fsdp_worker.py)."""
    # Imported here, not at the top: it needs `datasets`, which the GPU machine may lack.
    from test_ssmlora_training import free_port

    out = tmp_path / "results.pt"
    # PYTHONPATH: the worker imports tiny_models from the tests folder
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS.parent), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), str(TESTS / "fsdp_worker.py"), str(out)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-5000:]
    results = torch.load(out)
    sharded = [name for name in results if not name.startswith("one-process")]
    assert len(sharded) == 4
    for name in sharded:
        losses, weights = results[name]
        reference_losses, reference_weights = results["one-process-" + name.rsplit("-", 1)[1]]
        assert len(losses) == 4 and losses[-1] != losses[0]  # it trained
        assert losses == pytest.approx(reference_losses, rel=1e-5), name
        assert weights.keys() == reference_weights.keys() and any("ssmlora_C" in k for k in weights)
        for key in weights:
            torch.testing.assert_close(weights[key], reference_weights[key], rtol=1e-4, atol=1e-6, msg=f"{name} {key}")


# ---------------------------------------------------------------- torch.compile


def test_torch_compile_traces_one_graph_with_eager_results():
    """fullgraph=True: dynamo captures the whole forward (adapter weights, chain states, hooks) without a graph
    break. The "eager" backend checks the capture without code generation, which would take minutes on CPU."""
    model = get_peft_model(tiny_llama(layers=2), SSMLoRAConfig(r=4, init_weights=False, state_dropout=0.0)).train()

    def loss_and_grads(forward):
        model.zero_grad()
        loss = forward(input_ids=IDS, labels=IDS).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    eager_loss, eager_grads = loss_and_grads(model)
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(model, backend="eager", fullgraph=True))
    torch.testing.assert_close(compiled_loss, eager_loss)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, msg=name)


# ---------------------------------------------------------------- saved adapters


def test_adapters_saved_in_the_nn_linear_layout_still_load(tmp_path):
    """The SSMLoRA matrices were `nn.Linear` modules before they became `SSMLoRAWeight`s: saved files name them
    `<module>.ssmlora_A.weight` etc., in nn.Linear's (out, in) shapes. Such a file, written by hand, must load."""
    from safetensors.torch import load_file, save_file

    get_peft_model(tiny_llama(), SSMLoRAConfig(r=4)).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    q_proj = "base_model.model.model.layers.0.self_attn.q_proj"
    r, d = 4, 32
    shapes = {"A": (r, d), "B": (d, r), "C": (r, r), "D": (r, r)}
    saved = load_file(path)
    assert {name: tuple(tensor.shape) for name, tensor in saved.items() if name.startswith(q_proj + ".")} == {
        f"{q_proj}.ssmlora_{m}.weight": shape for m, shape in shapes.items()}
    generator = torch.Generator().manual_seed(0)
    written = {name: torch.randn(tensor.shape, generator=generator) for name, tensor in saved.items()}
    save_file(written, path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).state_dict()
    for name, tensor in written.items():
        torch.testing.assert_close(loaded[name.replace(".weight", ".default.weight")], tensor, rtol=0, atol=0)


# ---------------------------------------------------------------- transformers' adapter API


def test_transformers_load_adapter_enable_disable_match_peft_model(tmp_path):
    """`model.load_adapter(dir)` and `AutoModelForCausalLM.from_pretrained(adapter_dir)` give PeftModel's outputs;
    `disable_adapters()` gives the base model's, `enable_adapters()` the adapter's again."""
    tiny_llama().save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                SSMLoRAConfig(r=4, init_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = logits(peft_model)
    with peft_model.disable_adapter():
        base = logits(peft_model)
    assert not torch.allclose(expected, base)

    model = tiny_llama()
    model.load_adapter(str(tmp_path / "adapter"))
    assert model.active_adapters() == ["default"]
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)
    model.disable_adapters()
    torch.testing.assert_close(logits(model), base, rtol=0, atol=0)
    model.enable_adapters()
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)

    # The base model's path is read from the adapter's config.
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(auto), expected, rtol=0, atol=0)


def test_transformers_add_set_delete_adapter_match_peft_model(tmp_path):
    model = tiny_llama()
    torch.manual_seed(1)
    model.add_adapter(SSMLoRAConfig(r=4, init_weights=False), adapter_name="first")
    model.add_adapter(SSMLoRAConfig(r=2, init_weights=False, target_modules=["q_proj", "v_proj", "o_proj"]),
                      adapter_name="second")
    model.eval()  # the added modules are created in training mode (state dropout), as with peft's LoRA
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "ssmlora_" in n and ".second." in n}
    base = logits(tiny_llama())

    def peft_model_of(name: str) -> PeftModel:
        """The PeftModel path with the same config and weights."""
        peft_model = get_peft_model(tiny_llama(), copy.deepcopy(model.peft_config[name])).eval()
        state = {"base_model.model." + key: value for key, value in model.get_adapter_state_dict(name).items()}
        assert not set_peft_model_state_dict(peft_model, state).unexpected_keys
        return peft_model

    second = peft_model_of("second")
    torch.testing.assert_close(logits(model), logits(second), rtol=0, atol=0)
    model.set_adapter("first")
    first = peft_model_of("first")
    torch.testing.assert_close(logits(model), logits(first), rtol=0, atol=0)
    assert not torch.allclose(logits(first), logits(second))

    model.delete_adapter("second")
    assert not any(".second." in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model), logits(first), rtol=0, atol=0)
    model.delete_adapter("first")
    assert not any("ssmlora_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model), base, rtol=0, atol=0)


def test_transformers_add_adapter_trains():
    model = tiny_llama()
    model.add_adapter(SSMLoRAConfig(r=4, init_weights=False))
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("ssmlora_" in n and g is not None for n, g in grads.items())
    # (C of a chain's first module gets a zero gradient: its incoming state is zero.)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "ssmlora_C" not in n)


# ---------------------------------------------------------------- bitsandbytes (QLoRA)

BNB_QUANTIZATION = {
    "4bit": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "8bit": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    # Wide enough for bitsandbytes' 4-bit CPU kernel on CPUs with AVX512-BF16, which in eval mode repacks each weight
    # in 32-row blocks of 64-wide quantisation blocks: 32 / 48 wide layers make that repacking fail.
    tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(path)
    return path


def qlora_model(path: Path, bits: str):
    from transformers import BitsAndBytesConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(**BNB_QUANTIZATION[bits]), device_map=device)
    # Non-reentrant checkpointing: with no kwargs peft asks for reentrant checkpointing, which SSMLoRA refuses
    # (or, once supported, allows only with state_grad="detach").
    base = prepare_model_for_kbit_training(base, gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    return get_peft_model(base, SSMLoRAConfig(r=4, init_weights=False, state_dropout=0.0))


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_bitsandbytes_layer_is_the_quantized_output_plus_the_ssmlora_update(saved_llama, bits):
    bnb = pytest.importorskip("bitsandbytes")
    model = qlora_model(saved_llama, bits).eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj  # position 0 of its chain: zero state
    assert isinstance(layer.get_base_layer(), {"4bit": bnb.nn.Linear4bit, "8bit": bnb.nn.Linear8bitLt}[bits])
    seen = {}
    layer.register_forward_hook(lambda module, args, out: seen.update(x=args[0], out=out.clone()))
    layer.base_layer.register_forward_hook(lambda module, args, out: seen.update(base=out.clone()))
    logits(model)
    weights = [getattr(layer, f"ssmlora_{m}")["default"].weight for m in "ABCD"]
    expected, _ = ssmlora_step_reference(seen["x"], seen["base"], None, *weights, scaling=layer.scaling["default"])
    assert not torch.allclose(seen["out"], seen["base"])
    torch.testing.assert_close(seen["out"], expected)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_qlora_trains_the_same_on_the_torch_and_the_triton_step(saved_llama, bits, monkeypatch):
    """prepare_model_for_kbit_training + get_peft_model on a bitsandbytes model; the Triton step (which adds the
    update in place) on bitsandbytes' outputs gives the PyTorch step's losses and gradients."""
    pytest.importorskip("bitsandbytes")
    runs = {}
    for impl in ("torch", "triton"):
        monkeypatch.setenv("PEFT_SSMLORA_IMPL", impl)
        model = qlora_model(saved_llama, bits)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses, grads = [], {}
        # The last step in eval mode (no checkpointing, no dropout): there bitsandbytes' 8-bit layer returns a view of
        # its own autograd output, which the in-place Triton step must not modify.
        for training in (True, True, False):
            model.train(training)
            ids = IDS.to(model.device)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert grads and all("ssmlora_" in n for n in grads)  # the quantized base stays frozen
        runs[impl] = losses, grads
    (torch_losses, torch_grads), (triton_losses, triton_grads) = runs["torch"], runs["triton"]
    assert torch_losses[1] < torch_losses[0]
    assert triton_losses == pytest.approx(torch_losses, rel=1e-4)
    for name, grad in torch_grads.items():
        torch.testing.assert_close(triton_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


# ---------------------------------------------------------------- TRL


def trl_model_and_tokenizer():
    from rare_fixtures import make_tokenizer

    tokenizer = make_tokenizer()
    model = tiny_llama()
    model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def trl_args(config_cls, output_dir, **overrides):
    args = dict(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    return config_cls(**{**args, **overrides})


def assert_trained_ssmlora(trainer, before: dict[str, torch.Tensor]) -> None:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert after.keys() == before.keys() and all("ssmlora_" in n for n in after)
    assert any(not torch.equal(after[n], before[n]) for n in after)


def trainable_before(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_trl_sft_trainer_with_ssmlora_config(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    model, tokenizer = trl_model_and_tokenizer()
    data = Dataset.from_dict({"messages": [[{"role": "user", "content": f"what is {i} plus {i}"},
                                            {"role": "assistant", "content": f"it is {2 * i}"}] for i in range(8)]})
    trainer = trl.SFTTrainer(model=model, args=trl_args(trl.SFTConfig, tmp_path, max_length=64),
                             train_dataset=data, processing_class=tokenizer,
                             peft_config=SSMLoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = trainable_before(trainer)
    trainer.train()
    assert_trained_ssmlora(trainer, before)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-checkpointing", "checkpointing"])
def test_trl_dpo_trainer_with_ssmlora_config(tmp_path, checkpointing):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    model, tokenizer = trl_model_and_tokenizer()
    data = Dataset.from_dict({"prompt": [f"what is {i} plus {i}?" for i in range(8)],
                              "chosen": [f" it is {2 * i}" for i in range(8)],
                              "rejected": [f" it is {2 * i + 1}" for i in range(8)]})
    args = trl_args(trl.DPOConfig, tmp_path, max_length=64, gradient_checkpointing=checkpointing)
    trainer = trl.DPOTrainer(model=model, args=args,
                             train_dataset=data, processing_class=tokenizer,
                             peft_config=SSMLoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = trainable_before(trainer)
    trainer.train()
    assert_trained_ssmlora(trainer, before)
