"""Exact and fuzzy (MinHash + LSH) document deduplication.

Exact dedup keys a document by a digest of its normalised text. Fuzzy dedup estimates the
Jaccard similarity of word n-gram shingle sets with MinHash (Broder 1997, "On the
resemblance and containment of documents") and finds candidate pairs with LSH banding
(Leskovec, Rajaraman & Ullman, "Mining of Massive Datasets", ch. 3.4). The defaults (5-gram
shingles, 14 bands x 8 rows, seed 1) are datatrove's / FineWeb's.

Words: a word is a maximal run of Unicode word characters (regex `\\w+`: letters, digits and
underscore, after optional lowercasing). Every other character (whitespace, punctuation,
symbols such as `$ + = < >`) only separates words, so "48/2=24" is the words 48, 2, 24.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import xxhash
from pydantic import Field

from components.config import StrictConfig

_WORD = re.compile(r"\w+")

# Universal hashing modulo the Mersenne prime 2^61 - 1 (Carter & Wegman 1979; the
# Mersenne-prime reduction as in Thorup, "High Speed Hashing for Integers and Strings", 2015).
_MERSENNE_EXPONENT = 61
_MERSENNE_PRIME = (1 << _MERSENNE_EXPONENT) - 1
_P = np.uint64(_MERSENNE_PRIME)
_LOW_32_BITS = np.uint64(0xFFFF_FFFF)
_LOW_29_BITS = np.uint64((1 << 29) - 1)

# Shingles are hashed in chunks so a very long document never materialises a
# (num_shingles x num_hashes) matrix larger than this many rows.
_SHINGLE_CHUNK_ROWS = 4096


class ExactDedupConfig(StrictConfig):
    enabled: bool = Field(True, description="Drop documents whose normalised text was already seen.")


def exact_key(normalized_text: str) -> bytes:
    """A 128-bit digest to keep in a `seen` set instead of the text itself.

    BLAKE2b-128: collisions are negligible (~n^2 / 2^129 for n documents) at half the memory
    of sha256. The caller normalises, so the key is only as forgiving as its normalisation.
    """
    return hashlib.blake2b(normalized_text.encode("utf-8"), digest_size=16).digest()


class FuzzyDedupConfig(StrictConfig):
    enabled: bool = Field(True, description="Cluster near-duplicate documents with MinHash + LSH and keep one per cluster.")
    ngram_words: int = Field(5, ge=1, le=64, description="Words per shingle (word n-gram).")
    num_bands: int = Field(14, ge=1, le=1024, description="LSH bands b; documents sharing any whole band collide.")
    rows_per_band: int = Field(8, ge=1, le=256, description="MinHash values per band r; signature length is b*r.")
    seed: int = Field(1, ge=0, lt=2**64, description="Seed of the hash permutations; fixed so signatures are comparable across runs.")
    lowercase: bool = Field(True, description="Lowercase the text before splitting it into words.")

    @property
    def num_hashes(self) -> int:
        return self.num_bands * self.rows_per_band


@dataclass(frozen=True)
class Permutations:
    """Coefficients of h_i(x) = (a_i * x + b_i) mod (2^61 - 1), one pair per signature entry."""

    a: np.ndarray  # uint64, shape (num_hashes,), each in [1, p)
    b: np.ndarray  # uint64, shape (num_hashes,), each in [0, p)


def collision_probability(jaccard: float, bands: int, rows: int) -> float:
    """Chance that two documents of Jaccard similarity s share at least one LSH band.

    Mining of Massive Datasets (Leskovec, Rajaraman & Ullman), §3.4.2: 1 - (1 - s^r)^b, the
    S-curve whose threshold is about (1/b)^(1/r) (~0.72 at b=14, r=8).
    """
    if not 0.0 <= jaccard <= 1.0:
        raise ValueError(f"jaccard must be in [0, 1], got {jaccard}")
    return 1.0 - (1.0 - jaccard**rows) ** bands


def make_permutations(config: FuzzyDedupConfig) -> Permutations:
    """Derive the coefficients from the seed with xxhash, not numpy's RNG.

    NumPy does not promise stable `Generator` streams across releases; signatures computed
    today must stay comparable with signatures computed after an upgrade.
    """
    indices = range(config.num_hashes)
    a = [1 + xxhash.xxh64_intdigest(f"a{i}", seed=config.seed) % (_MERSENNE_PRIME - 1) for i in indices]
    b = [xxhash.xxh64_intdigest(f"b{i}", seed=config.seed) % _MERSENNE_PRIME for i in indices]
    return Permutations(a=np.array(a, dtype=np.uint64), b=np.array(b, dtype=np.uint64))


def words(text: str, lowercase: bool = True) -> list[str]:
    """Maximal `\\w+` runs; everything else only separates words (see the module docstring)."""
    return _WORD.findall(text.lower() if lowercase else text)


def shingle_hashes(text: str, config: FuzzyDedupConfig) -> np.ndarray:
    """Distinct 64-bit xxhash64 values of the word n-grams (the set whose Jaccard we estimate).

    A document with fewer than `ngram_words` words (including none) is one shingle of all its
    words, so short documents still get a signature and identical short ones still collide.
    """
    tokens = words(text, config.lowercase)
    n = config.ngram_words
    if len(tokens) < n:
        grams: Iterable[str] = (" ".join(tokens),)
    else:
        grams = (" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return np.unique(np.fromiter((xxhash.xxh64_intdigest(g) for g in grams), dtype=np.uint64))


def _mod_mersenne(values: np.ndarray) -> np.ndarray:
    """Reduce uint64 values modulo p = 2^61 - 1 using 2^61 = 1 (mod p).

    After folding, v < 2p; `minimum(v, v - p)` then picks v - p when v >= p and v otherwise,
    because v - p wraps past 2^64 - p > p when v < p: two passes instead of a `where`.
    """
    folded = (values & _P) + (values >> np.uint64(_MERSENNE_EXPONENT))  # <= 2^61 - 1 + 7 < 2p
    return np.minimum(folded, folded - _P)


def _permute(shingles: np.ndarray, permutations: Permutations) -> np.ndarray:
    """Exact (a*x + b) mod (2^61 - 1) for every shingle x (rows) and permutation (columns).

    NumPy has no 128-bit integers and plain uint64 `a * x % p` (as in datatrove) silently
    wraps at 2^64, which is no longer a universal hash. So split a, x < 2^61 into 32-bit
    halves, a*x = ah*xh*2^64 + (ah*xl + al*xh)*2^32 + al*xl, and fold each part with
    2^61 = 1 (mod p): 2^64 = 8 and mid*2^32 = (mid >> 29) + (mid mod 2^29)*2^32. Bounds in
    the comments keep every intermediate below 2^64; the ops are in place for speed.
    """
    x = _mod_mersenne(shingles)[:, None]
    x_high, x_low = x >> np.uint64(32), x & _LOW_32_BITS  # < 2^29, < 2^32
    a_high, a_low = permutations.a >> np.uint64(32), permutations.a & _LOW_32_BITS
    total = (a_high << np.uint64(3)) * x_high  # ah*xh*2^64 = ah*xh*8: < 2^61
    middle = a_high * x_low
    middle += a_low * x_high  # < 2^62
    total += middle >> np.uint64(29)  # + < 2^33
    middle &= _LOW_29_BITS
    middle <<= np.uint64(32)
    total += middle  # + < 2^61
    low = a_low * x_low  # < 2^64
    total += low & _P
    low >>= np.uint64(_MERSENNE_EXPONENT)
    total += low  # + < 2^61 + 8
    total += permutations.b  # + < 2^61: total < 2^63 + 2^33 + 8
    return _mod_mersenne(total)


def minhash_signature(text: str, config: FuzzyDedupConfig, permutations: Permutations) -> np.ndarray:
    """The minimum of each permutation over the shingles: P[equal entry] = Jaccard (Broder 1997).

    Returns uint64 of shape (num_bands * rows_per_band,), every entry in [0, 2^61 - 1).
    """
    if permutations.a.shape != (config.num_hashes,):
        raise ValueError(f"permutations have {permutations.a.shape[0]} hashes, config needs {config.num_hashes}")
    shingles = shingle_hashes(text, config)
    signature = np.full(config.num_hashes, _P, dtype=np.uint64)
    for start in range(0, len(shingles), _SHINGLE_CHUNK_ROWS):
        chunk = _permute(shingles[start : start + _SHINGLE_CHUNK_ROWS], permutations)
        np.minimum(signature, chunk.min(axis=0), out=signature)
    return signature


def minhash_signatures(texts: Iterable[str], config: FuzzyDedupConfig) -> np.ndarray:
    """Signature matrix (num_docs x num_hashes) in the layout `fuzzy_clusters` expects."""
    permutations = make_permutations(config)
    rows = [minhash_signature(text, config, permutations) for text in texts]
    return np.stack(rows) if rows else np.empty((0, config.num_hashes), dtype=np.uint64)


class _UnionFind:
    """Disjoint sets over 0..n-1 with union by size and path halving (Tarjan & van Leeuwen 1984)."""

    def __init__(self, size: int) -> None:
        self.parent = np.arange(size, dtype=np.int64)
        self.size = np.ones(size, dtype=np.int64)

    def find(self, item: int) -> int:
        parent = self.parent
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = int(parent[item])
        return item

    def union(self, first: int, second: int) -> None:
        root_a, root_b = self.find(first), self.find(second)
        if root_a == root_b:
            return
        if self.size[root_a] < self.size[root_b]:
            root_a, root_b = root_b, root_a
        self.parent[root_b] = root_a
        self.size[root_a] += self.size[root_b]

    def roots(self) -> np.ndarray:
        """Root of every item, by vectorised pointer jumping (depth halves each pass)."""
        roots = self.parent.copy()
        while True:
            jumped = roots[roots]
            if np.array_equal(jumped, roots):
                return roots
            roots = jumped


def _band_buckets(band: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group documents by the band's r values: (first document of the bucket, bucket per doc).

    The bucket key is the r values themselves (a byte view), i.e. a perfect hash: no spurious
    collisions, and no more memory than the band slice that is hashed anyway.
    """
    rows = np.ascontiguousarray(band)
    keys = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
    _, first_doc, bucket = np.unique(keys, return_index=True, return_inverse=True)
    return first_doc, bucket.ravel()


def fuzzy_clusters(signatures: np.ndarray, config: FuzzyDedupConfig) -> np.ndarray:
    """Cluster id per document: the smallest document index of its LSH-connected component.

    Two documents are linked when any band of r consecutive signature entries is identical;
    clusters are the transitive closure (A~B and B~C put A, B, C together even when A and C
    share no band). Naming a cluster by its smallest index makes "keep the documents whose
    cluster id equals their own index" keep the first occurrence in input order, independent
    of band order or union-find internals. Bands are processed one at a time, so beyond the
    input only one band's buckets and the union-find arrays (O(num_docs)) are alive.
    """
    if signatures.ndim != 2 or signatures.shape[1] != config.num_hashes:
        raise ValueError(f"signatures must be (num_docs, {config.num_hashes}), got shape {signatures.shape}")
    num_docs = signatures.shape[0]
    if num_docs == 0:
        return np.empty(0, dtype=np.int64)
    sets = _UnionFind(num_docs)
    rows = config.rows_per_band
    for band_index in range(config.num_bands):
        first_doc, bucket = _band_buckets(signatures[:, band_index * rows : (band_index + 1) * rows])
        representative = first_doc[bucket]
        for doc in np.flatnonzero(representative != np.arange(num_docs)):
            sets.union(int(doc), int(representative[doc]))
    _, smallest_member, component = np.unique(sets.roots(), return_index=True, return_inverse=True)
    return smallest_member[component.ravel()].astype(np.int64)
