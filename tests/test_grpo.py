"""Online RL (GRPO, PPO) on a real tiny model: rollouts equal transformers' decoding, the
log-probs equal a plain forward, rewards that fail are counted or stop the run, a learnable
reward goes up, a killed run resumes to the same weights."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from components.tasks.arithmetic import ArithmeticTaskConfig, generate
from components.runlog import read_metrics
from components.train.grpo import GRPOConfig, grpo
from components.train.losses import adaptive_kl_coef
from components.train.ppo import PPOConfig, minibatch_rows, ppo
from components.train.rewards import RewardError, RewardSpec, answer_format, correctness, score
from components.train.rl import step_grad_norm
from tests.conftest import REPO_ROOT, build_tiny_lm


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny tokenizer + causal LM and an arithmetic task in GSM8K format."""
    root = tmp_path_factory.mktemp("rl")
    build_tiny_lm(root)
    splits = generate(ArithmeticTaskConfig(train_problems=32, test_problems=4, max_steps=1, max_operand=9))
    for split, rows in splits.items():
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


def grpo_config(**overrides) -> GRPOConfig:
    train = overrides.pop("train", {})
    return GRPOConfig.model_validate({
        "train": {"max_steps": 4, "batch_size_rows": 2, "checkpoint_every_steps": 0, "seed": 0,
                  "optim": {"learning_rate": 3e-2, "warmup_steps": 0, "weight_decay": 0.0, "lr_schedule": "constant"},
                  **train},
        "group_size": 4, "max_new_tokens": 12, "rewards": [{"function": "tests.rl_rewards:digit_fraction"}],
        "heldout": {"problems": 4}, **overrides})


def load(path: Path):  # noqa: ANN201
    from transformers import AutoTokenizer

    from components.models.factory import load_causal_lm

    return load_causal_lm(path), AutoTokenizer.from_pretrained(path)


def test_decode_equals_transformers_generate_and_groups_share_their_prompt(setup: Path) -> None:
    import torch

    from components.models.chat import prompt_ids
    from components.models.sampling import decode, sample

    model, tokenizer = load(setup / "model")
    questions = [json.loads(line)["question"] for line in (setup / "test.jsonl").read_text().splitlines()]
    greedy = decode(model, tokenizer, [prompt_ids(tokenizer, q) for q in questions], 1, 16, 0.0)
    reference = sample(model, tokenizer, questions, 1, 16, temperature=0)
    assert greedy.texts == [s[0].text for s in reference]
    assert greedy.finished == [s[0].finished for s in reference]
    torch.manual_seed(3)
    grouped = decode(model, tokenizer, [prompt_ids(tokenizer, q) for q in questions[:2]], 3, 16, 1.0)
    assert grouped.input_ids.shape[0] == 6 and len(set(grouped.texts)) > 1
    prompts = grouped.input_ids[:, :grouped.prompt_width]
    assert torch.equal(prompts[0], prompts[2]) and not torch.equal(prompts[2], prompts[3])
    # completion mask covers exactly the sampled tokens: a stop token ends each finished row
    lengths = grouped.completion_mask.sum(1).long()
    for row, length in enumerate(lengths.tolist()):
        assert grouped.attention_mask[row, grouped.prompt_width:].sum() == length
    torch.manual_seed(3)
    again = decode(model, tokenizer, [prompt_ids(tokenizer, q) for q in questions[:2]], 3, 16, 1.0)
    assert again.texts == grouped.texts  # sampling draws from the (checkpointed) global RNG


def test_samples_without_log_probs_are_the_same_samples(setup: Path) -> None:
    """`with_logprobs=False` skips only the scoring forward: the same texts, no mean log-prob."""
    from components.models.sampling import sample, sample_decoded

    model, tokenizer = load(setup / "model")
    questions = [json.loads(line)["question"] for line in (setup / "test.jsonl").read_text().splitlines()][:3]
    for draw in (sample, sample_decoded):
        scored = draw(model, tokenizer, questions, 2, 12, temperature=1.0, seed=5)
        unscored = draw(model, tokenizer, questions, 2, 12, temperature=1.0, seed=5, with_logprobs=False)
        assert [[s.text for s in pool] for pool in unscored] == [[s.text for s in pool] for pool in scored]
        assert all(s.mean_logprob is None for pool in unscored for s in pool)
        assert all(isinstance(s.mean_logprob, float) for pool in scored for s in pool)


def test_completion_logprobs_equal_a_plain_forward(setup: Path) -> None:
    import torch

    from components.models.chat import prompt_ids
    from components.models.logprobs import completion_logprobs
    from components.models.sampling import decode

    model, tokenizer = load(setup / "model")
    questions = [json.loads(line)["question"] for line in (setup / "test.jsonl").read_text().splitlines()]
    torch.manual_seed(0)
    rollout = decode(model, tokenizer, [prompt_ids(tokenizer, q) for q in questions], 2, 10, 1.0)
    with torch.no_grad():
        logprobs, entropy, _ = completion_logprobs(model, rollout.input_ids, rollout.attention_mask,
                                                   rollout.prompt_width, 0.7, entropy=True)
        for row in range(rollout.input_ids.shape[0]):  # each row alone, no padding, full logits
            keep = rollout.attention_mask[row].bool()
            ids = rollout.input_ids[row][keep][None]
            logits = model(input_ids=ids).logits[0].float() / 0.7
            start = int((~keep[:rollout.prompt_width]).sum())
            width = rollout.prompt_width - start
            n = int(rollout.completion_mask[row].sum())
            expected = torch.log_softmax(logits[width - 1:width - 1 + n], -1)
            targets = ids[0, width:width + n]
            assert torch.allclose(logprobs[row, :n], expected.gather(-1, targets[:, None]).squeeze(-1), atol=1e-5)
            assert torch.allclose(entropy[row, :n], -(expected.exp() * expected).sum(-1), atol=1e-5)


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_shared_prompt_forward_equals_the_model_on_every_row(setup: Path, kv_heads: int) -> None:
    """Each prompt run once for its group gives the log-probs, entropies and gradients of
    running every row as prompt + completion through transformers (plain and grouped-query)."""
    import torch
    from transformers import AutoTokenizer

    from components.models.chat import prompt_ids
    from components.models.factory import ModelConfig, build_causal_lm
    from components.models.fast_llama import shared_prompt_logprobs
    from components.models.logprobs import completion_logprobs
    from components.models.sampling import decode

    tokenizer = AutoTokenizer.from_pretrained(setup / "model")
    torch.manual_seed(0)
    model = build_causal_lm(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=kv_heads,
                                        intermediate_size=64, max_position_embeddings=512), tokenizer)
    questions = [json.loads(line)["question"] for line in (setup / "test.jsonl").read_text().splitlines()][:3]
    rollout = decode(model, tokenizer, [prompt_ids(tokenizer, q) for q in questions], 3, 12, 1.0)
    width, mask = rollout.prompt_width, rollout.completion_mask
    results = []
    for shared in (False, True):
        model.zero_grad()
        if shared:
            logprobs, entropy = shared_prompt_logprobs(model, rollout.input_ids[::3, :width],
                                                       rollout.attention_mask[::3, :width],
                                                       rollout.input_ids[:, width:], mask, 0.8, entropy=True)
        else:
            logprobs, entropy, _ = completion_logprobs(model, rollout.input_ids, rollout.attention_mask, width, 0.8,
                                                       entropy=True)
        (logprobs * mask * torch.linspace(-1, 1, mask.shape[0])[:, None]).sum().backward()
        results.append((logprobs.detach() * mask, entropy * mask, [p.grad.clone() for p in model.parameters()]))
    (lp_a, ent_a, grads_a), (lp_b, ent_b, grads_b) = results
    assert torch.allclose(lp_a, lp_b, atol=1e-5) and torch.allclose(ent_a, ent_b, atol=1e-5)
    for a, b in zip(grads_a, grads_b):
        assert torch.allclose(a, b, atol=1e-5 * max(1.0, float(a.abs().max())))


@pytest.mark.parametrize("kv_heads", [1, 3])
def test_completion_attention_by_matmuls_equals_sdpa(kv_heads: int) -> None:
    """The update's two-matmul attention (small score tensors) computes what SDPA computes, with
    grouped-query heads and a prompt with padding keys; its gradients too."""
    import torch

    from components.models.fast_llama import _completion_attention

    torch.manual_seed(0)
    rows, heads, steps, prompt, dim = 4, 6, 5, 3, 8
    q = torch.randn(rows, heads, steps, dim, requires_grad=True)
    keys = torch.randn(rows, kv_heads, prompt + steps, dim, requires_grad=True)
    values = torch.randn(rows, kv_heads, prompt + steps, dim, requires_grad=True)
    valid = torch.ones(rows, prompt, dtype=torch.bool)
    valid[1, 0] = valid[3, :2] = False  # left padding
    allowed = torch.cat([valid[:, None].expand(rows, steps, prompt),
                         torch.ones(steps, steps, dtype=torch.bool).tril()[None].expand(rows, -1, -1)], -1)[:, None]
    results = []
    for max_scores in (0, 1 << 20):  # 0: always SDPA
        out = _completion_attention(q, keys, values, allowed, kv_heads != heads, max_scores)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, steps)[:, None]).sum(), (q, keys, values))
        results.append((out.detach(), grads))
    (sdpa, sdpa_grads), (matmuls, matmul_grads) = results
    assert torch.allclose(matmuls, sdpa, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(matmul_grads, sdpa_grads))


def test_reward_functions_and_their_failures_are_counted_or_stop() -> None:
    assert correctness("3 + 4 = 7\n#### 7", "#### 7") == 1.0 and correctness("#### 8", "7") == 0.0
    assert answer_format("so\n#### 12", "") == 1.0
    assert answer_format("the answer is 12", "") == 0.0
    specs = [RewardSpec(function="correctness"), RewardSpec(function="format", weight=0.5)]
    scores = score(specs, ["#### 7", "7", "#### 8"], ["7", "7", "7"])
    assert scores.total == [1.5, 1.0, 0.5] and scores.errors == 0
    failing = score([RewardSpec(function="tests.rl_rewards:raises"), RewardSpec(function="tests.rl_rewards:not_a_number")],
                    ["a", "b"], ["1", "2"])
    assert failing.total == [0.0, 0.0] and failing.errors == 4
    assert "reward service unavailable" in failing.error_examples[0] and "returned nan" in failing.error_examples[1]
    with pytest.raises(RewardError, match=r"'tests.rl_rewards:raises' on sample 0 .*reward service unavailable"):
        score([RewardSpec(function="tests.rl_rewards:raises")], ["a"], ["1"], on_error="stop")
    with pytest.raises(Exception, match=r"reward function 'nope': not a built-in"):
        score([RewardSpec(function="nope")], ["a"], ["1"])
    with pytest.raises(Exception, match=r"'tests.rl_rewards:missing': cannot import it"):
        score([RewardSpec(function="tests.rl_rewards:missing")], ["a"], ["1"])


def test_grpo_raises_a_learnable_reward_and_logs_every_quantity(setup: Path, tmp_path: Path) -> None:
    config = grpo_config(train={"max_steps": 14, "batch_size_rows": 4}, max_new_tokens=10)
    manifest = grpo(config, str(setup / "model"), str(setup / "train.jsonl"), str(tmp_path / "grpo"),
                    heldout=str(setup / "test.jsonl"))
    records = read_metrics(tmp_path / "grpo/train_metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 15))
    for name in ("reward_mean", "reward_std", "entropy", "clip_fraction_low", "clip_fraction_high",
                 "zero_variance_fraction", "response_length", "rollout_time_s", "update_time_s", "grad_norm"):
        assert all(r[name] is not None for r in records), name
    first, last = records[0]["reward_mean"], sum(r["reward_mean"] for r in records[-3:]) / 3
    assert last > first + 0.15, (first, last)
    metrics = manifest.metrics
    assert metrics["training_flops"] > 0 and metrics["heldout_problems"] == 4
    assert "heldout_accuracy_before" in metrics and (tmp_path / "grpo/heldout_accuracy.csv").is_file()
    assert (tmp_path / "grpo/config.json").is_file() and (tmp_path / "grpo/metrics.json").is_file()


def test_which_problems_are_held_out_never_changes_the_trained_weights(setup: Path, tmp_path: Path) -> None:
    """Monitoring moved from test to validation: the run trains on the same samples whatever it
    scores (held-out sampling draws from its own seed), so the trained model, and the test
    numbers measured on it, do not depend on the held-out set."""
    import torch

    config = grpo_config(train={"max_steps": 2}, heldout={"problems": 4, "samples": 2, "every_steps": 1})
    weights, heldout_hashes = [], []
    for name, heldout in (("validation", setup / "validation.jsonl"), ("test", setup / "test.jsonl"), ("none", None)):
        manifest = grpo(config, str(setup / "model"), str(setup / "train.jsonl"), str(tmp_path / name),
                        heldout=str(heldout) if heldout else None)
        weights.append(load(tmp_path / name)[0].state_dict())
        heldout_hashes.append(manifest.inputs["heldout"].content_hash if heldout else None)
    assert len(set(heldout_hashes)) == 3  # two different held-out files, and none
    assert [r["step"] for r in read_metrics(tmp_path / "validation/heldout_accuracy.jsonl")] == [0, 1, 2]
    assert all(torch.equal(a, b) for other in weights[1:] for a, b in zip(weights[0].values(), other.values()))


def test_dynamic_sampling_drops_groups_that_carry_no_signal(setup: Path, tmp_path: Path) -> None:
    """A constant reward: every group has zero variance, refills are tried up to the cap, and
    no update happens (the published weights equal the starting ones)."""
    import torch

    config = grpo_config(train={"max_steps": 2}, rewards=[{"function": "tests.rl_rewards:constant"}],
                         max_sampling_rounds=3, heldout={"problems": 0})
    grpo(config, str(setup / "model"), str(setup / "train.jsonl"), str(tmp_path / "grpo"))
    records = read_metrics(tmp_path / "grpo/train_metrics.jsonl")
    assert all(r["zero_variance_fraction"] == 1.0 and r["sampling_rounds"] == 3 and r["groups_trained"] == 0
               and r["updates"] == 0 for r in records)
    before, _ = load(setup / "model")
    after, _ = load(tmp_path / "grpo")
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))


def test_failing_reward_function_is_counted_or_stops_the_run(setup: Path, tmp_path: Path) -> None:
    counted = grpo(grpo_config(train={"max_steps": 1}, rewards=[{"function": "tests.rl_rewards:raises_every_other"},
                                                                {"function": "tests.rl_rewards:digit_fraction"}],
                               dynamic_sampling=False, heldout={"problems": 0}),
                   str(setup / "model"), str(setup / "train.jsonl"), str(tmp_path / "counted"))
    assert counted.metrics["reward_errors"] == 4  # 2 prompts x G=4, every other call of the flaky function
    with pytest.raises(RewardError, match="reward service unavailable"):
        grpo(grpo_config(train={"max_steps": 1}, rewards=[{"function": "tests.rl_rewards:raises"}],
                         on_reward_error="stop", heldout={"problems": 0}),
             str(setup / "model"), str(setup / "train.jsonl"), str(tmp_path / "stopped"))
    assert not (tmp_path / "stopped").exists()


def test_a_reward_function_failing_on_every_sample_stops_the_run_unpublished(
        setup: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 14, case 7: a function that raised on all 8 samples of the step (next to a working
    one) is broken: the run stops at that step, names the function and an example, publishes
    nothing, and the log shows the failures."""
    config = grpo_config(train={"max_steps": 2}, rewards=[{"function": "tests.rl_rewards:raises"},
                                                          {"function": "tests.rl_rewards:digit_fraction"}],
                         dynamic_sampling=False, heldout={"problems": 0})
    with caplog.at_level("WARNING", logger="components.train.rewards"), pytest.raises(
            RewardError, match=r"grpo step 1: reward function 'tests.rl_rewards:raises' failed on 8 of 8 samples.*"
                               r"First: reward function 'tests.rl_rewards:raises' on sample 0 .*"
                               r"reward service unavailable"):
        grpo(config, str(setup / "model"), str(setup / "train.jsonl"), str(tmp_path / "grpo"))
    assert not (tmp_path / "grpo").exists()
    assert "grpo step 1: reward 'tests.rl_rewards:raises' failed on 8 of 8 samples" in caplog.text
    with pytest.raises(RewardError, match=r"ppo step 1: reward function 'tests.rl_rewards:raises' failed on 8 of 8"):
        ppo(PPOConfig.model_validate({
            "train": {"max_steps": 1, "batch_size_rows": 2, "checkpoint_every_steps": 0, "optim": {"warmup_steps": 0}},
            "samples_per_prompt": 4, "max_new_tokens": 6, "rewards": [{"function": "tests.rl_rewards:raises"}],
            "heldout": {"problems": 0}}), str(setup / "model"), str(setup / "train.jsonl"), str(tmp_path / "ppo"))
    assert not (tmp_path / "ppo").exists()


def test_reward_failures_below_the_bound_are_reported_with_examples(
        setup: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Half of every step's calls fail: under the default bound (every sample) the run finishes
    and its report shows the count and examples; a bound of one half stops it."""
    config = grpo_config(train={"max_steps": 2}, rewards=[{"function": "tests.rl_rewards:raises_every_other"}],
                         dynamic_sampling=False, heldout={"problems": 0})
    with caplog.at_level("WARNING", logger="components.train.rewards"):
        manifest = grpo(config, str(setup / "model"), str(setup / "train.jsonl"), str(tmp_path / "grpo"))
    assert manifest.metrics["reward_errors"] == 8  # 4 of 8 samples in each of 2 steps
    assert len(manifest.metrics["reward_error_examples"]) == 3
    report = (tmp_path / "grpo/train_report.md").read_text()
    assert "## Reward errors" in report and "8 reward function calls failed" in report
    assert report.count("flaky reward service") == 3
    assert [line for line in caplog.text.splitlines() if "failed on 4 of 8 samples" in line][:2] == [
        line for line in caplog.text.splitlines() if "reward 'tests.rl_rewards:raises_every_other'" in line][:2]
    assert "grpo step 2: reward" in caplog.text
    strict = config.model_copy(update={"max_reward_error_fraction": 0.5})
    assert strict.config_hash() != config.config_hash()
    with pytest.raises(RewardError, match=r"failed on 4 of 8 samples, at or above max_reward_error_fraction=0.5"):
        grpo(strict, str(setup / "model"), str(setup / "train.jsonl"), str(tmp_path / "strict"))
    assert not (tmp_path / "strict").exists()


CHILD = """
import sys
from components.train.grpo import GRPOConfig, grpo
grpo(GRPOConfig.model_validate_json(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
"""


def test_a_killed_grpo_run_resumes_to_the_same_weights(setup: Path, tmp_path: Path) -> None:
    """SIGKILLed during step 3's rewards, after its step-2 checkpoint: the rerun resumes there
    (sampler, optimizer and RNG restored, so it samples the same completions) and ends with
    the weights and step records of an uninterrupted run, its training FLOPs counted from step 1."""
    import torch

    config = grpo_config(train={"max_steps": 4, "checkpoint_every_steps": 2}, dynamic_sampling=False,
                         rewards=[{"function": "tests.rl_rewards:dies_after_calls"}], heldout={"problems": 0})

    def run(dest: Path, die_at: int) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "CRUCIBLE_TEST_CALLS": str(tmp_path / f"{dest.name}.calls"),
               "CRUCIBLE_TEST_DIE_AT": str(die_at)}
        return subprocess.run([sys.executable, "-c", CHILD, config.model_dump_json(), str(setup / "model"),
                               str(setup / "train.jsonl"), str(dest)], cwd=REPO_ROOT, env=env, capture_output=True,
                              text=True, timeout=300)

    assert run(tmp_path / "straight", 0).returncode == 0
    killed = run(tmp_path / "resumed", 2 * 4 * 2 + 1)  # steps of 2 prompts x G=4 calls: the first call of step 3
    assert killed.returncode == -9 and not (tmp_path / "resumed").exists()
    (tmp_path / "resumed.calls").unlink()
    rerun = run(tmp_path / "resumed", 0)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    manifest = json.loads((tmp_path / "resumed/manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 4
    resumed_records = read_metrics(tmp_path / "resumed/train_metrics.jsonl")
    assert [r["step"] for r in resumed_records] == [1, 2, 3, 4]
    straight_records = read_metrics(tmp_path / "straight/train_metrics.jsonl")
    same = ("reward_mean", "loss", "training_flops", "reward_errors")
    assert [[r[k] for k in same] for r in resumed_records] == [[r[k] for k in same] for r in straight_records]
    straight_manifest = json.loads((tmp_path / "straight/manifest.json").read_text())
    assert manifest["metrics"]["training_flops"] == straight_manifest["metrics"]["training_flops"] > 0
    straight, _ = load(tmp_path / "straight")
    resumed, _ = load(tmp_path / "resumed")
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))


def leave_one_out(rewards: list[float]) -> list[float]:
    """RLOO (Ahmadian et al. 2024, eq. 5): A_i = r_i - 1/(k-1) sum_{j != i} r_j, in Python floats."""
    k = len(rewards)
    return [r - sum(other for j, other in enumerate(rewards) if j != i) / (k - 1) for i, r in enumerate(rewards)]


def test_grpo_with_rloo_advantages_trains_on_the_leave_one_out_baseline(setup: Path, tmp_path: Path) -> None:
    """`advantage_estimator: rloo`: the batch GRPO fills (dynamic sampling dropping a group whose
    rewards agree, then a refill) carries the leave-one-out advantages of each kept group, and a
    run with it trains (and ends elsewhere than the default estimator's run)."""
    import torch

    from components.models.chat import prompt_ids
    from components.models.sampling import decode
    from components.train.grpo import Round, fill_batch
    from components.train.rewards import Scores

    model, tokenizer = load(setup / "model")
    torch.manual_seed(0)
    rollout = decode(model, tokenizer, [prompt_ids(tokenizer, q) for q in ("1+1?", "2+3?")], 4, 4, 1.0)

    def round_of(rewards: list[float]) -> Round:
        return Round(rollout, torch.tensor(rewards), Scores(total=rewards, per_function={}))

    first = round_of([1.0, 1.0, 1.0, 1.0, 0.0, 0.25, 1.0, 0.5])  # group 0 agrees: dropped
    refill = round_of([0.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])  # group 0 fills the batch
    rloo = grpo_config(advantage_estimator="rloo")
    batch = fill_batch(rloo, first, lambda: refill)
    assert (batch.rounds, batch.groups, len(batch.chunks)) == (2, 2, 2)
    for chunk, group in zip(batch.chunks, ([0.0, 0.25, 1.0, 0.5], [0.0, 1.0, 0.0, 0.0])):
        assert chunk.advantages.tolist() == pytest.approx(leave_one_out(group))
    default = fill_batch(grpo_config(), first, lambda: refill)
    assert default.chunks[0].advantages.tolist() != pytest.approx(leave_one_out([0.0, 0.25, 1.0, 0.5]))

    weights = {}
    for estimator in ("rloo", "grpo"):
        manifest = grpo(grpo_config(train={"max_steps": 3}, advantage_estimator=estimator, heldout={"problems": 0}),
                        str(setup / "model"), str(setup / "train.jsonl"), str(tmp_path / estimator))
        assert manifest.config["advantage_estimator"] == estimator
        records = read_metrics(tmp_path / f"{estimator}/train_metrics.jsonl")
        assert sum(r["updates"] for r in records) > 0
        assert all(r["loss"] is None or math.isfinite(r["loss"]) for r in records)
        weights[estimator] = load(tmp_path / estimator)[0].state_dict()
    start = model.state_dict()
    assert not all(torch.equal(start[name], value) for name, value in weights["rloo"].items())
    assert not all(torch.equal(weights["grpo"][name], value) for name, value in weights["rloo"].items())


def test_an_unknown_advantage_estimator_is_refused_naming_the_field_and_the_known_names() -> None:
    from components.config import validate_config
    from components.errors import ConfigError

    with pytest.raises(ConfigError, match=r"params.yaml: advantage_estimator: Input should be 'grpo' or 'rloo' "
                                          r"\(got 'ppo'\)"):
        validate_config(GRPOConfig, {"advantage_estimator": "ppo"}, "params.yaml")
    # a new field at its default leaves existing configs' cache keys as they were
    assert "advantage_estimator" in GRPOConfig.hash_omits_at_default
    assert GRPOConfig(advantage_estimator="rloo").config_hash() != GRPOConfig().config_hash()


def test_adaptive_kl_controller_moves_toward_the_target() -> None:
    # Ziegler et al. 2019 §2.2: e = clip(KL/target - 1, -0.2, 0.2), beta *= 1 + e * n / horizon
    assert adaptive_kl_coef(0.1, 12.0, 6.0, 100, 1000) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert adaptive_kl_coef(0.1, 5.7, 6.0, 100, 1000) == pytest.approx(0.1 * (1 - 0.05 * 0.1))
    assert adaptive_kl_coef(0.1, 0.0, 6.0, 100, 1000) == pytest.approx(0.1 * (1 - 0.2 * 0.1))


def test_ppo_raises_a_learnable_reward_with_value_head_and_kl(setup: Path, tmp_path: Path) -> None:
    config = PPOConfig.model_validate({
        "train": {"max_steps": 12, "batch_size_rows": 8, "checkpoint_every_steps": 0,
                  "optim": {"learning_rate": 3e-2, "warmup_steps": 0, "weight_decay": 0.0, "lr_schedule": "constant"}},
        "samples_per_prompt": 4, "max_new_tokens": 10, "rewards": [{"function": "tests.rl_rewards:digit_fraction"}],
        "kl_coef": 0.02, "kl_target": 1.0, "kl_horizon": 100, "ppo_epochs": 2, "minibatches": 2,
        "heldout": {"problems": 0}})
    manifest = ppo(config, str(setup / "model"), str(setup / "train.jsonl"), str(tmp_path / "ppo"))
    records = read_metrics(tmp_path / "ppo/train_metrics.jsonl")
    assert all(r["updates"] == 4 for r in records)
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as the reference
    assert records[-1]["kl"] > 1.0 and records[-1]["kl_coef"] > 0.02  # KL above target: the controller raised beta
    first, last = records[0]["reward_mean"], sum(r["reward_mean"] for r in records[-3:]) / 3
    assert last > first + 0.1, (first, last)
    assert (tmp_path / "ppo/value_head.pt").is_file() and manifest.metrics["training_flops"] > 0
    distributed = PPOConfig.model_validate({**config.model_dump(), "train": {
        **config.train.model_dump(), "distributed": {"launcher": "deepspeed"}}})
    with pytest.raises(Exception, match="launcher must be 'none'"):
        ppo(distributed, str(setup / "model"), str(setup / "train.jsonl"), str(tmp_path / "bad"))


def test_ppo_resumed_from_a_checkpoint_keeps_its_kl_coefficient_and_totals(setup: Path, tmp_path: Path) -> None:
    """The adaptive KL coefficient and the run's totals are the step's own state: a run resumed
    from the step-2 checkpoint of another continues them, so its steps 3-4, weights and training
    FLOPs are the uninterrupted run's."""
    import torch

    config = PPOConfig.model_validate({
        "train": {"max_steps": 4, "batch_size_rows": 4, "checkpoint_every_steps": 2,
                  "optim": {"learning_rate": 3e-2, "warmup_steps": 0, "weight_decay": 0.0, "lr_schedule": "constant"}},
        "samples_per_prompt": 2, "max_new_tokens": 8, "rewards": [{"function": "tests.rl_rewards:digit_fraction"}],
        "kl_coef": 0.02, "kl_target": 0.01, "kl_horizon": 10, "heldout": {"problems": 0}})
    straight = ppo(config, str(setup / "model"), str(setup / "train.jsonl"), str(tmp_path / "straight"))
    (checkpoint,) = (tmp_path / "straight.runs").glob("*/checkpoints/step-00000002")
    resumed_config = config.model_copy(update={"train": config.train.model_copy(update={"resume_from": str(checkpoint)})})
    resumed = ppo(resumed_config, str(setup / "model"), str(setup / "train.jsonl"), str(tmp_path / "resumed"))

    straight_records = read_metrics(tmp_path / "straight/train_metrics.jsonl")
    assert straight_records[1]["kl_coef"] != 0.02  # the controller moved before the checkpoint
    same = ("step", "kl_coef", "loss", "training_flops")
    assert [[r[k] for k in same] for r in read_metrics(tmp_path / "resumed/train_metrics.jsonl")] == \
        [[r[k] for k in same] for r in straight_records[2:]]
    assert resumed.metrics["training_flops"] == straight.metrics["training_flops"]
    a, b = load(tmp_path / "straight")[0], load(tmp_path / "resumed")[0]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_ppo_takes_its_reward_from_a_reward_model_and_refuses_another_tokenizer(setup: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from components.errors import ConfigError
    from components.models.reward import load_reward_model, score

    torch.manual_seed(1)
    head = AutoModelForSequenceClassification.from_pretrained(setup / "model", num_labels=1)
    head.config.pad_token_id = AutoTokenizer.from_pretrained(setup / "model").pad_token_id
    head.save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(setup / "model").save_pretrained(tmp_path / "rm")
    config = PPOConfig.model_validate({
        "train": {"max_steps": 2, "batch_size_rows": 2, "checkpoint_every_steps": 0, "optim": {"warmup_steps": 2}},
        "samples_per_prompt": 2, "max_new_tokens": 6, "ppo_epochs": 1, "minibatches": 1, "heldout": {"problems": 0}})
    ppo(config, str(setup / "model"), str(setup / "train.jsonl"), str(tmp_path / "ppo"), reward_model=str(tmp_path / "rm"))
    records = read_metrics(tmp_path / "ppo/train_metrics.jsonl")
    rm, rm_tokenizer = load_reward_model(tmp_path / "rm")
    assert all(r["reward_mean"] not in (0.0, 1.0) for r in records)  # scores of the head, not 0/1 verdicts
    assert len(score(rm, rm_tokenizer, ["q"], ["a"])) == 1
    other = tmp_path / "other_tok"
    AutoTokenizer.from_pretrained(setup / "tok").save_pretrained(other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<extra_token>"])
    tokenizer.save_pretrained(tmp_path / "rm")
    with pytest.raises(ConfigError, match=r"reward model .*rm and policy .* use different tokenizers.*<extra_token>"):
        ppo(config, str(setup / "model"), str(setup / "train.jsonl"), str(tmp_path / "ppo2"), reward_model=str(tmp_path / "rm"))
    assert not (tmp_path / "ppo2").exists()


def test_a_step_reports_its_first_non_finite_gradient_norm_else_the_largest() -> None:
    nan, inf = float("nan"), float("inf")
    assert max([1.0, nan]) == 1.0  # why max() is not enough
    assert math.isnan(step_grad_norm([1.0, nan, 3.0])) and step_grad_norm([1.0, inf, nan]) == inf
    assert step_grad_norm([1.0, 3.0, 2.0]) == 3.0 and step_grad_norm([]) is None


def test_ppo_minibatches_are_a_fresh_permutation_per_epoch() -> None:
    import torch

    torch.manual_seed(0)
    picks = [p.tolist() for p in minibatch_rows(rows=5, epochs=2, minibatches=2)]
    assert [len(p) for p in picks] == [2, 2, 2, 2]  # 5 rows in 2 parts: one row left out per epoch
    for epoch in (picks[:2], picks[2:]):
        assert len(set(epoch[0] + epoch[1])) == 4 and set(epoch[0] + epoch[1]) <= set(range(5))


@pytest.mark.parametrize("trainer", ["ppo", "grpo"])
def test_a_non_finite_gradient_norm_after_the_first_update_stops_the_run_unpublished(
        setup: Path, tmp_path: Path, trainer: str) -> None:
    """At a learning rate of 1e30 the first update of step 1 is finite but leaves Adam's weights
    near 1e30, so the second update's gradient norm is NaN while every loss stays finite. The
    step's max() reported the first norm and the run was published; it must stop at update 2,
    before that update is applied, with nothing published or logged for the step."""
    from components.runlog import STEP_LOG_FILE
    from components.train.run import COMPLETED_FILE, TrainingDivergedError

    train = {"max_steps": 1, "batch_size_rows": 2, "checkpoint_every_steps": 0,
             "optim": {"learning_rate": 1e30, "warmup_steps": 0, "weight_decay": 0.0, "lr_schedule": "constant"}}
    dest = tmp_path / trainer
    with pytest.raises(TrainingDivergedError, match=rf"{trainer}: grad_norm became nan at step 1 \(update 2 of the "
                                                    r"step\); stopped \(no checkpoint was written before it\)"):
        if trainer == "ppo":
            ppo(PPOConfig.model_validate({
                "train": train, "samples_per_prompt": 2, "max_new_tokens": 6, "ppo_epochs": 2, "minibatches": 2,
                "rewards": [{"function": "tests.rl_rewards:digit_fraction"}], "heldout": {"problems": 0}}),
                str(setup / "model"), str(setup / "train.jsonl"), str(dest))
        else:
            grpo(grpo_config(train={**train, "batch_size_rows": 4}, iterations=2, dynamic_sampling=False,
                             heldout={"problems": 0}),
                 str(setup / "model"), str(setup / "train.jsonl"), str(dest))
    assert not dest.exists()
    [run] = (tmp_path / f"{trainer}.runs").iterdir()
    assert read_metrics(run / STEP_LOG_FILE) == [] and not (run / COMPLETED_FILE).exists()
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())


def tiny_reward_model(setup: Path, dest: Path) -> Path:
    """A reward_model-shaped directory: the tiny LM with a one-output sequence-classification head."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(1)
    head = AutoModelForSequenceClassification.from_pretrained(setup / "model", num_labels=1)
    head.config.pad_token_id = AutoTokenizer.from_pretrained(setup / "model").pad_token_id
    head.save_pretrained(dest)
    AutoTokenizer.from_pretrained(setup / "model").save_pretrained(dest)
    return dest


def small_ppo(**overrides) -> PPOConfig:
    return PPOConfig.model_validate({
        "train": {"max_steps": 2, "batch_size_rows": 2, "checkpoint_every_steps": 0, "optim": {"warmup_steps": 0}},
        "samples_per_prompt": 2, "max_new_tokens": 6, "ppo_epochs": 1, "minibatches": 1, "heldout": {"problems": 0},
        **overrides})


def test_ppo_without_a_reward_model_calls_the_configured_function(
        setup: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 14, case 3: the configured function is called on every sample (2 steps x 2 prompts x
    2 samples), the step reward is its value, and the manifest says where the reward came from."""
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("CRUCIBLE_TEST_REWARD_LOG", str(calls))
    manifest = ppo(small_ppo(rewards=[{"function": "tests.rl_rewards:records_calls", "weight": 2.0}]),
                   str(setup / "model"), str(setup / "train.jsonl"), str(tmp_path / "ppo"))
    assert len(calls.read_text().splitlines()) == 8
    records = read_metrics(tmp_path / "ppo/train_metrics.jsonl")
    assert all(r["reward_mean"] == pytest.approx(2.0 * r["reward/tests.rl_rewards:records_calls"]) for r in records)
    assert manifest.metrics["reward_source"] == "functions"
    assert set(manifest.metrics["reward_code"]) == {"tests.rl_rewards:records_calls"}


def test_ppo_combines_a_reward_model_with_functions_only_when_weighted(setup: Path, tmp_path: Path) -> None:
    """A reward model and configured functions: reward_model_weight x score + the functions' sum;
    without the weight the pair is refused (never one silently dropped), and a weight without a
    reward model is refused too. The default functions next to a reward model stay unused."""
    from components.errors import ConfigError

    rm = tiny_reward_model(setup, tmp_path / "rm")
    constant = [{"function": "tests.rl_rewards:constant", "weight": 0.5}]
    manifest = ppo(small_ppo(rewards=constant, reward_model_weight=3.0), str(setup / "model"),
                   str(setup / "train.jsonl"), str(tmp_path / "both"), reward_model=str(rm))
    records = read_metrics(tmp_path / "both/train_metrics.jsonl")
    assert all(r["reward_mean"] == pytest.approx(3.0 * r["reward/reward_model"] + 0.5, abs=1e-5) for r in records)
    assert manifest.metrics["reward_source"] == "reward_model+functions"
    only_model = ppo(small_ppo(), str(setup / "model"), str(setup / "train.jsonl"), str(tmp_path / "rm_only"),
                     reward_model=str(rm))
    assert only_model.metrics["reward_source"] == "reward_model" and "reward_code" not in only_model.metrics
    with pytest.raises(ConfigError, match=r"rewards \(tests.rl_rewards:constant\) and a reward_model input are both "
                                          r"given: set ppo.reward_model_weight"):
        ppo(small_ppo(rewards=constant), str(setup / "model"), str(setup / "train.jsonl"), str(tmp_path / "refused"),
            reward_model=str(rm))
    with pytest.raises(ConfigError, match="reward_model_weight is set but no reward_model input"):
        ppo(small_ppo(rewards=constant, reward_model_weight=1.0), str(setup / "model"), str(setup / "train.jsonl"),
            str(tmp_path / "refused"))
    with pytest.raises(ConfigError, match="no reward: give a reward_model input or configure ppo.rewards"):
        ppo(small_ppo(rewards=[]), str(setup / "model"), str(setup / "train.jsonl"), str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()


REWARD_MODULE = '''
def reward(completion: str, reference: str) -> float:
    return {value}
'''


def test_editing_a_user_reward_module_changes_the_cache_key_and_reruns(
        setup: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 14, case 6: the same config over an edited reward module is a different key, so the
    rerun trains with the new code (and records its hash) instead of answering "up to date";
    an unchanged module keeps its key; configs naming no user code keep the keys they had."""
    from components.artifacts import cache_key
    from components.config import ConfigError, source_fingerprint
    from components.train.grpo import SPEC

    module_dir = tmp_path / "user_code"
    module_dir.mkdir()
    monkeypatch.syspath_prepend(str(module_dir))
    source = module_dir / "crucible_test_user_reward.py"
    source.write_text(REWARD_MODULE.format(value="float(len(completion) % 2)"))
    config = grpo_config(train={"max_steps": 1}, rewards=[{"function": "crucible_test_user_reward:reward"},
                                                          {"function": "correctness"}], heldout={"problems": 0})
    key = cache_key(SPEC, config, {})
    assert cache_key(SPEC, config, {}) == key
    first = grpo(config, str(setup / "model"), str(setup / "train.jsonl"), str(tmp_path / "grpo"))
    assert grpo(config, str(setup / "model"), str(setup / "train.jsonl"), str(tmp_path / "grpo")) == first  # reused
    user = "reward/crucible_test_user_reward:reward"
    old_reward = read_metrics(tmp_path / "grpo/train_metrics.jsonl")[0][user]
    source.write_text(REWARD_MODULE.format(value="1.0 - float(len(completion) % 2)"))
    assert cache_key(SPEC, config, {}) != key
    second = grpo(config, str(setup / "model"), str(setup / "train.jsonl"), str(tmp_path / "grpo"), overwrite=True)
    assert second.cache_key != first.cache_key and second.started_at != first.started_at
    assert second.metrics["reward_code"] == {"crucible_test_user_reward:reward": source_fingerprint(
        "crucible_test_user_reward:reward")} != first.metrics["reward_code"]
    # the same first rollout (same weights and seed), scored by the edited function: 1 - the old reward
    assert read_metrics(tmp_path / "grpo/train_metrics.jsonl")[0][user] == pytest.approx(1.0 - old_reward)
    assert 0.0 < old_reward < 1.0
    # no user code: the payload (and so every existing key) is what it was before code joined it
    builtin = grpo_config(rewards=[{"function": "correctness"}])
    assert builtin.code_fingerprints() == {}
    legacy = {"component": SPEC.name, "version": SPEC.version, "config_hash": builtin.config_hash(), "inputs": {}}
    assert cache_key(SPEC, builtin, {}) == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()
    missing = grpo_config(rewards=[{"function": "crucible_no_such_module:reward"}])
    with pytest.raises(ConfigError, match="function 'crucible_no_such_module:reward': module "
                                          "'crucible_no_such_module' not found"):
        cache_key(SPEC, missing, {})
