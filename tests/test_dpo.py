"""DPO on a real tiny model: the cached reference, the trainer, its variants and its guards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from components.errors import ConfigError, DataError
from components.models.tokenizers import tokenizer_differences, tokenizer_fingerprint
from components.train.dpo import REFERENCE_DATA, DPOConfig, DPOReferenceConfig, dpo, dpo_reference, load_reference
from components.train.config import TrainConfig
from components.train.optim import OptimConfig
from components.runlog import PUBLISHED_STEP_LOG_FILE
from tests.test_preferences import build_base, write_sign_pairs

PAIRS = 96
BETA = 0.1


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/model (an untrained tiny Llama and its tokenizer), root/pairs.jsonl and root/reference."""
    root = tmp_path_factory.mktemp("dpo")
    build_base(root)
    write_sign_pairs(root / "pairs.jsonl", PAIRS)
    dpo_reference(DPOReferenceConfig(batch_rows=32), str(root / "pairs.jsonl"), str(root / "model"),
                  str(root / "reference"))
    return root


def _train(steps: int, **overrides: object) -> DPOConfig:
    # fp32: the tests check h = 0 exactly at step 0 against reference log-probs cached in fp32
    # (under bf16 autocast the policy's log-probs differ from them: h is not 0), and two DeepSpeed ranks
    # (bf16 weights there, not autocast) against one process to 1e-5.
    return DPOConfig(heldout_fraction=0.25, beta=BETA, train=TrainConfig(
        batch_size_rows=8, max_steps=steps, checkpoint_every_steps=0, precision="fp32",
        optim=OptimConfig(learning_rate=5e-3, warmup_steps=min(5, steps))), **overrides)


def test_cached_reference_logprobs_equal_a_direct_recomputation(base: Path) -> None:
    """The cache against an independent computation: full-vocabulary logits of the plain
    transformers model, log-softmax, the label tokens gathered and summed per row."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    columns = load_reference(base / "reference")
    table = pq.read_table(base / "reference" / REFERENCE_DATA)
    pairs = [json.loads(line) for line in (base / "pairs.jsonl").read_text().splitlines()]
    assert table.column("prompt").to_pylist() == [p["prompt"] for p in pairs]  # every pair, in file order
    assert AutoTokenizer.from_pretrained(base / "reference/tokenizer").get_vocab() == \
        AutoTokenizer.from_pretrained(base / "model").get_vocab()
    model = AutoModelForCausalLM.from_pretrained(base / "model").eval()
    for side in ("chosen", "rejected"):
        ids, labels = columns[f"{side}_input_ids"], columns[f"{side}_labels"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[:, :-1]
        targets = labels[:, 1:]
        mask = targets != -100
        gathered = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        direct = (gathered * mask).sum(-1)
        assert torch.allclose(columns[f"ref_{side}_logps"], direct.double(), atol=1e-4)
        assert int(mask.sum(-1).min()) >= 2  # the answer tokens and the end of turn, never the prompt
    assert torch.all(columns["ref_chosen_logps"] != columns["ref_rejected_logps"])


def test_dpo_starts_at_log_2_and_learns_the_preference(base: Path) -> None:
    from transformers import AutoModelForCausalLM

    manifest = dpo(_train(25), str(base / "reference"), str(base / "model"), str(base / "policy"))
    metrics = manifest.metrics
    records = [json.loads(line) for line in (base / "policy" / PUBLISHED_STEP_LOG_FILE).read_text().splitlines()]
    # policy == reference before the first update: h = 0, so -log sigmoid(0) = log 2 and every implicit reward is 0
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert records[0]["chosen_reward"] == pytest.approx(0, abs=1e-5) and records[0]["reward_accuracy"] == 0
    assert metrics["heldout_loss_before"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics["heldout_reward_accuracy_before"] == 0  # ties (h = 0) count as wrong, as in TRL
    assert sum(r["loss"] for r in records[-5:]) / 5 < records[0]["loss"] - 0.3
    assert metrics["heldout_loss_after"] < metrics["heldout_loss_before"] - 0.3
    assert metrics["heldout_reward_accuracy_after"] >= 0.9
    assert metrics["heldout_reward_margin_after"] > 0.5
    assert all(r["loss_tokens"] == 8 and {"chosen_reward", "rejected_reward", "reward_margin"} <= r.keys()
               for r in records)
    assert records[-1]["reward_margin"] == pytest.approx(records[-1]["chosen_reward"] - records[-1]["rejected_reward"])
    assert metrics["train_pairs"] == 72 and metrics["heldout_pairs"] == 24
    assert metrics["policy_is_reference_model"] is True
    assert metrics["tokenizer_fingerprint"] == tokenizer_fingerprint(base / "model")
    AutoModelForCausalLM.from_pretrained(base / "policy")  # a plain transformers causal LM


def test_a_policy_other_than_the_reference_model_only_when_asked(base: Path, tmp_path: Path) -> None:
    """Same tokenizer, other weights: refused (naming both models and hashes), nothing
    published; with `allow_policy_other_than_reference` it trains, and its first held-out
    loss is measurably not log 2 (what the refusal guards against)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base / "model")
    with torch.no_grad():
        model.model.norm.weight.mul_(3.0)  # another model: same tokenizer, other log-probs
    model.save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(base / "model").save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match=r"policy .*other \(sha256:[0-9a-f]{12}\) is not the model the reference "
                                          r"log-probs of .*reference were computed from, .*model \(sha256:[0-9a-f]{12}\)"):
        dpo(_train(1), str(base / "reference"), str(tmp_path / "other"), str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()  # nothing published

    metrics = dpo(_train(1, allow_policy_other_than_reference=True), str(base / "reference"), str(tmp_path / "other"),
                  str(tmp_path / "allowed")).metrics
    assert metrics["policy_is_reference_model"] is False
    assert abs(metrics["heldout_loss_before"] - math.log(2)) > 1e-3


@pytest.mark.parametrize(("variant", "step_zero_loss"), [("ipo", (1 / (2 * BETA)) ** 2), ("hinge", 1.0)])
def test_every_variant_starts_from_its_value_at_h_0(base: Path, tmp_path: Path, variant: str,
                                                    step_zero_loss: float) -> None:
    """At h = 0: IPO's (h - 1/(2 beta))^2 = 1/(4 beta^2); hinge's max(0, 1 - beta h) = 1."""
    manifest = dpo(_train(1, loss_type=variant), str(base / "reference"), str(base / "model"), str(tmp_path / "p"))
    record = json.loads((tmp_path / "p" / PUBLISHED_STEP_LOG_FILE).read_text().splitlines()[0])
    assert record["loss"] == pytest.approx(step_zero_loss, rel=1e-5)
    assert manifest.metrics["heldout_loss_before"] == pytest.approx(step_zero_loss, rel=1e-5)


def test_label_smoothing_only_with_the_sigmoid_loss() -> None:
    assert DPOConfig(label_smoothing=0.1).label_smoothing == 0.1
    with pytest.raises(ValidationError, match="label_smoothing applies to loss_type 'sigmoid' only, not 'ipo'"):
        DPOConfig(loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValidationError, match="less than 0.5"):
        DPOConfig(label_smoothing=0.5)


def test_a_policy_with_another_tokenizer_is_refused(base: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    from components.data.tokenizer import TokenizerConfig, train_tokenizer
    from components.models.factory import ModelConfig, build_causal_lm

    train_tokenizer(TokenizerConfig(vocab_size=300), str(base / "curated"), str(tmp_path / "tok"))
    other = AutoTokenizer.from_pretrained(tmp_path / "tok")
    torch.manual_seed(0)
    build_causal_lm(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                                max_position_embeddings=256), other).save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match=r"the tokenizer of reference .*reference/tokenizer and the policy .*other "
                                          r"use different tokenizers .*: vocabulary: 400 vs 300 tokens"):
        # other weights too: allowed explicitly, so the tokenizer check is what refuses
        dpo(_train(1, allow_policy_other_than_reference=True), str(base / "reference"), str(tmp_path / "other"),
            str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing published

    ours = AutoTokenizer.from_pretrained(base / "model")
    changed = AutoTokenizer.from_pretrained(base / "model")
    changed.chat_template = ours.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert tokenizer_differences(ours, changed) == ["chat template differs"]
    assert tokenizer_differences(ours, AutoTokenizer.from_pretrained(base / "model")) == []


def test_identical_pairs_are_counted_or_refused(base: Path, tmp_path: Path) -> None:
    pairs = (base / "pairs.jsonl").read_text().splitlines()[:8]
    same = json.loads(pairs[0]) | {"rejected": json.loads(pairs[0])["chosen"]}
    (tmp_path / "pairs.jsonl").write_text("\n".join(pairs[:3] + [json.dumps(same)] + pairs[3:]) + "\n")
    metrics = dpo_reference(DPOReferenceConfig(), str(tmp_path / "pairs.jsonl"), str(base / "model"),
                            str(tmp_path / "reference")).metrics
    assert metrics["pairs_read"] == 9 and metrics["identical_pairs_skipped"] == 1 and metrics["pairs"] == 8
    with pytest.raises(DataError, match=r"pairs.jsonl:4: 'chosen' and 'rejected' are identical"):
        dpo_reference(DPOReferenceConfig(strict_pairs=True), str(tmp_path / "pairs.jsonl"), str(base / "model"),
                      str(tmp_path / "strict"))
    assert not (tmp_path / "strict").exists()


@pytest.mark.slow
def test_two_deepspeed_cpu_ranks_train_the_single_process_policy(base: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from components.train.config import DistributedConfig

    short = _train(3).train.model_copy(update={"micro_batch_rows": 2})
    ranks = short.model_copy(update={"distributed": DistributedConfig(launcher="deepspeed", num_procs=2)})
    single = dpo(_train(3).model_copy(update={"train": short}), str(base / "reference"), str(base / "model"),
                 str(tmp_path / "single")).metrics
    two_ranks = dpo(_train(3).model_copy(update={"train": ranks}), str(base / "reference"), str(base / "model"),
                    str(tmp_path / "ranks")).metrics
    assert two_ranks["world_size"] == 2 and two_ranks["backend"] == "deepspeed"
    assert two_ranks["heldout_loss_after"] == pytest.approx(single["heldout_loss_after"], abs=1e-5)
    one, two = load_file(tmp_path / "single/model.safetensors"), load_file(tmp_path / "ranks/model.safetensors")
    assert max(float((one[name] - two[name]).abs().max()) for name in one) < 1e-5
