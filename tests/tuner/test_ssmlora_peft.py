"""SSMLoRA behaves like a peft method: save/load, disable, several adapters, heads, unload, no merge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import VOCAB, tiny_bert, tiny_llama

from peft_ssmlora import SSMLoRAConfig
from peft_ssmlora.layer import SSMLoRALayer


def batch(seed=0, size=3, length=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (size, length), generator=g)


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def hooked_modules(model) -> list[str]:
    return [name for name, m in model.named_modules() if m._forward_pre_hooks or m._forward_hooks]


def test_gradients_reach_exactly_the_trainable_parameters(capsys):
    model = get_peft_model(tiny_bert(), SSMLoRAConfig(r=4, task_type="SEQ_CLS", init_weights=False))
    model.print_trainable_parameters()
    assert "trainable params: 1,218 " in capsys.readouterr().out  # 4 × (4·(32+32) + 2·4²) + head 32·2 + 2
    model.train()
    model(input_ids=batch(), labels=torch.tensor([0, 1, 1])).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert "ssmlora_" in name or "classifier.modules_to_save" in name, name
        else:
            assert p.grad is None, name


def test_save_and_load_round_trip_gives_identical_outputs(tmp_path):
    model = get_peft_model(tiny_bert(), SSMLoRAConfig(r=4, task_type="SEQ_CLS", init_weights=False))
    model.eval()
    ids = batch()
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["interval_modules"] == ["query", "value"] and saved["r"] == 4

    loaded = PeftModel.from_pretrained(tiny_bert(seed=0), tmp_path)
    assert isinstance(loaded.peft_config["default"], SSMLoRAConfig)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)
    # The state is never part of the checkpoint: only weights of A, B, C, D and the head.
    keys = loaded.base_model.model.state_dict().keys()
    assert not [k for k in keys if "state" in k.lower()]


def test_loading_without_the_plugin_says_to_import_it(tmp_path):
    model = get_peft_model(tiny_bert(), SSMLoRAConfig(r=4, task_type="SEQ_CLS"))
    model.save_pretrained(tmp_path)
    script = (
        "from tiny_models import tiny_bert\n"
        "from peft import PeftModel\n"
        f"PeftModel.from_pretrained(tiny_bert(), {str(tmp_path)!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                     os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    assert "import peft_ssmlora" in result.stderr


def test_disable_adapter_gives_exactly_the_base_model():
    base_logits = logits(tiny_bert(), batch())
    model = get_peft_model(tiny_bert(), SSMLoRAConfig(r=4, init_weights=False, target_modules=["query", "value"]))
    model.eval()
    assert not torch.allclose(logits(model, batch()), base_logits)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, batch()), base_logits, rtol=0, atol=0)


def test_several_adapters_add_set_delete():
    model = get_peft_model(tiny_llama(), SSMLoRAConfig(r=4, init_weights=False, target_modules=["q_proj", "v_proj"]))
    model.eval()
    ids = batch()
    out_default = logits(model, ids)
    torch.manual_seed(7)
    model.add_adapter("other", SSMLoRAConfig(r=2, init_weights=False, target_modules=["o_proj"]))
    # Adding an adapter does not activate it nor make it trainable.
    torch.testing.assert_close(logits(model, ids), out_default, rtol=0, atol=0)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".other." in n)

    model.set_adapter("other")
    out_other = logits(model, ids)
    assert not torch.allclose(out_other, out_default)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".other." in n)
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, ids), out_default, rtol=0, atol=0)

    model.delete_adapter("other")
    assert not any(".other." in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model, ids), out_default, rtol=0, atol=0)


def test_classifier_head_is_saved_and_restored(tmp_path):
    model = get_peft_model(tiny_bert(num_labels=3), SSMLoRAConfig(r=4, task_type="SEQ_CLS"))
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    model.eval()
    expected = logits(model, batch())
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(num_labels=3), tmp_path)
    torch.testing.assert_close(logits(loaded, batch()), expected, rtol=0, atol=0)


def test_merge_is_refused_with_an_explanation():
    model = get_peft_model(tiny_bert(), SSMLoRAConfig(r=4))
    with pytest.raises(NotImplementedError, match="cannot be merged.*unload"):
        model.merge_and_unload()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_adapter()


def test_unload_returns_the_clean_base_model_without_hooks():
    base_logits = logits(tiny_bert(), batch())
    model = get_peft_model(tiny_bert(), SSMLoRAConfig(r=4, init_weights=False))
    assert hooked_modules(model.base_model.model) == ["bert.encoder"]  # the module that runs the chains
    unloaded = model.unload()
    assert not any(isinstance(m, SSMLoRALayer) for m in unloaded.modules())
    assert not hooked_modules(unloaded)
    torch.testing.assert_close(logits(unloaded.eval(), batch()), base_logits, rtol=0, atol=0)


def test_deleting_the_last_adapter_removes_the_hook():
    model = get_peft_model(tiny_bert(), SSMLoRAConfig(r=4))
    model.base_model.delete_adapter("default")
    assert not hooked_modules(model.base_model.model)


def test_outputs_do_not_depend_on_batch_composition_or_earlier_calls():
    """The chain restarts from zeros at every call: unlike the reference code, no state leaks between batches."""
    model = get_peft_model(tiny_bert(), SSMLoRAConfig(r=4, init_weights=False))
    model.eval()
    ids = batch(size=6)
    together = logits(model, ids)
    logits(model, batch(seed=5, size=2, length=4))  # an unrelated call in between
    one_by_one = torch.cat([logits(model, ids[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(one_by_one, together, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), together, rtol=0, atol=0)


def test_trainable_token_indices_train_only_those_embedding_rows_and_round_trip(tmp_path):
    """TRL sets `trainable_token_indices` when it adds chat-template tokens; peft's trainable-tokens machinery
    serves SSMLoRA as it serves LoRA."""
    model = get_peft_model(tiny_llama(), SSMLoRAConfig(r=4, init_weights=False, trainable_token_indices=[3, 5]))
    every_token = torch.arange(VOCAB)
    with torch.no_grad():
        embeddings_before = model.get_input_embeddings()(every_token)
    model.train()
    ids = torch.tensor([[3, 5, 7, 9, 3]])
    model(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p -= p.grad
        embeddings_after = model.get_input_embeddings()(every_token)
    changed = (embeddings_after != embeddings_before).any(dim=-1).nonzero().flatten().tolist()
    assert changed == [3, 5]

    model.eval()
    expected = logits(model, batch())
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.peft_config["default"].trainable_token_indices == [3, 5]
    torch.testing.assert_close(logits(loaded, batch()), expected, rtol=0, atol=0)


def test_transformers_delete_adapter_of_the_last_adapter_removes_the_hooks():
    """transformers' own adapter API deletes adapters layer by layer, without the tuner."""
    model = tiny_llama()
    model.add_adapter(SSMLoRAConfig(r=4, init_weights=False), adapter_name="first")
    model.add_adapter(SSMLoRAConfig(r=2, init_weights=False, target_modules=["o_proj"]), adapter_name="second")
    assert hooked_modules(model) == ["model"]
    model.delete_adapter("first")
    assert hooked_modules(model) == ["model"]  # "second" still needs them
    model.delete_adapter("second")
    assert not hooked_modules(model)
    torch.testing.assert_close(logits(model, batch()), logits(tiny_llama(), batch()), rtol=0, atol=0)


def test_lora_only_operations_say_they_are_not_supported():
    model = get_peft_model(tiny_llama(), SSMLoRAConfig(r=4))
    model.add_adapter("other", SSMLoRAConfig(r=4))
    with pytest.raises(NotImplementedError, match="`add_weighted_adapter` is not supported by SSMLoRA"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], adapter_name="mix")
    with pytest.raises(NotImplementedError, match="`subtract_mutated_init` is not supported by SSMLoRA"):
        model.base_model.subtract_mutated_init({}, "default")
