"""components/train/losses.py against TRL's own implementations, on the same seeded random inputs.

Each test builds a real TRL trainer around a tiny float64 Llama (hidden 16, 1 layer, vocab 50) and calls the TRL
method that holds the formula: `GRPOTrainer._generate_and_score_completions` (group advantages) and
`GRPOTrainer._compute_loss` (clipped loss, k3 KL, aggregation), `RLOOTrainer._generate_and_score_completions`
(leave-one-out baseline, k1 KL penalty) and `RLOOTrainer._compute_loss`, `DPOTrainer._compute_loss` and
`RewardTrainer.compute_loss`. Our side takes the per-token log-probs of the same model from the same forward
(TRL's fused LM head, checked once against a plain forward) and feeds them to our functions; losses, logged
stats and parameter gradients must agree to 1e-6.

Exceptions, said where they occur:
- PPO (GAE, clipped value loss, PPO's k1/k3 reward penalty) is no longer in TRL 1.x; its last release,
  trl 0.29.1, computed it inline in `trl/experimental/ppo/ppo_trainer.py::PPOTrainer.train`, which needs a
  reward model, a value model and a rollout. Those lines are copied verbatim below, with file and line numbers.
- k2 = (log r)^2 / 2 exists in no TRL version (TRL's PPO accepted k1/k3 only); it is tested in tests/test_losses.py.
- Documented convention differences, asserted as relations: TRL 1.16's DPO `"sigmoid"` has no label smoothing
  (conservative DPO is recovered from two TRL calls); TRL's `"ipo"` divides each log-ratio by its completion
  length; TRL's PPO places the score one token after EOS (`sequence_lengths_p1`).
"""

from __future__ import annotations

import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast,
)
from trl import (  # noqa: E402
    DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, RewardConfig, RewardTrainer, RLOOConfig, RLOOTrainer,
)

from components.train.losses import (  # noqa: E402
    aggregate_loss, bradley_terry_loss, dpo_loss, gae_advantages, group_advantages, kl_estimate, ppo_policy_loss,
    rloo_advantages, value_loss,
)

VOCAB = 50
PAD, EOS = 0, 1


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- tiny model, tokenizer, trainers


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": PAD, "<eos>": EOS, **{f"w{i}": i + 2 for i in range(VOCAB - 2)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def llama_config(**kwargs) -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                       pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, **kwargs)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory) -> str:
    """A saved tiny policy: TRL builds its reference model from this path (`config._name_or_path`)."""
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("tiny_llama"))
    LlamaForCausalLM(llama_config()).double().save_pretrained(path)
    return path


def policy(reference_dir: str) -> LlamaForCausalLM:
    """The saved model with perturbed weights, so that policy and reference differ."""
    model = LlamaForCausalLM.from_pretrained(reference_dir, dtype=torch.float64)
    with torch.no_grad():
        g = gen(1)
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    model.config._name_or_path = reference_dir
    return model


def common_args(tmp_path_factory) -> dict:
    return dict(output_dir=str(tmp_path_factory.mktemp("out")), report_to="none", use_cpu=True,
                save_strategy="no", bf16=False, gradient_checkpointing=False)


def reward_from_column(completions, r, **kwargs):
    """The reward of each sample is its dataset column `r`, whatever the completion: rewards are known exactly."""
    return list(r)


PROMPTS = ["w2 w3 w4", "w5 w6 w7", "w8 w9 w10"]
GROUP = 4
# Rewards per sample (3 prompts x 4 generations); the last group agrees (zero std) on purpose.
REWARDS = [0.3, 1.7, -0.4, 0.9, 2.0, 0.0, 0.5, 0.25, 1.0, 1.0, 1.0, 1.0]


def rollout_inputs() -> list[dict]:
    return [{"prompt": PROMPTS[i // GROUP], "r": REWARDS[i]} for i in range(len(REWARDS))]


@pytest.fixture(scope="module")
def grpo(tokenizer, reference_dir, tmp_path_factory) -> GRPOTrainer:
    dataset = Dataset.from_dict({"prompt": PROMPTS, "r": [0.0] * len(PROMPTS)})
    args = GRPOConfig(**common_args(tmp_path_factory), per_device_train_batch_size=len(REWARDS),
                      num_generations=GROUP, max_completion_length=8, beta=0.04)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=policy(reference_dir), reward_funcs=reward_from_column, args=args,
                              train_dataset=dataset, processing_class=tokenizer)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop; one micro-batch here
    return trainer


@pytest.fixture(scope="module")
def rloo(tokenizer, reference_dir, tmp_path_factory) -> RLOOTrainer:
    dataset = Dataset.from_dict({"prompt": PROMPTS, "r": [0.0] * len(PROMPTS)})
    args = RLOOConfig(**common_args(tmp_path_factory), per_device_train_batch_size=len(REWARDS),
                      num_generations=GROUP, max_completion_length=6, beta=0.05, epsilon=0.2, epsilon_high=0.28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = RLOOTrainer(model=policy(reference_dir), reward_funcs=reward_from_column, args=args,
                              train_dataset=dataset, processing_class=tokenizer)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def token_logps(model, input_ids, attention_mask, scored, fused: bool = True) -> torch.Tensor:
    """log pi(input_ids[:, t + 1] | prefix) for t in [0, T - 1), zero where `scored[:, t + 1]` is 0.

    fused=True goes through the model's forward as TRL patched it (`add_fused_lm_head`), which every TRL trainer
    here uses for its own log-probs: it computes the log-softmax in float32 whatever the model's dtype, so using it
    on our side too keeps the comparison of the losses at float64 precision. fused=False is a plain float64
    forward, used once to check that both read the same tokens (test_log_probs_are_those_of_a_plain_forward).
    """
    if fused:
        labels = input_ids.masked_fill(scored == 0, -100)
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True).log_probs
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    logps = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return logps * scored[:, 1:]


def completion_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask, fused=True) -> torch.Tensor:
    """Per-token log pi(completion token), [batch, completion width], zero off the completion mask."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    scored = torch.cat([torch.zeros_like(prompt_mask), completion_mask], dim=1)
    return token_logps(model, input_ids, attention_mask, scored, fused)[:, -completion_ids.shape[1]:]


def gradients(model) -> list[torch.Tensor]:
    grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return grads


def assert_same_gradients(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    """Same gradients to 1e-6 of the largest gradient entry: the fused LM head's backward runs in float32."""
    assert len(ours) == len(theirs) > 0
    scale = max(1.0, max(g.abs().max().item() for g in theirs))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * scale)


# ---------------------------------------------------------------- GRPO


@pytest.mark.parametrize(("scale_rewards", "normalize"), [("group", "group_std"), ("batch", "batch_std"),
                                                          ("none", "none")])
def test_grpo_group_advantages(grpo, scale_rewards, normalize) -> None:
    """`GRPOTrainer._generate_and_score_completions` (grpo_trainer.py L2761-2787: group mean, nanstd, + 1e-4)
    against `group_advantages(..., eps=1e-4)`; the generation itself runs on the tiny model."""
    grpo.scale_rewards = scale_rewards
    torch.manual_seed(0)
    output = grpo._generate_and_score_completions(rollout_inputs())
    rewards = torch.tensor(REWARDS, dtype=torch.float32)  # TRL holds rewards in float32
    ours = group_advantages(rewards, GROUP, normalize, eps=1e-4)
    close(ours, output["advantages"])
    assert torch.all(ours[-GROUP:] == 0)  # the agreeing group carries no signal


def grpo_batch(model, seed: int) -> dict[str, torch.Tensor]:
    """A hand-built GRPO batch: fixed-length prompts, right-padded completions of lengths 5, 2, 7, 4, with
    old log-probs set +-0.5 off the current ones, so that ratios pass both clip bounds, and reference log-probs
    set at random near them."""
    g = gen(seed)
    batch, prompt_len, width = 4, 3, 7
    prompt_ids = torch.randint(2, VOCAB, (batch, prompt_len), generator=g)
    completion_ids = torch.randint(2, VOCAB, (batch, width), generator=g)
    lengths = torch.tensor([5, 2, 7, 4])
    completion_mask = (torch.arange(width)[None] < lengths[:, None]).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, PAD)
    prompt_mask = torch.ones_like(prompt_ids)
    with torch.no_grad():
        logps = completion_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    noise = lambda: 0.05 * torch.randn(batch, width, generator=g, dtype=torch.float64)  # noqa: E731
    offset = 0.5 * (-1.0) ** torch.arange(batch * width, dtype=torch.float64).view(batch, width)  # ratios e^-+0.5
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.3, -0.7, 0.4, -1.1], dtype=torch.float64),
        "old_per_token_logps": (logps + offset + noise()) * completion_mask,
        "ref_per_token_logps": (logps + 8 * noise()) * completion_mask,
        "num_items_in_batch": completion_mask.sum(),
    }


GRPO_AGGREGATIONS = [("grpo", "sequence_mean"), ("bnpo", "token_mean"), ("dapo", "token_mean"),
                     ("dr_grpo", "constant")]


@pytest.mark.parametrize(("loss_type", "aggregation"), GRPO_AGGREGATIONS)
@pytest.mark.parametrize(("eps_low", "eps_high", "beta", "dual_clip", "kl_is_weighted"),
                         [(0.2, 0.2, 0.0, None, False), (0.2, 0.28, 0.04, None, False),
                          (0.1, 0.3, 0.1, 1.5, False), (0.2, 0.28, 0.04, None, True)])
def test_grpo_loss(grpo, loss_type, aggregation, eps_low, eps_high, beta, dual_clip, kl_is_weighted) -> None:
    """`GRPOTrainer._compute_loss` (grpo_trainer.py L3020-3290) against ppo_policy_loss + beta * k3 KL, with the
    loss type's aggregation; clip-higher through epsilon_low/epsilon_high; TRL's two-sided clip `delta`
    (INTELLECT-2) equals our dual clip when delta > 1 + epsilon_high. Loss, clip fractions and gradients.

    The KL term matches with `use_bias_correction_kl=False` (Shao et al.'s GRPO). TRL 1.16 defaults it to True
    (DeepSeek-V3.2): the k3 term is multiplied by the ratio pi / pi_old (L3104-3105), which we compose from
    kl_estimate and the ratio; losses.py has no option for it."""
    grpo.loss_type, grpo.epsilon_low, grpo.epsilon_high, grpo.beta = loss_type, eps_low, eps_high, beta
    grpo.args.delta, grpo.args.use_bias_correction_kl = dual_clip, kl_is_weighted
    grpo._metrics["train"].clear()
    model = grpo.model
    inputs = grpo_batch(model, seed=sum(map(ord, loss_type)) + int(100 * eps_high) + int(100 * beta))

    theirs = grpo._compute_loss(model, inputs)
    theirs.backward()
    their_grads = gradients(model)

    mask = inputs["completion_mask"]
    logps = completion_logps(model, inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"], mask)
    advantages = inputs["advantages"][:, None].expand_as(logps)
    constant = grpo.max_completion_length * logps.shape[0] if aggregation == "constant" else None
    ours, stats = ppo_policy_loss(logps, inputs["old_per_token_logps"], advantages, mask, eps_low=eps_low,
                                  eps_high=eps_high, dual_clip=dual_clip, aggregation=aggregation, constant=constant)
    if beta:
        kl = kl_estimate(logps, inputs["ref_per_token_logps"], "k3")
        if kl_is_weighted:
            kl = kl * torch.exp(logps - inputs["old_per_token_logps"])
        ours = ours + beta * aggregate_loss(kl, mask, aggregation, constant)
        close(aggregate_loss(kl, mask, "token_mean"), torch.tensor(grpo._metrics["train"]["kl"][-1]))
    ours.backward()

    close(ours, theirs)
    assert_same_gradients(gradients(model), their_grads)
    metrics = grpo._metrics["train"]
    close(stats["clip_fraction_low"], torch.tensor(metrics["clip_ratio/low_mean"][-1]))
    close(stats["clip_fraction_high"], torch.tensor(metrics["clip_ratio/high_mean"][-1]))
    assert metrics["clip_ratio/low_mean"][-1] > 0 and metrics["clip_ratio/high_mean"][-1] > 0


def test_log_probs_are_those_of_a_plain_forward(grpo) -> None:
    """The fused log-probs both sides use are the plain float64 forward's, to float32 precision."""
    inputs = grpo_batch(grpo.model, seed=3)
    args = (grpo.model, inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"],
            inputs["completion_mask"])
    with torch.no_grad():
        trl_logps, _, _ = grpo._get_per_token_logps_and_entropies(
            grpo.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].shape[1])
        close(completion_logps(*args), trl_logps * inputs["completion_mask"], tol=0)
        close(completion_logps(*args, fused=False), trl_logps * inputs["completion_mask"], tol=1e-5)


def test_dr_grpo_constant_is_max_completion_length_not_batch_width(grpo) -> None:
    """Dr. GRPO divides by max_completion_length (8) times the batch, not by the padded width (7)."""
    grpo.loss_type, grpo.epsilon_low, grpo.epsilon_high, grpo.beta = "dr_grpo", 0.2, 0.2, 0.0
    grpo.args.delta = None
    inputs = grpo_batch(grpo.model, seed=5)
    with torch.no_grad():
        theirs = grpo._compute_loss(grpo.model, inputs)
        mask = inputs["completion_mask"]
        logps = completion_logps(grpo.model, inputs["prompt_ids"], inputs["prompt_mask"],
                                 inputs["completion_ids"], mask)
        args = (logps, inputs["old_per_token_logps"], inputs["advantages"][:, None].expand_as(logps), mask)
        batch, width = logps.shape
        assert width < grpo.max_completion_length
        close(ppo_policy_loss(*args, aggregation="constant", constant=grpo.max_completion_length * batch)[0], theirs)
        assert not torch.allclose(ppo_policy_loss(*args, aggregation="constant", constant=width * batch)[0], theirs)


# ---------------------------------------------------------------- RLOO


@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_rloo_advantages_with_k1_reward_penalty(rloo, beta) -> None:
    """`RLOOTrainer._generate_and_score_completions` (rloo_trainer.py L1663-1699): the sequence-summed k1 KL
    (log pi_old - log pi_ref) is subtracted from the reward, then each sample's baseline is the mean of the
    other k-1 rewards of its prompt. Against rewards - beta * sum_t kl_estimate(k1), then rloo_advantages."""
    rloo.beta = beta
    torch.manual_seed(1)
    output = rloo._generate_and_score_completions(rollout_inputs())
    mask = output["completion_mask"]
    with torch.no_grad():
        args = (output["prompt_ids"], output["prompt_mask"], output["completion_ids"], mask)
        logps, ref_logps = completion_logps(rloo.model, *args), completion_logps(rloo.ref_model, *args)
    rewards = torch.tensor(REWARDS, dtype=torch.float32).double()
    if beta:
        rewards = rewards - beta * (kl_estimate(logps, ref_logps, "k1") * mask).sum(-1)
        assert (kl_estimate(logps, ref_logps, "k1") * mask).abs().sum() > 0  # policy and reference differ
    close(rloo_advantages(rewards, GROUP), output["advantages"])
    close(logps.sum(-1), output["old_logps"])


def test_rloo_sequence_level_clipped_loss(rloo) -> None:
    """`RLOOTrainer._compute_loss` (rloo_trainer.py L1794-1835) clips the sequence-level ratio and averages over
    sequences: ppo_policy_loss on [batch, 1] sequence log-probs with clip-higher (0.2 / 0.28)."""
    rloo.beta = 0.0
    torch.manual_seed(2)
    inputs = rloo._generate_and_score_completions(rollout_inputs())
    g = gen(3)
    inputs["advantages"] = torch.randn(len(REWARDS), generator=g, dtype=torch.float64)
    inputs["old_logps"] = inputs["old_logps"] + 0.4 * torch.randn(len(REWARDS), generator=g, dtype=torch.float64)
    model = rloo.model
    rloo._metrics["train"].clear()

    theirs = rloo._compute_loss(model, inputs)
    theirs.backward()
    their_grads = gradients(model)

    mask = inputs["completion_mask"]
    seq_logps = completion_logps(model, inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"],
                                 mask).sum(-1, keepdim=True)
    ours, stats = ppo_policy_loss(seq_logps, inputs["old_logps"][:, None], inputs["advantages"][:, None],
                                  torch.ones_like(seq_logps), eps_low=0.2, eps_high=0.28)
    ours.backward()
    close(ours, theirs)
    assert_same_gradients(gradients(model), their_grads)
    metrics = rloo._metrics["train"]
    close(stats["clip_fraction_low"], torch.tensor(metrics["clip_ratio/low_mean"][-1]))
    close(stats["clip_fraction_high"], torch.tensor(metrics["clip_ratio/high_mean"][-1]))
    assert stats["clip_fraction_low"] > 0 and stats["clip_fraction_high"] > 0


# ---------------------------------------------------------------- DPO


@pytest.fixture(scope="module")
def dpo(tokenizer, reference_dir, tmp_path_factory) -> DPOTrainer:
    dataset = Dataset.from_dict({"prompt": ["w2 w3"], "chosen": [" w4 w5"], "rejected": [" w6"]})
    args = DPOConfig(**common_args(tmp_path_factory), per_device_train_batch_size=2, beta=0.1)
    ref_model = LlamaForCausalLM.from_pretrained(reference_dir, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=policy(reference_dir), ref_model=ref_model, args=args, train_dataset=dataset,
                             processing_class=tokenizer)
    trainer.model.train()
    return trainer


def preference_batch(seed: int, chosen_first: bool = True) -> dict[str, torch.Tensor]:
    """[chosen rows; rejected rows]: prompts of 3 tokens, completions of 2 to 6 tokens, right padding."""
    g = gen(seed)
    pairs, prompt_len, width = 3, 3, 9
    input_ids = torch.randint(2, VOCAB, (2 * pairs, width), generator=g)
    input_ids[pairs:, :prompt_len] = input_ids[:pairs, :prompt_len]  # a pair shares its prompt
    ends = prompt_len + torch.tensor([6, 2, 4, 3, 5, 2])
    positions = torch.arange(width)[None]
    attention_mask = (positions < ends[:, None]).long()
    completion_mask = attention_mask * (positions >= prompt_len)
    input_ids = input_ids.masked_fill(attention_mask == 0, PAD)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
    if not chosen_first:
        batch = {k: torch.cat([v[pairs:], v[:pairs]]) for k, v in batch.items()}
    return batch


def sequence_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed completion log-probs, and (chosen, rejected) completion lengths."""
    logps = token_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    chosen, rejected = logps.sum(-1).chunk(2)
    return chosen, rejected, *batch["completion_mask"].sum(-1).double().chunk(2)


def dpo_call(trainer: DPOTrainer, batch, loss_type: str, beta: float) -> torch.Tensor:
    trainer.loss_types, trainer.loss_weights, trainer.beta = [loss_type], [1.0], beta
    return trainer._compute_loss(trainer.model, dict(batch), return_outputs=False)


def our_dpo(trainer: DPOTrainer, batch, **kwargs):
    policy_chosen, policy_rejected, chosen_len, rejected_len = sequence_logps(trainer.model, batch)
    with torch.no_grad():
        ref_chosen, ref_rejected, _, _ = sequence_logps(trainer.ref_model, batch)
    return (policy_chosen, policy_rejected, ref_chosen, ref_rejected), (chosen_len, rejected_len), kwargs


@pytest.mark.parametrize("variant", ["sigmoid", "hinge"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_sigmoid_and_hinge(dpo, variant, beta) -> None:
    """`DPOTrainer._compute_loss` (dpo_trainer.py L1285-1612) loss_type sigmoid / hinge against dpo_loss:
    loss, gradients, and the logged implicit rewards and reward accuracy."""
    batch = preference_batch(seed=int(beta * 10))
    dpo._metrics["train"].clear()
    theirs = dpo_call(dpo, batch, variant, beta)
    theirs.backward()
    their_grads = gradients(dpo.model)

    logps, _, _ = our_dpo(dpo, batch)
    ours, stats = dpo_loss(*logps, beta=beta, variant=variant)
    ours.backward()
    close(ours, theirs)
    assert_same_gradients(gradients(dpo.model), their_grads)
    metrics = dpo._metrics["train"]
    close(stats["chosen_reward"], torch.tensor(metrics["rewards/chosen"][-1]))
    close(stats["rejected_reward"], torch.tensor(metrics["rewards/rejected"][-1]))
    close(stats["reward_accuracy"], torch.tensor(metrics["rewards/accuracies"][-1]))


@pytest.mark.parametrize("label_smoothing", [0.1, 0.3])
def test_dpo_label_smoothing_is_cdpo_from_two_trl_calls(dpo, label_smoothing) -> None:
    """TRL 1.16's `"sigmoid"` ignores `label_smoothing` (it serves `"robust"`, `"exo_pair"`, `"aot"`). Our
    conservative DPO (Mitchell 2023) is (1 - e) DPO(y_w > y_l) + e DPO(y_l > y_w): two TRL sigmoid calls, the
    second with chosen and rejected swapped."""
    beta = 0.2
    forward = dpo_call(dpo, preference_batch(seed=7), "sigmoid", beta)
    swapped = dpo_call(dpo, preference_batch(seed=7, chosen_first=False), "sigmoid", beta)
    theirs = (1 - label_smoothing) * forward + label_smoothing * swapped
    theirs.backward()
    their_grads = gradients(dpo.model)

    logps, _, _ = our_dpo(dpo, preference_batch(seed=7))
    ours, _ = dpo_loss(*logps, beta=beta, label_smoothing=label_smoothing)
    ours.backward()
    close(ours, theirs)
    assert_same_gradients(gradients(dpo.model), their_grads)


def test_dpo_ipo_averages_log_ratios_per_token(dpo) -> None:
    """TRL's `"ipo"` (dpo_trainer.py L1393-1404) divides each sequence log-ratio by its completion length before
    Azar et al.'s (h - 1/(2 beta))^2; our dpo_loss takes whatever sequence log-probs it is given. So TRL's value
    is ours on per-token-averaged log-probs, and differs from ours on summed ones."""
    beta = 0.1
    batch = preference_batch(seed=11)
    theirs = dpo_call(dpo, batch, "ipo", beta)
    theirs.backward()
    their_grads = gradients(dpo.model)

    (pc, pr, rc, rr), (chosen_len, rejected_len), _ = our_dpo(dpo, batch)
    assert not torch.equal(chosen_len, rejected_len)
    ours, _ = dpo_loss(pc / chosen_len, pr / rejected_len, rc / chosen_len, rr / rejected_len, beta=beta,
                       variant="ipo")
    ours.backward()
    close(ours, theirs)
    assert_same_gradients(gradients(dpo.model), their_grads)
    with torch.no_grad():
        summed, _ = dpo_loss(pc, pr, rc, rr, beta=beta, variant="ipo")
    assert not torch.allclose(summed, theirs.detach(), rtol=1e-3)


# ---------------------------------------------------------------- reward model


@pytest.fixture(scope="module")
def reward_trainer(tokenizer, tmp_path_factory) -> RewardTrainer:
    torch.manual_seed(4)
    model = LlamaForSequenceClassification(llama_config(num_labels=1)).double()
    dataset = Dataset.from_dict({"chosen": ["w2 w3"], "rejected": ["w4"]})
    args = RewardConfig(**common_args(tmp_path_factory), per_device_train_batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.model.train()
    return trainer


@pytest.mark.parametrize("with_margin", [False, True])
def test_reward_model_bradley_terry(reward_trainer, with_margin) -> None:
    """`RewardTrainer.compute_loss` (reward_trainer.py L778-793): -log sigmoid(r_w - r_l [- margin]), mean."""
    batch = preference_batch(seed=13)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    margin = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)
    if with_margin:
        inputs["margin"] = margin
    model = reward_trainer.model
    theirs = reward_trainer.compute_loss(model, dict(inputs))
    theirs.backward()
    their_grads = gradients(model)

    rewards = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.squeeze(-1)
    chosen, rejected = rewards.chunk(2)
    ours = bradley_terry_loss(chosen, rejected, margin if with_margin else 0.0)
    ours.backward()
    close(ours, theirs)
    assert_same_gradients(gradients(model), their_grads)


# ---------------------------------------------------------------- PPO: lines copied from trl 0.29.1
# PPO left TRL in 1.0. In trl 0.29.1 (its last release), trl/experimental/ppo/ppo_trainer.py computes the KL reward
# penalty, GAE, the value loss and the policy loss inline in `PPOTrainer.train`, which needs a reward model, a
# value model and a generation loop to run, so the exact lines are copied here; `args.*` are TRL's PPOConfig fields.


class PPOArgs:
    gamma, lam, cliprange, cliprange_value = 1.0, 0.95, 0.2, 0.2
    kl_estimator, kl_coef = "k3", 0.05


def trl_masked_mean(values, mask, axis=None):
    # trl 0.29.1, trl/experimental/ppo/ppo_trainer.py L246-251 (`masked_mean`), verbatim
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    else:
        return (values * mask).sum() / mask.sum()


def trl_gae(rewards, values, args, gen_length):
    # trl 0.29.1, trl/experimental/ppo/ppo_trainer.py L783-792, verbatim (before the whitening of L793)
    lastgaelam = 0
    advantages_reversed = []
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + args.gamma * nextvalues - values[:, t]
        lastgaelam = delta + args.gamma * args.lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    return advantages, returns


def ppo_rollout(seed: int):
    """Right-padded responses of lengths 6, 3, 8, 1 (width 8); mask 1 on response tokens."""
    g = gen(seed)
    lengths = torch.tensor([6, 3, 8, 1])
    mask = torch.arange(8)[None] < lengths[:, None]
    randn = lambda: torch.randn(4, 8, generator=g, dtype=torch.float64)  # noqa: E731
    return mask, lengths, randn


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0)])
def test_ppo_gae(gamma, lam) -> None:
    """GAE: TRL's loop runs over the whole padded width with values and rewards zeroed on padding (its
    `masked_fill(values, padding_mask_p1, 0)`, L765); on the response tokens it equals gae_advantages."""
    mask, _, randn = ppo_rollout(seed=17)
    rewards, values = randn() * mask, randn()
    args = PPOArgs()
    args.gamma, args.lam = gamma, lam
    trl_advantages, trl_returns = trl_gae(rewards, values.masked_fill(~mask, 0), args, gen_length=mask.shape[1])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    close(advantages, trl_advantages * mask)
    close(returns, trl_returns * mask)


def test_ppo_score_placement_convention() -> None:
    """TRL's PPO adds the score at `sequence_lengths_p1`, one token after the last response token (L773-775),
    keeps the value of that position (`padding_mask_p1`, L764-765), and zeroes the KL on padding through
    INVALID_LOGPROB (L761-762): its GAE is ours with the mask extended by one token, and its per-token reward
    is -kl_coef * kl_estimate on the response."""
    mask, lengths, randn = ppo_rollout(seed=19)
    values, logprobs, ref_logprobs = randn(), -randn().abs(), -randn().abs()
    scores = torch.tensor([1.0, -0.5, 2.0, 0.3], dtype=torch.float64)
    sequence_lengths = lengths - 1  # index of the last response token, as TRL's first_true_indices(...) - 1
    responses = torch.zeros(4, 8, dtype=torch.long)
    args = PPOArgs()
    INVALID_LOGPROB = 1.0  # trl 0.29.1 L81
    # trl 0.29.1, trl/experimental/ppo/ppo_trainer.py L759-765 and L769-775, verbatim
    response_idxs = torch.arange(responses.shape[1], device=responses.device).repeat(responses.shape[0], 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
    values_trl = torch.masked_fill(values, padding_mask_p1, 0)  # TRL reassigns `values`
    logr = ref_logprobs - logprobs
    kl = -logr if args.kl_estimator == "k1" else (logr.exp() - 1) - logr  # Else statement is k3
    non_score_reward = -args.kl_coef * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0), device=rewards.device)
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    rewards[actual_start, actual_end] += scores
    trl_advantages, trl_returns = trl_gae(rewards, values_trl, args, gen_length=responses.shape[1])

    close(non_score_reward, -args.kl_coef * kl_estimate(logprobs, ref_logprobs, args.kl_estimator) * mask)
    mask_p1 = ~padding_mask_p1
    advantages, returns = gae_advantages(rewards, values, mask_p1, gamma=args.gamma, lam=args.lam)
    close(advantages, trl_advantages * mask_p1)
    close(returns, trl_returns * mask_p1)
    # with the mask on the response tokens only, the score after the EOS would be dropped: the layouts differ
    assert not torch.allclose(gae_advantages(rewards, values, mask, gamma=args.gamma, lam=args.lam)[0],
                              trl_advantages * mask)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_ppo_kl_reward_penalty(estimator) -> None:
    """PPO's per-token KL (L769-770; TRL's PPO accepted k1 and k3 only) equals kl_estimate."""
    _, _, randn = ppo_rollout(seed=23)
    logprobs, ref_logprobs = -randn().abs(), -randn().abs()
    args = PPOArgs()
    args.kl_estimator = estimator
    # trl 0.29.1 L769-770, verbatim
    logr = ref_logprobs - logprobs
    kl = -logr if args.kl_estimator == "k1" else (logr.exp() - 1) - logr  # Else statement is k3
    close(kl_estimate(logprobs, ref_logprobs, estimator), kl)


@pytest.mark.parametrize("cliprange", [0.1, 0.2])
def test_ppo_clipped_policy_loss(cliprange) -> None:
    """PPO's clipped surrogate (L838-842, token mean over the response) and its clip fraction (L848-850) equal
    ppo_policy_loss with eps_low = eps_high = cliprange; TRL's one clip fraction is our low + high."""
    mask, _, randn = ppo_rollout(seed=29)
    mb_logprobs, mb_advantage = -randn().abs(), randn()
    new_logprobs = mb_logprobs + 0.3 * randn()
    padding_mask = ~mask
    args = PPOArgs()
    args.cliprange = cliprange
    # trl 0.29.1 L837-842 and L848-850, verbatim
    logprobs_diff = new_logprobs - mb_logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - args.cliprange, 1.0 + args.cliprange)
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    pg_loss = trl_masked_mean(pg_loss_max, ~padding_mask)
    pg_clipfrac = trl_masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask)

    ours, stats = ppo_policy_loss(new_logprobs, mb_logprobs, mb_advantage, mask, eps_low=cliprange, eps_high=cliprange)
    close(ours, pg_loss)
    close(stats["clip_fraction_low"] + stats["clip_fraction_high"], pg_clipfrac)
    assert pg_clipfrac > 0


@pytest.mark.parametrize("cliprange_value", [0.1, 0.5])
def test_ppo_clipped_value_loss(cliprange_value) -> None:
    """PPO's value loss (L825-833): 0.5 * masked mean of max((V - R)^2, (clip(V, V_old +- c) - R)^2)."""
    mask, _, randn = ppo_rollout(seed=31)
    mb_values, mb_return = randn(), randn()
    vpred = mb_values + 0.5 * randn()
    padding_mask_p1 = ~mask
    args = PPOArgs()
    args.cliprange_value = cliprange_value
    # trl 0.29.1 L825-833, verbatim
    vpredclipped = torch.clamp(
        vpred,
        mb_values - args.cliprange_value,
        mb_values + args.cliprange_value,
    )
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * trl_masked_mean(vf_loss_max, ~padding_mask_p1)

    close(value_loss(vpred, mb_values, mb_return, mask, clip_range=cliprange_value), vf_loss)
    assert not torch.allclose(value_loss(vpred, mb_values, mb_return, mask, clip_range=None), vf_loss)
