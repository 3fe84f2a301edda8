"""peft's own generic tuner battery, run on SSMLoRA (issue 28, item 1).

The test bodies are peft's, from the sdist of the installed peft version that `.ci/run`'s battery stage unpacks into
`.peft-tests/` (see `peft_battery_loader`); this module declares SSMLoRA's cases the way peft declares LoRA's and
says which tests must fail and why. It is marked `peft_battery`, which the main suite deselects (pyproject's
`addopts`); run it with

    bash .ci/run --battery-only          # downloads the sdist, then runs this module
    python -m pytest -m peft_battery tests/tuner/test_peft_battery.py   # once `.peft-tests/` is there

What is collected: every test of peft's `TestPeftCustomModel`, `TestMultipleActiveAdapters`, `TestDecoderModels`,
`TestPeftFeatureExtractionModel` and `TestEncoderDecoderModels` that peft parametrizes over its list of methods'
cases or configs; ours replace them. Tests outside those parametrizations are written for one other method (their
bodies build a `LoraConfig`, `IA3Config`, ... themselves) and are not collected.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from peft_battery_loader import import_peft_test_module, reparametrized, tiny_checkpoint
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_ssmlora import SSMLoRAConfig
from peft_ssmlora.layer import MERGE_REFUSED

# Nothing may come from the Hub: every model below is built from a config.
os.environ["HF_HUB_OFFLINE"] = "1"

pytestmark = pytest.mark.peft_battery

# peft's tests that merge the adapter into the base weights (or unmerge it): SSMLoRA refuses by design, since its
# update depends on the state carried along the chain (src/peft_ssmlora/layer.py, MERGE_REFUSED). They must keep
# failing with exactly that error.
# peft's check that every trainable adapter parameter changes after three SGD steps: an SSMLoRA module's C multiplies
# the state coming from the module before it in the chain, and the first module of a chain has none (zero, by the
# method), so its C never gets a gradient; elsewhere zero-initialised B, C, D need more than three steps to give C one.
ZERO_STATE_TESTS = {
    "test_only_params_are_updated": "by design: C of a chain's first module multiplies a zero incoming state and never "
                                    "trains",
}

MERGE_REFUSAL = pytest.RaisesExc(NotImplementedError, match=f"^{re.escape(MERGE_REFUSED)}$")
MERGING_TESTS = {
    "test_merge_layers", "test_merge_layers_fp16", "test_merge_layers_nan", "test_merge_layers_multi",
    "test_merge_layers_is_idempotent", "test_merge_layers_is_deterministic_in_train_mode", "test_safe_merge",
    "test_disable_adapters_with_merging", "test_delete_merged_adapter_raises_without_mutation",
    "test_delete_merged_adapter_only_rejects_the_merged_one",
    # these check a half-precision forward, then merge
    "test_forward_float16", "test_forward_bfloat16", "test_forward_float16_no_autocast",
    "test_forward_bfloat16_no_autocast",
    # several active adapters
    "test_multiple_active_adapters_merge_and_unmerge", "test_sequential_merge_matches_batch_merge",
    "test_unmerge_after_sequential_merge_restores_base",
}

custom = import_peft_test_module("test_custom_models")


def _expectation(test: str, value: object) -> list[pytest.MarkDecorator]:
    """The marks one of our parameter values gets in `test` (every value alike: the reasons hold for every case)."""
    if test in ZERO_STATE_TESTS:
        return [pytest.mark.xfail(raises=AssertionError, strict=True, reason=ZERO_STATE_TESTS[test])]
    if test in MERGING_TESTS:
        return [pytest.mark.xfail(raises=MERGE_REFUSAL, strict=True, reason=f"by design: {MERGE_REFUSED}")]
    return []


# ------------------------------------------------------------------------------------------------ custom models


class _StackedBlock(nn.Module):
    """One layer of a stack: two projections of the same shape, the types an SSMLoRA chain links across layers."""

    def __init__(self, size: int, conv1d: bool) -> None:
        super().__init__()
        # transformers' Conv1D(nf=out, nx=in) stores its weight transposed, as GPT-2's projections do.
        self.q = Conv1D(size, size) if conv1d else nn.Linear(size, size)
        self.v = Conv1D(size, size) if conv1d else nn.Linear(size, size)
        self.act = nn.ReLU()

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X + self.v(self.act(self.q(X)))


class StackedModel(nn.Module):
    """`layers.0` … `layers.3`, each with `q` and `v`: chains of length 4 (peft's MLPs give chains of length 1).

    A LayerNorm first, as in transformers' stacks: peft feeds raw token ids (0 … 89) as features, and its training
    test (SGD at lr 0.5, `init_weights=False`) drives this residual stack to NaN without it, with the normalisation
    gradient of the "normgrad" branch (norm_grad_floor) as well as without.
    """

    def __init__(self, conv1d: bool, num_layers: int = 4, size: int = 10) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(size)
        self.layers = nn.ModuleList(_StackedBlock(size, conv1d) for _ in range(num_layers))
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(size, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = self.norm(X.to(self.dtype))
        for layer in self.layers:
            X = layer(X)
        return self.sm(self.out(self.drop(X)))


class _ModelsWithStacks(custom.MockTransformerWrapper):
    """peft's model factory, plus the stacked models."""

    @classmethod
    def from_pretrained(cls, model_id, dtype=None):
        if model_id not in ("StackedLinear", "StackedConv1D"):
            return super().from_pretrained(model_id, dtype=dtype)
        torch.manual_seed(0)
        return StackedModel(conv1d=model_id == "StackedConv1D").to(dtype or torch.float32)


def _ssm(**kwargs):
    return SSMLoRAConfig, kwargs


_STACK = {"target_modules": ["q", "v"]}
# As peft declares LoRA's: default (identity) initialisation; the tests that need an adapter that changes the output
# set `init_weights=False` themselves (peft's `set_init_weights_false`). `bias` is declared for no case, as for
# LoRA: peft's tests take every trained parameter to be the adapter's and add second adapters, which peft refuses
# when one adapter trains biases ("supports only 1 adapter with bias", LoRA alike).
CUSTOM_CASES = [
    (name, model_id, *_ssm(**kwargs))
    for name, model_id, kwargs in [
        # plain MLPs: every chain has length 1
        ("Vanilla MLP 1 SSMLoRA", "MLP", {"target_modules": ["lin0"]}),
        ("Vanilla MLP 2 SSMLoRA", "MLP", {"target_modules": ["lin0", "lin1"]}),
        ("Vanilla MLP 3 SSMLoRA regex", "MLP", {"target_modules": "lin1"}),
        ("Vanilla MLP 4 SSMLoRA modules_to_save", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
        ("Embedding + transformers Conv1D 1 SSMLoRA", "EmbConv1D", {"target_modules": ["conv1d"]}),
        ("Embedding + transformers Conv1D 2 SSMLoRA trainable_tokens", "EmbConv1D",
         {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}}),
        # stacks: chains of length 4 across layers (2 where staggered or restricted)
        ("Stacked Linear 1 SSMLoRA", "StackedLinear", {**_STACK}),
        ("Stacked Linear 2 SSMLoRA interval", "StackedLinear", {**_STACK, "interval_modules": ["q", "v"]}),
        ("Stacked Linear 3 SSMLoRA layers_to_transform", "StackedLinear",
         {**_STACK, "layers_pattern": "layers", "layers_to_transform": [0, 2, 3]}),
        ("Stacked Linear 4 SSMLoRA regex", "StackedLinear", {"target_modules": r"layers\.\d+\.(q|v)"}),
        ("Stacked Linear 5 SSMLoRA state_grad full, state dropout", "StackedLinear",
         {**_STACK, "state_grad": "full", "state_dropout": 0.5}),
        ("Stacked Conv1D 1 SSMLoRA", "StackedConv1D", {**_STACK}),
        ("Stacked Conv1D 2 SSMLoRA interval, state_grad full, modules_to_save", "StackedConv1D",
         {**_STACK, "interval_modules": ["q", "v"], "state_grad": "full", "modules_to_save": ["out"]}),
    ]
]

MULTIPLE_ACTIVE_ADAPTERS_CASES = [
    ("SSMLoRA Same", "ssmlora", SSMLoRAConfig, {"target_modules": ["lin0"], "init_weights": False},
     {"target_modules": ["lin0"], "init_weights": False}),
    ("SSMLoRA Different", "ssmlora", SSMLoRAConfig, {"target_modules": ["lin0"], "init_weights": False},
     {"target_modules": ["lin1"], "init_weights": False}),
]

TestSSMLoRACustomModels = reparametrized(
    custom.TestPeftCustomModel,
    "TestSSMLoRACustomModels",
    [(custom.TEST_CASES, CUSTOM_CASES), (custom.ALL_PEFT_CONFIG_CLASSES, [SSMLoRAConfig])],
    config_lists=[custom.TEST_CASES, custom.ALL_PEFT_CONFIG_CLASSES],
    expect=_expectation,
    namespace={"transformers_class": _ModelsWithStacks},
)

TestSSMLoRAMultipleActiveAdapters = reparametrized(
    custom.TestMultipleActiveAdapters,
    "TestSSMLoRAMultipleActiveAdapters",
    [(custom.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES, MULTIPLE_ACTIVE_ADAPTERS_CASES)],
    config_lists=[custom.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES],
    expect=_expectation,
)


# ------------------------------------------------------------------------------------------------ transformers models
# peft's hub ids replaced by tiny checkpoints built locally from configs (peft_battery_loader.tiny_checkpoint).

decoders = import_peft_test_module("test_decoder_models")
feature_extraction = import_peft_test_module("test_feature_extraction_models")
encoder_decoders = import_peft_test_module("test_encoder_decoder_models")
common = import_peft_test_module("testing_common")

# peft's shared tests skip GPT-2 for every method outside their list of those that adapt transformers' Conv1D
# (LoRA, IA3, LoHa, LoKr). SSMLoRA adapts it too (layer.py), so it is let through.
_skip_if_conv1d_not_supported = common._skip_if_conv1d_not_supported


def _skip_unless_conv1d_supported(model_id, config_cls, config_kwargs):
    if config_cls is not SSMLoRAConfig:
        _skip_if_conv1d_not_supported(model_id, config_cls, config_kwargs)


common._skip_if_conv1d_not_supported = _skip_unless_conv1d_supported


def _models(*names: str) -> list:
    return [pytest.param(tiny_checkpoint(f"tiny-random-{name}"), id=name) for name in names]


DECODER_MODELS = _models("LlamaForCausalLM", "GPT2LMHeadModel", "Qwen2ForCausalLM")
# The family's default placement: the paper's query/value interval scheme (GPT-2: `c_attn` every other layer).
DECODER_CONFIGS = [_ssm(task_type="CAUSAL_LM", target_modules=None)]
FEATURE_EXTRACTION_MODELS = _models("BertModel", "RobertaModel")
FEATURE_EXTRACTION_CONFIGS = [_ssm(task_type="FEATURE_EXTRACTION", target_modules=None)]
ENCODER_DECODER_MODELS = _models("T5ForConditionalGeneration", "BartForConditionalGeneration")
ENCODER_DECODER_CONFIGS = [_ssm(task_type="SEQ_2_SEQ_LM", target_modules=None)]

TestSSMLoRADecoderModels = reparametrized(
    decoders.TestDecoderModels,
    "TestSSMLoRADecoderModels",
    [(decoders.ALL_CONFIGS, DECODER_CONFIGS), (decoders.PEFT_DECODER_MODELS_TO_TEST, DECODER_MODELS),
     (decoders.SMALL_GRID_MODELS, DECODER_MODELS)],
    config_lists=[decoders.ALL_CONFIGS],
    expect=_expectation,
)

TestSSMLoRAFeatureExtractionModels = reparametrized(
    feature_extraction.TestPeftFeatureExtractionModel,
    "TestSSMLoRAFeatureExtractionModels",
    [(feature_extraction.ALL_CONFIGS, FEATURE_EXTRACTION_CONFIGS),
     (feature_extraction.PEFT_FEATURE_EXTRACTION_MODELS_TO_TEST, FEATURE_EXTRACTION_MODELS)],
    config_lists=[feature_extraction.ALL_CONFIGS],
    expect=_expectation,
)

TestSSMLoRAEncoderDecoderModels = reparametrized(
    encoder_decoders.TestEncoderDecoderModels,
    "TestSSMLoRAEncoderDecoderModels",
    [(encoder_decoders.ALL_CONFIGS, ENCODER_DECODER_CONFIGS),
     (encoder_decoders.PEFT_ENCODER_DECODER_MODELS_TO_TEST, ENCODER_DECODER_MODELS)],
    config_lists=[encoder_decoders.ALL_CONFIGS],
    expect=_expectation,
)
