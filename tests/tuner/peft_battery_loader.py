"""Load peft's own generic test classes from the sdist of the installed peft, and re-parametrize them with our cases.

`.ci/run` downloads the sdist of the installed peft version and unpacks it into `.peft-tests/` (ignored by git; none
of peft's test code is copied into this repository). Its `tests/` folder has no `__init__.py` and imports its
helpers relatively (`from .testing_common import ...`), so it is imported here as a package of its own name,
`peft_upstream_tests`, which cannot clash with our `tests/` folder.

peft parametrizes each generic test over module-level lists (`TEST_CASES`, `ALL_CONFIGS`, the model-id lists).
`reparametrized` builds a subclass of one of peft's test classes in which every such list is replaced by ours; the
test bodies stay peft's. A test whose parametrization names no config list we replace is written for one other
method (it builds e.g. a `LoraConfig` itself) and is not collected.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
from _pytest.mark.structures import ParameterSet

REPO_ROOT = Path(__file__).resolve().parents[2]
PEFT_TESTS_ROOT = REPO_ROOT / ".peft-tests"
PEFT_TESTS = PEFT_TESTS_ROOT / f"peft-{peft.__version__}" / "tests"
PACKAGE = "peft_upstream_tests"


def import_peft_test_module(name: str) -> types.ModuleType:
    """`peft_upstream_tests.<name>` from the unpacked sdist; a clear error when `.ci/run` has not unpacked it."""
    if not (PEFT_TESTS / f"{name}.py").is_file():
        raise FileNotFoundError(
            f"peft {peft.__version__}'s test sources are not at {PEFT_TESTS}. Unpack them with the battery stage of "
            "`.ci/run` (`bash .ci/run --battery-only`), which downloads the sdist of the installed peft version."
        )
    if PACKAGE not in sys.modules:
        package = importlib.util.module_from_spec(importlib.util.spec_from_loader(PACKAGE, loader=None, is_package=True))
        package.__path__ = [str(PEFT_TESTS)]
        sys.modules[PACKAGE] = package
    return importlib.import_module(f"{PACKAGE}.{name}")


def _parametrize_values(mark: pytest.Mark) -> object:
    return mark.args[1] if len(mark.args) > 1 else mark.kwargs.get("argvalues")


def reparametrized(
    peft_class: type,
    name: str,
    replacements: list[tuple[object, list]],
    *,
    config_lists: list[object],
    expect: Callable[[str, object], list[pytest.MarkDecorator]] = lambda test, value: [],
    namespace: dict | None = None,
) -> type:
    """A subclass of `peft_class` named `name` whose tests run over our parameter lists.

    `replacements`: pairs (peft's list object, our list), matched by identity against each test's `parametrize`
    marks. A test is kept when one of its marks iterates over one of `config_lists` (peft's lists of configs or
    cases, all replaced); every other inherited test is set to `None`, so pytest does not collect it.
    `expect(test name, value)`: the marks (xfail, skip) one of our values gets in one test.
    """
    by_identity = {id(theirs): ours for theirs, ours in replacements}
    config_ids = {id(values) for values in config_lists}
    body: dict = {}
    for base in reversed(peft_class.__mro__):
        for attr, func in vars(base).items():
            if not (attr.startswith("test_") and callable(func)):
                continue
            marks = list(getattr(func, "pytestmark", []))
            param_marks = [m for m in marks if m.name == "parametrize"]
            if not any(id(_parametrize_values(m)) in config_ids for m in param_marks):
                body[attr] = None
                continue
            new_marks = []
            for mark in marks:
                values = _parametrize_values(mark) if mark.name == "parametrize" else None
                if values is not None and id(values) in by_identity:
                    ours = [_with_expectation(value, expect(attr, value), mark.args[0])
                            for value in by_identity[id(values)]]
                    mark = pytest.mark.parametrize(mark.args[0], ours).mark
                new_marks.append(mark)
            body[attr] = _with_marks(func, new_marks)
    body.update(namespace or {})
    return type(name, (peft_class,), body)


def _with_expectation(value: object, marks: list, argnames: str | list[str]):
    if isinstance(value, ParameterSet):
        return pytest.param(*value.values, id=value.id, marks=[*value.marks, *marks])
    several = not isinstance(argnames, str) or "," in argnames
    return pytest.param(*(value if several else (value,)), marks=marks)


def _with_marks(func: Callable, marks: list[pytest.Mark]) -> Callable:
    """A copy of `func` carrying `marks` instead of its own (the original stays as peft defined it)."""
    copy = types.FunctionType(func.__code__, func.__globals__, func.__name__, func.__defaults__, func.__closure__)
    copy.__dict__.update(func.__dict__)
    copy.__qualname__ = func.__qualname__
    copy.__kwdefaults__ = func.__kwdefaults__
    copy.pytestmark = marks
    return copy


# ------------------------------------------------------------------------------------------------ tiny checkpoints

CHECKPOINTS = PEFT_TESTS_ROOT / "checkpoints"


def _tiny_configs() -> dict[str, tuple[str, object]]:
    """Name (it keeps the architecture in it, as peft's hub ids do: some of peft's tests look for e.g. "gpt2" or
    "llama" in the model id) → (transformers class name, config). Four layers where the default placement staggers
    query and value (chains of length 2), two elsewhere."""
    import transformers as tf

    shared = {"vocab_size": 100}
    return {
        "tiny-random-LlamaForCausalLM": ("LlamaForCausalLM", tf.LlamaConfig(
            **shared, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
        "tiny-random-GPT2LMHeadModel": ("GPT2LMHeadModel", tf.GPT2Config(
            **shared, n_embd=16, n_layer=4, n_head=4, n_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
        "tiny-random-Qwen2ForCausalLM": ("Qwen2ForCausalLM", tf.Qwen2Config(
            **shared, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
        "tiny-random-BertModel": ("BertModel", tf.BertConfig(
            **shared, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)),
        "tiny-random-RobertaModel": ("RobertaModel", tf.RobertaConfig(
            **shared, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=66, pad_token_id=1)),
        "tiny-random-T5ForConditionalGeneration": ("T5ForConditionalGeneration", tf.T5Config(
            **shared, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0)),
        "tiny-random-BartForConditionalGeneration": ("BartForConditionalGeneration", tf.BartConfig(
            **shared, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)),
    }


def tiny_checkpoint(name: str) -> str:
    """The folder of a tiny random checkpoint, built from its config and saved on first use (no Hub access)."""
    import torch
    import transformers

    folder = CHECKPOINTS / name
    if not (folder / "config.json").is_file():
        class_name, config = _tiny_configs()[name]
        torch.manual_seed(0)
        getattr(transformers, class_name)(config).save_pretrained(folder)
    return str(folder)
