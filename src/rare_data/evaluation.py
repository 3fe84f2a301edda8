"""Evaluation helpers: answer extraction, validity rate, accuracy and retrieval recall@k."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

__all__ = ["extract_answer", "validity_rate", "accuracy", "recall_at_k", "hit_rate_at_k"]

_TAG = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.IGNORECASE | re.DOTALL)
# Fallbacks, tried in order when there is no closed tag: an unclosed tag at the end, "answer is X", "Answer: X".
_FALLBACKS = (
    re.compile(r"<answer>\s*([^<\n]+?)\s*$", re.IGNORECASE),
    re.compile(r"\banswer\s+is\s*:?\s*\(?([^\s.,;:)]+)", re.IGNORECASE),
    re.compile(r"\banswer\s*:\s*\(?([^\s.,;:)]+)", re.IGNORECASE),
)


def _normalise(answer: str) -> str:
    answer = answer.strip().strip(".*()[]\"'").strip().lower()
    # "B. aspirin" / "B) aspirin" -> "b" when the answer starts with an option letter.
    match = re.match(r"^([a-z])(?:[.)]\s|$)", answer)
    return match.group(1) if match else answer


def extract_answer(text: str, choices: Iterable[str] | None = None) -> str | None:
    """Extract the final answer of a generation, lower-cased.

    Looks for the last ``<answer>...</answer>``, then falls back to an unclosed ``<answer>``, ``answer is X``
    and ``Answer: X``. With ``choices`` (e.g. ``["yes", "no", "maybe"]`` or option letters) an answer outside
    them counts as invalid, and a bare generation equal to a choice is accepted.

    Returns:
        The normalised answer, or ``None`` when no valid answer is found.
    """
    allowed = {c.lower() for c in choices} if choices is not None else None
    candidates = [m for m in _TAG.findall(text)][::-1]
    if not candidates:
        for pattern in _FALLBACKS:
            found = pattern.findall(text)
            if found:
                candidates = found[::-1]
                break
    if not candidates and allowed is not None:
        candidates = [text]
    for candidate in candidates:
        answer = _normalise(candidate)
        if answer and (allowed is None or answer in allowed):
            return answer
    return None


def validity_rate(answers: Sequence[str | None]) -> float:
    """Fraction of generations with an extractable answer (``extract_answer`` did not return ``None``)."""
    return sum(a is not None for a in answers) / len(answers) if answers else 0.0


def accuracy(answers: Sequence[str | None], references: Sequence[str]) -> float:
    """Exact-match accuracy; invalid answers (``None``) count as wrong."""
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers for {len(references)} references")
    if not answers:
        return 0.0
    return sum(a is not None and a == _normalise(r) for a, r in zip(answers, references)) / len(answers)


def recall_at_k(retrieved_ids: Sequence[Sequence[str]], gold_ids: Sequence[Sequence[str]], k: int) -> float:
    """Mean fraction of each query's gold passages found in its top ``k`` (queries without gold are skipped)."""
    scores = [len(set(r[:k]) & set(g)) / len(set(g)) for r, g in zip(retrieved_ids, gold_ids) if g]
    return sum(scores) / len(scores) if scores else 0.0


def hit_rate_at_k(retrieved_ids: Sequence[Sequence[str]], gold_ids: Sequence[Sequence[str]], k: int) -> float:
    """Fraction of queries with at least one gold passage in the top ``k`` (queries without gold are skipped)."""
    hits = [bool(set(r[:k]) & set(g)) for r, g in zip(retrieved_ids, gold_ids) if g]
    return sum(hits) / len(hits) if hits else 0.0
