"""The agent loop and its trajectories, on real transformers models: a tiny Llama trained here
to replay an expert's tool-using episode (with ids no tokenizer would produce from its text),
and the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from components.agents.envs import EnvConfig, demonstration, make_env
from components.agents.loop import (AgentLimits, observation_ids, opening_messages, reflection_prompt_ids, run_episodes,
                                   run_trials, run_trials_batched)
from components.agents.memory import EpisodicMemory
from components.agents.tools import render_prompt_ids
from components.agents.trajectory import Trajectory, replay, rollout_of
from components.errors import ConfigError, DataError
from components.models.factory import ModelConfig, build_causal_lm
from components.tasks.big_arithmetic import BigArithmeticConfig

EASY = EnvConfig(arithmetic=BigArithmeticConfig(digits=2, min_steps=1, max_steps=1))  # one calculator call
LIMITS = AgentLimits(max_turns=3, max_new_tokens_per_turn=80, max_episode_tokens=1024)
TRAINED_SEED = 0


def non_canonical(tokenizer, ids: list[int]) -> list[int]:
    """`ids` with its first splittable token replaced by two tokens whose text is the same but
    which the tokenizer merges back when the text is encoded again."""
    vocab = tokenizer.get_vocab()
    for index, token in enumerate(tokenizer.convert_ids_to_tokens(ids)):
        for cut in range(1, len(token)):
            if token[:cut] in vocab and token[cut:] in vocab:
                split = ids[:index] + [vocab[token[:cut]], vocab[token[cut:]]] + ids[index + 1:]
                if tokenizer(tokenizer.decode(split), add_special_tokens=False)["input_ids"] != split:
                    return split
    raise AssertionError("no token of the turn can be split into two that re-merge")


def expert_episode(tokenizer, seed: int) -> tuple[list[int], list[int], list[dict]]:
    """(ids, policy mask, messages) of the expert's demonstration for `seed` as the loop's
    context would hold it, its first tool call's ids made non-canonical."""
    env = make_env("arithmetic", EASY)
    demo = demonstration(env, seed)
    messages = opening_messages(tokenizer, env, env.reset(seed)[0], [])
    ids = render_prompt_ids(tokenizer, messages, env.registry)
    mask = [0] * len(ids)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for message in demo[2:]:
        if message["role"] == "assistant":
            turn = tokenizer(message["content"], add_special_tokens=False)["input_ids"]
            policy = (turn if any(mask) else non_canonical(tokenizer, turn)) + [end_of_turn]
            ids, mask = ids + policy, mask + [1] * len(policy)
        else:
            observed = observation_ids(tokenizer, messages, policy, message)
            ids, mask = ids + observed, mask + [0] * len(observed)
        messages.append(message)
    return ids, mask, messages


def memorize(model, ids: list[int], mask: list[int], margin: float = 2.0, max_steps: int = 400) -> None:
    """Train `model` until greedy decoding reproduces every masked id of `ids` with a logit
    margin of at least `margin` over the runner-up."""
    inputs, targets = torch.tensor([ids]), torch.tensor(ids[1:])
    where = torch.tensor(mask[1:]).bool()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(max_steps):
        logits = model(input_ids=inputs).logits[0, :-1][where]
        target_logits = logits.gather(1, targets[where][:, None]).squeeze(1)
        runner_up = logits.scatter(1, targets[where][:, None], float("-inf")).max(-1).values
        if bool((target_logits - runner_up > margin).all()):
            return
        loss = torch.nn.functional.cross_entropy(logits, targets[where])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    raise AssertionError(f"the tiny policy did not memorize the episode in {max_steps} steps")


@pytest.fixture(scope="module")
def expert_policy(tiny_llama_dir):
    """(policy, tokenizer, expert ids, expert mask, expert messages): a tiny Llama (context 1024)
    trained on the expert's episode for TRAINED_SEED."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids, mask, messages = expert_episode(tokenizer, TRAINED_SEED)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # faster than contending for the 2 shared cores
    try:
        torch.manual_seed(0)
        policy = build_causal_lm(ModelConfig(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                                             intermediate_size=128, max_position_embeddings=1024), tokenizer)
        memorize(policy, ids, mask)
    finally:
        torch.set_num_threads(threads)
    return policy.eval(), tokenizer, ids, mask, messages


def episodes(policy, tokenizer, seeds: list[int], limits: AgentLimits = LIMITS) -> list[Trajectory]:
    return run_episodes(policy, tokenizer, [make_env("arithmetic", EASY) for _ in seeds], seeds, limits, 0.0)


def test_trajectory_keeps_the_sampled_ids_that_re_tokenising_would_change(expert_policy):
    policy, tokenizer, ids, mask, messages = expert_policy
    (trajectory,) = episodes(policy, tokenizer, [TRAINED_SEED])
    first = trajectory.turns[0].policy_ids[:-1]  # without its end-of-turn id
    assert tokenizer(tokenizer.decode(first), add_special_tokens=False)["input_ids"] != first
    assert trajectory.ids() == ids and trajectory.policy_mask() == mask
    assert [t.tool_call["name"] if t.tool_call else None for t in trajectory.turns] == ["calculator", None]
    assert trajectory.final_reward == 1.0 and trajectory.limit_hit is None
    # the context is, as text, the chat template's rendering of the conversation (less the newline ChatML
    # writes after the last end-of-turn id, which nothing samples after the final answer)
    assert tokenizer.decode(trajectory.ids()) + "\n" == tokenizer.apply_chat_template(messages, tokenize=False)
    observation = tokenizer.decode(trajectory.turns[0].observation_ids)
    assert observation == (f"\n<|im_start|>tool\n<tool_response>\n{trajectory.turns[0].tool_output}\n"
                           "</tool_response><|im_end|>\n<|im_start|>assistant\n")

    rollout = rollout_of([trajectory], tokenizer.pad_token_id)
    assert rollout.input_ids[0].tolist() == ids
    completion = rollout.completion_mask[0].tolist()
    assert completion == [float(m) for m in mask[rollout.prompt_width:]]
    observed = range(len(trajectory.turns[0].policy_ids), len(trajectory.turns[0].policy_ids)
                     + len(trajectory.turns[0].observation_ids))
    assert all(completion[i] == 0 for i in observed)  # the tool's output is masked from the loss
    assert rollout.finished == [True] and rollout.texts == [trajectory.turns[-1].text]


def test_batched_episodes_equal_episodes_run_alone(expert_policy):
    policy, tokenizer, *_ = expert_policy
    seeds = [TRAINED_SEED, 7, 12]
    together = episodes(policy, tokenizer, seeds)
    alone = [episodes(policy, tokenizer, [seed])[0] for seed in seeds]
    assert [t.to_json() for t in together] == [t.to_json() for t in alone]
    rollout = rollout_of(together, tokenizer.pad_token_id)
    for row, trajectory in enumerate(together):
        real = rollout.attention_mask[row].bool()
        assert rollout.input_ids[row][real].tolist() == trajectory.ids()
        assert int(rollout.completion_mask[row].sum()) == sum(trajectory.policy_mask())


def test_limits_end_episodes_with_reward_zero_and_are_recorded(expert_policy):
    policy, tokenizer, *_ = expert_policy
    (one_turn,) = episodes(policy, tokenizer, [TRAINED_SEED], LIMITS.model_copy(update={"max_turns": 1}))
    assert one_turn.limit_hit == "turns" and len(one_turn.turns) == 1 and one_turn.turns[0].tool_call is not None
    assert one_turn.final_reward == 0.0 and rollout_of([one_turn], tokenizer.pad_token_id).finished == [False]
    prompt = len(one_turn.prompt_ids)
    budget = prompt + LIMITS.max_new_tokens_per_turn + 5  # room for one turn, not for a second
    (tokens,) = episodes(policy, tokenizer, [TRAINED_SEED], LIMITS.model_copy(update={"max_episode_tokens": budget}))
    assert tokens.limit_hit == "tokens" and len(tokens.turns) == 1 and tokens.final_reward == 0.0
    assert len(tokens.ids()) <= budget
    (no_room,) = episodes(policy, tokenizer, [TRAINED_SEED], LIMITS.model_copy(update={"max_episode_tokens": prompt}))
    assert no_room.limit_hit == "tokens" and no_room.turns == []
    past_context = LIMITS.model_copy(update={"max_episode_tokens": 4096, "max_new_tokens_per_turn": 1024 - prompt + 1})
    (context,) = episodes(policy, tokenizer, [TRAINED_SEED], past_context)
    assert context.limit_hit == "context" and context.turns == []
    (wall,) = episodes(policy, tokenizer, [TRAINED_SEED], LIMITS.model_copy(update={"max_wall_seconds": 1e-9}))
    assert wall.limit_hit == "wall_time" and wall.turns == []


def test_json_round_trip_and_replay_catches_tampering(expert_policy):
    policy, tokenizer, *_ = expert_policy
    (trajectory,) = episodes(policy, tokenizer, [TRAINED_SEED])
    record = json.loads(json.dumps(trajectory.to_json()))
    restored = Trajectory.from_json(record)
    assert restored == trajectory
    with pytest.raises(DataError, match="limit_hit"):
        Trajectory.from_json({**record, "limit_hit": "patience"})
    with pytest.raises(DataError, match="seed 0"):
        Trajectory.from_json({k: v for k, v in record.items() if k != "prompt_ids"})

    env = make_env("arithmetic", EASY)
    assert replay(restored, env) == [(t.observation, t.reward, i == 1) for i, t in enumerate(trajectory.turns)]
    tampered = copy.deepcopy(restored)
    tampered.turns[0].observation = str(int(tampered.turns[0].observation) + 1)
    with pytest.raises(DataError, match="turn 0"):
        replay(tampered, env)
    forged = copy.deepcopy(restored)
    forged.turns[-1].reward = 0.0
    with pytest.raises(DataError, match="turn 1"):
        replay(forged, env)


def test_observation_ids_refuse_a_template_that_does_not_render_turn_after_turn(expert_policy):
    _, tokenizer, *_ = expert_policy
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "calling"}]
    policy_ids = tokenizer("calling", add_special_tokens=False)["input_ids"]
    assert observation_ids(tokenizer, messages, policy_ids, {"role": "tool", "content": "4"})
    footer = copy.deepcopy(tokenizer)
    footer.chat_template = tokenizer.chat_template + "{{ 'Messages: ' + (messages | length | string) }}"
    with pytest.raises(ConfigError, match="tokenizer .*chat template"):
        observation_ids(footer, messages, policy_ids, {"role": "tool", "content": "4"})


def test_trials_carry_reflections_and_stop_at_success(expert_policy):
    policy, tokenizer, *_ = expert_policy
    env = make_env("arithmetic", EASY)
    solved = run_trials(policy, tokenizer, env, TRAINED_SEED, 3, LIMITS, 0.0)
    assert len(solved) == 1 and solved[0].final_reward == 1.0
    memory = EpisodicMemory()
    failed = run_trials(policy, tokenizer, env, 7, 2, LIMITS, 0.0, memory=memory, reflection_tokens=12)
    assert [t.final_reward for t in failed] == [0.0, 0.0]  # the tiny policy answers its one memorized task
    trials = memory.trials("arithmetic:7")
    assert [(t["trial"], t["success"]) for t in trials] == [(1, False), (2, False)]
    assert failed[0].reflections_used == [] and failed[1].reflections_used == [trials[0]["reflection"]]
    assert trials[0]["reflection"] in tokenizer.decode(failed[1].prompt_ids)
    # the reflection prompt on a transcript longer than the context keeps its latest part within it
    assert len(reflection_prompt_ids(tokenizer, failed[0], 10**6)) > 1024 - 12  # the whole transcript would not fit
    cut = reflection_prompt_ids(tokenizer, failed[0], 1024 - 12)
    reflection_prompt = tokenizer.decode(cut)
    assert len(cut) <= 1024 - 12
    assert failed[0].turns[-1].text in reflection_prompt and "# Tools" not in reflection_prompt


def test_trials_of_many_tasks_run_together_as_each_alone(expert_policy):
    """`run_trials_batched` decodes the tasks' episodes and reflections together: each task's
    trials are those it has alone (greedy, fp32), and each reflection's sampled count is what
    decoding its prompt alone samples (the evaluation charges that count, not the cap)."""
    from components.models.sampling import decode

    policy, tokenizer, *_ = expert_policy
    env = make_env("arithmetic", EASY)
    seeds = [TRAINED_SEED, 7, 8]
    together = run_trials_batched(policy, tokenizer, [copy.copy(env) for _ in seeds], seeds, 2, LIMITS, 0.0,
                                  reflection_tokens=12)
    for seed, (trials, reflections) in zip(seeds, together):
        alone = run_trials(policy, tokenizer, env, seed, 2, LIMITS, 0.0, reflection_tokens=12)
        assert [t.to_json() for t in trials] == [t.to_json() for t in alone]
        assert len(reflections) == len(trials) - 1  # after each failed trial but the last
        for failed, reflection in zip(trials, reflections):
            prompt = reflection_prompt_ids(tokenizer, failed, 1024 - 12)
            direct = decode(policy, tokenizer, [prompt], 1, 12, 0.0)
            assert (reflection.prompt_tokens, reflection.text) == (len(prompt), direct.texts[0].strip())
            assert reflection.sampled_tokens == int(direct.completion_mask.sum())
    assert [len(trials) for trials, _ in together] == [1, 2, 2]  # the memorized task is solved at once
    with pytest.raises(ConfigError, match=r"give the same task more than once \(arithmetic:7\)"):
        run_trials_batched(policy, tokenizer, [copy.copy(env) for _ in range(2)], [7, 7], 2, LIMITS, 0.0)


@pytest.mark.slow
def test_smollm2_runs_an_arithmetic_episode_with_tools(smollm2_artifact, record_property):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_artifact)
    policy = AutoModelForCausalLM.from_pretrained(smollm2_artifact).eval()
    env = make_env("arithmetic")
    limits = AgentLimits(max_turns=2, max_new_tokens_per_turn=48, max_episode_tokens=1024)
    (trajectory,) = run_episodes(policy, tokenizer, [env], [TRAINED_SEED], limits, 0.0)
    assert trajectory.turns and (trajectory.finished or trajectory.limit_hit == "turns")
    assert "calculator" in tokenizer.decode(trajectory.prompt_ids)  # the tools reached the model
    record_property("called_tool", any(t.tool_call for t in trajectory.turns))
    record_property("reward", trajectory.final_reward)
    replay(trajectory, make_env("arithmetic"))
    assert rollout_of([trajectory], tokenizer.pad_token_id).input_ids[0].tolist() == trajectory.ids()
