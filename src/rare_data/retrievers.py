"""Retrievers behind one small protocol.

Every retriever answers ``search(queries, k)`` with, per query, a ranked list of :class:`RetrievedPassage`
(best first), exposes a ``fingerprint`` that is stable across processes (for caching precomputed
retrieval), and can look passages up by id (``get_passages``) so that examples may carry ``passage_ids``.

All retrievers pickle cheaply: heavy handles (memory-mapped indexes, embedding models, faiss indexes) are
dropped from the pickled state and re-opened lazily in the process that uses them, so ``DataLoader``
workers, ``datasets.map(num_proc=N)`` workers and DDP ranks each load their own copy on first use.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ._progress import progress_enabled
from .templates import format_query

__all__ = [
    "RetrievedPassage",
    "Retriever",
    "BM25Retriever",
    "DenseRetriever",
    "PrecomputedRetriever",
    "precompute_retrieval",
]


@dataclass(frozen=True)
class RetrievedPassage:
    """One passage returned by a retriever.

    Attributes:
        id: Corpus id of the passage (a string).
        text: Passage text.
        score: Retrieval score (higher is better); ``nan`` when the passage did not come from a search.
    """

    id: str
    text: str
    score: float = float("nan")


@runtime_checkable
class Retriever(Protocol):
    """What the collator needs from a retriever."""

    @property
    def fingerprint(self) -> str:  # pragma: no cover - protocol
        """A string that changes whenever the corpus or the retrieval settings change."""
        ...

    def search(self, queries: Sequence[str], k: int) -> list[list[RetrievedPassage]]:  # pragma: no cover
        """Return, for each query, at most ``k`` passages ranked best first."""
        ...


def _sha256(*parts: Iterable[str] | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        for piece in [part] if isinstance(part, str) else part:
            digest.update(piece.encode("utf-8"))
            digest.update(b"\x00")  # separator so that ("ab", "c") and ("a", "bc") differ
    return digest.hexdigest()


def _check_corpus(texts: Sequence[str], ids: Sequence[Any] | None) -> list[str]:
    """Validate a corpus and return its ids as strings (``"0"``, ``"1"``, ... by default)."""
    if len(texts) == 0:
        raise ValueError("the passage corpus is empty: pass at least one passage text")
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            name = f"id {ids[row]!r}" if ids is not None and row < len(ids) else f"row {row}"
            raise TypeError(f"passage {name} is {type(text).__name__}, not a string (a None text would be retrieved "
                            "as the text 'None'): fix or remove it")
    if ids is None:
        return [str(i) for i in range(len(texts))]
    if len(ids) != len(texts):
        raise ValueError(f"got {len(texts)} passages but {len(ids)} ids: pass one id per passage")
    str_ids = [str(i) for i in ids]
    if len(set(str_ids)) != len(str_ids):
        raise ValueError("passage ids must be unique: deduplicate the corpus or its ids")
    return str_ids


class _CorpusLookup:
    """Shared ``get_passages`` for retrievers that hold ids and a text accessor."""

    _ids: list[str]
    _id_to_row: dict[str, int] | None = None

    def _text(self, row: int) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def get_passages(self, ids: Sequence[str]) -> list[RetrievedPassage]:
        """Look passages up by id.

        Raises:
            KeyError: If an id is not in the corpus.
        """
        if self._id_to_row is None:
            self._id_to_row = {pid: row for row, pid in enumerate(self._ids)}
        out = []
        for pid in ids:
            row = self._id_to_row.get(str(pid))
            if row is None:
                raise KeyError(f"passage id {pid!r} is not in this retriever's corpus")
            out.append(RetrievedPassage(str(pid), self._text(row)))
        return out

    def random_passages(self, n: int, rng: np.random.Generator, exclude: Iterable[str] = ()) -> list[RetrievedPassage]:
        """Up to ``n`` passages drawn uniformly without replacement from the corpus, none with an id in ``exclude``
        (RAFT's random distractors, when the ranked candidates run out)."""
        exclude = set(exclude)
        size = min(len(self._ids), n + len(exclude))
        rows = rng.choice(len(self._ids), size=size, replace=False)
        return [RetrievedPassage(self._ids[r], self._text(int(r))) for r in rows if self._ids[r] not in exclude][:n]

    def __len__(self) -> int:
        return len(self._ids)


# ---------------------------------------------------------------------------------------------------------------
# BM25 (bm25s)
# ---------------------------------------------------------------------------------------------------------------

_BM25_META = "rare_bm25.json"
_BM25_CORPUS = "corpus.jsonl"


class BM25Retriever(_CorpusLookup):
    """Sparse BM25 retrieval on `bm25s` -- embedded, no server, numpy/scipy only.

    Queries are tokenised with exactly the settings used for the corpus (lower-casing, token pattern,
    stop words), passages with a zero score (no query term in common) are never returned, and ties are
    broken by corpus position so rankings are deterministic.

    Build with :meth:`from_texts`, persist with :meth:`save`, reopen with :meth:`load` (memory-mapped by
    default, so several processes share one copy of the index in the page cache).
    """

    def __init__(self, *, settings: dict[str, Any], ids: list[str], fingerprint: str, path: str | None = None,
                 texts: list[str] | None = None, bm25: Any = None, mmap: bool = True):
        # Use from_texts/load; this constructor only wires state together.
        self._settings = settings
        self._ids = ids
        self._fingerprint = fingerprint
        self._path = path
        self._texts = texts
        self._bm25 = bm25
        self._corpus = None  # bm25s JsonlCorpus when loaded from disk
        self._mmap = mmap

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_texts(cls, texts: Sequence[str], ids: Sequence[Any] | None = None, *, k1: float = 1.5, b: float = 0.75,
                   method: str = "lucene", stopwords: str | list[str] | None = "en", lower: bool = True,
                   token_pattern: str = r"(?u)\b\w\w+\b") -> BM25Retriever:
        """Index a corpus in memory.

        Args:
            texts: Passage texts.
            ids: Passage ids (any value, stored as strings); default ``"0" .. "n-1"``.
            k1: BM25 term-frequency saturation.
            b: BM25 length normalisation.
            method: bm25s scoring variant (``"lucene"``, ``"robertson"``, ``"atire"``, ``"bm25l"``, ``"bm25+"``).
            stopwords: Stop-word language or list for bm25s (``None`` keeps every token).
            lower: Lower-case before tokenising.
            token_pattern: Regular expression selecting tokens.
        """
        import bm25s

        str_ids = _check_corpus(texts, ids)
        texts = list(texts)
        settings = {"k1": k1, "b": b, "method": method, "stopwords": stopwords, "lower": lower,
                    "token_pattern": token_pattern}
        tokens = bm25s.tokenize(texts, lower=lower, stopwords=stopwords, token_pattern=token_pattern,
                                show_progress=progress_enabled())
        if not tokens.vocab:
            raise ValueError(f"no passage contains a single token under token_pattern={token_pattern!r} and "
                             f"stopwords={stopwords!r}: check the passages or relax these settings")
        bm25 = bm25s.BM25(k1=k1, b=b, method=method)
        bm25.index(tokens, show_progress=progress_enabled())
        fingerprint = _sha256("bm25", json.dumps(settings, sort_keys=True), str_ids, texts)
        return cls(settings=settings, ids=str_ids, fingerprint=fingerprint, texts=texts, bm25=bm25)

    def save(self, path: str | os.PathLike) -> None:
        """Write the index, the passages and the settings to the folder ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        corpus = [{"id": pid, "text": self._text(row)} for row, pid in enumerate(self._ids)]
        self._index().save(str(path), corpus=corpus, show_progress=False)
        meta = {"settings": self._settings, "ids": self._ids, "fingerprint": self._fingerprint}
        (path / _BM25_META).write_text(json.dumps(meta))

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = True) -> BM25Retriever:
        """Open an index written by :meth:`save`; the arrays and passages are memory-mapped when ``mmap``."""
        path = Path(path)
        meta_file = path / _BM25_META
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file} not found: {path} is not a folder written by BM25Retriever.save")
        meta = json.loads(meta_file.read_text())
        retriever = cls(settings=meta["settings"], ids=meta["ids"], fingerprint=meta["fingerprint"],
                        path=str(path), mmap=mmap)
        retriever._index()  # fail now, not inside a worker, if the files are broken
        return retriever

    # -- lazy handles -------------------------------------------------------------------------------------------
    def _index(self):
        if self._bm25 is None:
            import bm25s

            self._bm25 = bm25s.BM25.load(self._path, mmap=self._mmap, show_progress=False)
        return self._bm25

    def _text(self, row: int) -> str:
        if self._texts is not None:
            return self._texts[row]
        if self._corpus is None:
            from bm25s.utils.corpus import JsonlCorpus

            self._corpus = JsonlCorpus(os.path.join(self._path, _BM25_CORPUS), show_progress=False, verbosity=0)
        return self._corpus[int(row)]["text"]

    def __getstate__(self):
        state = self.__dict__.copy()
        if self._path is not None:
            # Loaded from disk: ship only the path; each process re-opens (and memory-maps) the files.
            state.update(_bm25=None, _corpus=None, _texts=None)
        state["_id_to_row"] = None
        return state

    # -- protocol -------------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def tokenize_queries(self, queries: Sequence[str]) -> list[list[str]]:
        """Tokenise queries with the corpus settings (tokens unknown to the corpus are kept here)."""
        import bm25s

        s = self._settings
        return bm25s.tokenize(list(queries), lower=s["lower"], stopwords=s["stopwords"],
                              token_pattern=s["token_pattern"], return_ids=False, show_progress=False)

    def search(self, queries: Sequence[str], k: int) -> list[list[RetrievedPassage]]:
        """Rank the corpus for each query; at most ``k`` hits with a positive score, ties by corpus order."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if isinstance(queries, str):
            raise TypeError("search takes a list of queries; wrap a single query in a list")
        bm25 = self._index()
        results = []
        for tokens in self.tokenize_queries(queries):
            token_ids = bm25.get_tokens_ids(tokens)
            if k == 0 or not token_ids:
                results.append([])
                continue
            scores = np.asarray(bm25.get_scores_from_ids(token_ids))
            rows = self._top_k(scores, k)
            results.append([RetrievedPassage(self._ids[r], self._text(int(r)), float(scores[r])) for r in rows])
        return results

    @staticmethod
    def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
        """Rows of the ``k`` best positive scores, ties broken by row (argpartition alone is not stable)."""
        rows = np.flatnonzero(scores > 0)
        if len(rows) > k:
            kth = np.partition(scores[rows], len(rows) - k)[len(rows) - k]
            rows = rows[scores[rows] >= kth]  # keeps every row tied at the boundary
        order = np.lexsort((rows, -scores[rows]))  # primary: score descending; secondary: row ascending
        return rows[order][:k]


# ---------------------------------------------------------------------------------------------------------------
# Dense (sentence-transformers + faiss)
# ---------------------------------------------------------------------------------------------------------------

_DENSE_META = "rare_dense.json"
_DENSE_INDEX = "index.faiss"
_DENSE_CORPUS = "passages.jsonl"


class DenseRetriever(_CorpusLookup):
    """Dense retrieval: a sentence-transformers embedder and an exact faiss inner-product index.

    Embeddings are L2-normalised, so the inner product is the cosine similarity. Queries and passages go
    through the embedder's own pooling and its own prompts (``encode_query`` / ``encode_document`` use the
    model's ``"query"`` / ``"document"`` prompts when it defines them); ``query_prompt`` / ``document_prompt``
    override them (e.g. ``"query: "`` / ``"passage: "`` for E5 models).

    The model loads lazily on the first search and stays on ``device`` (CPU by default, so that forked
    ``DataLoader`` workers never initialise CUDA).
    """

    def __init__(self, *, model: str, ids: list[str], texts: list[str], fingerprint: str, index: Any = None,
                 path: str | None = None, device: str = "cpu", query_prompt: str | None = None,
                 document_prompt: str | None = None, batch_size: int = 32):
        self._model_name = model
        self._ids = ids
        self._texts = texts
        self._fingerprint = fingerprint
        self._faiss_index = index
        self._path = path
        self._device = device
        self._query_prompt = query_prompt
        self._document_prompt = document_prompt
        self._batch_size = batch_size
        self._model = None

    @classmethod
    def from_texts(cls, texts: Sequence[str], ids: Sequence[Any] | None = None, *, model: str,
                   device: str = "cpu", query_prompt: str | None = None, document_prompt: str | None = None,
                   batch_size: int = 32) -> DenseRetriever:
        """Embed a corpus and build the index.

        Args:
            texts: Passage texts.
            ids: Passage ids; default ``"0" .. "n-1"``.
            model: A sentence-transformers model name or local folder.
            device: Device for the embedder.
            query_prompt: Text prepended to queries (default: the model's own ``"query"`` prompt, if any).
            document_prompt: Text prepended to passages (default: the model's ``"document"`` prompt, if any).
            batch_size: Embedding batch size.
        """
        import faiss

        str_ids = _check_corpus(texts, ids)
        texts = list(texts)
        retriever = cls(model=str(model), ids=str_ids, texts=texts, fingerprint="", device=device,
                        query_prompt=query_prompt, document_prompt=document_prompt, batch_size=batch_size)
        kwargs = {} if document_prompt is None else {"prompt": document_prompt}
        emb = retriever._embedder().encode_document(texts, batch_size=batch_size, normalize_embeddings=True,
                                                    convert_to_numpy=True, show_progress_bar=progress_enabled(),
                                                    **kwargs)
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        index = faiss.IndexFlatIP(emb.shape[1])
        index.add(emb)
        retriever._faiss_index = index
        settings = json.dumps({"model": str(model), "query_prompt": query_prompt, "document_prompt": document_prompt})
        retriever._fingerprint = _sha256("dense", settings, str_ids, texts)
        return retriever

    def save(self, path: str | os.PathLike) -> None:
        """Write the faiss index, the passages and the settings to the folder ``path``."""
        import faiss

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self._index(), str(path / _DENSE_INDEX))
        with open(path / _DENSE_CORPUS, "w", encoding="utf-8") as f:
            for pid, text in zip(self._ids, self._texts):
                f.write(json.dumps({"id": pid, "text": text}) + "\n")
        meta = {"model": self._model_name, "fingerprint": self._fingerprint, "query_prompt": self._query_prompt,
                "document_prompt": self._document_prompt, "batch_size": self._batch_size}
        (path / _DENSE_META).write_text(json.dumps(meta))

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str = "cpu") -> DenseRetriever:
        """Open a folder written by :meth:`save` (the faiss index is memory-mapped)."""
        path = Path(path)
        meta_file = path / _DENSE_META
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file} not found: {path} is not a folder written by DenseRetriever.save")
        meta = json.loads(meta_file.read_text())
        ids, texts = [], []
        with open(path / _DENSE_CORPUS, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                ids.append(row["id"])
                texts.append(row["text"])
        return cls(model=meta["model"], ids=ids, texts=texts, fingerprint=meta["fingerprint"], path=str(path),
                   device=device, query_prompt=meta["query_prompt"], document_prompt=meta["document_prompt"],
                   batch_size=meta["batch_size"])

    def _embedder(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(self._model_name, device=self._device)
        return self._model

    def _index(self):
        if self._faiss_index is None:
            import faiss

            self._faiss_index = faiss.read_index(os.path.join(self._path, _DENSE_INDEX), faiss.IO_FLAG_MMAP)
        return self._faiss_index

    def _text(self, row: int) -> str:
        return self._texts[row]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_model"] = None  # reloaded lazily in the receiving process
        state["_id_to_row"] = None
        if self._faiss_index is not None and self._path is None:
            import faiss

            # faiss indexes are SWIG objects and do not pickle; ship their serialised bytes instead.
            state["_faiss_index"] = faiss.serialize_index(self._faiss_index)
        elif self._path is not None:
            state["_faiss_index"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if isinstance(self._faiss_index, np.ndarray):
            import faiss

            self._faiss_index = faiss.deserialize_index(self._faiss_index)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def search(self, queries: Sequence[str], k: int) -> list[list[RetrievedPassage]]:
        """Rank the corpus by cosine similarity to each query; at most ``k`` hits."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if isinstance(queries, str):
            raise TypeError("search takes a list of queries; wrap a single query in a list")
        if k == 0 or len(queries) == 0:
            return [[] for _ in queries]
        kwargs = {} if self._query_prompt is None else {"prompt": self._query_prompt}
        emb = self._embedder().encode_query(list(queries), batch_size=self._batch_size, normalize_embeddings=True,
                                            convert_to_numpy=True, show_progress_bar=False, **kwargs)
        scores, rows = self._index().search(np.ascontiguousarray(emb, dtype=np.float32), min(k, len(self._ids)))
        return [[RetrievedPassage(self._ids[r], self._texts[r], float(s)) for s, r in zip(srow, rrow) if r >= 0]
                for srow, rrow in zip(scores, rows)]


# ---------------------------------------------------------------------------------------------------------------
# Precomputed retrieval (datasets.map with num_proc)
# ---------------------------------------------------------------------------------------------------------------


def _batch_queries(batch: Mapping[str, list], query_column: str) -> list[str]:
    """The collator's search text for each row of a batch: the stripped question plus its ``options``."""
    options = batch.get("options") or [None] * len(batch[query_column])
    return [format_query({"question": q, "options": o}) for q, o in zip(batch[query_column], options)]


def precompute_retrieval(dataset, retriever: Retriever, k: int, *, query_column: str = "question",
                         ids_column: str = "passage_ids", scores_column: str | None = "passage_scores",
                         num_proc: int | None = None, batch_size: int = 256):
    """Run retrieval once over a ``datasets.Dataset`` and store the ranked ids as a column.

    Each row is searched with the text the collator searches with (the stripped question, plus its ``options``
    when the data set has that column). Retrieval goes through ``dataset.map(..., batched=True,
    num_proc=num_proc)``; the retriever is pickled
    into each worker and opens its own handles there. The result caches under a fingerprint derived from
    the dataset, the retriever's fingerprint and ``k``, so a rerun with the same inputs is free.

    Examples with an ``ids_column`` of ``passage_ids`` are used by :class:`~rare_data.RAREDataCollator`
    directly (passages looked up by id, no search at training time); :class:`PrecomputedRetriever` serves
    the same table through the search protocol.

    Args:
        dataset: A ``datasets.Dataset`` with a ``query_column``.
        retriever: Any retriever.
        k: Passages kept per query.
        query_column: Column holding the query text.
        ids_column: Output column of ranked passage ids.
        scores_column: Output column of scores (``None`` to skip).
        num_proc: Worker processes for ``datasets.map``.
        batch_size: Queries per ``search`` call.

    Returns:
        The dataset with the new column(s).
    """
    if query_column not in dataset.column_names:
        raise KeyError(f"dataset has no column {query_column!r} (columns: {dataset.column_names}); "
                       "pass query_column=")

    def _retrieve(batch):
        hits = retriever.search(_batch_queries(batch, query_column), k)
        out = {ids_column: [[h.id for h in hs] for hs in hits]}
        if scores_column is not None:
            out[scores_column] = [[h.score for h in hs] for hs in hits]
        return out

    fingerprint = _sha256("precompute", getattr(dataset, "_fingerprint", "") or "", retriever.fingerprint, str(k),
                          ids_column, str(scores_column), query_column)[:32]
    return dataset.map(_retrieve, batched=True, batch_size=batch_size, num_proc=num_proc,
                       new_fingerprint=fingerprint, desc=f"retrieving top-{k}")


class PrecomputedRetriever:
    """Serve retrieval results computed ahead of time (see :func:`precompute_retrieval`).

    Results are keyed on the query text, stripped (the collator searches with the stripped question plus its
    options; :meth:`from_dataset` builds exactly that text). A query listed twice must have the same results:
    different results for one text (e.g. two examples sharing a question but retrieved differently) are refused,
    because a search by text could only return one of them -- keep such per-example results in the examples'
    ``passage_ids`` column instead, which the collator reads per example.

    Args:
        queries: Query texts.
        ranked_ids: For each query, passage ids best first.
        store: Where passage texts come from: a mapping ``id -> text`` or an object with ``get_passages``
            (e.g. the retriever that produced the ids).
        scores: Optional scores matching ``ranked_ids``.
    """

    def __init__(self, queries: Sequence[str], ranked_ids: Sequence[Sequence[Any]], store: Any,
                 scores: Sequence[Sequence[float]] | None = None):
        if len(queries) != len(ranked_ids):
            raise ValueError(f"got {len(queries)} queries but {len(ranked_ids)} id lists")
        if not (isinstance(store, Mapping) or hasattr(store, "get_passages")):
            raise TypeError("store must be a mapping id -> text or have a get_passages(ids) method")
        self._table: dict[str, tuple[list[str], list[float]]] = {}
        for i, (q, pids) in enumerate(zip(queries, ranked_ids)):
            if not isinstance(q, str):
                raise TypeError(f"query {i} is {type(q).__name__}, not a string")
            sc = list(scores[i]) if scores is not None else [float("nan")] * len(pids)
            entry = ([str(p) for p in pids], [float(s) for s in sc])
            key = q.strip()
            if key in self._table and self._table[key][0] != entry[0]:
                raise ValueError(f"query {key[:80]!r} appears twice with different passage ids ({self._table[key][0]}"
                                 f" vs {entry[0]}): a search by text cannot tell them apart; keep the ids per example "
                                 "in a 'passage_ids' column (the collator reads it directly) or deduplicate")
            self._table[key] = entry
        self._store = store
        store_fp = getattr(store, "fingerprint", None) or _sha256(
            "store", (f"{key}\x01{value}" for key, value in sorted(store.items())))
        self._fingerprint = _sha256("precomputed", store_fp, (f"{q}\x01{' '.join(v[0])}" for q, v in
                                                              sorted(self._table.items())))

    @classmethod
    def from_dataset(cls, dataset, store: Any, *, query_column: str = "question", ids_column: str = "passage_ids",
                     scores_column: str | None = "passage_scores") -> PrecomputedRetriever:
        """Build from the output of :func:`precompute_retrieval` (keyed on the collator's search text)."""
        scores = dataset[scores_column] if scores_column and scores_column in dataset.column_names else None
        columns = [query_column] + (["options"] if "options" in dataset.column_names else [])
        queries = _batch_queries(dataset.select_columns(columns).to_dict(), query_column)
        return cls(queries, dataset[ids_column], store, scores)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def get_passages(self, ids: Sequence[str]) -> list[RetrievedPassage]:
        """Look passages up in the store by id."""
        if isinstance(self._store, Mapping):
            try:
                return [RetrievedPassage(str(p), self._store[str(p)]) for p in ids]
            except KeyError as err:
                raise KeyError(f"passage id {err.args[0]!r} is not in the store") from None
        return self._store.get_passages(ids)

    def search(self, queries: Sequence[str], k: int) -> list[list[RetrievedPassage]]:
        """Return the stored top-``k`` for each query.

        Raises:
            KeyError: If a query was not precomputed.
        """
        out = []
        for q in queries:
            entry = self._table.get(str(q).strip())
            if entry is None:
                raise KeyError(f"query {str(q)[:80]!r} has no precomputed results: run precompute_retrieval on the "
                               "data set that holds it, or use a live retriever")
            pids, scores = entry[0][:k], entry[1][:k]
            passages = self.get_passages(pids)
            out.append([RetrievedPassage(p.id, p.text, s) for p, s in zip(passages, scores)])
        return out
