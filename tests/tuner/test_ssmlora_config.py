"""Configuration, placement and trainable-parameter counts (the paper's exact figures, on the meta device)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama, trainable_adapter_params
from transformers import (
    AutoConfig,
    AutoModel,
    GPT2Config,
    GPT2Model,
    LlamaConfig,
    LlamaForSequenceClassification,
    RobertaConfig,
    RobertaModel,
)

from peft_ssmlora import SSMLoRAConfig


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def on_meta(factory):
    with torch.device("meta"):
        return factory()


# ---------------------------------------------------------------- the paper's exact figures


def test_llama2_7b_counts_match_the_paper():
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, num_labels=2, pad_token_id=0)
    targets = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "score"]
    ssm = get_peft_model(on_meta(lambda: LlamaForSequenceClassification(config)),
                         SSMLoRAConfig(r=8, target_modules=targets, interval_modules=["q_proj", "v_proj"]))
    assert trainable(ssm) == 15_847_568
    lora = get_peft_model(on_meta(lambda: LlamaForSequenceClassification(config)),
                          LoraConfig(r=8, target_modules=["q_proj", "k_proj", *targets]))
    assert trainable(lora) == 20_021_264


@pytest.mark.parametrize(("r", "expected"), [(1, 49_200), (16, 798_720)])
def test_roberta_large_query_value_interval_counts(r, expected):
    config = RobertaConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    model = get_peft_model(on_meta(lambda: RobertaModel(config, add_pooling_layer=False)),
                           SSMLoRAConfig(r=r, target_modules=["query", "value"], interval_modules=["query", "value"]))
    assert trainable(model) == expected


def test_gpt2_c_attn_interval_count():
    with pytest.warns(UserWarning, match="r=1"):
        config = SSMLoRAConfig(r=1)  # the model family's default: c_attn in every other layer
    model = get_peft_model(on_meta(lambda: GPT2Model(GPT2Config())), config)
    assert trainable(model) == 18_444
    adapted = [n for n, _ in model.named_modules() if n.endswith("c_attn") and hasattr(_, "ssmlora_A")]
    assert [int(n.split(".h.")[1].split(".")[0]) for n in adapted] == [0, 2, 4, 6, 8, 10]


# ---------------------------------------------------------------- defaults per model family

FAMILIES = {
    "bert": dict(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, intermediate_size=2048),
    "roberta": dict(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, intermediate_size=2048),
    "deberta-v2": dict(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, intermediate_size=2048),
    "gpt2": dict(n_embd=1024, n_layer=4, n_head=16),
    "llama": dict(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, intermediate_size=2048),
    "mistral": dict(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, intermediate_size=2048),
    "qwen2": dict(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, intermediate_size=2048),
}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_default_is_about_half_of_lora_default(model_type):
    config = AutoConfig.for_model(model_type, **FAMILIES[model_type])
    ssm = trainable_adapter_params(get_peft_model(on_meta(lambda: AutoModel.from_config(config)),
                                                  SSMLoRAConfig(r=8)), "ssmlora_")
    lora = trainable_adapter_params(get_peft_model(on_meta(lambda: AutoModel.from_config(config)),
                                                   LoraConfig(r=8)), "lora_")
    assert 0.49 <= ssm / lora <= 0.52, (ssm, lora)


def test_default_placement_alternates_query_and_value():
    model = get_peft_model(tiny_bert(layers=4), SSMLoRAConfig(r=4))
    adapted = sorted(n.split("encoder.layer.")[1] for n, m in model.named_modules() if hasattr(m, "ssmlora_chain"))
    assert adapted == ["0.attention.self.query", "1.attention.self.value", "2.attention.self.query",
                       "3.attention.self.value"]
    chains = {m.ssmlora_chain["default"] for m in model.modules() if hasattr(m, "ssmlora_chain")}
    assert {(c.chain.rsplit(".", 1)[-1], c.position, c.length) for c in chains} == {
        ("query", 0, 2), ("query", 1, 2), ("value", 0, 2), ("value", 1, 2)}


def test_three_interval_modules_use_period_three():
    model = get_peft_model(tiny_bert(layers=6), SSMLoRAConfig(r=4, target_modules=["query", "key", "value"],
                                                             interval_modules=["query", "key", "value"]))
    adapted = {n.split("encoder.layer.")[1] for n, m in model.named_modules() if hasattr(m, "ssmlora_chain")}
    assert adapted == {"0.attention.self.query", "1.attention.self.key", "2.attention.self.value",
                       "3.attention.self.query", "4.attention.self.key", "5.attention.self.value"}


def test_scaling_modes():
    assert SSMLoRAConfig(r=8, lora_alpha=16).scaling == 2.0
    assert SSMLoRAConfig(r=8, lora_alpha=16, scale_by_rank=False).scaling == 16.0


# ---------------------------------------------------------------- clear errors


def test_rank_below_one_is_refused():
    with pytest.raises(ValueError, match="`r` must be an integer >= 1"):
        SSMLoRAConfig(r=0)


@pytest.mark.parametrize("field", ["lora_alpha", "norm_eps", "state_dropout", "leaky_slope"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused(field, value):
    with pytest.raises(ValueError, match=f"`{field}` must be a finite number"):
        SSMLoRAConfig(**{field: value})


def test_zero_lora_alpha_is_refused_as_it_cannot_train():
    with pytest.raises(ValueError, match="`lora_alpha` is 0.*nothing would train"):
        SSMLoRAConfig(lora_alpha=0)


@pytest.mark.parametrize("field, value, message", [("lora_alpha", 0, "`lora_alpha` is 0"),
                                                   ("norm_eps", float("nan"), "`norm_eps` must be a finite number"),
                                                   ("leaky_slope", float("inf"), "`leaky_slope` must be a finite")])
def test_a_saved_config_is_validated_on_load(tmp_path, field, value, message):
    get_peft_model(tiny_bert(), SSMLoRAConfig(r=2)).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    saved[field] = value  # a hand-edited or foreign file: json writes NaN and Infinity
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)


def test_unknown_target_module_names_the_available_layers():
    with pytest.raises(ValueError, match=r"\['vlaue'\] match no module.*'query'.*Fix `target_modules`"):
        get_peft_model(tiny_bert(), SSMLoRAConfig(target_modules=["query", "vlaue"]))


def test_interval_module_outside_targets_is_refused():
    with pytest.raises(ValueError, match=r"`interval_modules` \['key'\] are not among the targets"):
        get_peft_model(tiny_bert(), SSMLoRAConfig(target_modules=["query", "value"], interval_modules=["key"]))


def test_layers_pattern_matching_no_layer_is_refused():
    with pytest.raises(ValueError, match=r"`layers_pattern` 'blocks' matches no layer.*encoder.layer"):
        get_peft_model(tiny_bert(), SSMLoRAConfig(target_modules=["query"], layers_pattern="blocks",
                                                  layers_to_transform=[0]))


def test_unknown_model_type_without_targets_is_refused():
    with pytest.raises(ValueError, match="no default target modules.*pass `target_modules`"):
        get_peft_model(torch.nn.Sequential(torch.nn.Linear(3, 3)), SSMLoRAConfig())


def test_layers_to_transform_restricts_placement():
    model = get_peft_model(tiny_gpt2(layers=4), SSMLoRAConfig(r=2, target_modules=["c_attn"], layers_to_transform=[1, 3]))
    adapted = sorted(n for n, m in model.named_modules() if hasattr(m, "ssmlora_chain"))
    assert [n.split(".h.")[1] for n in adapted] == ["1.attn.c_attn", "3.attn.c_attn"]


def test_interval_module_outside_the_layer_stack_is_refused():
    with pytest.raises(ValueError, match="'classifier'.*has no layer index.*Remove it from `interval_modules`"):
        get_peft_model(tiny_bert(), SSMLoRAConfig(target_modules=["query", "classifier"],
                                                  interval_modules=["query", "classifier"]))


BAD_TYPES = [
    ("r", True, r"`r` must be an integer >= 1, got True \(type bool\)"),
    ("r", "8", r"`r` must be an integer >= 1, got the string '8'"),
    ("scale_by_rank", "false", r"`scale_by_rank` must be a bool, got the string 'false'\. Write true or false"),
    ("scale_by_rank", 0, r"`scale_by_rank` must be a bool, got 0 \(type int\)"),
    ("inference_mode", "true", r"`inference_mode` must be a bool, got the string 'true'"),
    ("target_modules", 5, r"`target_modules` must be a list of module names, a regex string or None, got 5"),
    ("target_modules", ["query", 5], r"`target_modules` must be a list of module names"),
    ("exclude_modules", {"a": 1}, r"`exclude_modules` must be a list of module names"),
    ("layers_pattern", 123, r"`layers_pattern` must be a list of module names, a string or None, got 123.*"
                            r"layers_pattern=\"layers\""),
    ("interval_modules", 7, r"`interval_modules` must be a list of module names"),
    ("modules_to_save", "classifier", r"`modules_to_save` must be a list of module names or None, got the string"),
    ("layers_to_transform", ["1"], r"`layers_to_transform` must be a layer index, a list of layer indices or None"),
    ("layers_to_transform", True, r"`layers_to_transform` must be a layer index"),
    ("init_weights", 1, r"`init_weights` must be True, False, 'gaussian' or 'kaiming', got 1"),
    ("init_weights", "false", r"`init_weights` must be True, False, 'gaussian' or 'kaiming', got the string"),
    ("trainable_token_indices", ["0"], r"`trainable_token_indices` must be a list of token indices or a dict"),
]


@pytest.mark.parametrize("field, value, message", BAD_TYPES)
def test_a_value_of_the_wrong_type_names_the_field_and_the_fix(field, value, message):
    with pytest.raises(TypeError, match=message):
        SSMLoRAConfig(**{field: value})


@pytest.mark.parametrize("field, value, message", [case for case in BAD_TYPES if case[0] != "exclude_modules"])
def test_a_hand_edited_adapter_config_of_the_wrong_type_is_refused_on_load(tmp_path, field, value, message):
    get_peft_model(tiny_bert(), SSMLoRAConfig(r=2, lora_alpha=1)).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    saved[field] = value
    path.write_text(json.dumps(saved))
    with pytest.raises(TypeError, match=message):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)


def test_five_interval_modules_on_four_layers_leave_none_unadapted():
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]
    with pytest.raises(ValueError, match=r"Interval module 'up_proj' is adapted nowhere.*i % 5 == 4.*"
                                         r"layers \[0, 1, 2, 3\].*at most as many interval modules"):
        get_peft_model(tiny_llama(layers=4), SSMLoRAConfig(r=2, target_modules=targets, interval_modules=targets))


def test_layers_to_transform_may_leave_out_an_interval_modules_layers():
    """The default placement with `layers_to_transform=[0]` (peft's layer-indexing tests) adapts only the query:
    allowed, since the saved config (which then lists both interval modules) must load again."""
    model = get_peft_model(tiny_llama(layers=4), SSMLoRAConfig(r=2, layers_to_transform=[0]))
    adapted = sorted(n for n, m in model.named_modules() if hasattr(m, "ssmlora_chain"))
    assert [n.split("layers.")[1] for n in adapted] == ["0.self_attn.q_proj"]


def test_layers_to_transform_that_drops_a_target_is_refused():
    # a hybrid stack: only layer 1 has a `gate`, and `layers_to_transform` keeps layer 0
    layers = torch.nn.ModuleList([torch.nn.ModuleDict({"q": torch.nn.Linear(4, 4)}),
                                  torch.nn.ModuleDict({"q": torch.nn.Linear(4, 4), "gate": torch.nn.Linear(4, 4)})])
    model = torch.nn.ModuleDict({"model": torch.nn.ModuleDict({"layers": layers})})
    with pytest.raises(ValueError, match=r"Target module 'gate' is adapted nowhere: the model has it in layers \[1\].*"
                                         r"widen `layers_to_transform`"):
        get_peft_model(model, SSMLoRAConfig(r=2, target_modules=["q", "gate"], layers_to_transform=[0]))


class BackwardsStack(torch.nn.Module):
    """Runs its layers from the last to the first: against the chain order of their indices."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.layers):
            x = layer(x)
        return x


def test_a_chain_module_run_out_of_order_is_an_error():
    model = get_peft_model(BackwardsStack(), SSMLoRAConfig(r=2, target_modules=["layers.0", "layers.1", "layers.2"]))
    with pytest.raises(RuntimeError, match="position 2 ran before position 1 in this forward call"):
        model(torch.randn(1, 4))


@pytest.mark.parametrize("init_weights", [True, "kaiming", "gaussian"])
def test_init_of_a_and_zero_b_c_d(init_weights):
    r, d_in = 8, 32  # tiny_bert's hidden size
    model = get_peft_model(tiny_bert(), SSMLoRAConfig(r=r, init_weights=init_weights))
    params = dict(model.named_parameters())
    a = torch.cat([p.flatten() for n, p in params.items() if "ssmlora_A" in n])
    if init_weights == "gaussian":  # the paper: N(0, 1/r)
        assert abs(a.std().item() * r**0.5 - 1) < 0.15
    else:  # peft LoRA's kaiming-uniform(a=sqrt(5)): U(-1/sqrt(d_in), 1/sqrt(d_in))
        bound = d_in**-0.5
        assert a.abs().max().item() <= bound
        assert abs(a.std().item() / (bound / 3**0.5) - 1) < 0.15
    others = [p for n, p in params.items() if any(k in n for k in ("ssmlora_B", "ssmlora_C", "ssmlora_D"))]
    assert others and all(torch.count_nonzero(p) == 0 for p in others)
