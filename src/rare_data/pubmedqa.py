"""PubMedQA (PQA-L, 1000 expert-labelled questions) as RARE examples and a passage corpus.

The official split: the 500 questions of ``test_ground_truth.json`` are the test set, the other 500 the
train/dev pool. Every abstract passage of the 1000 questions (3358 of them) forms the retrieval corpus, with
ids ``"<pmid>_<i>"``; the passages of a question's own abstract are its gold passages.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PubMedQA", "load_pubmedqa", "pubmedqa_response"]

HUB_ID = "qiaojin/PubMedQA"
HUB_CONFIG = "pqa_labeled"
DECISIONS = ("yes", "no", "maybe")
# PQA-L: 1000 expert-labelled questions, of which the official split puts 500 in the test set.
PQAL_SIZE = 1000
OFFICIAL_TEST_SIZE = 500


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): re-download it from github.com/pubmedqa/pubmedqa") from err


def _read_test_ids(path: Path) -> set[str]:
    """Test ids from ``test_ground_truth.json`` (a mapping id -> answer) or a plain JSON list of ids."""
    ids = _read_json(path)
    if not isinstance(ids, (dict, list)):
        raise ValueError(f"{path} must hold a JSON object (id -> answer, as test_ground_truth.json) or a list of ids, "
                         f"got {type(ids).__name__}")
    return {str(i) for i in ids}


def pubmedqa_response(long_answer: str, decision: str) -> str:
    """The response to learn: the abstract's conclusion as rationale, then the answer tag."""
    return f"{long_answer.strip()}\n<answer>{decision}</answer>"


@dataclass
class PubMedQA:
    """PubMedQA examples and corpus.

    Attributes:
        train: ``datasets.Dataset`` of the 500 train/dev-pool examples.
        test: ``datasets.Dataset`` of the 500 official test examples (empty when the split is unknown).
        passages: Corpus passage texts.
        passage_ids: Corpus passage ids (``"<pmid>_<i>"``), aligned with ``passages``.
    """

    train: Any
    test: Any
    passages: list[str]
    passage_ids: list[str]


def _record(pmid: Any, question: Any, contexts: Any, long_answer: Any, decision: Any, *, names: tuple[str, ...],
            source: Any) -> dict[str, Any]:
    """One record, its schema checked: a malformed one would otherwise train silently wrong (a string of
    contexts split into single characters, a decision outside yes/no/maybe, a question ``None``). ``names``: the
    fields' names in ``source`` (question, contexts, long answer, decision), for the error."""

    def refuse(field: str, value: Any, expected: str) -> ValueError:
        got = f"the string {value!r}" if isinstance(value, str) else f"{value!r} (type {type(value).__name__})"
        return ValueError(f"PubMedQA record {pmid!s} in {source}: {field} must be {expected}, got {got[:200]}: fix "
                          "or drop that record (or re-download the data)")

    question_name, contexts_name, long_answer_name, decision_name = names
    if not isinstance(question, str) or not question.strip():
        raise refuse(question_name, question, "a non-empty string")
    if not isinstance(contexts, list) or not contexts or not all(isinstance(c, str) for c in contexts):
        raise refuse(contexts_name, contexts, "a non-empty list of passage strings")
    if not isinstance(long_answer, str):
        raise refuse(long_answer_name, long_answer, "a string")
    if decision not in DECISIONS:
        raise refuse(decision_name, decision, f"one of {list(DECISIONS)}")
    return {"pmid": str(pmid), "question": question, "contexts": list(contexts), "long_answer": long_answer,
            "final_decision": decision}


def _records_from_local(data_dir: Path) -> tuple[list[dict[str, Any]], set[str] | None]:
    pqal = data_dir / "ori_pqal.json"
    truth = data_dir / "test_ground_truth.json"
    for f in (pqal, truth):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: data_dir must hold ori_pqal.json and test_ground_truth.json from "
                                    "github.com/pubmedqa/pubmedqa (data/), or pass data_dir=None to use the Hub")
    raw = _read_json(pqal)
    test_ids = _read_test_ids(truth)
    if not isinstance(raw, dict):
        raise ValueError(f"{pqal} must hold a JSON object (PubMed id -> record), got {type(raw).__name__}")
    names = ("QUESTION", "CONTEXTS", "LONG_ANSWER", "final_decision")
    records = []
    for pmid, r in raw.items():
        if not isinstance(r, dict):
            raise ValueError(f"PubMedQA record {pmid} in {pqal} must be a JSON object, got {type(r).__name__}")
        missing = [name for name in names if name not in r]
        if missing:
            raise ValueError(f"PubMedQA record {pmid} in {pqal} has no field(s) {missing} (fields: {sorted(r)}): fix "
                             "or drop that record (or re-download the data)")
        records.append(_record(pmid, *(r[name] for name in names), names=names, source=pqal))
    return records, test_ids


def _records_from_hub(test_ids_file: str | os.PathLike | None) -> tuple[list[dict[str, Any]], set[str] | None]:
    import datasets

    try:
        ds = datasets.load_dataset(HUB_ID, HUB_CONFIG, split="train")
    except Exception as err:  # offline, no cache, hub outage: the fix is the same
        raise RuntimeError(f"could not load {HUB_ID} ({HUB_CONFIG}) from the Hugging Face Hub ({type(err).__name__}: "
                           f"{err}); without network access pass data_dir= a folder holding ori_pqal.json and "
                           "test_ground_truth.json") from err
    names = ("question", "context.contexts", "long_answer", "final_decision")
    records = [_record(r["pubid"], r["question"], r["context"]["contexts"], r["long_answer"], r["final_decision"],
                       names=names, source=f"{HUB_ID} ({HUB_CONFIG})") for r in ds]
    test_ids = None
    if test_ids_file is not None:
        if not Path(test_ids_file).is_file():
            raise FileNotFoundError(f"test_ids_file {test_ids_file} not found: pass the official test_ground_truth.json")
        test_ids = _read_test_ids(Path(test_ids_file))
    return records, test_ids


def load_pubmedqa(data_dir: str | os.PathLike | None = None, *, test_ids_file: str | os.PathLike | None = None,
                  allow_partial_test: bool = False) -> PubMedQA:
    """Load PubMedQA PQA-L as RARE examples plus the passage corpus.

    Args:
        data_dir: Local folder with ``ori_pqal.json`` and ``test_ground_truth.json``. ``None`` loads
            ``qiaojin/PubMedQA`` (``pqa_labeled``) from the Hub.
        test_ids_file: With the Hub, the official ``test_ground_truth.json`` that defines the test split (the Hub
            copy has a single split); without it every question goes to ``train`` and ``test`` is empty.
        allow_partial_test: With all 1000 PQA-L questions, a test-ids file that lists fewer than the official 500
            test questions is refused, because the unlisted test questions would silently become training data;
            pass ``True`` to accept such a file (the unlisted questions then go to ``train``).

    Returns:
        A :class:`PubMedQA`. Each example has ``id`` (the PubMed id), ``question``, ``response`` (the long answer
        then ``<answer>yes|no|maybe</answer>``), ``answer``, ``gold_passage_ids`` and ``long_answer``.
    """
    import datasets

    if data_dir is not None:
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise FileNotFoundError(f"PubMedQA data_dir {data_dir} does not exist: pass the folder holding "
                                    "ori_pqal.json and test_ground_truth.json, or data_dir=None for the Hub")
        records, test_ids = _records_from_local(data_dir)
    else:
        records, test_ids = _records_from_hub(test_ids_file)

    passages, passage_ids = [], []
    train, test = [], []
    for r in records:
        gold = [f"{r['pmid']}_{i}" for i in range(len(r["contexts"]))]
        passages.extend(r["contexts"])
        passage_ids.extend(gold)
        example = {"id": r["pmid"], "question": r["question"],
                   "response": pubmedqa_response(r["long_answer"], r["final_decision"]),
                   "answer": r["final_decision"], "gold_passage_ids": gold, "long_answer": r["long_answer"]}
        (test if test_ids is not None and r["pmid"] in test_ids else train).append(example)
    if test_ids is not None and len(test) != len(test_ids):
        raise ValueError(f"{len(test_ids) - len(test)} test ids are not among the PubMedQA questions: the ground-truth "
                         "file does not match the question file")
    if test_ids is not None and len(records) == PQAL_SIZE and len(test) != OFFICIAL_TEST_SIZE and not allow_partial_test:
        raise ValueError(f"the test-ids file lists {len(test)} of the {OFFICIAL_TEST_SIZE} official PQA-L test "
                         f"questions, so {OFFICIAL_TEST_SIZE - len(test)} test questions would move into the training "
                         f"set ({len(train)} train questions instead of {PQAL_SIZE - OFFICIAL_TEST_SIZE}): pass the "
                         "complete official test_ground_truth.json, or allow_partial_test=True if this is intended")
    features = datasets.Features({"id": datasets.Value("string"), "question": datasets.Value("string"),
                                  "response": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "gold_passage_ids": datasets.Sequence(datasets.Value("string")),
                                  "long_answer": datasets.Value("string")})
    # from_list([]) cannot build an empty table with features; from_dict with empty columns can.
    def to_dataset(rows: list[dict[str, Any]]):
        return datasets.Dataset.from_dict({name: [row[name] for row in rows] for name in features}, features=features)

    return PubMedQA(train=to_dataset(train), test=to_dataset(test), passages=passages, passage_ids=passage_ids)
