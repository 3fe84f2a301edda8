"""The RARE data collator: raw records in, ``model.forward`` inputs out.

Per example the collator chooses passages (given, looked up by id, or retrieved; optionally RAFT-style
gold + distractors), renders the prompt, tokenises it in *segments* and masks by segment length:

    prompt_ids      = chat template (add_generation_prompt=True) or plain layout, label -100
    completion_ids  = response tokens + end-of-turn token, labelled with their own ids

It never searches the token stream for a template string, and truncation never touches the response or the
question: passages are capped to ``max_passage_tokens`` and dropped lowest-ranked first; an example that does
not fit without any passage is dropped (counted, with a warning) or raises, as ``on_overflow`` says.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from .retrievers import RetrievedPassage
from .templates import PromptTemplate, get_template

__all__ = ["RAREDataCollator", "RAREEpochCallback", "EncodedExample", "ExampleTooLongError"]

logger = logging.getLogger(__name__)

SETTINGS = ("retrieval", "closed_book", "oracle", "distractors")


class ExampleTooLongError(ValueError):
    """Raised when an example cannot fit ``max_length`` even without passages and ``on_overflow="error"``."""


@dataclass
class EncodedExample:
    """One tokenised example and how it was built.

    Attributes:
        input_ids: Prompt followed by completion.
        labels: -100 over the prompt, the token ids over the completion.
        prompt_length: Number of prompt tokens (the masked segment).
        passage_ids: Ids of the passages shown, in display order.
    """

    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    passage_ids: list[str]


def _stable_int(value: Any) -> int:
    """A process-independent 64-bit integer for an example id (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.sha256(str(value).encode("utf-8")).digest()[:8], "little")


class RAREDataCollator:
    """Retrieval-augmented SFT collator for the standard ``transformers.Trainer``.

    Examples are dicts with ``question`` and ``response`` and optionally ``id``, ``options`` (multiple
    choice), ``passages`` (texts or ``{"id", "text"}`` dicts, best first), ``passage_ids`` (looked up in the
    retriever's corpus) and ``gold_passage_ids`` (for RAFT and the oracle/distractor settings). Without
    ``passages``/``passage_ids`` the collator retrieves with ``retriever.search`` (one call per batch).

    Use it with ``TrainingArguments(remove_unused_columns=False)`` so the Trainer hands the raw records over.
    For RAFT randomness that changes per epoch, add :class:`RAREEpochCallback` to the Trainer (or call
    :meth:`set_epoch` before each epoch); all randomness comes from ``(seed, example id, epoch)`` so batches
    do not depend on the number of DataLoader workers.

    Args:
        tokenizer: A transformers tokenizer (fast or slow).
        retriever: Optional retriever (see :mod:`rare_data.retrievers`).
        k: Passages shown per example (without RAFT: the top ``k``).
        max_length: Maximum tokens per example (prompt + completion).
        max_passage_tokens: Each passage is cut to this many tokens before it is shown.
        template: A template name (``"qa"``, ``"medical_mcq"``, ``"yes_no_maybe"``, ``"fact_check"``), a
            :class:`~rare_data.PromptTemplate`, or a function ``(question, passages) -> str``.
        on_overflow: ``"error"`` (raise :class:`ExampleTooLongError`) or ``"drop"`` (skip the example, count it
            in :attr:`num_dropped` and warn) for examples that do not fit even without passages.
        num_distractors: Enables RAFT: show the gold passages (kept with probability ``p_keep_gold``) plus this
            many distractors sampled from the retrieved / given non-gold passages. ``None`` disables RAFT.
        p_keep_gold: Probability of keeping the gold passages of an example (RAFT's ``P``).
        distractor_pool: How many top-ranked candidates distractors are sampled from (default ``k +
            num_distractors``).
        shuffle_passages: Show the selected passages in random order (their rank still decides which are
            dropped first when the example is too long).
        seed: Base seed of all randomness.
        padding_free: Concatenate the batch into one row with ``position_ids`` and no padding (like
            ``DataCollatorWithFlattening``), for attention implementations that support it.
        pad_to_multiple_of: Pad lengths up to a multiple of this (padded mode).
        use_chat_template: ``None`` (default) uses the tokenizer's chat template when it has one; ``False``
            forces the plain-text layout.
        end_of_turn: The text ending the assistant turn; by default read from the chat template (or the EOS
            token in plain mode).
        setting: Which passages to show: ``"retrieval"`` (default), ``"closed_book"``, ``"oracle"`` (gold only)
            or ``"distractors"`` (non-gold only) -- the evaluation settings of the RARE paper.
    """

    model_input_names = ("input_ids", "attention_mask", "labels")

    def __init__(self, tokenizer, retriever=None, *, k: int = 3, max_length: int = 2048,
                 max_passage_tokens: int | None = 256, template: str | PromptTemplate | Callable = "qa",
                 on_overflow: str = "error", num_distractors: int | None = None, p_keep_gold: float = 1.0,
                 distractor_pool: int | None = None, shuffle_passages: bool = False, seed: int = 0,
                 padding_free: bool = False, pad_to_multiple_of: int | None = None,
                 use_chat_template: bool | None = None, end_of_turn: str | None = None,
                 setting: str = "retrieval"):
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        if max_passage_tokens is not None and max_passage_tokens <= 0:
            raise ValueError(f"max_passage_tokens must be positive or None, got {max_passage_tokens}")
        if on_overflow not in ("error", "drop"):
            raise ValueError(f"on_overflow must be 'error' or 'drop', got {on_overflow!r}")
        if num_distractors is not None and num_distractors < 0:
            raise ValueError(f"num_distractors must be >= 0 or None, got {num_distractors}")
        if not 0.0 <= p_keep_gold <= 1.0:
            raise ValueError(f"p_keep_gold is a probability in [0, 1], got {p_keep_gold}")
        if setting not in SETTINGS:
            raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
        if use_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError("use_chat_template=True but the tokenizer has no chat_template: set one or pass "
                             "use_chat_template=None for the plain-text layout")
        self.tokenizer = tokenizer
        self.retriever = retriever
        self.k = k
        self.max_length = max_length
        self.max_passage_tokens = max_passage_tokens
        self.template = get_template(template)
        self.on_overflow = on_overflow
        self.num_distractors = num_distractors
        self.p_keep_gold = p_keep_gold
        self.distractor_pool = distractor_pool
        self.shuffle_passages = shuffle_passages
        self.seed = seed
        self.padding_free = padding_free
        self.pad_to_multiple_of = pad_to_multiple_of
        self.setting = setting
        self.epoch = 0
        self.num_dropped = 0
        self.chat = bool(getattr(tokenizer, "chat_template", None)) if use_chat_template is None else use_chat_template
        self._checked_template = False
        self._bos_prefix = self._special_prefix()
        self._eot_ids = self._end_of_turn_ids(end_of_turn)
        self._pad_id = self._pad_token_id()

    # ---- tokenizer facts, worked out once -----------------------------------------------------------------
    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _special_prefix(self) -> list[int]:
        """Tokens the tokenizer puts before text (e.g. BOS) -- used for the plain layout only.

        A chat template writes its own BOS into the text, so chat prompts are tokenised without special
        tokens; adding them again would double the BOS.
        """
        if self.chat:
            return []
        with_special = self.tokenizer("x", add_special_tokens=True)["input_ids"]
        without = self._ids("x")
        for start in range(len(with_special) - len(without) + 1):
            if with_special[start:start + len(without)] == without:
                return list(with_special[:start])
        return []

    def _end_of_turn_ids(self, end_of_turn: str | None) -> list[int]:
        """Token ids that close the assistant turn (the model must learn to emit them to stop)."""
        if end_of_turn is not None:
            ids = self._ids(end_of_turn)
            if not ids:
                raise ValueError(f"end_of_turn={end_of_turn!r} tokenises to nothing")
            return ids
        if not self.chat:
            eos = self.tokenizer.eos_token_id
            if eos is None:
                raise ValueError("the tokenizer has no EOS token, so the plain layout cannot end the response: set "
                                 "tokenizer.eos_token or pass end_of_turn=")
            return [eos]
        # Render a conversation with a placeholder answer and read what the template writes after it.
        placeholder = "RAREPLACEHOLDER"
        messages = self._messages("question")
        prompt = self._render_chat(messages, generation_prompt=True)
        full = self._render_chat(messages + [{"role": "assistant", "content": placeholder}], generation_prompt=False)
        if not full.startswith(prompt) or placeholder not in full[len(prompt):]:
            raise ValueError("the chat template does not render the prompt as a prefix of the full conversation, so "
                             "response masks cannot be derived from segment lengths: fix the template or pass "
                             "use_chat_template=False")
        suffix = full[len(prompt):].split(placeholder, 1)[1].rstrip()
        ids = self._ids(suffix) if suffix else []
        if not ids:
            eos = self.tokenizer.eos_token_id
            if eos is None:
                raise ValueError("the chat template writes no end-of-turn marker and the tokenizer has no EOS token: "
                                 "pass end_of_turn=")
            return [eos]
        return ids

    def _pad_token_id(self) -> int:
        # Labels come from segment lengths, so padding with EOS (a common default) does not mask the EOS.
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if candidate is not None:
                return candidate
        return 0

    # ---- rendering -------------------------------------------------------------------------------------------
    def _messages(self, user: str) -> list[dict[str, str]]:
        system = self.template.system_prompt
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]

    def _render_chat(self, messages, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def prompt_text(self, question: str, passages: Sequence[RetrievedPassage]) -> str:
        """The full prompt as text (what a model sees at inference before it generates)."""
        user = self.template.render(question, passages)
        if self.chat:
            return self._render_chat(self._messages(user), generation_prompt=True)
        system = f"{self.template.system_prompt}\n\n" if self.template.system_prompt else ""
        return f"{system}{user}\n\n{self.template.response_header}\n"

    def _prompt_ids(self, question: str, passages: Sequence[RetrievedPassage]) -> list[int]:
        return self._bos_prefix + self._ids(self.prompt_text(question, passages))

    def _check_once(self, question: str, passages, response: str, prompt_ids, completion_ids) -> None:
        """Check on the first example that segment-wise tokenisation matches the rendered conversation."""
        bos = self.tokenizer.bos_token_id
        if bos is not None and len(prompt_ids) >= 2 and prompt_ids[0] == bos and prompt_ids[1] == bos:
            raise ValueError("the prompt starts with a doubled BOS token: the chat template writes a BOS and the "
                             "tokenizer adds another; remove one of them")
        if self._checked_template:
            return
        self._checked_template = True
        if not self.chat:
            return
        user = self.template.render(question, passages)
        full = self._render_chat(self._messages(user) + [{"role": "assistant", "content": response}],
                                 generation_prompt=False)
        full_ids = self._ids(full)
        if full_ids[:len(prompt_ids)] != prompt_ids:
            raise ValueError("the tokenised conversation does not start with the tokenised prompt (the chat template "
                             "renders the prompt differently once an answer follows), so labels cannot be derived "
                             "from segment lengths: fix the chat template or pass use_chat_template=False")
        if full_ids[len(prompt_ids):len(prompt_ids) + len(completion_ids)] != completion_ids:
            warnings.warn("the response tokenised on its own differs from the response tokenised inside the "
                          "conversation (a tokenizer that merges across the turn boundary); training uses the "
                          "segment-wise ids, which is what generation after the prompt produces", stacklevel=3)

    # ---- passages --------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds RAFT sampling and shuffling (call before iterating a new epoch)."""
        self.epoch = int(epoch)

    def _rng(self, example_key: Any) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, _stable_int(example_key)])

    @staticmethod
    def _given_passages(example: Mapping[str, Any]) -> list[RetrievedPassage]:
        out = []
        for i, p in enumerate(example["passages"]):
            if isinstance(p, RetrievedPassage):
                out.append(p)
            elif isinstance(p, Mapping):
                out.append(RetrievedPassage(str(p.get("id", i)), str(p["text"]), float(p.get("score", math.nan))))
            else:
                out.append(RetrievedPassage(str(i), str(p)))
        return out

    def _lookup(self, ids: Sequence[Any]) -> list[RetrievedPassage]:
        if self.retriever is None or not hasattr(self.retriever, "get_passages"):
            raise ValueError("examples carry passage ids but the collator has no retriever with get_passages() to "
                             "look them up: pass retriever= (BM25Retriever, DenseRetriever or PrecomputedRetriever)")
        return self.retriever.get_passages([str(i) for i in ids])

    def _pool_size(self) -> int:
        if self.num_distractors is None and self.setting == "retrieval":
            return self.k
        extra = self.num_distractors if self.num_distractors is not None else self.k
        return self.distractor_pool or (self.k + extra)

    def _candidates(self, examples: Sequence[Mapping[str, Any]]) -> list[list[RetrievedPassage]]:
        """Ranked candidate passages per example; one retriever call for the whole batch."""
        candidates: list[list[RetrievedPassage] | None] = [None] * len(examples)
        to_search = []
        for i, ex in enumerate(examples):
            if self.setting == "closed_book":
                candidates[i] = []
            elif ex.get("passages") is not None:
                candidates[i] = self._given_passages(ex)
            elif ex.get("passage_ids") is not None:
                candidates[i] = self._lookup(ex["passage_ids"])
            else:
                to_search.append(i)
        if to_search:
            if self.retriever is None:
                raise ValueError("an example has neither 'passages' nor 'passage_ids' and the collator has no "
                                 "retriever: pass retriever= or add passages to the examples")
            queries = [self.template.format_question(examples[i]) for i in to_search]
            for i, hits in zip(to_search, self.retriever.search(queries, self._pool_size())):
                candidates[i] = hits
        return candidates  # type: ignore[return-value]

    def _select(self, example: Mapping[str, Any], candidates: list[RetrievedPassage], key: Any):
        """Pick the passages to show: returns (ranked, display order)."""
        setting = self.setting
        if setting == "closed_book":
            return [], []
        raft = self.num_distractors is not None
        if setting == "retrieval" and not raft:
            ranked = candidates[: self.k]
        else:
            if example.get("gold_passage_ids") is None:
                raise ValueError(f"setting={setting!r} / RAFT options need 'gold_passage_ids' in every example; "
                                 f"example {key!r} has none")
            gold_ids = [str(g) for g in example["gold_passage_ids"]]
            gold_set = set(gold_ids)
            by_id = {p.id: p for p in candidates}
            missing = [g for g in gold_ids if g not in by_id]
            golds = [by_id[g] for g in gold_ids if g in by_id] + (self._lookup(missing) if missing else [])
            others = [p for p in candidates if p.id not in gold_set]
            rng = self._rng(key)
            if setting == "oracle":
                ranked = golds
            elif setting == "distractors":
                ranked = others[: self.k]
            else:  # RAFT training: gold kept with probability p, plus sampled distractors
                keep_gold = rng.random() < self.p_keep_gold
                n = min(self.num_distractors, len(others))
                picks = sorted(rng.choice(len(others), size=n, replace=False).tolist()) if n else []
                ranked = (golds if keep_gold else []) + [others[j] for j in picks]
        display = list(range(len(ranked)))
        if self.shuffle_passages and len(ranked) > 1:
            display = self._rng(("shuffle", key)).permutation(len(ranked)).tolist()
        return ranked, display

    def _cap(self, passages: list[RetrievedPassage]) -> list[RetrievedPassage]:
        """Cut each passage to ``max_passage_tokens`` tokens (on token boundaries)."""
        if self.max_passage_tokens is None or not passages:
            return passages
        encoded = self.tokenizer([p.text for p in passages], add_special_tokens=False)["input_ids"]
        return [p if len(ids) <= self.max_passage_tokens
                else RetrievedPassage(p.id, self.tokenizer.decode(ids[: self.max_passage_tokens]), p.score)
                for p, ids in zip(passages, encoded)]

    # ---- encoding --------------------------------------------------------------------------------------------
    @staticmethod
    def _key(example: Mapping[str, Any]) -> Any:
        """The identity that seeds an example's randomness: its ``id``, else its question."""
        return example["id"] if example.get("id") is not None else example.get("question")

    def encode(self, example: Mapping[str, Any], candidates: list[RetrievedPassage] | None = None
               ) -> EncodedExample | None:
        """Tokenise one example; ``None`` when it is dropped (``on_overflow="drop"``)."""
        if "response" not in example:
            raise KeyError(f"example has no 'response' field (fields: {sorted(example)})")
        completion = self._ids(str(example["response"])) + self._eot_ids
        return self._encode(example, candidates, completion, len(completion))

    def encode_prompt(self, example: Mapping[str, Any], max_new_tokens: int = 256) -> EncodedExample | None:
        """Tokenise the prompt alone, for generation at evaluation time.

        Passages are selected and dropped exactly as in training, keeping ``max_new_tokens`` of ``max_length``
        free for the answer. ``labels`` is all -100. Combine with ``setting=`` for the closed-book, oracle and
        distractor-only evaluations.
        """
        return self._encode(example, None, [], max_new_tokens)

    def _encode(self, example, candidates, completion: list[int], reserve: int) -> EncodedExample | None:
        if candidates is None:
            candidates = self._candidates([example])[0]
        key = self._key(example)
        question = self.template.format_question(example)
        ranked, display = self._select(example, candidates, key)
        ranked = self._cap(ranked)
        # Keep the n best-ranked passages, n as large as fits; show them in display order.
        for n in range(len(ranked), -1, -1):
            shown = [ranked[j] for j in display if j < n]
            prompt = self._prompt_ids(question, shown)
            if len(prompt) + reserve <= self.max_length:
                if completion:
                    self._check_once(question, shown, str(example["response"]), prompt, completion)
                return EncodedExample(prompt + completion, [-100] * len(prompt) + completion, len(prompt),
                                      [p.id for p in shown])
        needed = len(self._prompt_ids(question, [])) + reserve
        message = (f"example {key!r} needs {needed} tokens without any passage (question + response or generation "
                   f"budget + template) but max_length={self.max_length}")
        if self.on_overflow == "error":
            raise ExampleTooLongError(f"{message}: raise max_length, filter long examples out (see "
                                      "RAREDataCollator.fits) or pass on_overflow='drop'")
        self.num_dropped += 1
        warnings.warn(f"{message}; dropped ({self.num_dropped} dropped so far by this process)", stacklevel=3)
        return None

    def fits(self, example: Mapping[str, Any]) -> bool:
        """Whether the example fits ``max_length`` with no passage -- for ``dataset.filter`` before training."""
        completion = self._ids(str(example["response"])) + self._eot_ids
        prompt = self._prompt_ids(self.template.format_question(example), [])
        return len(prompt) + len(completion) <= self.max_length

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if len(examples) == 0:
            raise ValueError("the collator got an empty batch")
        encoded = [self.encode(ex, cands) for ex, cands in zip(examples, self._candidates(examples))]
        encoded = [e for e in encoded if e is not None]
        if not encoded:
            raise ExampleTooLongError(f"every example of this batch of {len(examples)} is longer than "
                                      f"max_length={self.max_length} without passages: raise max_length or filter "
                                      "the data set with RAREDataCollator.fits")
        return self._flatten(encoded) if self.padding_free else self._pad(encoded)

    def _pad(self, encoded: list[EncodedExample]) -> dict[str, torch.Tensor]:
        length = max(len(e.input_ids) for e in encoded)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(encoded)
        input_ids = torch.full((n, length), self._pad_id, dtype=torch.long)
        labels = torch.full((n, length), -100, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        for row, e in enumerate(encoded):
            span = slice(length - len(e.input_ids), length) if left else slice(0, len(e.input_ids))
            input_ids[row, span] = torch.tensor(e.input_ids)
            labels[row, span] = torch.tensor(e.labels)
            attention_mask[row, span] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    @staticmethod
    def _flatten(encoded: list[EncodedExample]) -> dict[str, torch.Tensor]:
        # As DataCollatorWithFlattening: one row, positions restart per example; the first label of every
        # example is already -100 (it is a prompt token), so no loss crosses an example boundary.
        input_ids = [t for e in encoded for t in e.input_ids]
        labels = [t for e in encoded for t in e.labels]
        position_ids = [p for e in encoded for p in range(len(e.input_ids))]
        return {"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([position_ids])}


class RAREEpochCallback(TrainerCallback):
    """Advance :meth:`RAREDataCollator.set_epoch` at the start of every Trainer epoch.

    The Trainer creates a new DataLoader iterator after ``on_epoch_begin``; with non-persistent workers (the
    default) each worker receives a fresh copy of the collator carrying the new epoch. Persistent workers keep
    their first copy, so the epoch cannot reach them -- this callback warns in that case.
    """

    def __init__(self, collator: RAREDataCollator):
        self.collator = collator

    def on_train_begin(self, args, state, control, **kwargs):
        if args.dataloader_persistent_workers and args.dataloader_num_workers > 0:
            warnings.warn("dataloader_persistent_workers=True: workers keep the collator of the first epoch, so "
                          "RAFT sampling repeats every epoch; set dataloader_persistent_workers=False", stacklevel=2)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.set_epoch(round(state.epoch or 0))
