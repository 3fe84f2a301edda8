"""Prompt templates: the RARE layouts and user-supplied ones.

A template renders only the *user turn* (instruction, retrieved documents, question). Turning that into
tokens -- through the tokenizer's chat template or a plain-text layout -- is the collator's job, so one
template works with every tokenizer.

RARE layout (Wang et al., 2025): an instruction to reason step by step with the retrieved documents, then
``# Retrieved Documents`` and the passages one per line, then ``# Question`` (or ``# Statement`` for
fact-checking) and the question with its options. No system prompt. The response to learn is a rationale
followed by ``<answer>X</answer>``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["PromptTemplate", "TEMPLATES", "get_template", "format_options", "format_query"]


def format_options(options: Any) -> str:
    """Render multiple-choice options as ``A. text`` lines.

    Args:
        options: A mapping ``{"A": "text", ...}`` or a sequence of texts (lettered A, B, C, ...).
    """
    if isinstance(options, Mapping):
        items = [(str(key), str(value)) for key, value in options.items()]
    else:
        items = [(chr(ord("A") + i), str(value)) for i, value in enumerate(options)]
    return "\n".join(f"{key}. {value}" for key, value in items)


def format_query(example: Mapping[str, Any]) -> str:
    """The question as shown and searched with: stripped, with ``options`` appended when the example has them.

    The collator retrieves with exactly this text, and :func:`~rare_data.precompute_retrieval` /
    :class:`~rare_data.PrecomputedRetriever` key their results on it, so multiple-choice questions match.

    Raises:
        KeyError: If there is no ``question``.
        TypeError: If the question (or an option) is not a string -- ``None`` would be shown as "None".
    """
    name = example.get("id", example.get("question"))
    if "question" not in example:
        raise KeyError(f"example {name!r} has no 'question' field (fields: {sorted(example)})")
    question = example["question"]
    if not isinstance(question, str):
        raise TypeError(f"example {name!r}: field 'question' is {type(question).__name__}, not a string")
    question = question.strip()
    options = example.get("options")
    if isinstance(options, Mapping):
        # a `datasets` struct column fills the keys a row lacks (option "E" of a 4-option question) with None
        options = {key: value for key, value in options.items() if value is not None}
    if options:
        values = options.values() if isinstance(options, Mapping) else options
        if isinstance(options, str) or not all(isinstance(v, str) for v in values):
            raise TypeError(f"example {name!r}: field 'options' must be a mapping or a list of strings, got "
                            f"{options!r}")
        question = f"{question}\n{format_options(options)}"
    return question


@dataclass(frozen=True)
class PromptTemplate:
    """A retrieval-augmented prompt layout for the user turn.

    Attributes:
        instruction: Text opening the prompt when passages are shown.
        closed_book_instruction: Text opening the prompt when there are no passages (closed-book evaluation,
            or every passage dropped to fit ``max_length``); defaults to ``instruction``.
        passages_header: Heading above the passages.
        question_header: Heading above the question (``# Statement`` for fact-checking).
        passage_format: Format of one passage; may use ``{text}``, ``{id}`` and ``{index}`` (1-based).
        passage_separator: Text between passages.
        response_header: Heading that ends plain-text prompts (tokenizers without a chat template).
        system_prompt: Optional system message (RARE uses none).
    """

    instruction: str
    closed_book_instruction: str | None = None
    passages_header: str = "# Retrieved Documents"
    question_header: str = "# Question"
    passage_format: str = "{text}"
    passage_separator: str = "\n"
    response_header: str = "# Response"
    system_prompt: str | None = None

    def format_question(self, example: Mapping[str, Any]) -> str:
        """The question text as shown (with ``options`` appended when the example has them)."""
        return format_query(example)

    def render(self, question: str, passages: Sequence[Any]) -> str:
        """Render the user turn.

        Args:
            question: Output of :meth:`format_question`.
            passages: Passages to show, in display order (objects with ``id`` and ``text``).
        """
        if not passages:
            return f"{self.closed_book_instruction or self.instruction}\n\n{self.question_header}\n{question}"
        docs = self.passage_separator.join(
            self.passage_format.format(text=p.text, id=p.id, index=i + 1) for i, p in enumerate(passages))
        return f"{self.instruction}\n\n{self.passages_header}\n{docs}\n\n{self.question_header}\n{question}"


_ANSWER_FORMAT = "Reason step by step inside <think></think>, then give the final answer inside <answer></answer>."

TEMPLATES: dict[str, PromptTemplate] = {
    # General open QA.
    "qa": PromptTemplate(
        instruction=f"Answer the question using the retrieved documents. {_ANSWER_FORMAT}",
        closed_book_instruction=f"Answer the question. {_ANSWER_FORMAT}",
    ),
    # Medical multiple choice (MedQA, MedMCQA, MMLU-medical).
    "medical_mcq": PromptTemplate(
        instruction=("The following are multiple choice questions about medical knowledge. Use the retrieved "
                     f"documents to solve them step by step. {_ANSWER_FORMAT} The answer is the option letter."),
        closed_book_instruction=("The following are multiple choice questions about medical knowledge. Solve them "
                                 f"step by step. {_ANSWER_FORMAT} The answer is the option letter."),
    ),
    # Yes / no / maybe research questions (PubMedQA).
    "yes_no_maybe": PromptTemplate(
        instruction=("Answer the biomedical research question using the retrieved documents. Reason step by step, "
                     "then give the final answer, one of yes, no or maybe, inside <answer></answer>."),
        closed_book_instruction=("Answer the biomedical research question. Reason step by step, then give the final "
                                 "answer, one of yes, no or maybe, inside <answer></answer>."),
    ),
    # Fact-checking of health claims (PubHealth).
    "fact_check": PromptTemplate(
        instruction=("Using the retrieved documents, decide whether the statement is true or false. Reason step by "
                     "step, then give the verdict, true or false, inside <answer></answer>."),
        closed_book_instruction=("Decide whether the statement is true or false. Reason step by step, then give the "
                                 "verdict, true or false, inside <answer></answer>."),
        question_header="# Statement",
    ),
}


class _CallableTemplate(PromptTemplate):
    """Adapter for a user function ``fn(question, passages) -> str``."""

    def __init__(self, fn: Callable[[str, Sequence[Any]], str]):
        object.__setattr__(self, "_fn", fn)
        super().__init__(instruction="")

    def render(self, question: str, passages: Sequence[Any]) -> str:
        return self._fn(question, passages)


def get_template(template: str | PromptTemplate | Callable[[str, Sequence[Any]], str]) -> PromptTemplate:
    """Resolve a template name, a :class:`PromptTemplate` or a function ``(question, passages) -> str``."""
    if isinstance(template, PromptTemplate):
        return template
    if isinstance(template, str):
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}: use one of {sorted(TEMPLATES)} or a PromptTemplate")
        return TEMPLATES[template]
    if callable(template):
        return _CallableTemplate(template)
    raise TypeError(f"template must be a name, a PromptTemplate or a callable, got {type(template).__name__}")
