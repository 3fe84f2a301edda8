"""Retrieval-augmented training data (RARE) for the standard ``transformers.Trainer``.

Quick start::

    from rare_data import BM25Retriever, RAREDataCollator
    retriever = BM25Retriever.from_texts(passages, ids=passage_ids)
    collator = RAREDataCollator(tokenizer, retriever=retriever, k=3, max_length=2048)
    trainer = Trainer(model=model, args=TrainingArguments(..., remove_unused_columns=False),
                      train_dataset=raw_dataset, data_collator=collator)

See ``README.md`` in this folder for the design.
"""

from .collator import EncodedExample, ExampleTooLongError, RAREDataCollator, RAREEpochCallback
from .evaluation import (
    ChoiceScorer,
    accuracy,
    extract_answer,
    hit_rate_at_k,
    macro_f1,
    progress,
    recall_at_k,
    validity_rate,
)
from .pubmedqa import PubMedQA, load_pubmedqa, pubmedqa_response
from .retrievers import (
    BM25Retriever,
    DenseRetriever,
    PrecomputedRetriever,
    RetrievedPassage,
    Retriever,
    precompute_retrieval,
)
from .templates import TEMPLATES, PromptTemplate, format_options, format_query, get_template

__all__ = [
    "BM25Retriever",
    "DenseRetriever",
    "PrecomputedRetriever",
    "RetrievedPassage",
    "Retriever",
    "precompute_retrieval",
    "RAREDataCollator",
    "RAREEpochCallback",
    "EncodedExample",
    "ExampleTooLongError",
    "PromptTemplate",
    "TEMPLATES",
    "get_template",
    "format_options",
    "format_query",
    "PubMedQA",
    "load_pubmedqa",
    "pubmedqa_response",
    "extract_answer",
    "validity_rate",
    "accuracy",
    "macro_f1",
    "ChoiceScorer",
    "progress",
    "recall_at_k",
    "hit_rate_at_k",
]
