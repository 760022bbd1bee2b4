"""Semantic memory: a document store the agent searches by BM25.

Invariant: a search is a pure function of the documents and the query: the same store and
query give the same documents in the same order (ties broken by the order the documents
were given in), in any process.

Scoring is Okapi BM25 (Robertson & Zaragoza 2009, "The Probabilistic Relevance Framework:
BM25 and Beyond", §3.4): for each query term t in document d,
    idf(t) * tf(t, d) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl)),
summed over the query's terms, with Lucene's non-negative idf(t) = ln(1 + (N - df(t) + 0.5) /
(df(t) + 0.5)) (Kamphuis et al. 2020, "Which BM25 Do You Mean?", Table 1), k1 = 1.5, b = 0.75.
The index is bm25s's (Lù 2024): maintained, numpy/scipy only, its scores checked against the
formula above in tests/test_agent_tools.py; rank-bm25 is unmaintained since 2022 and slower.
A document's searchable text is its title and its text; terms are lower-cased words (single
characters and digits included, so "7" is a term) less English stopwords.
"""

from __future__ import annotations

import bm25s
import numpy as np

from components.errors import DataError

K1 = 1.5  # term-frequency saturation (Robertson & Zaragoza 2009 §3.4: k1 in [1.2, 2])
B = 0.75  # document-length normalisation
TERM_PATTERN = r"(?u)\b\w+\b"  # bm25s's default drops one-character words; digits matter here
DOCUMENT_KEYS = ("id", "title", "text")


def terms(texts: list[str]) -> list[list[str]]:
    """Each text's BM25 terms: lower-cased words, English stopwords removed."""
    return bm25s.tokenize(texts, token_pattern=TERM_PATTERN, stopwords="en", return_ids=False,
                          show_progress=False)


def _checked(documents: list[dict]) -> list[dict]:
    """Copies of the documents, each with string id, title and text, ids unique."""
    seen: set[str] = set()
    for index, document in enumerate(documents):
        if not isinstance(document, dict):
            raise DataError(f"document {index}: expected a dict with {', '.join(DOCUMENT_KEYS)}, "
                            f"got {type(document).__name__}")
        for key in DOCUMENT_KEYS:
            if not isinstance(document.get(key), str):
                raise DataError(f"document {index}: field {key!r} must be a string, got {document.get(key)!r}")
        if document["id"] in seen:
            raise DataError(f"document {index}: duplicate id {document['id']!r}")
        seen.add(document["id"])
    return [{key: document[key] for key in DOCUMENT_KEYS} for document in documents]


class DocumentStore:
    """Documents (dicts with id, title, text) searchable by BM25. An empty store is allowed:
    every search of it finds nothing."""

    def __init__(self, documents: list[dict]):
        self._documents = _checked(documents)
        self._index: bm25s.BM25 | None = None
        document_terms = terms([f"{d['title']}\n{d['text']}" for d in self._documents])
        if any(document_terms):
            self._index = bm25s.BM25(k1=K1, b=B, method="lucene")
            self._index.index(document_terms, show_progress=False)

    def __len__(self) -> int:
        return len(self._documents)

    def search(self, query: str, k: int) -> list[dict]:
        """The (at most) k best documents for the query, best first, each a copy with its
        BM25 `score`; documents sharing no term with the query (score 0) are left out.
        DataError for a query with no searchable term (empty, or stopwords only)."""
        if k < 1:
            raise DataError(f"search: k must be at least 1, got {k}")
        query_terms = terms([query])[0]
        if not query_terms:
            raise DataError(f"search: the query {query!r} has no searchable words (empty or only stopwords)")
        if self._index is None:
            return []
        scores = self._index.get_scores_from_ids(self._index.get_tokens_ids(query_terms))
        order = np.lexsort((np.arange(len(scores)), -scores))  # score descending, then input order
        return [{**self._documents[i], "score": float(scores[i])} for i in order[:k] if scores[i] > 0]
