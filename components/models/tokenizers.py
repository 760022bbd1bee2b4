"""Tokenizer identity: one fingerprint and one check wherever token ids cross artifacts.

Token ids mean something only to the tokenizer that made them: blocks packed by one tokenizer
and trained into a model with another teach it the wrong tokens, a unigram baseline fitted on
another tokenizer's ids scores the wrong tokens, and cached DPO reference log-probs or a reward
model score ids the policy never produced. Nothing fails loudly in those cases (a smaller
vocabulary's ids are valid indices of a larger one), so every stage where ids cross artifacts
calls `check_same_tokenizer` (two tokenizer directories) or `check_blocks_tokenizer` (a
blocks artifact against a model), and the producers record `tokenizer_fingerprint` in their
metrics (the manifest), so the check and the lineage need not reload the tokenizer that made
the blocks.

The fingerprint is over the tokenizer as loaded, not its files' bytes: `save_pretrained`
rewrites the files (key order, where the chat template is stored) and a tokenizer call records
its truncation/padding state in `tokenizer.json`, none of which changes a token id.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.artifacts import input_ref, is_remote, try_read_manifest
from components.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FINGERPRINT_KEY = "tokenizer_fingerprint"  # the metric name producers record it under
SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")
# fields of tokenizer.json that record the last call's settings, not the mapping text -> ids
VOLATILE_BACKEND_FIELDS = ("truncation", "padding")


def canonical_tokenizer(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Everything that decides the ids of a text or a rendered chat: the backend pipeline
    (normalizer, pre-tokenizer, vocabulary and merges, added tokens, post-processor), the
    special tokens with their ids, and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pipeline = {k: v for k, v in json.loads(backend.to_str()).items() if k not in VOLATILE_BACKEND_FIELDS}
    else:  # a slow (Python) tokenizer: its vocabulary is all it exposes
        pipeline = {"vocab": sorted(tokenizer.get_vocab().items())}
    specials = {name: [getattr(tokenizer, name), getattr(tokenizer, f"{name}_id")] for name in SPECIAL_TOKENS}
    return {"pipeline": pipeline, "special_tokens": specials, "chat_template": tokenizer.chat_template}


def fingerprint_of(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of `canonical_tokenizer` as sorted-key JSON."""
    canonical = json.dumps(canonical_tokenizer(tokenizer), sort_keys=True, ensure_ascii=False)
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def load_tokenizer(directory: Path | str, role: str) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained(directory)`; a directory without one is named with its role."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{role} {directory}: no loadable tokenizer ({error})") from None


def tokenizer_fingerprint(directory: Path | str) -> str:
    """The fingerprint of the tokenizer saved in `directory` (a tokenizer or model directory)."""
    return fingerprint_of(load_tokenizer(directory, "tokenizer"))


def tokenizer_differences(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> list[str]:
    """What differs between two tokenizers in ways that change token ids or the rendered chat:
    vocabulary size and the first differing token, special tokens, chat template, and
    otherwise the pipeline part (merges, normalizer, ...) that differs."""
    problems = []
    a_vocab, b_vocab = a.get_vocab(), b.get_vocab()
    if a_vocab != b_vocab:
        differing = sorted(token for token in a_vocab.keys() | b_vocab.keys() if a_vocab.get(token) != b_vocab.get(token))
        example = differing[0]
        problems.append(f"vocabulary: {len(a_vocab)} vs {len(b_vocab)} tokens, {len(differing)} differ "
                        f"(e.g. {example!r}: id {a_vocab.get(example)} vs {b_vocab.get(example)})")
    for name in SPECIAL_TOKENS:
        ours, theirs = getattr(a, name), getattr(b, name)
        if ours != theirs or getattr(a, f"{name}_id") != getattr(b, f"{name}_id"):
            problems.append(f"{name}: {ours!r} (id {getattr(a, f'{name}_id')}) vs {theirs!r} (id {getattr(b, f'{name}_id')})")
    if sorted(a.all_special_tokens) != sorted(b.all_special_tokens):
        problems.append(f"special tokens: {sorted(a.all_special_tokens)} vs {sorted(b.all_special_tokens)}")
    if a.chat_template != b.chat_template:
        problems.append("chat template differs")
    if not problems:
        a_pipeline, b_pipeline = canonical_tokenizer(a)["pipeline"], canonical_tokenizer(b)["pipeline"]
        parts = sorted(key for key in a_pipeline.keys() | b_pipeline.keys() if a_pipeline.get(key) != b_pipeline.get(key))
        problems += [f"tokenizer.json {key!r} differs" for key in parts]
    return problems


def check_same_tokenizer(a_name: str, a_dir: Path | str, b_name: str, b_dir: Path | str) -> str:
    """The shared fingerprint of the tokenizers in `a_dir` and `b_dir`; a ConfigError naming
    both (role and directory) and what differs when they are not the same tokenizer."""
    a, b = load_tokenizer(a_dir, a_name), load_tokenizer(b_dir, b_name)
    a_print, b_print = fingerprint_of(a), fingerprint_of(b)
    if a_print != b_print:
        problems = tokenizer_differences(a, b) or ["the tokenizers differ"]
        raise ConfigError(f"{a_name} {a_dir} and {b_name} {b_dir} use different tokenizers "
                          f"({a_print[:19]} vs {b_print[:19]}): {'; '.join(problems)}")
    return a_print


def check_blocks_tokenizer(blocks_name: str, blocks_dir: Path | str, model_name: str, model_dir: Path | str) -> str:
    """The fingerprint shared by the tokenizer that made the token-id artifact `blocks_dir`
    (`pack` or `sft_data`; its manifest records the tokenizer input and, since this check, its
    fingerprint) and the tokenizer of `model_dir`; a ConfigError naming both otherwise.

    Where the recorded tokenizer directory is still there unchanged, the error says what
    differs (vocabulary size, first differing token, ...); otherwise it gives the fingerprints."""
    manifest = try_read_manifest(str(blocks_dir))
    if manifest is None or "tokenizer" not in manifest.inputs:
        raise ConfigError(f"{blocks_name} {blocks_dir}: cannot tell which tokenizer made its token ids (no manifest "
                          "recording a `tokenizer` input); use a `pack` or `sft_data` artifact")
    recorded = manifest.metrics.get(FINGERPRINT_KEY)
    model_print = tokenizer_fingerprint(model_dir)
    if recorded == model_print:
        return model_print
    tokenizer_ref = manifest.inputs["tokenizer"]
    uri = tokenizer_ref.uri
    if not is_remote(uri) and Path(uri).is_dir() and input_ref(uri).content_hash == tokenizer_ref.content_hash:
        return check_same_tokenizer(f"the tokenizer that made {blocks_name} {blocks_dir}:", uri, model_name, model_dir)
    made_with = recorded[:19] if recorded else "not recorded"
    raise ConfigError(f"{blocks_name} {blocks_dir} was tokenized by {uri} ({made_with}), which is not the tokenizer "
                      f"of {model_name} {model_dir} ({model_print[:19]}); rebuild the blocks with that model's tokenizer")
