"""Agent evaluation on a real tiny model: the test split only, no tool reaches a no-tools episode,
every rate and cost is recounted from the transcripts, the reflection curve never falls, and the
existing test-time-compute comparison reads two agent evaluations (SFT and RL-trained) as is."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import pytest

from components.agents.envs import SPLIT_SEEDS, EnvConfig, make_env
from components.agents.trajectory import Trajectory, Turn
from components.artifacts import read_manifest
from components.eval.agents import (AgentEvalConfig, TaskRun, evaluate_agent, run_cost, solved, summary,
                                    without_tools)
from components.errors import DataError
from components.eval.compare import CompareConfig, _task_differences, compare_test_time_compute
from tests.conftest import build_tiny_lm, sft_on_records

TASKS, TRIALS = 4, 3
ANSWERS = [7, 8, 7, 9]  # the test problems' answers: an agent that always answers 7 solves half
LIMITS = {"max_turns": 2, "max_new_tokens_per_turn": 8, "max_episode_tokens": 1800}


def gsm8k_dir(root: Path) -> Path:
    """A GSM8K-format directory: three train problems and the four test problems of ANSWERS."""
    def problem(index: int, answer: int) -> str:
        return json.dumps({"question": f"Sam packs {index} boxes. How many apples are left?",
                           "answer": f"There are {answer} apples left.\n#### {answer}"}) + "\n"
    (root / "train.jsonl").write_text("".join(problem(i, 7) for i in range(3)), encoding="utf-8")
    (root / "test.jsonl").write_text("".join(problem(i, a) for i, a in enumerate(ANSWERS)), encoding="utf-8")
    return root


def agent_config(root: Path, **overrides) -> AgentEvalConfig:
    env = {"name": "gsm8k", "gsm8k_dir": str(root), "gsm8k_validation_problems": 1}
    return AgentEvalConfig.model_validate({"env": env, "tasks": TASKS, "trials": TRIALS,
                                           "temperature": 1.0, "limits": LIMITS, "reflection_max_new_tokens": 8,
                                           **overrides})


@pytest.fixture(scope="module")
def problems(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gsm8k_dir(tmp_path_factory.mktemp("gsm8k"))


@pytest.fixture(scope="module")
def tiny_agent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (positions for a prompt with the tools' schemas: the 400-token BPE is
    long-winded) fine-tuned to answer "The answer is 7." to anything."""
    root = tmp_path_factory.mktemp("agent-lm")
    records = [{"prompt": f"Question {i}: how many apples?", "completion": "The answer is 7."} for i in range(16)]
    return sft_on_records(root, build_tiny_lm(root, max_positions=2048), records)


@pytest.fixture(scope="module")
def evaluation(tiny_agent: Path, problems: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("agent-eval") / "eval"
    evaluate_agent(agent_config(problems), str(tiny_agent), str(dest))
    return dest


def transcripts(evaluation: Path) -> list[dict]:
    return [json.loads(line) for line in (evaluation / "transcripts.jsonl").read_text().splitlines()]


def by_task(records: list[dict], method: str) -> dict[int, list[Trajectory]]:
    """A method's trials per seed, in trial order, rebuilt from the transcripts."""
    tasks: dict[int, list[Trajectory]] = defaultdict(list)
    for record in sorted((r for r in records if r["method"] == method), key=lambda r: r["trial"]):
        tasks[record["trajectory"]["seed"]].append(Trajectory.from_json(record["trajectory"]))
    return tasks


def test_config_needs_a_named_environment_and_distinct_methods(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="env.name is required"):
        AgentEvalConfig.model_validate({"env": {}})
    with pytest.raises(ValueError, match="name a method twice"):
        agent_config(tmp_path, methods=["tools", "tools"])
    with pytest.raises(ValueError, match="methods"):
        agent_config(tmp_path, methods=["best_of_n"])
    with pytest.raises(ValueError, match="first_task 999999 \\+ tasks 4 runs past the test split"):
        agent_config(tmp_path, first_task=len(SPLIT_SEEDS["test"]) - 1)


STOP = 1


def turn(policy: int, observation: int, tool_call: bool = False, tool_error: bool = False, cut: bool = False) -> Turn:
    """A turn of `policy` sampled ids, the last the stop id unless the turn was `cut` at the token cap."""
    return Turn(policy_ids=[7] * (policy - 1) + [7 if cut else STOP], text="",
                tool_call={"name": "calculator", "arguments": {}} if tool_call else None, tool_output=None,
                tool_error="bad" if tool_error else None, observation="", observation_ids=[2] * observation, reward=0.0)


def test_costs_count_each_turn_rereading_its_context_and_the_curve_counts_any_success() -> None:
    """Task a: fails (2 turns: a tool call, then an error in a turn cut at the token cap), reflects,
    then succeeds in one turn; task b: fails three times at the turn limit. F(T) = 1000 + T makes
    the context length visible."""
    failed = Trajectory("arithmetic", 1, [0] * 10, [turn(5, 3, tool_call=True), turn(4, 0, tool_error=True, cut=True)],
                        0.0, "turns")
    success = Trajectory("arithmetic", 1, [0] * 12, [turn(6, 0)], 1.0)
    a = TaskRun([failed, success], [(40, 7)])
    b = TaskRun([failed, failed, failed], [(40, 7), (41, 8)])
    flops = lambda context: 1000.0 + context  # noqa: E731
    # task a's trial 1: turn 1 reads 10 and samples 5 (14 processed at T=15), turn 2 reads 18 and samples 4 (21 at T=22)
    trial_1 = (14 + 21, 9, 14 * 1015.0 + 21 * 1022.0)
    assert run_cost(a, 1, flops) == trial_1
    # after 2 trials: + the reflection (46 at T=47) + trial 2 (17 at T=18)
    assert run_cost(a, 2, flops) == (trial_1[0] + 46 + 17, 9 + 7 + 6, trial_1[2] + 46 * 1047.0 + 17 * 1018.0)
    assert [solved(a, k) for k in (1, 2, 3)] == [False, True, True] and not solved(b, 3)
    after_1, after_3 = (summary([a, b], k, flops, frozenset({STOP})) for k in (1, 3))
    assert (after_1["successes"], after_3["successes"]) == (0, 1)
    assert after_1["tokens_per_solved"] is None and after_3["success_ci95_low"] < 0.5 < after_3["success_ci95_high"]
    assert after_3["episodes"] == 5 and after_3["turns_per_task"] == (3 + 6) / 2
    assert after_3["tool_calls_per_task"] == after_3["tool_errors_per_task"] == (1 + 3) / 2
    assert after_3["limit_hits"] == after_3["limit_hits_turns"] == 4
    assert after_3["cut_turns_per_task"] == (1 + 3) / 2
    total = run_cost(a, 3, flops)[0] + run_cost(b, 3, flops)[0]
    assert after_3["tokens_per_task"] == total / 2 and after_3["tokens_per_solved"] == total


def test_the_no_tools_environment_refuses_a_call_the_tools_environment_runs() -> None:
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*7"}}\n</tool_call>'
    seed = SPLIT_SEEDS["test"][0]
    env = make_env("arithmetic", EnvConfig(name="arithmetic"))
    env.reset(seed)
    assert env.step(call)[0] == "84"
    bare = without_tools(EnvConfig(name="arithmetic"))
    bare.reset(seed)
    observation, reward, done, info = bare.step(call)
    assert "unknown tool 'calculator'" in observation and info["tool_call"] is None and not done
    assert "calculator" not in bare.instructions and "calculator" in env.instructions


def test_the_artifact_has_its_files_and_each_rate_its_interval(evaluation: Path) -> None:
    assert {p.name for p in evaluation.iterdir()} >= {"manifest.json", "metrics.json", "report.md",
                                                      "transcripts.jsonl", "accuracy_vs_compute.csv"}
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics == read_manifest(str(evaluation)).metrics
    for method in ("no_tools", "tools", "reflection"):
        rate = metrics[f"{method}_success_rate"]
        assert 0 <= metrics[f"{method}_success_ci95_low"] <= rate <= metrics[f"{method}_success_ci95_high"] <= 1
        assert metrics[f"{method}_tasks"] == TASKS and metrics[f"{method}_flops_per_task"] > 0
    report = (evaluation / "report.md").read_text()
    assert "| gsm8k | no_tools |" in report and "| gsm8k | reflection (k = 3) |" in report
    assert "Success after k reflection trials" in report


def test_only_test_split_seeds_are_used(evaluation: Path) -> None:
    records = transcripts(evaluation)
    expected = list(SPLIT_SEEDS["test"][:TASKS])
    for method in ("no_tools", "tools", "reflection"):
        assert sorted(by_task(records, method)) == expected


def test_success_counts_agree_with_the_transcripts_final_rewards(evaluation: Path) -> None:
    metrics = json.loads((evaluation / "metrics.json").read_text())
    records = transcripts(evaluation)
    for method in ("no_tools", "tools", "reflection"):
        tasks = by_task(records, method)
        successes = sum(any(t.final_reward == 1.0 for t in trials) for trials in tasks.values())
        assert metrics[f"{method}_successes"] == successes > 0  # the agent answers 7: it solves some tasks
        per_solved = metrics[f"{method}_tokens_per_task"] * TASKS / successes
        assert metrics[f"{method}_tokens_per_solved"] == pytest.approx(per_solved)
        turns = [turn for trials in tasks.values() for t in trials for turn in t.turns]
        assert metrics[f"{method}_turns_per_task"] == len(turns) / TASKS
        # every decode reads its whole context: prompt + earlier turns, then samples the turn's ids
        processed = 0
        for trials in tasks.values():
            for t in trials:
                context = len(t.prompt_ids)
                for step in t.turns:
                    processed += context + len(step.policy_ids) - 1
                    context += len(step.policy_ids) + len(step.observation_ids)
        reflections = sum(r["reflection_decode"][0] + r["reflection_decode"][1] - 1
                          for r in records if r["method"] == method and r["reflection_decode"])
        assert metrics[f"{method}_tokens_per_task"] == (processed + reflections) / TASKS


def test_no_tools_episodes_see_no_tool_and_answer_in_one_turn(evaluation: Path, tiny_agent: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_agent)
    records = transcripts(evaluation)
    for trials in by_task(records, "no_tools").values():
        (trajectory,) = trials
        assert len(trajectory.turns) <= 1
        assert all(t.tool_call is None and t.tool_output is None for t in trajectory.turns)
        assert "calculator" not in tokenizer.decode(trajectory.prompt_ids)
    tools_prompt = by_task(records, "tools")[SPLIT_SEEDS["test"][0]][0].prompt_ids
    assert "calculator" in tokenizer.decode(tools_prompt)  # the tools method does show its tool


def test_reflection_curve_never_falls_and_equals_the_recount(evaluation: Path) -> None:
    metrics = json.loads((evaluation / "metrics.json").read_text())
    tasks = by_task(transcripts(evaluation), "reflection")
    curve = [metrics[f"reflection_success_rate_after_{k}"] for k in range(1, TRIALS + 1)]
    assert curve == sorted(curve) and curve[-1] == metrics["reflection_success_rate"]
    for k in range(1, TRIALS + 1):
        recount = sum(any(t.final_reward == 1.0 for t in trials[:k]) for trials in tasks.values()) / TASKS
        assert curve[k - 1] == recount
    for trials in tasks.values():  # a task stops at its first success, and never runs more than k trials
        assert len(trials) <= TRIALS and all(t.final_reward == 0.0 for t in trials[:-1])
        assert len(trials) == TRIALS or trials[-1].final_reward == 1.0
    with open(evaluation / "accuracy_vs_compute.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    reflection_rows = [r for r in rows if r["method"] == "reflection (verifier)"]
    assert [float(r["accuracy"]) for r in reflection_rows] == curve
    assert [int(r["n"]) for r in reflection_rows] == list(range(1, TRIALS + 1))
    flops = [float(r["inference_flops"]) for r in reflection_rows]
    assert flops == sorted(flops)  # more trials never cost less


@pytest.fixture(scope="module")
def rl_agent(tiny_agent: Path, problems: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny agent trained two GRPO steps on the train problems (a model artifact with `training_flops`)."""
    from components.train.grpo import GRPOConfig, grpo

    root = tmp_path_factory.mktemp("rl-agent")
    config = GRPOConfig.model_validate({
        "train": {"max_steps": 2, "batch_size_rows": 2, "checkpoint_every_steps": 0,
                  "optim": {"learning_rate": 1e-2, "warmup_steps": 0}},
        "group_size": 2, "max_new_tokens": 8, "dynamic_sampling": False, "heldout": {"problems": 0}})
    grpo(config, str(tiny_agent), str(problems / "train.jsonl"), str(root / "model"))
    return root / "model"


def test_compare_reads_an_sft_and_an_rl_agent_evaluation(evaluation: Path, rl_agent: Path, problems: Path,
                                                         tmp_path: Path) -> None:
    rl_evaluation = tmp_path / "rl_eval"
    evaluate_agent(agent_config(problems, methods=["tools"]), str(rl_agent), str(rl_evaluation))
    manifest = compare_test_time_compute(CompareConfig(query_volumes=[10, 1000]), str(evaluation), str(tmp_path / "cmp"),
                                         rl_evaluation=str(rl_evaluation))
    training_flops = read_manifest(str(rl_agent)).metrics["training_flops"]
    assert training_flops > 0 and manifest.metrics["rl_training_flops"] == training_flops
    rl_tools = json.loads((rl_evaluation / "metrics.json").read_text())["tools_success_rate"]
    assert manifest.metrics["rl_single_sample_accuracy"] == rl_tools
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "RL vs best-of-n" in report and "reflection (verifier)" in report and "1,000 queries" in report

    # a later slice of the test split: other seeds, and compare refuses to set it against the first
    later = tmp_path / "rl_eval_later"
    evaluate_agent(agent_config(problems, methods=["tools"], first_task=TASKS), str(rl_agent), str(later))
    assert sorted(by_task(transcripts(later), "tools")) == list(SPLIT_SEEDS["test"][TASKS:2 * TASKS])
    assert f"(seeds {SPLIT_SEEDS['test'][TASKS]}..{SPLIT_SEEDS['test'][2 * TASKS - 1]})" in (later / "report.md").read_text()
    with pytest.raises(DataError, match=f"first_test_seed {SPLIT_SEEDS['test'][0]} vs {SPLIT_SEEDS['test'][TASKS]}"):
        compare_test_time_compute(CompareConfig(), str(evaluation), str(tmp_path / "cmp2"), rl_evaluation=str(later))
    assert not (tmp_path / "cmp2").exists()


def test_compare_names_each_way_two_evaluations_tasks_differ(evaluation: Path) -> None:
    """A real evaluation's manifest against itself with one thing changed: another environment
    setting, problem count, test slice or dataset is a difference; another tool set is not."""
    base = read_manifest(str(evaluation))

    def changed(**update: dict) -> list[str]:
        return _task_differences(base, base.model_copy(update=update))

    assert changed() == []
    assert changed(config={**base.config, "env": {**base.config["env"], "tools": []}}) == []
    assert changed(config={**base.config, "env": {**base.config["env"], "gsm8k_validation_problems": 2}})[0].startswith(
        "env settings")
    assert changed(metrics={**base.metrics, "first_test_seed": base.metrics["first_test_seed"] + 4}) == [
        f"first_test_seed {base.metrics['first_test_seed']} vs {base.metrics['first_test_seed'] + 4}"]
    assert changed(metrics={**base.metrics, "problems_used": 3}) == ["problems_used None vs 3"]
    model = base.inputs["model"]
    with_data = base.model_copy(update={"inputs": {"dataset": model}})
    other_data = base.model_copy(update={"inputs": {"dataset": model.model_copy(update={
        "uri": "other.jsonl", "content_hash": "sha256:" + "0" * 64})}})
    assert _task_differences(with_data, with_data) == []
    assert _task_differences(with_data, other_data) == [f"dataset {model.uri} vs other.jsonl"]


@pytest.mark.slow
@pytest.mark.parametrize("env", ["arithmetic", "lookup", "gsm8k"])
def test_smollm2_runs_each_environment_with_tools(smollm2_artifact: Path, env: str, tmp_path: Path) -> None:
    config = AgentEvalConfig.model_validate({"env": {"name": env}, "methods": ["tools"], "tasks": 2,
                                             "limits": {"max_turns": 2, "max_new_tokens_per_turn": 48,
                                                        "max_episode_tokens": 2048}})
    evaluate_agent(config, str(smollm2_artifact), str(tmp_path / "eval"))
    records = transcripts(tmp_path / "eval")
    assert [r["trajectory"]["seed"] for r in records] == list(SPLIT_SEEDS["test"][:2])
    for record in records:  # complete: ended by a final answer or a recorded limit, every turn's ids kept
        trajectory = Trajectory.from_json(record["trajectory"])
        assert trajectory.turns and all(t.policy_ids for t in trajectory.turns)
        assert trajectory.finished or trajectory.limit_hit in ("turns", "tokens", "wall_time", "context")


@pytest.mark.parametrize("flags, chosen", [("fpu avx2 avx512_bf16 amx_bf16", "bf16"), ("fpu avx2 fma", "fp32")])
def test_auto_precision_is_resolved_for_the_cpu_and_recorded(tiny_agent: Path, problems: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, flags: str,
                                                           chosen: str) -> None:
    """`precision: auto` decodes in bf16 on a CPU with a bf16 unit and in fp32 on one without (the
    CPU injected as a /proc/cpuinfo), and the artifact says which and why."""
    import torch

    from components.models import precision as precision_module

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n", encoding="utf-8")
    monkeypatch.setattr(precision_module, "CPUINFO", cpuinfo)
    precision_module.this_cpu_flags.cache_clear()
    matmuls = (torch.nn.functional.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)

    class AutocastAtMatmuls(torch.overrides.TorchFunctionMode):
        """Records whether bf16 autocast is on at each matmul the decoding runs."""

        def __init__(self) -> None:
            super().__init__()
            self.states: list[bool] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in matmuls:
                self.states.append(torch.is_autocast_enabled("cpu"))
            return func(*args, **(kwargs or {}))

    try:
        config = agent_config(problems, tasks=1, methods=["no_tools"], precision="auto")
        with AutocastAtMatmuls() as probe:
            metrics = evaluate_agent(config, str(tiny_agent), str(tmp_path / "eval")).metrics
    finally:
        precision_module.this_cpu_flags.cache_clear()
    assert probe.states and set(probe.states) == {chosen == "bf16"}
    assert metrics["precision"] == chosen and metrics["precision_reason"].startswith("auto: cpu has ")
    assert f"{chosen} (auto: cpu has" in (tmp_path / "eval" / "report.md").read_text()
