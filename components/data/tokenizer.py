"""Train a byte-level BPE tokenizer with `tokenizers`; save it as a transformers tokenizer.

Byte-level BPE (GPT-2, Radford et al. 2019) never produces an unknown token, so any text
round-trips. The saved directory loads with `AutoTokenizer.from_pretrained` and carries a
ChatML chat template whose assistant turns are wrapped in `{% generation %}` so
`apply_chat_template(..., return_assistant_tokens_mask=True)` can mask the loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from components.artifacts import ComponentSpec, Manifest, produce
from components.config import StrictConfig
from components.records import read_column

SPEC = ComponentSpec(name="tokenizer", version="1")

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, *CHAT_TOKENS]
_BYTE_ALPHABET_SIZE = 256

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TokenizerConfig(StrictConfig):
    vocab_size: int = Field(
        4096, ge=_BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS),
        description="Total vocabulary: 256 byte tokens, special tokens and learned merges.",
    )
    min_frequency: int = Field(2, ge=1, description="A pair must occur this often to be merged.")


def _build(config: TokenizerConfig, dataset: Path, out_dir: Path) -> dict[str, Any]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = read_column(dataset, "text")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(CHAT_TOKENS),
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(out_dir)
    tokens = sum(len(ids) for ids in tokenizer(texts)["input_ids"])
    chars = sum(map(len, texts))
    return {
        "vocab_size": len(tokenizer),
        "training_docs": len(texts),
        "training_tokens": tokens,
        "chars_per_token": round(chars / tokens, 4),
    }


def train_tokenizer(config: TokenizerConfig, dataset: str, dest: str, overwrite: bool = False) -> Manifest:
    """Train a tokenizer on the `text` column of the dataset artifact at `dataset`."""
    return produce(
        SPEC, config, {"dataset": dataset}, dest,
        lambda out_dir, paths: _build(config, paths["dataset"], out_dir),
        overwrite=overwrite,
    )
