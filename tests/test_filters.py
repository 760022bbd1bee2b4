"""Quality filters: each rule on small inputs, then decision-for-decision equality with datatrove."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

from components.data.filters import (
    PUNCTUATION_SET,
    TERMINAL_PUNCTUATION,
    C4Quality,
    C4QualityConfig,
    EnglishWordTokenizer,
    FiltersConfig,
    FineWebQuality,
    FineWebQualityConfig,
    GopherQuality,
    GopherQualityConfig,
    GopherRepetition,
    GopherRepetitionConfig,
    Words,
    english_word_tokenizer,
    run_filters,
)

GSM8K_TRAIN = Path(__file__).resolve().parent.parent / "data/raw/gsm8k/train.jsonl"

# ~70 words of ordinary prose: passes every Gopher quality rule with the defaults.
PROSE = (
    "The village sits at the edge of a quiet forest, and most of the people who live there have "
    "worked with timber for generations. Every spring the river rises to meet the old stone bridge, "
    "which reminds everyone that the water has its own plans. Children learn to read the weather from "
    "their grandparents, and travellers who stop for the night often stay much longer than they "
    "intended because the bread is good and the evenings are long. Nobody here is in a hurry. On market "
    "days the square fills with carts of apples, cheese and wool from the hills."
)
SENTENCES = [sentence.strip() + "." for sentence in PROSE.split(".") if sentence.strip()]


@pytest.fixture(scope="module")
def tokenizer() -> EnglishWordTokenizer:
    return english_word_tokenizer()


def gopher_quality(text: str, tokenizer: EnglishWordTokenizer, **overrides) -> str | None:
    return GopherQuality(GopherQualityConfig(**overrides)).apply(text, Words(text, tokenizer)).reason


def gopher_repetition(text: str, tokenizer: EnglishWordTokenizer, **overrides) -> str | None:
    return GopherRepetition(GopherRepetitionConfig(**overrides)).apply(text, Words(text, tokenizer)).reason


# --------------------------------------------------------------------------------------------- configs


def test_configs_are_strict_frozen_and_hash_stably() -> None:
    config = FiltersConfig()
    assert config.gopher_quality.enabled and config.gopher_repetition.enabled
    assert not config.c4.enabled and not config.fineweb.enabled
    assert config.config_hash() == FiltersConfig.model_validate(config.model_dump(mode="json")).config_hash()
    with pytest.raises(ValidationError):
        FiltersConfig.model_validate({"gopher_quality": {"min_words": 5}})
    with pytest.raises(ValidationError):
        GopherQualityConfig(max_non_alpha_words_ratio=1.5)
    with pytest.raises(ValidationError):
        GopherRepetitionConfig(top_n_grams=((0, 0.2),))
    with pytest.raises(ValidationError):
        C4QualityConfig(min_num_sentences=-2)
    with pytest.raises(ValidationError):
        config.gopher_quality.min_doc_words = 3  # type: ignore[misc]


def test_copied_character_sets_match_datatrove() -> None:
    from datatrove.utils import text as datatrove_text

    assert PUNCTUATION_SET == datatrove_text.PUNCTUATION_SET
    assert TERMINAL_PUNCTUATION == frozenset(datatrove_text.TERMINAL_PUNCTUATION)


# --------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_strips_whitespace_tokens_and_splits_sentences(tokenizer: EnglishWordTokenizer) -> None:
    assert tokenizer.word_tokenize("Hello,  world!\n\nIt's 3.5 kg.") == [
        "Hello", ",", "world", "!", "It", "'s", "3.5", "kg", "."]
    assert tokenizer.split_sentences("One here. Two there! Three") == ["One here.", " Two there!", " Three"]
    assert tokenizer.split_sentences("") == [""]


def test_tokenizer_survives_the_string_that_breaks_spacy(tokenizer: EnglishWordTokenizer) -> None:
    for _ in range(3):  # spaCy fails on the repeat inside a memory zone; datatrove's retry handles it
        words = tokenizer.word_tokenize("foo IS_ALPHA bar")
        assert words[0] == "foo" and words[-1] == "bar"


def test_words_tokenize_once_and_only_when_read() -> None:
    class CountingTokenizer:
        calls = 0

        def word_tokenize(self, text: str) -> list[str]:
            self.calls += 1
            return text.split()

        def split_sentences(self, text: str) -> list[str]:
            return [text]

    counting = CountingTokenizer()
    words = Words("a b c", counting)
    assert counting.calls == 0
    assert words.tokens == ["a", "b", "c"] and words.tokens == ["a", "b", "c"]
    assert counting.calls == 1
    # repetition fails on paragraphs before it needs the words: no tokenization at all
    run_filters("x y z\n\nx y z\n\nx y z", FiltersConfig(), counting)
    assert counting.calls == 1


# --------------------------------------------------------------------------------------------- gopher quality


def test_prose_passes_gopher_quality(tokenizer: EnglishWordTokenizer) -> None:
    assert gopher_quality(PROSE, tokenizer) is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("The cat and the dog sat with me.", "gopher_short_doc"),
        (" ".join(["to be of the and it a"] * 10), "gopher_below_avg_threshold"),
        (" ".join(["the internationalization and characterization"] * 20), "gopher_above_avg_threshold"),
        (PROSE + " #" * 20, "gopher_too_many_hashes"),
        (PROSE + " ..." * 20 + " end", "gopher_too_many_ellipsis"),
        ("\n".join("- " + sentence for sentence in SENTENCES), "gopher_too_many_bullets"),
        ("\n".join("• " + sentence for sentence in SENTENCES), "gopher_too_many_bullets"),
        ("\n".join(s[:-1] + ("..." if i % 2 else "") for i, s in enumerate(SENTENCES)), "gopher_too_many_end_ellipsis"),
        (PROSE + " " + " ".join(str(1000 + i) for i in range(70)), "gopher_below_alpha_threshold"),
        (PROSE.upper(), "gopher_enough_stop_words"),
    ],
)
def test_each_gopher_quality_rule_drops_with_its_reason(
    text: str, reason: str, tokenizer: EnglishWordTokenizer
) -> None:
    assert gopher_quality(text, tokenizer) == reason


def test_gopher_quality_thresholds_are_configurable(tokenizer: EnglishWordTokenizer) -> None:
    assert gopher_quality(PROSE, tokenizer, max_doc_words=20) == "gopher_long_doc"
    assert gopher_quality("The cat and the dog sat with me.", tokenizer, min_doc_words=5) is None
    hashes = PROSE + " #" * 20
    assert gopher_quality(hashes, tokenizer, max_symbol_word_ratio=0.5) == "gopher_below_alpha_threshold"
    assert gopher_quality(hashes, tokenizer, max_symbol_word_ratio=0.5, max_non_alpha_words_ratio=0.7) is None
    assert gopher_quality(PROSE.upper(), tokenizer, min_stop_words=None) is None
    assert gopher_quality(PROSE.upper(), tokenizer, stop_words=("THE", "AND")) is None
    # datatrove's truthiness: 0 disables a rule just like None
    assert gopher_quality(hashes, tokenizer, max_symbol_word_ratio=0, max_non_alpha_words_ratio=0) is None


def test_symbol_words_do_not_count_towards_length(tokenizer: EnglishWordTokenizer) -> None:
    text = "The cat and the dog . , ; ! ? -- " * 4  # 20 real words, 28 symbol words
    assert gopher_quality(text, tokenizer, max_non_alpha_words_ratio=None) == "gopher_short_doc"
    assert gopher_quality(text, tokenizer, min_doc_words=20, max_non_alpha_words_ratio=None) is None


def test_wordless_documents_are_dropped_where_datatrove_would_divide_by_zero(
    tokenizer: EnglishWordTokenizer,
) -> None:
    assert gopher_quality("  \n ", tokenizer, min_doc_words=None) == "gopher_no_words"
    assert gopher_quality("", tokenizer, min_doc_words=None, max_symbol_word_ratio=None) == "gopher_no_lines"


# --------------------------------------------------------------------------------------------- gopher repetition


def test_prose_passes_gopher_repetition(tokenizer: EnglishWordTokenizer) -> None:
    assert gopher_repetition(PROSE, tokenizer) is None
    assert gopher_repetition("\n".join(SENTENCES), tokenizer) is None


@pytest.mark.parametrize(
    ("text", "overrides", "reason"),
    [
        ("", {}, "empty"),
        ("\n\n".join([SENTENCES[0]] * 3 + SENTENCES[1:3]), {}, "dup_para_frac"),
        ("\n\n".join([PROSE, PROSE] + [f"note {i}" for i in range(8)]), {}, "dup_para_char_frac"),
        ("\n".join([SENTENCES[0]] * 3 + SENTENCES[1:3]), {}, "dup_line_frac"),
        ("\n".join([PROSE, PROSE] + [f"note {i}" for i in range(8)]), {}, "dup_line_char_frac"),
        ("more " + "salt and pepper " * 12, {}, "top_2_gram"),
        (PROSE + " " + "salt and pepper " * 12, {"top_n_grams": ((3, 0.18),)}, "top_3_gram"),
        (PROSE + " " + "salt and pepper " * 12, {"top_n_grams": ((4, 0.16),)}, "top_4_gram"),
        (PROSE + " " + SENTENCES[0] + " " + SENTENCES[0], {"top_n_grams": ()}, "duplicated_5_n_grams"),
        (PROSE + " " + SENTENCES[0], {"top_n_grams": (), "dup_n_grams": ((10, 0.10),)}, "duplicated_10_n_grams"),
    ],
)
def test_each_gopher_repetition_rule_drops_with_its_reason(
    text: str, overrides: dict, reason: str, tokenizer: EnglishWordTokenizer
) -> None:
    assert gopher_repetition(text, tokenizer, **overrides) == reason


def test_gopher_repetition_thresholds_are_configurable(tokenizer: EnglishWordTokenizer) -> None:
    repeated_lines = "\n".join([SENTENCES[0]] * 3 + SENTENCES[1:3])
    relaxed = {"dup_line_frac": 0.5, "dup_line_char_frac": 0.9, "top_n_grams": (), "dup_n_grams": ()}
    assert gopher_repetition(repeated_lines, tokenizer, **relaxed) is None
    assert gopher_repetition("more " + "salt and pepper " * 12, tokenizer, top_n_grams=(), dup_n_grams=()) is None


def test_repeated_n_grams_are_compared_without_spaces_as_in_datatrove(tokenizer: EnglishWordTokenizer) -> None:
    # "ab c d e f" and "a bc d e f" join to the same "abcdef": datatrove counts that as a repeat
    text = "ab c d e f a bc d e f"
    assert gopher_repetition(text, tokenizer, top_n_grams=(), dup_n_grams=((5, 0.15),)) == "duplicated_5_n_grams"


# --------------------------------------------------------------------------------------------- C4


def c4(text: str, tokenizer: EnglishWordTokenizer, **overrides):
    return C4Quality(C4QualityConfig(enabled=True, **overrides), tokenizer).apply(text, Words(text, tokenizer))


def test_c4_keeps_only_the_lines_that_pass(tokenizer: EnglishWordTokenizer) -> None:
    text = "\n".join([
        *SENTENCES,
        "A heading without punctuation",
        "Too short.",
        "Enable JavaScript to see this page.",
        "This site uses cookies to work well.",
        "The bridge was rebuilt in 1850.[1] It still stands[citation needed].",
        "She said it would be fine...",
    ])
    result = c4(text, tokenizer)
    assert result.kept
    assert result.text == "\n".join([*SENTENCES, "The bridge was rebuilt in 1850. It still stands."])


@pytest.mark.parametrize(
    ("extra_line", "reason"),
    [("Lorem ipsum dolor sit amet, consectetur.", "lorem_ipsum"), ("Use a {placeholder} here now.", "curly_bracket")],
)
def test_c4_drops_whole_documents(extra_line: str, reason: str, tokenizer: EnglishWordTokenizer) -> None:
    assert c4("\n".join([*SENTENCES, extra_line]), tokenizer).reason == reason


def test_c4_counts_sentences_in_kept_lines(tokenizer: EnglishWordTokenizer) -> None:
    assert c4("\n".join(SENTENCES[:3]), tokenizer).reason == "too_few_sentences"
    assert c4("\n".join(SENTENCES[:3]), tokenizer, min_num_sentences=3).kept
    assert c4(" ".join(SENTENCES), tokenizer).kept  # one line, five sentences
    assert c4(" ".join(SENTENCES), tokenizer, split_paragraph=False).text == " ".join(SENTENCES)


# --------------------------------------------------------------------------------------------- FineWeb


def fineweb(text: str, tokenizer: EnglishWordTokenizer, **overrides) -> str | None:
    config = FineWebQualityConfig(enabled=True, **overrides)
    return FineWebQuality(config).apply(text, Words(text, tokenizer)).reason


@pytest.mark.parametrize(
    ("text", "overrides", "reason"),
    [
        ("\n \n", {}, "empty"),
        ("\n".join(s[:-1] for s in SENTENCES), {}, "line_punct_ratio"),
        ("\n".join(["Short line."] * 2 + [f"Note {i}." for i in range(5)] + [PROSE]), {}, "short_line_ratio"),
        ("\n".join(SENTENCES + SENTENCES[:1]), {}, "char_dup_ratio"),
        (("\n" * 10).join(SENTENCES), {}, "list_ratio"),
    ],
)
def test_each_fineweb_rule_drops_with_its_reason(
    text: str, overrides: dict, reason: str, tokenizer: EnglishWordTokenizer
) -> None:
    assert fineweb(text, tokenizer, **overrides) == reason


def test_fineweb_options(tokenizer: EnglishWordTokenizer) -> None:
    assert fineweb(PROSE, tokenizer) is None
    no_punct = "\n".join(s[:-1] for s in SENTENCES)
    assert fineweb(no_punct, tokenizer, line_punct_exclude_zero=True) is None
    assert fineweb(no_punct, tokenizer, stop_chars=("e", "d", "s", "r", "g")) is None


# --------------------------------------------------------------------------------------------- run_filters


def test_disabled_filters_keep_everything(tokenizer: EnglishWordTokenizer) -> None:
    off = FiltersConfig(gopher_quality={"enabled": False}, gopher_repetition={"enabled": False})
    for text in ["", "x", "#### ####", "\n\n".join([PROSE] * 5)]:
        assert run_filters(text, off, tokenizer) == (text, None)


def test_run_filters_applies_fineweb_order_and_passes_c4_rewrites_on(tokenizer: EnglishWordTokenizer) -> None:
    assert run_filters(PROSE, FiltersConfig(), tokenizer) == (PROSE, None)
    # fails repetition and quality: repetition runs first, as in FineWeb's pipeline
    assert run_filters("x\n\nx\n\nx", FiltersConfig(), tokenizer) == (None, "dup_para_frac")
    # C4 removes the heading, so FineWeb judges the rewritten text (and its new words)
    everything = FiltersConfig(c4={"enabled": True}, fineweb={"enabled": True})
    with_heading = "A heading without punctuation\n" + "\n".join(SENTENCES)
    assert run_filters(with_heading, everything, tokenizer) == ("\n".join(SENTENCES), None)


# --------------------------------------------------------------------------------------------- vs datatrove


def gsm8k_documents(count: int) -> list[str]:
    with GSM8K_TRAIN.open(encoding="utf-8") as lines:
        records = [json.loads(line) for line, _ in zip(lines, range(count))]
    return ["Question: {question}\nAnswer: {answer}".format(**record) for record in records]


def perturbations(index: int, docs: list[str]) -> list[str]:
    """Deterministic variants of document `index` that trip (or nearly trip) each rule.

    Raw GSM8K answers are mostly numbers and symbols (Gopher's alpha rule drops them), so most
    variants start from `prose`: the questions of four consecutive documents, one per line.
    """
    doc, nxt, third = (docs[(index + offset) % len(docs)] for offset in range(3))
    questions = [docs[(index + offset) % len(docs)].splitlines()[0] for offset in range(4)]
    prose = "\n".join(questions)
    words = prose.split()
    k = index % 6  # varies each perturbation's strength so that some variants pass and some fail
    extra_line = [
        "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
        "Use {braces} around the values, please.",
        "Please enable javascript to view this page properly.",
        "This site uses cookies to make it work better.",
        "It was founded in 1850.[1] It grew quickly.[edit] It is large[citation needed].",
    ][index % 5]
    return [
        doc,
        doc + "\n\n" + nxt,
        re.sub(r"<<[^>]*>>", "", doc + "\n\n" + nxt),  # without GSM8K's calculator annotations
        prose,
        " ".join(questions),
        questions[0],  # short
        "\n".join(questions + questions[: 1 + k % 3]),  # repeated lines
        "\n\n".join(questions + questions[: 1 + k % 3]),  # repeated paragraphs
        "\n\n".join([" ".join(questions), doc, nxt, third, " ".join(questions)]),  # one long repeat
        "\n".join(("- " if index % 2 else "• ") * (i >= k % 2) + q for i, q in enumerate(questions)),
        "\n".join(q + "..." * (i < k % 3) for i, q in enumerate(questions)),  # lines ending in ...
        prose + " " + " ".join(["#"] * (8 * k + 1)),
        prose + " " + " ".join(["…"] * (8 * k + 1)),
        prose + " " + " ".join(str(7 * i + index) for i in range(4 * k)),  # non-alpha words
        prose.replace(questions[1], " ".join([questions[1]] * (1 + k))),  # repeated n-grams in a line
        prose.upper() if k % 2 else prose.replace(" the ", " THE "),  # no (or fewer) stop words
        " ".join("".join(words[i:i + 1 + k]) for i in range(0, len(words), 1 + k)),  # long words
        " ".join(prose[: 150 + 10 * k]),  # one-letter words
        "\n".join(" ".join(words[i:i + 2 + k]) + "." for i in range(0, len(words), 2 + k)),  # short lines
        ("\n" * (10 + 10 * k)).join(questions),  # blank lines: a high newline/word ratio
        prose + "\n" + extra_line,
        "\n".join(q.rstrip(".?!") for q in questions[: 1 + k % 4]) + "\n" + "\n".join(questions[1 + k % 4:]),
    ]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    docs = gsm8k_documents(20)
    texts = ["", " \n ", "####", "\n\n\n"]
    for index in range(len(docs)):
        texts.extend(perturbations(index, docs))
    return texts


def datatrove_verdict(datatrove_filter, text: str) -> tuple[str | None, str | None]:
    from datatrove.data import Document

    document = Document(text=text, id="doc")
    result = datatrove_filter.filter(document)
    if result is True:
        return document.text, None
    assert isinstance(result, tuple) and result[0] is False, result
    return None, result[1]


def our_verdict(our_filter, text: str, tokenizer: EnglishWordTokenizer) -> tuple[str | None, str | None]:
    result = our_filter.apply(text, Words(text, tokenizer))
    return result.text, result.reason


def assert_same_as_datatrove(ours, theirs, corpus: list[str], tokenizer: EnglishWordTokenizer) -> Counter:
    reasons: Counter = Counter()
    mismatches = []
    for text in corpus:
        expected = datatrove_verdict(theirs, text)
        if our_verdict(ours, text, tokenizer) != expected:
            mismatches.append((text[:80], our_verdict(ours, text, tokenizer), expected))
        reasons[expected[1] or ("kept" if expected[0] == text else "kept_rewritten")] += 1
    assert not mismatches, mismatches[:5]
    kept = reasons["kept"] + reasons["kept_rewritten"]
    assert 0 < kept < sum(reasons.values()), reasons
    return reasons


def test_corpus_is_a_few_hundred_documents(corpus: list[str]) -> None:
    assert len(corpus) >= 400


def test_word_and_sentence_splits_match_datatrove(corpus: list[str], tokenizer: EnglishWordTokenizer) -> None:
    from datatrove.utils.text import split_into_sentences, split_into_words

    for text in corpus:
        assert tokenizer.word_tokenize(text) == split_into_words(text, "eng")
        assert tokenizer.split_sentences(text) == split_into_sentences(text, "eng")


@pytest.mark.parametrize(
    ("overrides", "expected_reasons"),
    [
        ({}, {"gopher_short_doc", "gopher_below_avg_threshold", "gopher_above_avg_threshold",
              "gopher_too_many_hashes", "gopher_too_many_ellipsis", "gopher_too_many_bullets",
              "gopher_too_many_end_ellipsis", "gopher_below_alpha_threshold", "gopher_enough_stop_words"}),
        ({"max_doc_words": 250, "min_doc_words": 20, "max_non_alpha_words_ratio": 0.7, "min_stop_words": 4},
         {"gopher_long_doc", "gopher_below_alpha_threshold", "gopher_enough_stop_words"}),
    ],
)
def test_gopher_quality_matches_datatrove(
    overrides: dict, expected_reasons: set[str], corpus: list[str], tokenizer: EnglishWordTokenizer
) -> None:
    from datatrove.pipeline.filters import GopherQualityFilter

    config = GopherQualityConfig(**overrides)
    theirs = GopherQualityFilter(**config.model_dump(exclude={"enabled"}))
    reasons = assert_same_as_datatrove(GopherQuality(config), theirs, corpus, tokenizer)
    assert expected_reasons <= set(reasons), reasons


@pytest.mark.parametrize(
    ("overrides", "expected_reasons"),
    [
        ({}, {"empty", "dup_para_frac", "dup_para_char_frac", "dup_line_frac", "dup_line_char_frac",
              "top_2_gram", "duplicated_5_n_grams"}),
        ({"dup_line_frac": None, "dup_para_frac": None, "top_n_grams": ((3, 0.12), (4, 0.1))},
         {"top_3_gram", "duplicated_5_n_grams"}),
    ],
)
def test_gopher_repetition_matches_datatrove(
    overrides: dict, expected_reasons: set[str], corpus: list[str], tokenizer: EnglishWordTokenizer
) -> None:
    from datatrove.pipeline.filters import GopherRepetitionFilter

    config = GopherRepetitionConfig(**overrides)
    theirs = GopherRepetitionFilter(**config.model_dump(exclude={"enabled"}))
    reasons = assert_same_as_datatrove(GopherRepetition(config), theirs, corpus, tokenizer)
    assert expected_reasons <= set(reasons), reasons


@pytest.mark.parametrize(
    ("overrides", "expected_reasons"),
    [
        ({}, {"lorem_ipsum", "curly_bracket", "too_few_sentences"}),
        ({"filter_no_terminal_punct": False}, {"lorem_ipsum", "curly_bracket", "too_few_sentences"}),  # FineWeb's
        ({"split_paragraph": False, "min_num_sentences": 3}, {"curly_bracket", "too_few_sentences"}),
    ],
)
def test_c4_matches_datatrove_including_rewritten_text(
    overrides: dict, expected_reasons: set[str], corpus: list[str], tokenizer: EnglishWordTokenizer
) -> None:
    from datatrove.pipeline.filters import C4QualityFilter

    config = C4QualityConfig(enabled=True, **overrides)
    theirs = C4QualityFilter(**config.model_dump(exclude={"enabled"}))
    reasons = assert_same_as_datatrove(C4Quality(config, tokenizer), theirs, corpus, tokenizer)
    assert expected_reasons | {"kept_rewritten"} <= set(reasons), reasons


@pytest.mark.parametrize(
    ("overrides", "expected_reasons"),
    [
        ({}, {"empty", "line_punct_ratio", "short_line_ratio", "char_dup_ratio", "list_ratio"}),
        ({"line_punct_exclude_zero": True, "short_line_thr": 0.9, "char_duplicates_ratio": 0.1},
         {"empty", "line_punct_ratio", "char_dup_ratio", "list_ratio"}),
    ],
)
def test_fineweb_matches_datatrove(
    overrides: dict, expected_reasons: set[str], corpus: list[str], tokenizer: EnglishWordTokenizer
) -> None:
    from datatrove.pipeline.filters import FineWebQualityFilter

    config = FineWebQualityConfig(enabled=True, **overrides)
    theirs = FineWebQualityFilter(**config.model_dump(exclude={"enabled"}))
    reasons = assert_same_as_datatrove(FineWebQuality(config), theirs, corpus, tokenizer)
    assert expected_reasons <= set(reasons), reasons


def test_run_filters_matches_datatrove_fineweb_pipeline(corpus: list[str], tokenizer: EnglishWordTokenizer) -> None:
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    # the filter steps of datatrove's examples/fineweb.py, in its order
    pipeline = [GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(filter_no_terminal_punct=False),
                FineWebQualityFilter()]
    config = FiltersConfig(c4={"enabled": True, "filter_no_terminal_punct": False}, fineweb={"enabled": True})
    outcomes: Counter = Counter()
    for text in corpus:
        expected: tuple[str | None, str | None] = (text, None)
        for step in pipeline:
            expected = datatrove_verdict(step, expected[0])
            if expected[1] is not None:
                break
        assert run_filters(text, config, tokenizer) == expected, text[:80]
        outcomes[expected[1] or ("kept" if expected[0] == text else "kept_rewritten")] += 1
    assert outcomes["kept_rewritten"] > 0 and len(outcomes) >= 8, outcomes
