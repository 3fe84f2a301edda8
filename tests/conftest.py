"""Shared test setup.

`TRITON_INTERPRET=1` must be set before any module defining Triton kernels is imported, so it is set here, at
collection time, whenever no CUDA device is present: the Triton kernels then run on CPU tensors.

Layout: `tuner/` (the peft method), `step_kernels/` (the step's reference and Triton kernel), `rare/` (`rare_data`),
`bench/` (the benchmark runners); shared helpers (`tiny_models`, `rare_fixtures`) sit here, importable from every
folder because pytest puts this conftest's folder on `sys.path`. The folders are not named after the packages they
test (`rare_data`, `kernels`, `benchmarks`): without `__init__.py` a folder of that name on `sys.path` would shadow
the package as a namespace package (and a `kernels` one would make transformers believe Hugging Face's `kernels`
is installed).
"""

import os
from pathlib import Path

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The real data sets live beside the checkout (never inside it); tests that need them skip when absent.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (it sits beside the checkout in CI)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64) with the tiny BPE chat tokenizer of rare_fixtures, saved so that
    `from_pretrained` loads it: the model the benchmark runners' pipeline tests run on (read only)."""
    from rare_fixtures import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
