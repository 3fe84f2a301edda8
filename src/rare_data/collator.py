"""The RARE data collator: raw records in, ``model.forward`` inputs out.

Per example the collator chooses passages (given, looked up by id, or retrieved; optionally RAFT-style
gold + distractors), renders the prompt, tokenises it in *segments* and masks by segment length:

    prompt_ids      = chat template (add_generation_prompt=True) or plain layout, label -100
    completion_ids  = response tokens + end-of-turn token, labelled with their own ids

It never searches the token stream for a template string, and truncation never touches the response or the
question: passages are capped to ``max_passage_tokens``, then shortened to a budget-sized common cap
(``passage_fit="shorten"``) and/or dropped lowest-ranked first; an example that does not fit without any passage
is dropped (counted, with a warning) or raises, as ``on_overflow`` says. Each batch is tokenised with one
tokenizer call for the prompts and one for the responses; passage token ids are cached per process, within a byte
budget (``token_cache_bytes``).

Record text never becomes control tokens: the question and the passages are tokenised with special-token splitting
(``split_special_tokens=True``), so a passage that contains ``<|eot_id|>`` or ``<|im_start|>`` shows those
characters as text; only the chat template's own markers are special tokens.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import sys
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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
        passages: The passages shown, in display order, with the text as shown (cut when truncation cut it).
    """

    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    passage_ids: list[str]
    passages: list[RetrievedPassage] = field(default_factory=list)


# Default byte budget of the per-process passage token-id cache (ids stored as int32: 4 bytes a token, plus the
# passage text); least recently used passages are evicted beyond it.
DEFAULT_TOKEN_CACHE_BYTES = 256 * 2**20
# Stands in for the user message when the chat template is rendered once to find its own text around it.
_USER_PLACEHOLDER = "\x00RARE-USER-MESSAGE\x00"


def _capped_length(length: int, cap: int | None) -> int:
    return length if cap is None else min(length, cap)


def _water_level(sorted_lengths: Sequence[int], budget: int) -> int:
    """The largest cap ``c`` with ``sum(min(length, c)) <= budget`` (``sorted_lengths`` ascending)."""
    remaining = budget
    for i, length in enumerate(sorted_lengths):
        share = remaining // (len(sorted_lengths) - i)  # what each passage from i on can have if all are cut
        if share < length:
            return share
        remaining -= length
    return sorted_lengths[-1] if sorted_lengths else 0


def _check_encodable(text: str, key: Any, field: str) -> None:
    """Refuse text that no tokenizer can read (a lone surrogate, e.g. from a bad JSON escape) with its origin."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"example {key!r}: {field} holds {text[err.start:err.end]!r} at character {err.start}, which "
                         f"cannot be encoded as UTF-8 ({err.reason}): fix or drop that record") from None


class _TokenCache:
    """Token ids per text (int32 arrays), least recently used evicted beyond a byte budget."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[Any, tuple[Any, int]] = OrderedDict()

    def __contains__(self, key: Any) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Any) -> Any:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: Any, value: Any, nbytes: int) -> None:
        if key in self._entries:
            self.nbytes -= self._entries.pop(key)[1]
        if nbytes > self.max_bytes:  # larger than the whole budget: not cached
            return
        self._entries[key] = (value, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            self.nbytes -= self._entries.popitem(last=False)[1][1]


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
        max_passage_tokens: Each passage is cut to this many tokens before it is shown (``None``: no fixed cap).
        passage_fit: What to do when the passages do not all fit ``max_length``: ``"drop"`` (default) drops
            whole passages, lowest-ranked first; ``"shorten"`` first cuts the shown passages to the largest common
            length that fits (a cap sized from the budget), and drops the lowest-ranked passage only when that
            cap would fall below ``min_passage_tokens``.
        min_passage_tokens: With ``passage_fit="shorten"``, the shortest a passage is cut to before a passage is
            dropped instead.
        template: A template name (``"qa"``, ``"medical_mcq"``, ``"yes_no_maybe"``, ``"fact_check"``), a
            :class:`~rare_data.PromptTemplate`, or a function ``(question, passages) -> str``.
        on_overflow: ``"error"`` (raise :class:`ExampleTooLongError`) or ``"drop"`` (skip the example, count it
            in :attr:`num_dropped` and warn) for examples that do not fit even without passages.
        num_distractors: Enables RAFT: show the gold passages (kept with probability ``p_keep_gold``) plus this
            many distractors sampled from the retrieved / given non-gold passages (a dropped gold passage is
            replaced by one more, so every RAFT prompt shows as many passages). When the candidates run out (BM25
            returns only passages that share a word with the query), the rest are drawn at random from the
            retriever's corpus; without a corpus to draw from, that example raises ``ValueError``. ``None``
            disables RAFT.
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
        token_cache_bytes: Byte budget of the passage token-id cache (default ``DEFAULT_TOKEN_CACHE_BYTES``,
            256 MiB: about 40 million passage tokens with their text); least recently used passages are evicted
            beyond it. The cache belongs to the collator and is freed with it.


    Attributes:
        stats: Counters of what truncation did in this process (see :meth:`truncation_report`):
            ``examples``, ``passages_shown``, ``passages_cut`` (shown shorter than they are),
            ``passage_tokens_shown``, ``passage_tokens_cut``, ``passages_dropped_to_fit``, ``examples_dropped``.
            DataLoader workers count in their own copy.
    """

    model_input_names = ("input_ids", "attention_mask", "labels")

    def __init__(self, tokenizer, retriever=None, *, k: int = 3, max_length: int = 2048,
                 max_passage_tokens: int | None = 256, passage_fit: str = "drop", min_passage_tokens: int = 64,
                 template: str | PromptTemplate | Callable = "qa",
                 on_overflow: str = "error", num_distractors: int | None = None, p_keep_gold: float = 1.0,
                 distractor_pool: int | None = None, shuffle_passages: bool = False, seed: int = 0,
                 padding_free: bool = False, pad_to_multiple_of: int | None = None,
                 use_chat_template: bool | None = None, end_of_turn: str | None = None,
                 setting: str = "retrieval", token_cache_bytes: int = DEFAULT_TOKEN_CACHE_BYTES):
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        if max_passage_tokens is not None and max_passage_tokens <= 0:
            raise ValueError(f"max_passage_tokens must be positive or None, got {max_passage_tokens}")
        if passage_fit not in ("drop", "shorten"):
            raise ValueError(f"passage_fit must be 'drop' or 'shorten', got {passage_fit!r}")
        if min_passage_tokens < 1:
            raise ValueError(f"min_passage_tokens must be positive, got {min_passage_tokens}")
        if on_overflow not in ("error", "drop"):
            raise ValueError(f"on_overflow must be 'error' or 'drop', got {on_overflow!r}")
        if num_distractors is not None and num_distractors < 0:
            raise ValueError(f"num_distractors must be >= 0 or None, got {num_distractors}")
        if not 0.0 <= p_keep_gold <= 1.0:
            raise ValueError(f"p_keep_gold is a probability in [0, 1], got {p_keep_gold}")
        if setting not in SETTINGS:
            raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
        if token_cache_bytes < 0:
            raise ValueError(f"token_cache_bytes must be >= 0, got {token_cache_bytes}")
        if use_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError("use_chat_template=True but the tokenizer has no chat_template: set one or pass "
                             "use_chat_template=None for the plain-text layout")
        self.tokenizer = tokenizer
        self.retriever = retriever
        self.k = k
        self.max_length = max_length
        self.max_passage_tokens = max_passage_tokens
        self.passage_fit = passage_fit
        self.min_passage_tokens = min_passage_tokens
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
        self.stats: Counter[str] = Counter()
        # The corpus is static: token ids of every passage seen, and the text of its fixed-cap cut, are kept per
        # process within one byte budget.
        self.token_cache_bytes = token_cache_bytes
        self._passage_ids_cache = _TokenCache(token_cache_bytes)
        self.chat = bool(getattr(tokenizer, "chat_template", None)) if use_chat_template is None else use_chat_template
        self._checked_template = False
        self._frames: dict[tuple, str] = {}  # the template rendered around a placeholder user message
        self._special_tokens = self._special_token_strings()
        self._special_token_pattern = (re.compile("|".join(map(re.escape, self._special_tokens)))
                                       if self._special_tokens else None)
        self._check_special_tokens_stay_text()
        self._bos_prefix = self._special_prefix()
        self._eot_ids = self._end_of_turn_ids(end_of_turn)
        self._pad_id = self._pad_token_id()

    # ---- tokenizer facts, worked out once -----------------------------------------------------------------
    def _ids(self, text: str) -> list[int]:
        return self._ids_batch([text])[0]

    def _ids_batch(self, texts: list[str], *, as_text: bool = False) -> list[list[int]]:
        """One tokenizer call for many texts (fast tokenizers encode a batch in parallel, in Rust).

        ``as_text``: special-token strings inside the texts stay text (``split_special_tokens=True``): for record
        text (questions, passages), which must never produce control tokens. Otherwise they are special tokens,
        as the chat template's own markers must be.

        A fast tokenizer's ``__call__`` spends about a third of its time building offsets and Python objects
        the collator never reads; when the Rust tokenizer is in the state that call would put it in (no
        truncation, no padding), ``encode_batch_fast`` returns the same ids without them, with the special-token
        splitting set for this call and restored after it. Any other state, or a slow tokenizer, takes the
        ordinary call.
        """
        if not texts:
            return []
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if (backend is not None and hasattr(backend, "encode_batch_fast") and backend.truncation is None
                and backend.padding is None):
            previous = backend.encode_special_tokens
            backend.encode_special_tokens = as_text
            try:
                return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
            finally:
                backend.encode_special_tokens = previous
        return self.tokenizer(texts, add_special_tokens=False, split_special_tokens=as_text)["input_ids"]

    def _special_token_strings(self) -> list[str]:
        """The tokenizer's special-token strings, longest first (so the regex prefers the longest match)."""
        specials = set(getattr(self.tokenizer, "all_special_tokens", None) or [])
        for token in (getattr(self.tokenizer, "added_tokens_decoder", None) or {}).values():
            if getattr(token, "special", False):
                specials.add(str(token))
        specials.discard("")
        return sorted(specials, key=len, reverse=True)

    def _check_special_tokens_stay_text(self) -> None:
        """Refuse a tokenizer that turns special-token strings in record text into special tokens anyway."""
        if not self._special_tokens:
            return
        special_ids = {self.tokenizer.convert_tokens_to_ids(s) for s in self._special_tokens}
        try:
            encoded = self._ids_batch(self._special_tokens, as_text=True)
        except TypeError as err:  # a tokenizer whose __call__ takes no split_special_tokens
            raise ValueError(f"{type(self.tokenizer).__name__} cannot tokenise special-token strings as plain text "
                             f"({err}), so a passage could forge the chat template's control tokens: use a "
                             "transformers tokenizer (fast or slow), which supports split_special_tokens") from err
        leaked = [s for s, ids in zip(self._special_tokens, encoded) if set(ids) & special_ids]
        if leaked:
            raise ValueError(f"{type(self.tokenizer).__name__} still encodes {leaked} inside record text as special "
                             "tokens with split_special_tokens=True, so a passage could forge the chat template's "
                             "control tokens: use a tokenizer that supports split_special_tokens")

    def _chat_render(self, messages: list[dict[str, str]], generation_prompt: bool) -> tuple[str, str, str]:
        """The rendered conversation as (template text before the user message, the user message as rendered,
        template text after it). The template is rendered once more with a placeholder user message to find its
        own text, which holds the only special tokens the prompt may have."""
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        with_placeholder = [*messages[:last_user], {"role": "user", "content": _USER_PLACEHOLDER},
                            *messages[last_user + 1:]]
        key = (generation_prompt, tuple((m["role"], m["content"]) for m in with_placeholder))
        frame = self._frames.get(key)
        if frame is None:
            frame = self._frames[key] = self._render_chat(with_placeholder, generation_prompt)
        text = self._render_chat(messages, generation_prompt)
        before, _, after = frame.partition(_USER_PLACEHOLDER)
        if (frame.count(_USER_PLACEHOLDER) != 1 or not text.startswith(before) or not text.endswith(after)
                or len(text) < len(before) + len(after)):
            raise ValueError("the chat template does not write the user message once, verbatim or trimmed, between "
                             "text of its own, so record text cannot be told apart from the template's control "
                             "tokens: fix the template or pass use_chat_template=False")
        return before, text[len(before):len(text) - len(after)], after

    def _template_pieces(self, before: str, user: str, after: str) -> list[list[int] | str]:
        """The template's special tokens (as id lists) and the text between them (strings, tokenised later in one
        batch with special-token splitting). Special tokens split the text exactly where the tokenizer itself
        splits it, so the ids equal a plain tokenisation whenever the user message holds no special-token string."""
        pieces: list[list[int] | str] = []

        def add_text(part: str) -> None:
            if part:
                if pieces and isinstance(pieces[-1], str):
                    pieces[-1] += part
                else:
                    pieces.append(part)

        def add_template(part: str) -> None:
            position = 0
            for match in (self._special_token_pattern.finditer(part) if self._special_token_pattern else ()):
                add_text(part[position:match.start()])
                pieces.append([self.tokenizer.convert_tokens_to_ids(match.group())])
                position = match.end()
            add_text(part[position:])

        add_template(before)
        add_text(user)
        add_template(after)
        return pieces

    def _chat_ids_batch(self, renders: list[tuple[str, str, str]]) -> list[list[int]]:
        """Token ids of rendered conversations (see `_chat_render`): one tokenizer call for all their text."""
        pieces = [self._template_pieces(*render) for render in renders]
        texts = [piece for row in pieces for piece in row if isinstance(piece, str)]
        encoded = iter(self._ids_batch(texts, as_text=True))
        return [[i for piece in row for i in (piece if isinstance(piece, list) else next(encoded))] for row in pieces]

    def __getstate__(self):
        # Caches are rebuilt per process; shipping them to every DataLoader worker would only cost memory.
        state = self.__dict__.copy()
        state["_passage_ids_cache"] = _TokenCache(self.token_cache_bytes)
        return state

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
        return self._plain_prompt(user)

    def _plain_prompt(self, user: str) -> str:
        system = f"{self.template.system_prompt}\n\n" if self.template.system_prompt else ""
        return f"{system}{user}\n\n{self.template.response_header}\n"

    def _prompt_ids(self, question: str, passages: Sequence[RetrievedPassage]) -> list[int]:
        return self._prompt_ids_batch([question], [passages])[0]

    def _prompt_ids_batch(self, questions: Sequence[str], passages: Sequence[Sequence[RetrievedPassage]]
                          ) -> list[list[int]]:
        """Prompt ids; the question and passages (the user message) never yield a special token."""
        users = [self.template.render(q, shown) for q, shown in zip(questions, passages)]
        if self.chat:
            return self._chat_ids_batch([self._chat_render(self._messages(u), generation_prompt=True) for u in users])
        # The plain layout has no control tokens in its text (the BOS prefix is added as ids).
        return [self._bos_prefix + ids for ids in self._ids_batch([self._plain_prompt(u) for u in users], as_text=True)]

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
        full = self._chat_render(self._messages(user) + [{"role": "assistant", "content": response}],
                                 generation_prompt=False)
        full_ids = self._chat_ids_batch([full])[0]
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
    def _given_passages(example: Mapping[str, Any], key: Any) -> list[RetrievedPassage]:
        out = []
        for i, p in enumerate(example["passages"]):
            if isinstance(p, RetrievedPassage):
                out.append(p)
            elif isinstance(p, Mapping):
                if "text" not in p:
                    raise KeyError(f"example {key!r}: passage {i} is a dict without a 'text' field (fields: "
                                   f"{sorted(p)}); give passages as texts or {{'id', 'text'}} dicts")
                out.append(RetrievedPassage(str(p.get("id", i)), p["text"], float(p.get("score", math.nan))))
            else:
                out.append(RetrievedPassage(str(i), p))
        return out

    @staticmethod
    def _check_texts(passages: list[RetrievedPassage], key: Any) -> list[RetrievedPassage]:
        """Refuse passages whose text is not a string (``None`` would be shown as the text "None")."""
        for i, p in enumerate(passages):
            if not isinstance(p.text, str):
                raise TypeError(f"example {key!r}: passage {i} (id {p.id!r}) has text of type "
                                f"{type(p.text).__name__}, not a string: fix the passage or the corpus it comes from")
        return passages

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
        # k=0 without RAFT or gold-based settings shows no passage: nothing to look up or search for.
        no_passages = self.setting == "closed_book" or self._pool_size() == 0
        for i, ex in enumerate(examples):
            if no_passages:
                candidates[i] = []
            elif ex.get("passages") is not None:
                candidates[i] = self._given_passages(ex, self._key(ex))
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
        return [self._check_texts(c, self._key(ex)) for c, ex in zip(candidates, examples)]  # type: ignore[arg-type]

    @staticmethod
    def _unique_texts(passages: Sequence[RetrievedPassage], seen: set[str] | None = None) -> list[RetrievedPassage]:
        """Passages with a text not shown before (best-ranked copy kept): one prompt never repeats a passage."""
        seen = set() if seen is None else seen
        out = []
        for p in passages:
            if p.text not in seen:
                seen.add(p.text)
                out.append(p)
        return out

    def _select(self, example: Mapping[str, Any], candidates: list[RetrievedPassage], key: Any):
        """Pick the passages to show: returns (ranked, display order)."""
        setting = self.setting
        if setting == "closed_book":
            return [], []
        raft = self.num_distractors is not None
        if setting == "retrieval" and not raft:
            ranked = self._unique_texts(candidates)[: self.k]
        else:
            if example.get("gold_passage_ids") is None:
                raise ValueError(f"setting={setting!r} / RAFT options need 'gold_passage_ids' in every example; "
                                 f"example {key!r} has none")
            gold_ids = [str(g) for g in example["gold_passage_ids"]]
            gold_set = set(gold_ids)
            by_id = {p.id: p for p in candidates}
            missing = [g for g in gold_ids if g not in by_id]
            looked_up = {p.id: p for p in self._check_texts(self._lookup(missing), key)} if missing else {}
            shown_texts: set[str] = set()
            golds = self._unique_texts([by_id.get(g) or looked_up[g] for g in gold_ids], shown_texts)
            others = self._unique_texts([p for p in candidates if p.id not in gold_set], shown_texts)
            rng = self._rng(key)
            if setting == "oracle":
                ranked = golds
            elif setting == "distractors":
                ranked = others[: self.k]
            else:  # RAFT training: gold kept with probability p, plus sampled distractors
                keep_gold = rng.random() < self.p_keep_gold
                # RAFT keeps the number of documents constant: a dropped oracle is replaced by distractors, so
                # the prompt length does not give away whether the gold passages are there.
                wanted = self.num_distractors + (0 if keep_gold else len(golds))
                n = min(wanted, len(others))
                picks = sorted(rng.choice(len(others), size=n, replace=False).tolist()) if n else []
                distractors = [others[j] for j in picks]
                if n < wanted:
                    distractors += self._random_distractors(wanted - n, rng, shown_texts, gold_set, key)
                ranked = (golds if keep_gold else []) + distractors
        display = list(range(len(ranked)))
        if self.shuffle_passages and len(ranked) > 1:
            display = self._rng(("shuffle", key)).permutation(len(ranked)).tolist()
        return ranked, display

    def _random_distractors(self, n: int, rng: np.random.Generator, shown_texts: set[str], gold_ids: set[str],
                            key: Any) -> list[RetrievedPassage]:
        """``n`` RAFT distractors drawn at random from the retriever's corpus (not gold, no text shown already)."""
        if not hasattr(self.retriever, "random_passages"):
            raise ValueError(f"RAFT needs {n} more distractor(s) for example {key!r} than its non-gold candidates "
                             "give, and the collator has no corpus to draw them from: give the example more "
                             "passages, lower num_distractors, or pass a BM25Retriever / DenseRetriever")
        # drawn with margin: a drawn passage may repeat a text already in the prompt
        drawn = self.retriever.random_passages(n + len(shown_texts), rng, exclude=gold_ids)
        out = self._unique_texts(drawn, shown_texts)[:n]
        if len(out) < n:
            raise ValueError(f"the corpus has too few distinct passages for {self.num_distractors} RAFT "
                             f"distractors (example {key!r}): lower num_distractors")
        return out

    def _cache_passage_ids(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of passage texts, tokenised in one call for those not cached (special-token strings in a
        passage stay text); the cache keeps them as int32 within ``token_cache_bytes``."""
        cache = self._passage_ids_cache
        found = {t: ids for t in dict.fromkeys(texts) if (ids := cache.get(t)) is not None}
        new = [t for t in dict.fromkeys(texts) if t not in found]
        for text, ids in zip(new, self._ids_batch(new, as_text=True)):
            found[text] = np.asarray(ids, dtype=np.int32)
            cache.put(text, found[text], found[text].nbytes + sys.getsizeof(text))
        return [found[t] for t in texts]

    def _passage_token_ids(self, text: str) -> np.ndarray:
        return self._cache_passage_ids([text])[0]

    def _cut(self, passage: RetrievedPassage, cap: int | None) -> RetrievedPassage:
        """The passage cut to ``cap`` tokens (on token boundaries, decoded from its cached ids)."""
        ids = self._passage_token_ids(passage.text)
        if cap is None or len(ids) <= cap:
            return passage
        text = self._passage_ids_cache.get((passage.text, cap))
        if text is None:
            text = self.tokenizer.decode(ids[:cap].tolist())
            if cap == self.max_passage_tokens:  # budget-sized caps vary; only the fixed cap recurs
                self._passage_ids_cache.put((passage.text, cap), text, sys.getsizeof(text))
        return RetrievedPassage(passage.id, text, passage.score)

    def _shown(self, ranked: list[RetrievedPassage], display: list[int], n: int, cap: int | None):
        """The ``n`` best-ranked passages, each cut to ``cap`` tokens, in display order."""
        return [self._cut(ranked[j], cap) for j in display if j < n]

    # ---- encoding --------------------------------------------------------------------------------------------
    @staticmethod
    def _key(example: Mapping[str, Any]) -> Any:
        """The identity that seeds an example's randomness: its ``id``, else its question."""
        return example["id"] if example.get("id") is not None else example.get("question")

    def _response(self, example: Mapping[str, Any]) -> str:
        if "response" not in example:
            raise KeyError(f"example {self._key(example)!r} has no 'response' field (fields: {sorted(example)})")
        response = example["response"]
        if not isinstance(response, str):
            raise TypeError(f"example {self._key(example)!r}: field 'response' is {type(response).__name__}, not a "
                            "string: every training example needs the response text to learn")
        if not response.strip():
            raise ValueError(f"example {self._key(example)!r}: field 'response' is empty or whitespace only, so there "
                             "is nothing to learn: fill it in or filter the example out")
        _check_encodable(response, self._key(example), "field 'response'")
        return response

    def _completions(self, examples: Sequence[Mapping[str, Any]]) -> list[list[int]]:
        """Response + end-of-turn ids of each example (one tokenizer call)."""
        return [ids + self._eot_ids for ids in self._ids_batch([self._response(ex) for ex in examples])]

    def encode(self, example: Mapping[str, Any], candidates: list[RetrievedPassage] | None = None
               ) -> EncodedExample | None:
        """Tokenise one example; ``None`` when it is dropped (``on_overflow="drop"``)."""
        completion = self._completions([example])[0]
        return self._encode_many([example], None if candidates is None else [candidates], [completion],
                                 [len(completion)])[0]

    def encode_batch(self, examples: Sequence[Mapping[str, Any]]) -> list[EncodedExample | None]:
        """Tokenise a batch of examples (one retriever call, batched tokenizer calls); ``None`` for dropped ones."""
        completions = self._completions(examples)
        return self._encode_many(examples, None, completions, [len(c) for c in completions])

    def encode_prompt(self, example: Mapping[str, Any], max_new_tokens: int = 256) -> EncodedExample | None:
        """Tokenise the prompt alone, for generation at evaluation time.

        Passages are selected and dropped exactly as in training, keeping ``max_new_tokens`` of ``max_length``
        free for the answer. ``labels`` is all -100. Combine with ``setting=`` for the closed-book, oracle and
        distractor-only evaluations.
        """
        return self._encode_many([example], None, [[]], [max_new_tokens])[0]

    def _encode_many(self, examples, candidates, completions, reserves) -> list[EncodedExample | None]:
        """Choose, fit and tokenise the prompts of ``examples``: all passages first, in one tokenizer call."""
        if candidates is None:
            candidates = self._candidates(examples)
        keys = [self._key(ex) for ex in examples]
        questions = [self.template.format_question(ex) for ex in examples]
        plans = [self._select(ex, cands, key) for ex, cands, key in zip(examples, candidates, keys)]
        for key, question, (ranked, _) in zip(keys, questions, plans):
            _check_encodable(question, key, "the question")
            for p in ranked:
                if p.text not in self._passage_ids_cache:  # a cached text was checked when it was cached
                    _check_encodable(p.text, key, f"passage {p.id!r}")
        self._cache_passage_ids([p.text for ranked, _ in plans for p in ranked])
        cap = self.max_passage_tokens
        first_try = [self._shown(ranked, display, len(ranked), cap) for ranked, display in plans]
        prompts = self._prompt_ids_batch(questions, first_try)
        out = []
        for i, (ranked, display) in enumerate(plans):
            shown, prompt, shown_cap = first_try[i], prompts[i], cap
            if not self._fits(prompt, reserves[i]):
                shown, prompt, shown_cap = self._fit(questions[i], ranked, display, reserves[i])
            if prompt is None:
                out.append(self._overflow(keys[i], questions[i], reserves[i]))
                continue
            self._count(ranked, shown, shown_cap)
            if completions[i]:
                self._check_once(questions[i], shown, examples[i]["response"], prompt, completions[i])
            out.append(EncodedExample(prompt + completions[i], [-100] * len(prompt) + completions[i], len(prompt),
                                      [p.id for p in shown], shown))
        return out

    def _fits(self, prompt: list[int], reserve: int) -> bool:
        return len(prompt) + reserve <= self.max_length

    def _fit(self, question: str, ranked: list[RetrievedPassage], display: list[int], reserve: int):
        """Drop (and with ``passage_fit="shorten"`` first shorten) passages until the prompt fits.

        Returns (shown passages, prompt ids, their cap), or (None, None, None) when even the bare prompt does not
        fit.
        """
        cap = self.max_passage_tokens
        for n in range(len(ranked), -1, -1):
            if self.passage_fit == "shorten" and n:
                fitted = self._shorten(question, ranked, display, n, reserve)
                if fitted is not None:
                    return fitted
                continue
            shown = self._shown(ranked, display, n, cap)
            prompt = self._prompt_ids(question, shown)
            if self._fits(prompt, reserve):
                return shown, prompt, cap
        return None, None, None

    def _shorten(self, question, ranked, display, n: int, reserve: int):
        """Show the ``n`` best passages cut to the largest common cap that fits, if it is >= min_passage_tokens.

        The cap is sized from the budget: the passage tokens the prompt can hold are shared out by water-filling
        (short passages stay whole, the long ones are cut to one common length). Token counts of passages inside
        the rendered prompt can differ slightly from their own counts, so the rendered prompt is checked and the
        budget tightened by the remaining excess until it fits.
        """
        cap = self.max_passage_tokens
        lengths = sorted(_capped_length(len(self._passage_token_ids(p.text)), cap) for p in ranked[:n])
        budget = sum(lengths)
        while True:
            shown = self._shown(ranked, display, n, cap)
            prompt = self._prompt_ids(question, shown)
            excess = len(prompt) + reserve - self.max_length
            if excess <= 0:
                return shown, prompt, cap
            budget = min(budget, sum(_capped_length(length, cap) for length in lengths)) - excess
            cap = _water_level(lengths, budget)
            if cap < self.min_passage_tokens:
                return None

    def _count(self, ranked: list[RetrievedPassage], shown: list[RetrievedPassage], cap: int | None) -> None:
        stats = self.stats
        stats["examples"] += 1
        stats["passages_shown"] += len(shown)
        stats["passages_dropped_to_fit"] += len(ranked) - len(shown)
        shown_ids = {p.id for p in shown}
        for p in ranked:
            if p.id in shown_ids:
                full = len(self._passage_token_ids(p.text))
                kept = _capped_length(full, cap)
                stats["passage_tokens_shown"] += kept
                stats["passages_cut"] += kept < full
                stats["passage_tokens_cut"] += full - kept

    def truncation_report(self) -> str:
        """One line saying how much passage text truncation cut or dropped (from :attr:`stats`)."""
        s = self.stats
        total = s["passage_tokens_shown"] + s["passage_tokens_cut"]
        return (f"{s['examples']} examples: {s['passages_shown']} passages shown, {s['passages_cut']} of them cut "
                f"({s['passage_tokens_cut']} of {total} passage tokens, "
                f"{100 * s['passage_tokens_cut'] / max(total, 1):.1f}%), {s['passages_dropped_to_fit']} dropped to "
                f"fit max_length={self.max_length}; {s['examples_dropped']} examples dropped")

    def _overflow(self, key: Any, question: str, reserve: int) -> None:
        needed = len(self._prompt_ids(question, [])) + reserve
        message = (f"example {key!r} needs {needed} tokens without any passage (question + response or generation "
                   f"budget + template) but max_length={self.max_length}")
        if self.on_overflow == "error":
            raise ExampleTooLongError(f"{message}: raise max_length, filter long examples out (see "
                                      "RAREDataCollator.fits) or pass on_overflow='drop'")
        self.num_dropped += 1
        self.stats["examples_dropped"] += 1
        warnings.warn(f"{message}; dropped ({self.num_dropped} dropped so far by this process)", stacklevel=4)
        return None

    def fits(self, example: Mapping[str, Any]) -> bool:
        """Whether the example fits ``max_length`` with no passage -- for ``dataset.filter`` before training."""
        completion = self._completions([example])[0]
        prompt = self._prompt_ids(self.template.format_question(example), [])
        return len(prompt) + len(completion) <= self.max_length

    # ---- TRL-native path: the same prompts as data set columns ----------------------------------------------
    def prompt_completion(self, examples: Mapping[str, Any], epoch: int | None = None) -> dict[str, Any]:
        """Conversational ``prompt`` / ``completion`` columns for ``datasets.map``, e.g. for TRL's ``SFTTrainer``.

        ``dataset.map(collator.prompt_completion, batched=True)`` (or unbatched) retrieves and selects passages
        exactly as the collator would at batch time (same retriever call, RAFT sampling, shuffling, capping and
        fitting to ``max_length``), and writes the user turn with those passages as ``prompt`` and the response
        as ``completion``, plus ``shown_passage_ids``. ``SFTTrainer`` then builds the same tokens and labels as
        this collator (checked in the tests with a Llama-3 style template; a template that writes text after the
        end-of-turn token -- ChatML's newline -- makes TRL train on that text too). Passages are fixed per row:
        with ``epoch`` the RAFT draw is the one :meth:`set_epoch` ``(epoch)`` would give (map once per epoch for
        fresh draws); without it, the collator's current epoch. Examples that cannot fit raise
        :class:`ExampleTooLongError`: filter with :meth:`fits` first. A question or passage holding a special-token
        string raises ``ValueError``: TRL would tokenise it as a control token.
        """
        if not self.chat:
            raise ValueError("prompt_completion writes conversational columns and needs a tokenizer with a chat "
                             "template; without one, use the collator itself as the Trainer's data_collator")
        batched = isinstance(examples.get("question"), list)
        columns = examples if batched else {name: [value] for name, value in examples.items()}
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        saved_epoch = self.epoch
        if epoch is not None:
            self.set_epoch(epoch)
        try:
            encoded = self.encode_batch(rows)
        finally:
            self.epoch = saved_epoch
        out: dict[str, list] = {"prompt": [], "completion": [], "shown_passage_ids": []}
        for row, enc in zip(rows, encoded):
            if enc is None:
                raise ExampleTooLongError(f"example {self._key(row)!r} does not fit max_length={self.max_length} even "
                                          "without passages: filter first with `dataset.filter(collator.fits)`")
            user = self.template.render(self.template.format_question(row), enc.passages)
            forged = self._special_token_pattern.search(user) if self._special_token_pattern else None
            if forged:
                raise ValueError(f"example {self._key(row)!r}: its question or a passage holds the special-token "
                                 f"string {forged.group()!r}, which TRL would tokenise as a control token (it parses "
                                 "special tokens in conversational columns): remove it from the record, or train "
                                 "with this collator as the data_collator, which keeps such strings as text")
            out["prompt"].append(self._messages(user))
            out["completion"].append([{"role": "assistant", "content": row["response"]}])
            out["shown_passage_ids"].append(enc.passage_ids)
        return out if batched else {name: values[0] for name, values in out.items()}

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if len(examples) == 0:
            raise ValueError("the collator got an empty batch")
        encoded = [e for e in self.encode_batch(examples) if e is not None]
        if not encoded:
            raise ExampleTooLongError(
                f"every example of this batch of {len(examples)} is longer than max_length={self.max_length} even "
                "without passages, and a batch with no rows cannot be trained on: filter the data set first with "
                "`dataset = dataset.filter(collator.fits)` (or raise max_length)")
        return self._flatten(encoded) if self.padding_free else self._pad(encoded)

    def _pad(self, encoded: list[EncodedExample]) -> dict[str, torch.Tensor]:
        length = max(len(e.input_ids) for e in encoded)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(encoded)
        # filled in numpy and handed over without a copy: much cheaper than torch.tensor on Python lists
        input_ids = np.full((n, length), self._pad_id, dtype=np.int64)
        labels = np.full((n, length), -100, dtype=np.int64)
        attention_mask = np.zeros((n, length), dtype=np.int64)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        for row, e in enumerate(encoded):
            span = slice(length - len(e.input_ids), length) if left else slice(0, len(e.input_ids))
            input_ids[row, span] = e.input_ids
            labels[row, span] = e.labels
            attention_mask[row, span] = 1
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask),
                "labels": torch.from_numpy(labels)}

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
