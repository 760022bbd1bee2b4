"""Every mainstream decoder family the factory builds (random initialisation, small configs):
the sampler's greedy output equals transformers' `generate` token for token, our log-probs
equal transformers' forward, the Llama-like families take the fast sampler and the others
fall back, and every trainer runs and resumes exactly on each family."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from components.models.factory import CLASSES, ModelConfig
from components.tasks.arithmetic import ArithmeticTaskConfig, generate
from tests.conftest import build_tiny_lm
from tests.test_preferences import write_sign_pairs

FAMILIES = list(CLASSES)
FAST = {"llama", "mistral", "qwen2", "qwen3"}  # fast_llama's families; the rest decode through transformers
TOLERANCE = 1e-5
SPREAD = 0.3


def family_config(family: str, **fields: Any) -> ModelConfig:
    """Two layers (Gemma 2 alternates a sliding and a full layer), grouped-query attention where
    the family has it."""
    return ModelConfig(architecture=family, hidden_size=32, num_layers=2, num_heads=4,
                       num_kv_heads=4 if family == "gpt2" else 2, intermediate_size=64, max_position_embeddings=256,
                       **fields)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/tok (the shared tiny tokenizer), root/curated, and an arithmetic task in GSM8K format."""
    root = tmp_path_factory.mktemp("families")
    build_tiny_lm(root)
    splits = generate(ArithmeticTaskConfig(train_problems=16, test_problems=4, max_steps=1, max_operand=9))
    for split, rows in splits.items():
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


def model_dir(root: Path, family: str) -> Path:
    """The family's model (seed 0) saved with the tokenizer, built once per module. Every
    weight gets Gaussian noise of std `SPREAD`: at initialisation (std 0.02, norms at 1) the
    logits are nearly uniform and greedy decoding repeats one token whatever the attention
    computes, so a sampler that got a bias or a norm wrong would still match `generate`."""
    import torch
    from transformers import AutoTokenizer

    from components.models.factory import build_causal_lm

    path = root / family
    if not path.exists():
        tokenizer = AutoTokenizer.from_pretrained(root / "tok")
        torch.manual_seed(0)
        model = build_causal_lm(family_config(family), tokenizer)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * SPREAD)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def load(path: Path):  # noqa: ANN201
    from transformers import AutoTokenizer

    from components.models.factory import load_causal_lm

    return load_causal_lm(path).eval(), AutoTokenizer.from_pretrained(path)


def questions(root: Path) -> list[str]:
    return [json.loads(line)["question"] for line in (root / "test.jsonl").read_text().splitlines()]


def generate_greedy(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int) -> Any:
    """transformers' `generate` (greedy) on the same left-padded batch: [rows, max_new_tokens]."""
    import torch

    from components.models.chat import stop_ids
    from components.models.sampling import left_pad

    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=stop_ids(tokenizer), pad_token_id=tokenizer.pad_token_id, top_p=None,
                             top_k=None, temperature=None)
    return out[:, ids.shape[1]:]


def assert_decode_equals_generate(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int) -> None:
    from components.models.sampling import decode

    rollout = decode(model, tokenizer, prompts, 1, max_new_tokens, 0.0)
    expected = generate_greedy(model, tokenizer, prompts, max_new_tokens)
    lengths = rollout.completion_mask.sum(1).long().tolist()
    for row, length in enumerate(lengths):
        assert rollout.input_ids[row, rollout.prompt_width:][:length].tolist() == expected[row, :length].tolist()
        assert length == max_new_tokens or rollout.finished[row]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_decode_equals_generate_and_the_family_takes_its_sampler(root: Path, family: str) -> None:
    from components.models.chat import prompt_ids
    from components.models.fast_llama import supports

    model, tokenizer = load(model_dir(root, family))
    assert model.config.model_type == family
    assert supports(model) == (family in FAST)
    assert_decode_equals_generate(model, tokenizer, [prompt_ids(tokenizer, q) for q in questions(root)], 16)


def reference_logprobs(model: Any, ids: Any, keep: Any, prompt_width: int, length: int) -> Any:
    """One row alone, without padding, through transformers' full forward: the log-probs of its
    first `length` completion tokens."""
    import torch

    row = ids[keep][None]
    start = prompt_width - int((~keep[:prompt_width]).sum())  # real prompt tokens
    with torch.no_grad():
        logits = model(input_ids=row).logits[0].float()
    logprobs = torch.log_softmax(logits[start - 1:start - 1 + length], -1)
    return logprobs.gather(-1, row[0, start:start + length, None]).squeeze(-1)


def logprob_differences(model: Any, tokenizer: Any, prompts: list[list[int]]) -> dict[str, float]:
    """Largest |ours - transformers'| per-token log-prob over a sampled rollout (2 completions per
    prompt): `completion_logprobs` (RL), `shared_prompt_logprobs` where the family has it
    (GRPO's update), and DPO's summed `sequence_logprobs` per row (divided by its token count);
    and the largest |logit| difference of `output_logits` (the supervised losses' head)."""
    import torch

    from components.models.chat import IGNORE_INDEX
    from components.models.factory import output_logits
    from components.models.fast_llama import shared_prompt_logprobs, supports
    from components.models.logprobs import completion_logprobs, sequence_logprobs
    from components.models.sampling import decode

    torch.manual_seed(0)
    rollout = decode(model, tokenizer, prompts, 2, 10, 1.0)
    ids, mask, width = rollout.input_ids, rollout.attention_mask, rollout.prompt_width
    lengths = rollout.completion_mask.sum(1).long().tolist()
    expected = [reference_logprobs(model, ids[row], mask[row].bool(), width, n) for row, n in enumerate(lengths)]
    ours = {}
    with torch.no_grad():
        ours["completion"] = completion_logprobs(model, ids, mask, width, 1.0)[0]
        if supports(model):
            ours["shared_prompt"] = shared_prompt_logprobs(model, ids[::2, :width], mask[::2, :width], ids[:, width:],
                                                           rollout.completion_mask, 1.0)[0]
        # DPO's rows: right-padded prompt + completion, labels on the completion
        rows = [ids[row][mask[row].bool()] for row in range(len(lengths))]
        padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=tokenizer.pad_token_id)
        labels = torch.full_like(padded, IGNORE_INDEX)
        for row, (tokens, n) in enumerate(zip(rows, lengths)):
            labels[row, len(tokens) - n:len(tokens)] = tokens[len(tokens) - n:]
        sequences = sequence_logprobs(model, padded, labels)
        head = output_logits(model, model.get_decoder()(input_ids=padded).last_hidden_state)
        head_difference = float((head - model(input_ids=padded).logits).abs().max())
    differences = {name: max(float((values[row, :n] - expected[row]).abs().max()) for row, n in enumerate(lengths))
                   for name, values in ours.items()}
    differences["sequence"] = max(abs(float(sequences[row] - expected[row].sum())) / n for row, n in enumerate(lengths))
    return {**differences, "head": head_difference}


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_equal_transformers_forward(root: Path, family: str) -> None:
    from components.models.chat import prompt_ids

    model, tokenizer = load(model_dir(root, family))
    differences = logprob_differences(model, tokenizer, [prompt_ids(tokenizer, q) for q in questions(root)[:3]])
    assert ("shared_prompt" in differences) == (family in FAST)
    assert all(value <= TOLERANCE for value in differences.values()), differences


@pytest.mark.parametrize("family", sorted(FAST))
def test_shared_prompt_gradients_equal_transformers(root: Path, family: str) -> None:
    """GRPO's update through the lean forward: every parameter's gradient (Qwen2's biases and
    Qwen3's q/k norm weights included) equals the one through transformers' forward."""
    import torch

    from components.models.chat import prompt_ids
    from components.models.fast_llama import shared_prompt_logprobs
    from components.models.logprobs import completion_logprobs
    from components.models.sampling import decode

    model, tokenizer = load(model_dir(root, family))
    torch.manual_seed(0)
    rollout = decode(model, tokenizer, [prompt_ids(tokenizer, q) for q in questions(root)[:2]], 2, 8, 1.0)
    ids, mask, width, completion = rollout.input_ids, rollout.attention_mask, rollout.prompt_width, rollout.completion_mask
    gradients = []
    for shared in (False, True):
        model.zero_grad()
        logprobs = (shared_prompt_logprobs(model, ids[::2, :width], mask[::2, :width], ids[:, width:], completion, 1.0)[0]
                    if shared else completion_logprobs(model, ids, mask, width, 1.0)[0])
        (logprobs * completion * torch.linspace(-1, 1, len(ids))[:, None]).sum().backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert any("bias" in name or "q_norm" in name for name in gradients[0]) == (family in ("qwen2", "qwen3"))
    for name, expected in gradients[0].items():
        assert torch.allclose(gradients[1][name], expected, atol=TOLERANCE * max(1.0, float(expected.abs().max()))), name


def test_a_sliding_window_shorter_than_the_sequence_falls_back_to_transformers(root: Path) -> None:
    """Mistral with an 8-token window: the lean passes (which attend to every earlier token)
    compute another function, so `decode` takes transformers' path, which matches `generate`;
    with the window longer than the sequence the fast path is taken again."""
    import torch
    from transformers import AutoTokenizer

    from components.models.chat import prompt_ids
    from components.models.factory import build_causal_lm
    from components.models.fast_llama import shared_prompt_logprobs, supports
    from components.models.logprobs import completion_logprobs
    from components.models.sampling import decode

    tokenizer = AutoTokenizer.from_pretrained(root / "tok")
    torch.manual_seed(0)
    model = build_causal_lm(family_config("mistral"), tokenizer).eval()
    prompts = [prompt_ids(tokenizer, q) for q in questions(root)]
    width = max(len(p) for p in prompts)
    model.config.sliding_window = 8
    assert not supports(model) and not supports(model, width + 16)
    assert_decode_equals_generate(model, tokenizer, prompts, 16)
    rollout = decode(model, tokenizer, prompts, 1, 16, 1.0)
    ids, mask, width = rollout.input_ids, rollout.attention_mask, rollout.prompt_width
    with torch.no_grad():
        windowed = completion_logprobs(model, ids, mask, width, 1.0)[0] * rollout.completion_mask
        lean = shared_prompt_logprobs(model, ids[:, :width], mask[:, :width], ids[:, width:],
                                      rollout.completion_mask, 1.0)[0] * rollout.completion_mask
    assert not torch.allclose(lean, windowed, atol=TOLERANCE)  # why the check exists
    model.config.sliding_window = width + 16
    assert supports(model, width + 16) and not supports(model)
    assert_decode_equals_generate(model, tokenizer, prompts, 16)


# --------------------------------------------------------------------------- every trainer, 2 steps and a resume


def train_section(**fields: Any) -> dict[str, Any]:
    return {"batch_size_rows": 2, "max_steps": 2, "checkpoint_every_steps": 1, "seed": 0, "precision": "fp32",
            "optim": {"learning_rate": 1e-3, "warmup_steps": 0}, **fields}


@pytest.fixture(scope="module")
def data(root: Path) -> Path:
    """What the trainers read: packed pretraining blocks, SFT records, preference pairs."""
    from components.data.pack import PackConfig, pack

    pack(PackConfig(seq_len_tokens=32), str(root / "curated"), str(root / "tok"), str(root / "blocks"))
    records = [{"prompt": json.loads(line)["question"], "completion": json.loads(line)["answer"]}
               for line in (root / "train.jsonl").read_text().splitlines()]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    write_sign_pairs(root / "pairs.jsonl", 8)
    return root


def sft_blocks(root: Path, family: str) -> Path:
    """Packed SFT blocks made with the tokenizer as loaded from the family's model directory
    (transformers loads the one saved beside a Qwen2 model as `Qwen2Tokenizer`, another tokenizer)."""
    from components.data.sft_data import SFTDataConfig, sft_data

    blocks = root / f"{family}_sft_blocks"
    if not blocks.exists():
        sft_data(SFTDataConfig(format="prompt_completion", seq_len_tokens=128), str(root / "sft.jsonl"),
                 str(model_dir(root, family)), str(blocks))
    return blocks


def run_pretrain(root: Path, family: str, train: dict[str, Any], dest: Path) -> None:
    from components.feasibility.training import TrainingEstimateConfig, TrainingTarget, estimate_training
    from components.train.pretrain import PretrainConfig, pretrain

    config = PretrainConfig.model_validate({"model": family_config(family).model_dump(), "train": train})
    estimate = dest.with_name(f"{dest.name}_estimate")
    estimate_training(TrainingEstimateConfig(target=TrainingTarget(), model=config.model, seq_len_tokens=32,
                                             batch_size_blocks=config.train.batch_size_rows,
                                             max_steps=config.train.max_steps), str(root / "tok"), str(estimate))
    pretrain(config, str(root / "blocks"), str(root / "tok"), str(estimate), str(dest))


def run_sft(lora: bool) -> Callable[[Path, str, dict[str, Any], Path], None]:
    def run(root: Path, family: str, train: dict[str, Any], dest: Path) -> None:
        from components.train.sft import SFTConfig, sft

        config = SFTConfig.model_validate({"train": train, "lora": {"r": 4} if lora else None})
        sft(config, str(sft_blocks(root, family)), str(model_dir(root, family)), str(dest))
    return run


def run_reward_model(root: Path, family: str, train: dict[str, Any], dest: Path) -> None:
    from components.train.reward_model import RewardModelConfig, reward_model

    config = RewardModelConfig.model_validate({"train": train, "heldout_fraction": 0, "max_length_tokens": 128})
    reward_model(config, str(root / "pairs.jsonl"), str(model_dir(root, family)), str(dest))


def run_dpo(root: Path, family: str, train: dict[str, Any], dest: Path) -> None:
    from components.train.dpo import DPOConfig, DPOReferenceConfig, dpo, dpo_reference

    reference = root / f"{family}_dpo_reference"
    if not reference.exists():
        dpo_reference(DPOReferenceConfig(max_length_tokens=128), str(root / "pairs.jsonl"),
                      str(model_dir(root, family)), str(reference))
    dpo(DPOConfig.model_validate({"train": train, "heldout_fraction": 0}), str(reference),
        str(model_dir(root, family)), str(dest))


RL = {"max_new_tokens": 6, "heldout": {"problems": 0}, "rewards": [{"function": "tests.rl_rewards:digit_fraction"}]}


def run_grpo(root: Path, family: str, train: dict[str, Any], dest: Path) -> None:
    from components.train.grpo import GRPOConfig, grpo

    config = GRPOConfig.model_validate({"train": train, "group_size": 2, "dynamic_sampling": False, **RL})
    grpo(config, str(model_dir(root, family)), str(root / "train.jsonl"), str(dest))


def run_ppo(root: Path, family: str, train: dict[str, Any], dest: Path) -> None:
    from components.train.ppo import PPOConfig, ppo

    config = PPOConfig.model_validate({"train": train, "samples_per_prompt": 2, "ppo_epochs": 1, "minibatches": 1,
                                       **RL})
    ppo(config, str(model_dir(root, family)), str(root / "train.jsonl"), str(dest))


TRAINERS = {"pretrain": run_pretrain, "sft": run_sft(lora=False), "sft_lora": run_sft(lora=True),
            "reward_model": run_reward_model, "dpo": run_dpo, "grpo": run_grpo, "ppo": run_ppo}
CASES = [(family, trainer) for family in FAMILIES for trainer in TRAINERS]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "trainer"), CASES)
def test_every_trainer_runs_and_resumes_on_every_family(data: Path, family: str, trainer: str) -> None:
    """2 optimizer steps with a checkpoint after the first; then the same run resumed from that
    checkpoint into another artifact: it trains step 2 only and ends with the same weights."""
    from safetensors.torch import load_file

    from components.runlog import PUBLISHED_STEP_LOG_FILE, read_metrics

    run = TRAINERS[trainer]
    straight = data / f"{family}_{trainer}"
    run(data, family, train_section(), straight)
    (checkpoint,) = (straight.parent / f"{straight.name}.runs").glob("*/checkpoints/step-00000001")
    resumed = data / f"{family}_{trainer}_resumed"
    run(data, family, train_section(resume_from=str(checkpoint)), resumed)
    assert [r["step"] for r in read_metrics(straight / PUBLISHED_STEP_LOG_FILE)] == [1, 2]
    assert [r["step"] for r in read_metrics(resumed / PUBLISHED_STEP_LOG_FILE)] == [2]
    expected, got = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == got.keys() and all(expected[k].equal(got[k]) for k in expected)


def test_lora_targets_are_the_familys_projections_unless_configured() -> None:
    from components.errors import ConfigError
    from components.train.sft import LoraSettings, lora_targets

    llama = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert lora_targets(LoraSettings(), "llama", Path("m")) == llama  # the list and order LoRA always had
    assert lora_targets(LoraSettings(), "gpt2", Path("m")) == ["c_attn", "c_proj", "c_fc"]
    assert lora_targets(LoraSettings(target_modules=["q_proj"]), "gpt2", Path("m")) == ["q_proj"]
    with pytest.raises(ConfigError, match=r"^m: no default LoRA targets for model_type 'gpt_neox' .*set "
                                          r"lora.target_modules$"):
        lora_targets(LoraSettings(), "gpt_neox", Path("m"))
