"""Reward models: a causal LM's backbone with a one-output score head (transformers'
`*ForSequenceClassification`), loaded for training or scoring, and the scores it gives.

Invariant: a conversation is scored exactly as it was trained on: rendered by the chat
template (`chat.chat_example`), right-padded, the score read at its last real token.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from components.errors import ConfigError
from components.locks import exclusive
from components.models.chat import chat_example

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def rewards(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """[rows] scalar rewards of right-padded conversations: a sequence-classification model's
    single logit at each row's last non-padding token (transformers finds it from the
    config's `pad_token_id`)."""
    return model(input_ids=input_ids, use_cache=False).logits[:, 0].float()


def load_reward_backbone(model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The model at `model_dir` with a one-output score head (new, unless it already has one), fp32,
    with transformers' default attention: SDPA where the family has it, else eager (Gemma 2)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    with exclusive():
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def load_reward_model(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer) of a trained reward model directory; a directory
    without a one-output sequence-classification head (a plain causal LM, say) is refused
    rather than given a random head."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path}: not a model directory (no config.json)")
    config = AutoConfig.from_pretrained(path)
    architectures = config.architectures or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures) or config.num_labels != 1:
        raise ConfigError(f"{path}: not a reward model (architectures {architectures}, {config.num_labels} labels); "
                          "expected a one-output *ForSequenceClassification model, e.g. a `reward_model` artifact")
    tokenizer = AutoTokenizer.from_pretrained(path)
    return load_reward_backbone(path, tokenizer).eval(), tokenizer


def score(reward_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
          completions: list[str], batch_rows: int = 16, max_length_tokens: int | None = None) -> list[float]:
    """The reward of each (prompt, completion), rendered with the chat template as in training;
    a conversation longer than `max_length_tokens` (default: the model's context) is cut at the end."""
    import torch

    if len(prompts) != len(completions):
        raise ConfigError(f"score: {len(prompts)} prompts but {len(completions)} completions")
    limit = max_length_tokens or reward_model.config.max_position_embeddings
    encoded = [chat_example(tokenizer, p, c)[0][:limit] for p, c in zip(prompts, completions)]
    device = next(reward_model.parameters()).device
    scores: list[float] = []
    with torch.no_grad():
        for start in range(0, len(encoded), batch_rows):
            batch = encoded[start:start + batch_rows]
            width = max(len(ids) for ids in batch)
            ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in batch], device=device)
            scores += rewards(reward_model, ids).tolist()
    return scores
