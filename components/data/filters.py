"""Document quality filters: Gopher quality, Gopher repetition, C4 and FineWeb heuristics.

Each rule follows datatrove 0.10.1 (the library FineWeb was built with) exactly, so a document
kept or dropped here is kept or dropped by FineWeb's pipeline, with the same reason string:
  GopherQualityFilter     datatrove/pipeline/filters/gopher_quality_filter.py
  GopherRepetitionFilter  datatrove/pipeline/filters/gopher_repetition_filter.py
  C4QualityFilter         datatrove/pipeline/filters/c4_filters.py
  FineWebQualityFilter    datatrove/pipeline/filters/fineweb_quality_filter.py
Words, lines, paragraphs and n-grams are defined as in datatrove/utils/text.py and
datatrove/utils/word_tokenizers.py. datatrove itself is not imported: it is a test-only dependency.

Speed: datatrove asks its tokenizer for the words inside every filter; here `run_filters`
tokenizes a document at most once, lazily (not at all if a rule drops it before words are
needed), and shares the words across filters; it tokenizes again only after C4 rewrote the
text, as datatrove must too. The rules are unchanged. The gain is modest: datatrove's
lru_cache(5) on `split_into_parts` already lets a document's consecutive filters reuse its
words. Most of the time goes to spaCy itself: datatrove opens a `memory_zone` per call, so
spaCy rebuilds its lexemes for every text; we open one per 256 texts (memory stays bounded,
tokens are identical), about 1.6x faster tokenization.

Order: `run_filters` applies Gopher repetition, Gopher quality, C4, FineWeb, the order of
datatrove's examples/fineweb.py, so the first failing filter (and its reason) is FineWeb's.

Reason names (datatrove's strings, copied exactly):
  Gopher quality: gopher_short_doc, gopher_long_doc, gopher_below_avg_threshold,
    gopher_above_avg_threshold, gopher_too_many_hashes, gopher_too_many_ellipsis,
    gopher_too_many_bullets, gopher_too_many_end_ellipsis, gopher_below_alpha_threshold,
    gopher_enough_stop_words
  Gopher repetition: empty, dup_para_frac, dup_para_char_frac, dup_line_frac, dup_line_char_frac,
    top_{n}_gram, duplicated_{n}_n_grams
  C4: lorem_ipsum, curly_bracket, too_few_sentences
  FineWeb: empty, line_punct_ratio, short_line_ratio, char_dup_ratio, list_ratio
Every datatrove filter here gives a reason whenever it drops, so no bare-False name was needed.
"empty" is datatrove's name in both Gopher repetition and FineWeb.

Differences from datatrove:
  * Documents with no words at all reach a ratio rule only when `min_doc_words` is None or 0.
    There datatrove divides by zero and raises ZeroDivisionError, which stops its pipeline. We
    drop the document instead, with reason "gopher_no_words" (a word ratio) or "gopher_no_lines"
    (a line ratio, for the empty text). Every other input gets datatrove's decision.
  * spaCy 3.8's tokenizer fails, from the second time on, on text containing "IS_ALPHA" inside a
    `memory_zone`. datatrove then retries without that string, and so do we. The result depends on
    what the spaCy pipeline has seen before, and ours is a separate pipeline from datatrove's
    process-wide one, so the first text with "IS_ALPHA" can tokenize differently in the two.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

from pydantic import Field

from components.config import StrictConfig

# ---------------------------------------------------------------------------------------------
# Character sets, copied from datatrove/utils/text.py (PUNCTUATION, TERMINAL_PUNCTUATION).
# ---------------------------------------------------------------------------------------------

_CONTROL_CHARS = "".join(chr(code) for start, stop in ((0, 9), (11, 13), (13, 32), (127, 160))
                         for code in range(start, stop))
PUNCTUATION = (
    "!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»"
    + _CONTROL_CHARS
)
TERMINAL_PUNCTUATION = frozenset(
    "!.?\u0589\u061d\u061e\u061f\u06d4\u0700\u0701\u0702\u07f9\u0837\u0839\u083d\u083e\u0964"
    "\u0965\u104a\u104b\u1362\u1367\u1368\u166e\u1735\u1736\u17d4\u17d5\u17d6\u17d9\u17da\u1803"
    "\u1809\u1944\u1945\u1aa8\u1aa9\u1aaa\u1aab\u1b5a\u1b5b\u1b5e\u1b5f\u1b7d\u1b7e\u1c3b\u1c3c"
    "\u1c7e\u1c7f\u203c\u203d\u2047\u2048\u2049\u2e2e\u2e3c\u2e53\u2e54\u3002\ua4ff\ua60e\ua60f"
    "\ua6f3\ua6f7\ua876\ua877\ua8ce\ua8cf\ua92f\ua9c8\ua9c9\uaa5d\uaa5e\uaa5f\uaaf0\uaaf1\uabeb"
    "\ufe52\ufe56\ufe57\uff01\uff0e\uff1f\uff61\U00010a56\U00010a57\U00010f55\U00010f56\U00010f57"
    "\U00010f58\U00010f59\U00010f86\U00010f87\U00010f88\U00010f89\U00011047\U00011048\U000110be"
    "\U000110bf\U000110c0\U000110c1\U00011141\U00011142\U00011143\U000111c5\U000111c6\U000111cd"
    "\U000111de\U000111df\U00011238\U00011239\U0001123b\U0001123c\U000112a9\U0001144b\U0001144c"
    "\U000115c2\U000115c3\U000115c9\U000115ca\U000115cb\U000115cc\U000115cd\U000115ce\U000115cf"
    "\U000115d0\U000115d1\U000115d2\U000115d3\U000115d4\U000115d5\U000115d6\U000115d7\U00011641"
    "\U00011642\U0001173c\U0001173d\U0001173e\U00011944\U00011946\U00011a42\U00011a43\U00011a9b"
    "\U00011a9c\U00011c41\U00011c42\U00011ef7\U00011ef8\U00011f43\U00011f44\U00016a6e\U00016a6f"
    "\U00016af5\U00016b37\U00016b38\U00016b44\U00016e98\U0001bc9f\U0001da88"
)
PUNCTUATION_SET = frozenset(PUNCTUATION) | TERMINAL_PUNCTUATION

# ---------------------------------------------------------------------------------------------
# Configs. Thresholds keep datatrove's parameter names so a datatrove config maps one to one;
# the description gives the unit. For Gopher quality and the Gopher line/paragraph fractions,
# None or 0 disables a rule: datatrove tests each threshold for truthiness.
# ---------------------------------------------------------------------------------------------

NGramThreshold = tuple[Annotated[int, Field(ge=1)], Annotated[float, Field(ge=0)]]


class GopherQualityConfig(StrictConfig):
    """Gopher quality rules (Rae et al. 2021, arXiv:2112.11446, Appendix A, "quality filtering")."""

    enabled: bool = Field(True, description="Apply the Gopher quality rules.")
    min_doc_words: int | None = Field(50, ge=0, description="Drop below this many non-symbol words.")
    max_doc_words: int | None = Field(100_000, ge=0, description="Drop above this many non-symbol words.")
    min_avg_word_length: float | None = Field(
        3, ge=0, description="Drop when the mean non-symbol word length is below this (characters).")
    max_avg_word_length: float | None = Field(
        10, ge=0, description="Drop when the mean non-symbol word length is above this (characters).")
    max_symbol_word_ratio: float | None = Field(
        0.1, ge=0, description="Drop when '#' count, or '...' plus '…' count, per word exceeds this.")
    max_bullet_lines_ratio: float | None = Field(
        0.9, ge=0, le=1, description="Drop when more than this fraction of lines starts with '•' or '-'.")
    max_ellipsis_lines_ratio: float | None = Field(
        0.3, ge=0, le=1, description="Drop when more than this fraction of lines ends with '...' or '…'.")
    max_non_alpha_words_ratio: float | None = Field(
        0.8, ge=0, le=1,
        description="datatrove's name; drop when the fraction of words with a letter is BELOW this.")
    min_stop_words: int | None = Field(2, ge=0, description="Drop with fewer distinct stop words (case-sensitive).")
    stop_words: tuple[str, ...] = Field(
        ("the", "be", "to", "of", "and", "that", "have", "with"),
        description="Stop words; a tuple, not a set, so the config hash does not depend on set order.")


class GopherRepetitionConfig(StrictConfig):
    """Gopher repetition rules (arXiv:2112.11446, Table A1); fractions of characters or of items."""

    enabled: bool = Field(True, description="Apply the Gopher repetition rules.")
    dup_line_frac: float | None = Field(
        0.3, ge=0, le=1, description="Max fraction of lines that repeat an earlier line.")
    dup_para_frac: float | None = Field(
        0.3, ge=0, le=1, description="Max fraction of paragraphs that repeat an earlier paragraph.")
    dup_line_char_frac: float | None = Field(
        0.2, ge=0, le=1, description="Max fraction of the text's characters in repeated lines.")
    dup_para_char_frac: float | None = Field(
        0.2, ge=0, le=1, description="Max fraction of the text's characters in repeated paragraphs.")
    top_n_grams: tuple[NGramThreshold, ...] = Field(
        ((2, 0.2), (3, 0.18), (4, 0.16)),
        description="(n words, max fraction of characters covered by the most frequent n-gram).")
    dup_n_grams: tuple[NGramThreshold, ...] = Field(
        ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)),
        description="(n words, max fraction of characters in repeated n-grams).")


class C4QualityConfig(StrictConfig):
    """C4 line and page rules (Raffel et al. 2020, JMLR 21:140, section 2.2); -1 disables a count rule."""

    enabled: bool = Field(False, description="Apply the C4 rules (they remove lines, so they rewrite text).")
    split_paragraph: bool = Field(True, description="Judge lines split on newlines; False: judge sentences.")
    remove_citations: bool = Field(True, description="Delete wiki citations like [1], [edit], [citation needed].")
    filter_no_terminal_punct: bool = Field(True, description="Drop lines not ending in . ? ! \" ' (or ending '...').")
    min_num_sentences: int = Field(5, ge=-1, description="Drop documents with fewer sentences in kept lines.")
    min_words_per_line: int = Field(3, ge=-1, description="Drop lines with fewer whitespace-separated words.")
    max_word_length: int = Field(1000, ge=-1, description="Drop lines holding a word longer than this (characters).")
    filter_lorem_ipsum: bool = Field(True, description="Drop documents where a line passing the earlier rules has 'lorem ipsum'.")
    filter_javascript: bool = Field(True, description="Drop lines mentioning 'javascript'.")
    filter_curly_bracket: bool = Field(True, description="Drop documents where a line passing the earlier rules has '{'.")
    filter_policy: bool = Field(True, description="Drop lines mentioning cookies, terms of use or privacy policy.")


class FineWebQualityConfig(StrictConfig):
    """FineWeb's custom heuristics (Penedo et al. 2024, arXiv:2406.17557)."""

    enabled: bool = Field(False, description="Apply the FineWeb quality rules.")
    line_punct_thr: float = Field(
        0.12, ge=0, le=1, description="Drop when fewer than this fraction of lines end in a stop char.")
    line_punct_exclude_zero: bool = Field(False, description="Exempt documents with no line ending in a stop char from line_punct_thr.")
    stop_chars: tuple[str, ...] | None = Field(None, description="Line-ending chars; None: terminal punctuation.")
    short_line_thr: float = Field(
        0.67, ge=0, le=1, description="Drop when more than this fraction of lines is short.")
    short_line_length: int = Field(30, ge=0, description="A line this long or shorter (characters) is short.")
    char_duplicates_ratio: float = Field(
        0.01, ge=0, le=1, description="Max fraction of non-newline characters in repeated lines.")
    new_line_ratio: float = Field(0.3, ge=0, description="Max newlines per word.")


class FiltersConfig(StrictConfig):
    """All quality filters; `run_filters` applies the enabled ones in FineWeb's order."""

    gopher_quality: GopherQualityConfig = Field(default_factory=GopherQualityConfig)
    gopher_repetition: GopherRepetitionConfig = Field(default_factory=GopherRepetitionConfig)
    c4: C4QualityConfig = Field(default_factory=C4QualityConfig)
    fineweb: FineWebQualityConfig = Field(default_factory=FineWebQualityConfig)


# ---------------------------------------------------------------------------------------------
# Tokenizer: datatrove's load_word_tokenizer("eng") is SpaCyTokenizer("en").
# ---------------------------------------------------------------------------------------------


def _strip_strings(parts: list[str]) -> list[str]:
    """datatrove's strip_strings: strip each part, drop those left empty."""
    return [part.strip() for part in parts if part.strip()]


class EnglishWordTokenizer:
    """spaCy's blank English pipeline plus a sentencizer, called as datatrove's SpaCyTokenizer calls it.

    English text is never split into chunks (datatrove only chunks Japanese), spaCy's max_length
    is raised to the text's length before each call, and calls run in `memory_zone`s (one per
    `texts_per_memory_zone` texts) so a long run does not grow spaCy's string store.
    """

    def __init__(self, texts_per_memory_zone: int = 256) -> None:
        import spacy  # imported here so configs load where spaCy is not installed

        self._nlp = spacy.blank("en")
        self._nlp.add_pipe("sentencizer")
        self._texts_per_zone = texts_per_memory_zone
        self._texts_in_zone = 0
        self._zone: Any = None

    def _memory_zone(self) -> Any:
        """spaCy memory zones free the strings and lexemes created inside them. datatrove opens
        one per call, so every text rebuilds its lexemes (~2/3 of tokenization time); one zone
        per `texts_per_memory_zone` texts keeps memory bounded and tokens identical (tokens are
        copied out as str before a zone closes) at ~1.6x the speed."""
        if self._zone is None or self._texts_in_zone >= self._texts_per_zone:
            if self._zone is not None:
                self._zone.__exit__(None, None, None)
            self._zone = self._nlp.memory_zone()
            self._zone.__enter__()
            self._texts_in_zone = 0
        self._texts_in_zone += 1
        return self._zone

    def close(self) -> None:
        if self._zone is not None:
            self._zone.__exit__(None, None, None)
            self._zone = None

    def _parse(self, text: str, with_sentences: bool) -> Any:
        # Words come from the tokenizer alone (the sentencizer never changes tokens); sentences
        # need the pipeline, which refuses text longer than max_length.
        process = self._nlp if with_sentences else self._nlp.tokenizer
        self._nlp.max_length = len(text)
        try:
            return process(text)
        except Exception:
            # datatrove's retry: "this dumb string breaks the tokenizer completely"
            if "IS_ALPHA" not in text:
                raise
            return process(text.replace("IS_ALPHA", ""))

    def word_tokenize(self, text: str) -> list[str]:
        """datatrove's split_into_words(text, "eng")."""
        self._memory_zone()
        tokens = [token.text for token in self._parse(text, with_sentences=False)]
        return _strip_strings(tokens)

    def split_sentences(self, text: str) -> list[str]:
        """datatrove's split_into_sentences(text, "eng"): pieces cut at sentence ends, covering the text."""
        self._memory_zone()
        ends = [sentence.end_char for sentence in self._parse(text, with_sentences=True).sents]
        starts = [0] + ends[:-1]
        stops = ends[:-1] + [len(text)]
        return [text[start:stop] for start, stop in zip(starts, stops)]


def english_word_tokenizer() -> EnglishWordTokenizer:
    """A fresh tokenizer behaving like datatrove's load_word_tokenizer("en"); the caller keeps it."""
    return EnglishWordTokenizer()


class WordTokenizer(Protocol):
    """What the filters need from a tokenizer; EnglishWordTokenizer is the one datatrove uses."""

    def word_tokenize(self, text: str) -> list[str]: ...

    def split_sentences(self, text: str) -> list[str]: ...


class Words:
    """One text's words, tokenized on first use and then shared by every filter that reads them."""

    def __init__(self, text: str, tokenizer: WordTokenizer) -> None:
        self.text = text
        self._tokenizer = tokenizer
        self._tokens: list[str] | None = None

    @property
    def tokens(self) -> list[str]:
        if self._tokens is None:
            self._tokens = self._tokenizer.word_tokenize(self.text)
        return self._tokens


@dataclass(frozen=True)
class FilterResult:
    """A keep (with the text to pass on, possibly rewritten) or a drop (with its reason)."""

    text: str | None
    reason: str | None = None

    @property
    def kept(self) -> bool:
        return self.reason is None

    @classmethod
    def keep(cls, text: str) -> FilterResult:
        return cls(text=text)

    @classmethod
    def drop(cls, reason: str) -> FilterResult:
        return cls(text=None, reason=reason)


def _verdict(text: str, reason: str | None) -> FilterResult:
    return FilterResult.keep(text) if reason is None else FilterResult.drop(reason)


# ---------------------------------------------------------------------------------------------
# Gopher quality (gopher_quality_filter.py). Each rule returns a drop reason or None.
# ---------------------------------------------------------------------------------------------


def _gopher_doc_length(non_symbol_words: list[str], config: GopherQualityConfig) -> str | None:
    if config.min_doc_words and len(non_symbol_words) < config.min_doc_words:
        return "gopher_short_doc"
    if config.max_doc_words and len(non_symbol_words) > config.max_doc_words:
        return "gopher_long_doc"
    return None


def _gopher_avg_word_length(non_symbol_words: list[str], config: GopherQualityConfig) -> str | None:
    # datatrove takes np.mean of an empty list (nan) when there are no such words, and every
    # comparison with nan is false, so the rule passes.
    if not non_symbol_words:
        return None
    # equals np.mean: the integer sum is exact in float64, and both divide once
    mean_chars = sum(len(word) for word in non_symbol_words) / len(non_symbol_words)
    if config.min_avg_word_length and mean_chars < config.min_avg_word_length:
        return "gopher_below_avg_threshold"
    if config.max_avg_word_length and mean_chars > config.max_avg_word_length:
        return "gopher_above_avg_threshold"
    return None


def _gopher_symbol_ratio(text: str, n_words: int, config: GopherQualityConfig) -> str | None:
    if not config.max_symbol_word_ratio:
        return None
    if n_words == 0:
        return "gopher_no_words"  # datatrove: ZeroDivisionError
    if text.count("#") / n_words > config.max_symbol_word_ratio:
        return "gopher_too_many_hashes"
    if (text.count("...") + text.count("…")) / n_words > config.max_symbol_word_ratio:
        return "gopher_too_many_ellipsis"
    return None


def _gopher_line_shapes(lines: list[str], config: GopherQualityConfig) -> str | None:
    if (config.max_bullet_lines_ratio or config.max_ellipsis_lines_ratio) and not lines:
        return "gopher_no_lines"  # datatrove: ZeroDivisionError
    if config.max_bullet_lines_ratio:
        bullets = sum(line.lstrip().startswith("•") or line.lstrip().startswith("-") for line in lines)
        if bullets / len(lines) > config.max_bullet_lines_ratio:
            return "gopher_too_many_bullets"
    if config.max_ellipsis_lines_ratio:
        ellipses = sum(line.rstrip().endswith("...") or line.rstrip().endswith("…") for line in lines)
        if ellipses / len(lines) > config.max_ellipsis_lines_ratio:
            return "gopher_too_many_end_ellipsis"
    return None


def _gopher_alpha_words(words: list[str], config: GopherQualityConfig) -> str | None:
    # Gopher: "80% of words in a document contain at least one alphabetic character"
    if not config.max_non_alpha_words_ratio:
        return None
    if not words:
        return "gopher_no_words"  # datatrove: ZeroDivisionError
    with_letter = sum(any(char.isalpha() for char in word) for word in words)
    if with_letter / len(words) < config.max_non_alpha_words_ratio:
        return "gopher_below_alpha_threshold"
    return None


def _gopher_stop_words(words: list[str], config: GopherQualityConfig) -> str | None:
    if config.min_stop_words and len(set(config.stop_words).intersection(words)) < config.min_stop_words:
        return "gopher_enough_stop_words"  # sic: datatrove's name for "not enough"
    return None


@dataclass(frozen=True)
class GopherQuality:
    config: GopherQualityConfig

    def apply(self, text: str, words: Words) -> FilterResult:
        tokens = words.tokens
        # a "symbol word" is made only of punctuation; length rules ignore such words
        non_symbol = [word for word in tokens if any(char not in PUNCTUATION_SET for char in word)]
        reason = (
            _gopher_doc_length(non_symbol, self.config)
            or _gopher_avg_word_length(non_symbol, self.config)
            or _gopher_symbol_ratio(text, len(tokens), self.config)
            or _gopher_line_shapes(text.splitlines(), self.config)
            or _gopher_alpha_words(tokens, self.config)
            or _gopher_stop_words(tokens, self.config)
        )
        return _verdict(text, reason)


# ---------------------------------------------------------------------------------------------
# Gopher repetition (gopher_repetition_filter.py).
# ---------------------------------------------------------------------------------------------

_PARAGRAPH_BREAK = re.compile(r"\n{2,}")
_LINE_BREAK = re.compile(r"\n+")


def _find_duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items equal to an earlier item, characters in those items)."""
    seen: set[str] = set()
    duplicate_items = duplicate_chars = 0
    for item in items:
        if item in seen:
            duplicate_items += 1
            duplicate_chars += len(item)
        else:
            seen.add(item)
    return duplicate_items, duplicate_chars


def _duplicate_fractions(
    parts: list[str], text_chars: int, max_frac: float | None, max_char_frac: float | None, name: str,
) -> str | None:
    duplicates, duplicate_chars = _find_duplicates(parts)
    if max_frac and duplicates / len(parts) > max_frac:
        return f"dup_{name}_frac"
    if max_char_frac and duplicate_chars / text_chars > max_char_frac:
        return f"dup_{name}_char_frac"
    return None


def _top_n_gram_chars(words: list[str], n: int) -> int:
    """Characters covered by the most frequent n-gram (space-joined); ties go to the first seen."""
    counts = Counter(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))
    n_gram, count = counts.most_common(1)[0]
    return len(n_gram) * count


def _repeated_n_gram_chars(words: list[str], n: int) -> int:
    """Characters in n-grams seen before, skipping past each repeat (datatrove's find_all_duplicate).

    The n-grams are joined WITHOUT spaces, as in datatrove; keep it so decisions match.
    """
    seen: set[str] = set()
    repeated_chars = index = 0
    while index < len(words) - n + 1:
        n_gram = "".join(words[index:index + n])
        if n_gram in seen:
            repeated_chars += len(n_gram)
            index += n
        else:
            seen.add(n_gram)
            index += 1
    return repeated_chars


def _n_gram_repetition(words: list[str], text_chars: int, config: GopherRepetitionConfig) -> str | None:
    for n, max_frac in config.top_n_grams:
        if len(words) >= n and _top_n_gram_chars(words, n) / text_chars > max_frac:
            return f"top_{n}_gram"
    for n, max_frac in config.dup_n_grams:
        if _repeated_n_gram_chars(words, n) / text_chars > max_frac:
            return f"duplicated_{n}_n_grams"
    return None


@dataclass(frozen=True)
class GopherRepetition:
    config: GopherRepetitionConfig

    def apply(self, text: str, words: Words) -> FilterResult:
        if not text:
            return FilterResult.drop("empty")
        config = self.config
        # paragraphs split the stripped text, lines the raw text; both fractions are of len(text)
        reason = (
            _duplicate_fractions(_PARAGRAPH_BREAK.split(text.strip()), len(text),
                                 config.dup_para_frac, config.dup_para_char_frac, "para")
            or _duplicate_fractions(_LINE_BREAK.split(text), len(text),
                                    config.dup_line_frac, config.dup_line_char_frac, "line")
            or _n_gram_repetition(words.tokens, len(text), config)
        )
        return _verdict(text, reason)


# ---------------------------------------------------------------------------------------------
# C4 (c4_filters.py C4QualityFilter; reference: tensorflow_datasets c4_utils.py).
# ---------------------------------------------------------------------------------------------

_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_END_PUNCTUATION = (".", "?", "!", '"', "'")
_POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
                      "use cookies")


def _c4_judge_line(line: str, config: C4QualityConfig) -> tuple[str | None, str | None]:
    """(the line to keep or None, a reason to drop the whole document or None)."""
    line = line.strip()
    words = line.split()  # counted before citations are removed, as in datatrove
    if config.max_word_length != -1 and any(len(word) > config.max_word_length for word in words):
        return None, None
    if config.remove_citations:
        line = _CITATION.sub("", line)
    if config.filter_no_terminal_punct and (not line.endswith(_END_PUNCTUATION) or line.endswith("...")):
        return None, None
    if len(words) < config.min_words_per_line:
        return None, None
    lowered = line.lower()
    if config.filter_lorem_ipsum and "lorem ipsum" in lowered:
        return None, "lorem_ipsum"
    if config.filter_javascript and "javascript" in lowered:
        return None, None
    if config.filter_curly_bracket and "{" in line:
        return None, "curly_bracket"
    if config.filter_policy and any(phrase in lowered for phrase in _POLICY_SUBSTRINGS):
        return None, None
    return line, None


@dataclass(frozen=True)
class C4Quality:
    """Keeps only the lines that pass C4's line rules; may drop the whole document."""

    config: C4QualityConfig
    tokenizer: WordTokenizer

    def apply(self, text: str, words: Words) -> FilterResult:
        config = self.config
        lines = text.splitlines() if config.split_paragraph else self.tokenizer.split_sentences(text)
        kept_lines: list[str] = []
        n_sentences = 0
        for line in lines:
            kept, doc_reason = _c4_judge_line(line, config)
            if doc_reason is not None:
                return FilterResult.drop(doc_reason)
            if kept is None:
                continue
            if config.min_num_sentences != -1:
                n_sentences += len(self.tokenizer.split_sentences(kept)) if config.split_paragraph else 1
            kept_lines.append(kept)
        if n_sentences < config.min_num_sentences:
            return FilterResult.drop("too_few_sentences")
        return FilterResult.keep(("\n" if config.split_paragraph else " ").join(kept_lines).strip())


# ---------------------------------------------------------------------------------------------
# FineWeb (fineweb_quality_filter.py).
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FineWebQuality:
    config: FineWebQualityConfig

    def apply(self, text: str, words: Words) -> FilterResult:
        config = self.config
        lines = [line for line in text.split("\n") if line.strip() != ""]
        if not lines:
            return FilterResult.drop("empty")
        stop_chars = tuple(TERMINAL_PUNCTUATION) if config.stop_chars is None else config.stop_chars
        punct_ratio = sum(line.endswith(stop_chars) for line in lines) / len(lines)
        if punct_ratio < config.line_punct_thr and not (punct_ratio == 0 and config.line_punct_exclude_zero):
            return FilterResult.drop("line_punct_ratio")
        if sum(len(line) <= config.short_line_length for line in lines) / len(lines) > config.short_line_thr:
            return FilterResult.drop("short_line_ratio")
        if _find_duplicates(lines)[1] / len(text.replace("\n", "")) > config.char_duplicates_ratio:
            return FilterResult.drop("char_dup_ratio")
        # a text with a non-blank line always has a word, so this never divides by zero
        if text.count("\n") / len(words.tokens) > config.new_line_ratio:
            return FilterResult.drop("list_ratio")
        return FilterResult.keep(text)


# ---------------------------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------------------------

DocumentFilter = GopherRepetition | GopherQuality | C4Quality | FineWebQuality


def build_filters(config: FiltersConfig, tokenizer: WordTokenizer) -> list[DocumentFilter]:
    """The enabled filters, in FineWeb's order (datatrove examples/fineweb.py)."""
    candidates: list[tuple[bool, DocumentFilter]] = [
        (config.gopher_repetition.enabled, GopherRepetition(config.gopher_repetition)),
        (config.gopher_quality.enabled, GopherQuality(config.gopher_quality)),
        (config.c4.enabled, C4Quality(config.c4, tokenizer)),
        (config.fineweb.enabled, FineWebQuality(config.fineweb)),
    ]
    return [document_filter for enabled, document_filter in candidates if enabled]


def run_filters(text: str, config: FiltersConfig, tokenizer: WordTokenizer) -> tuple[str | None, str | None]:
    """(kept text, None), or (None, the first failing filter's reason).

    The words are computed at most once per distinct text: a filter that rewrites the text (C4)
    starts a new `Words` for the filters after it.
    """
    words = Words(text, tokenizer)
    for document_filter in build_filters(config, tokenizer):
        result = document_filter.apply(text, words)
        if not result.kept:
            return None, result.reason
        if result.text != text:
            text = result.text
            words = Words(text, tokenizer)
    return text, None
