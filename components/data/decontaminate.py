"""Find training documents that share a word n-gram with an evaluation item.

The method is GPT-3's (Brown et al. 2020, "Language Models are Few-Shot Learners", §4 and
Appendix C): an evaluation example is potentially leaked when a training document shares a
13-gram with it, or contains the whole example when that is shorter than 13 words.

Normalisation (both sides): lowercase, delete `_` and every character that is neither a
Unicode word character (letter, digit) nor whitespace, then split on whitespace. Punctuation is deleted, not
replaced by a space, so "don't" -> "dont" and "48/2=24" -> "48224". For ASCII text this is
exactly EleutherAI lm-evaluation-harness' `Janitor.normalize_string` (lowercase, delete
`string.punctuation`), the open reimplementation of GPT-3's tool.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import xxhash
from pydantic import Field, model_validator

from components.config import StrictConfig

_PUNCTUATION = re.compile(r"[^\w\s]|_")


class DecontaminationConfig(StrictConfig):
    """How to match, and how to read the evaluation set's text.

    The evaluation set has its own reading because it rarely shares the corpus's schema: a
    `{"text": ...}` web corpus is decontaminated against GSM8K's `question`/`answer` records.
    With neither `text_field` nor `text_template` set it is read like the corpus, as before.
    """

    enabled: bool = Field(True, description="Drop training documents that share an n-gram with an evaluation item.")
    ngram_words: int = Field(13, ge=1, le=64, description="Words per n-gram (GPT-3 used 13).")
    text_field: str | None = Field(
        None, description="Read each evaluation record's text from this field (default: as the corpus is read).")
    text_template: str | None = Field(
        None, description="Else fill this str.format template from each evaluation record, "
                          "e.g. 'Question: {question}\\nAnswer: {answer}' (default: as the corpus is read).")

    @model_validator(mode="after")
    def _one_reading(self) -> DecontaminationConfig:
        if self.text_field is not None and self.text_template is not None:
            raise ValueError("set text_field or text_template for the evaluation set, not both")
        return self

    @property
    def reads_own_text(self) -> bool:
        """Whether the evaluation set has a reading of its own (else it is read like the corpus)."""
        return self.text_field is not None or self.text_template is not None


def normalized_words(text: str) -> list[str]:
    return _PUNCTUATION.sub("", text.lower()).split()


def ngram_hashes(words: Sequence[str], n: int) -> np.ndarray:
    """Distinct xxhash64 values of the n-grams (words joined by one space; none if too short)."""
    grams = (" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    return np.unique(np.fromiter((xxhash.xxh64_intdigest(g) for g in grams), dtype=np.uint64))


class NgramIndex:
    """Evaluation n-grams as a sorted array of 64-bit hashes with the item each came from.

    12 bytes per distinct (n-gram, item) pair instead of Python strings in a set; a spurious
    64-bit hash match has probability ~ (query n-grams x index size) / 2^64, negligible.
    An item shorter than n words is indexed as one gram of all its words (length k < n) and
    queries are also cut into k-grams for every such k, so a training text matches it when it
    contains the whole item. An item with no words is never matched.
    """

    def __init__(self, hashes: np.ndarray, item_of_hash: np.ndarray, ids: list[str], n: int,
                 short_lengths: tuple[int, ...]) -> None:
        self._hashes = hashes  # uint64, sorted
        self._items = item_of_hash  # int32 index into ids, parallel to hashes
        self._ids = ids
        self.n = n
        self._gram_lengths = (n, *short_lengths)

    @classmethod
    def from_texts(cls, texts: list[str], ids: list[str], n: int = 13) -> NgramIndex:
        if len(texts) != len(ids):
            raise ValueError(f"got {len(texts)} texts but {len(ids)} ids")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        per_item: list[np.ndarray] = []
        short_lengths: set[int] = set()
        for text in texts:
            words = normalized_words(text)
            gram_length = min(len(words), n)
            if 0 < gram_length < n:
                short_lengths.add(gram_length)
            per_item.append(ngram_hashes(words, gram_length) if gram_length else np.empty(0, np.uint64))
        hashes = np.concatenate(per_item) if per_item else np.empty(0, np.uint64)
        items = np.repeat(np.arange(len(texts), dtype=np.int32), [len(h) for h in per_item])
        order = np.argsort(hashes, kind="stable")
        return cls(hashes[order], items[order], list(ids), n, tuple(sorted(short_lengths)))

    def __len__(self) -> int:
        """Number of indexed (n-gram, item) pairs."""
        return len(self._hashes)

    def matches(self, text: str) -> list[str]:
        """Ids of the evaluation items that share an n-gram with `text`, in index order.

        A `text` shorter than n words has no n-grams, so it can only match items that are no
        longer than it and contained in it: the whole-text rule applied to both sides.
        """
        words = normalized_words(text)
        query = np.concatenate([ngram_hashes(words, length) for length in self._gram_lengths])
        start = np.searchsorted(self._hashes, query, side="left")
        stop = np.searchsorted(self._hashes, query, side="right")
        found = np.flatnonzero(stop > start)
        if found.size == 0:
            return []
        items = np.unique(np.concatenate([self._items[start[i] : stop[i]] for i in found]))
        return [self._ids[item] for item in items]
