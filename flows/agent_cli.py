"""`crucible agent run`: one task of an environment, run by a model artifact as an agent, with
its transcript printed turn by turn (and, with --trials K, Reflexion's trials and reflections).

    crucible agent run --env arithmetic --model artifacts/agent_sft [--tools calculator python]
        [--trials 3] [--seed 2000000] [--max-turns 6] [--temperature 0] [--transcript FILE]

The seed picks the task (`components.agents.envs.SPLIT_SEEDS`: 0.. train, 1000000.. validation,
2000000.. test; the default is the first test task). --transcript writes the trials'
trajectories (token ids included) as JSON lines, which `components.agents.trajectory.replay`
re-runs against the environment.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from components.errors import ConfigError
from components.models.precision import precision_autocast, precision_for


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from components.agents.envs import DEFAULT_TOOLS, SPLIT_SEEDS

    actions = parser.add_subparsers(dest="agent_action", required=True, metavar="ACTION")
    run = actions.add_parser("run", help="Run one task as an agent and print the transcript.", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--env", required=True, choices=sorted(DEFAULT_TOOLS), help="The environment.")
    run.add_argument("--model", required=True, metavar="URI", help="A model artifact (or transformers directory).")
    run.add_argument("--tools", nargs="*", default=None, metavar="TOOL",
                     help="Tools the agent may call (calculator, search, python; none given: no tools; "
                          "default: the environment's own).")
    run.add_argument("--trials", type=int, default=1, help="Trials with reflection in between (default: 1).")
    run.add_argument("--seed", type=int, default=SPLIT_SEEDS["test"].start, help="The task's seed (default: %(default)s).")
    run.add_argument("--max-turns", type=int, default=6)
    run.add_argument("--max-new-tokens", type=int, default=128, help="Per turn (default: %(default)s).")
    run.add_argument("--temperature", type=float, default=0.0)
    run.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32",
                     help="bf16: decode under autocast; auto: bf16 where the CPU has a bf16 unit, else fp32.")
    run.add_argument("--transcript", metavar="FILE", help="Also write the trajectories as JSON lines.")


def transcript_lines(trajectory: Any, trial: int, tokenizer: Any) -> list[str]:
    """A trial as a reader follows it: the prompt's last user turn, then each turn's action
    and observation, then the outcome."""
    lines = [f"=== trial {trial}: {trajectory.env} seed {trajectory.seed}"]
    lines += [f"[reflection] {text}" for text in trajectory.reflections_used]
    lines.append(tokenizer.decode(trajectory.prompt_ids, skip_special_tokens=False).rstrip())
    for turn in trajectory.turns:
        lines.append(f"[assistant] {turn.text.strip()}")
        if turn.tool_call is not None or turn.tool_error is not None:
            lines.append(f"[tool] {turn.observation.strip()}")
    outcome = f"limit hit: {trajectory.limit_hit}" if trajectory.limit_hit else f"reward {trajectory.final_reward:g}"
    return lines + [f"=== {outcome}"]


def run(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoTokenizer

    from components.agents.envs import EnvConfig, make_env
    from components.agents.loop import AgentLimits, run_trials
    from components.models.factory import load_causal_lm

    if args.trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {args.trials}")
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"--model {args.model}: not a model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = load_causal_lm(model_dir, dtype=torch.float32)
    env = make_env(args.env, EnvConfig(name=args.env, tools=None if args.tools is None else tuple(args.tools)))
    limits = AgentLimits(max_turns=args.max_turns, max_new_tokens_per_turn=args.max_new_tokens)
    precision, reason = precision_for(args.precision, torch.device("cpu"))
    print(f"precision: {precision} ({reason})")
    with precision_autocast("cpu", precision):
        trials = run_trials(policy, tokenizer, env, args.seed, args.trials, limits, args.temperature)
    for index, trajectory in enumerate(trials, start=1):
        print("\n".join(transcript_lines(trajectory, index, tokenizer)))
    if args.transcript:
        Path(args.transcript).write_text("".join(json.dumps(t.to_json()) + "\n" for t in trials), encoding="utf-8")
    print(f"{args.env} seed {args.seed}: {'solved' if trials[-1].final_reward > 0 else 'not solved'} "
          f"in {len(trials)} trial(s), tools: {', '.join(env.tools) or 'none'}")
