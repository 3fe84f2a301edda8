"""Evaluation helpers: answer extraction, validity rate, accuracy, macro-F1, scored choices, retrieval recall@k."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

from ._progress import progress

__all__ = ["extract_answer", "validity_rate", "accuracy", "macro_f1", "ChoiceScorer", "progress", "recall_at_k",
           "hit_rate_at_k"]

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


def macro_f1(answers: Sequence[str | None], references: Sequence[str], labels: Sequence[str] | None = None
             ) -> float:
    """Macro-averaged F1 over the reference classes (PubMedQA's second official metric, beside accuracy).

    Invalid answers (``None``) and answers outside ``labels`` count as wrong: they lower the recall of the
    true class and are not a class of their own.

    Args:
        answers: Extracted answers (``None`` when invalid).
        references: Gold answers.
        labels: The classes averaged over (default: the classes present in ``references``).
    """
    from sklearn.metrics import f1_score

    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers for {len(references)} references")
    if not answers:
        return 0.0
    gold = [_normalise(r) for r in references]
    classes = sorted({_normalise(label) for label in labels} if labels is not None else set(gold))
    predicted = ["\x00invalid" if a is None else a for a in answers]
    return float(f1_score(gold, predicted, labels=classes, average="macro", zero_division=0))


def _surface_variants(choice: str) -> list[str]:
    """How a model may write a choice: as given, lower-case, capitalised, each with and without a leading space."""
    forms = dict.fromkeys([choice, choice.lower(), choice.capitalize()])
    return [v for form in forms for v in (form, " " + form)]


class ChoiceScorer:
    """Score closed choices (e.g. yes / no / maybe) by their log-likelihood after a prompt, in one forward pass.

    A choice's score is the log of the summed probability of all its surface variants -- ``"yes"``, ``" yes"``,
    ``"Yes"``, ``" Yes"`` (see ``variants``) -- written right after ``prefix`` (e.g. the ``<answer>`` tag that
    opens an answer-first response). Summing the variants makes zero-shot scores independent of which spelling
    a model happens to prefer; a fine-tuned model puts nearly all its mass on the trained spelling, so its
    scores barely change.

    Each variant is tokenised as ``prefix + variant`` on its own, no special tokens (as the collator tokenises a
    response). When every variant is the shared prefix plus one token (true for SmolLM2), one forward pass gives
    every score; otherwise each variant gets its own pass (the sum of its tokens' log-probabilities).

    Args:
        tokenizer: The model's tokenizer.
        choices: The choices, as the references spell them (e.g. ``("yes", "no", "maybe")``).
        prefix: Text between the prompt and the answer (e.g. ``"<answer>"``).
        variants: ``True`` (default) sums the surface variants; ``False`` scores each choice exactly as given.
    """

    def __init__(self, tokenizer, choices: Sequence[str], *, prefix: str = "", variants: bool = True):
        if not choices:
            raise ValueError("ChoiceScorer needs at least one choice")
        forms = {c: (_surface_variants(c) if variants else [c]) for c in choices}
        encoded = {c: [tokenizer(prefix + v, add_special_tokens=False)["input_ids"] for v in vs]
                   for c, vs in forms.items()}
        # Variants that tokenise identically (or that two choices share) would be counted twice: keep the first.
        seen: set[tuple[int, ...]] = set()
        self.candidates: dict[str, list[list[int]]] = {}
        for choice, seqs in encoded.items():
            kept = [s for s in seqs if tuple(s) not in seen]
            seen.update(tuple(s) for s in kept)
            self.candidates[choice] = kept
        every = [s for seqs in self.candidates.values() for s in seqs]
        n = 0
        while all(len(s) > n and s[n] == every[0][n] for s in every):
            n += 1
        self.prefix = every[0][:n]
        self.fast = all(len(s) == n + 1 for s in every)
        self.max_new_tokens = max(len(s) for s in every)  # tokens to keep free after the prompt

    def score(self, model, prompt_ids: Sequence[int]) -> tuple[dict[str, float], float]:
        """Returns ({choice: log-probability summed over its variants}, probability mass of all variants' first
        tokens after the prefix)."""
        import torch

        with torch.no_grad():
            device = model.device
            if self.fast:
                ids = torch.tensor([list(prompt_ids) + self.prefix], device=device)
                logp = torch.log_softmax(model(input_ids=ids, logits_to_keep=1).logits[0, -1].float(), -1)
                scores = {c: torch.logsumexp(logp[[s[-1] for s in seqs]], 0).item()
                          for c, seqs in self.candidates.items()}
                return scores, sum(math.exp(v) for v in scores.values())
            scores, mass = {}, 0.0
            start = len(prompt_ids) + len(self.prefix)
            for choice, seqs in self.candidates.items():
                variant_scores = []
                for seq in seqs:
                    ids = torch.tensor([list(prompt_ids) + seq], device=device)
                    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
                    # logits at position t predict token t + 1
                    variant_scores.append(sum(logp[t - 1, ids[0, t]].item() for t in range(start, ids.shape[1])))
                    mass += math.exp(logp[start - 1, ids[0, start]].item())
                scores[choice] = torch.logsumexp(torch.tensor(variant_scores), 0).item()
            return scores, mass


def recall_at_k(retrieved_ids: Sequence[Sequence[str]], gold_ids: Sequence[Sequence[str]], k: int) -> float:
    """Mean fraction of each query's gold passages found in its top ``k`` (queries without gold are skipped)."""
    scores = [len(set(r[:k]) & set(g)) / len(set(g)) for r, g in zip(retrieved_ids, gold_ids) if g]
    return sum(scores) / len(scores) if scores else 0.0


def hit_rate_at_k(retrieved_ids: Sequence[Sequence[str]], gold_ids: Sequence[Sequence[str]], k: int) -> float:
    """Fraction of queries with at least one gold passage in the top ``k`` (queries without gold are skipped)."""
    hits = [bool(set(r[:k]) & set(g)) for r, g in zip(retrieved_ids, gold_ids) if g]
    return sum(hits) / len(hits) if hits else 0.0
