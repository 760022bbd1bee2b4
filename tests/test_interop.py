"""The tools users already have read a Crucible model artifact as is: lm-evaluation-harness's
`hf` model on a local YAML task over a jsonl file, and transformers' `pipeline("text-generation")`.

Invariant: each tool reports what we compute ourselves from the same artifact (transformers'
forward and `generate`, and our own sampler), so "loads as is" means "gives the same numbers".
Nothing touches the network: the hub and datasets are offline and the task's data is a local file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from components.models.chat import prompt_ids
from components.models.importer import ImportModelConfig, import_model
from components.models.sampling import decode

# (question, choices, index of the right choice): a loglikelihood multiple-choice task.
CHOICE_ITEMS = [("What is 7 + 5?", ["12", "13", "57"], 0), ("What is 3 * 4?", ["7", "12", "34"], 1),
                ("What is 9 - 2?", ["11", "92", "7"], 2), ("What is 10 + 10?", ["20", "100", "1010"], 0)]
# (question, answer): a generate_until task scored by exact match on the last number.
ANSWER_ITEMS = [("What is 7 + 5? Reply with the number only.", 12), ("What is 2 + 2? Reply with the number only.", 4),
                ("What is 8 - 3? Reply with the number only.", 5)]
MAX_GEN_TOKENS = 24
LOGLIK_TOLERANCE = 1e-4  # nats; lm-eval's forward and ours run the same fp32 model on the same ids
NUMBER = re.compile(r"-?[0-9]+")

CHOICE_TASK = """task: crucible_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
"""
ANSWER_TASK = """task: crucible_answer
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer.split('#### ')[-1]}}}}"
generation_kwargs:
  until: ["<|im_end|>"]
  do_sample: false
  max_gen_toks: {max_gen_tokens}
filter_list:
  - name: last-number
    filter:
      - function: regex
        regex_pattern: "(-?[0-9]+)"
        group_select: -1
      - function: take_first
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def tiny_artifact(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-layer demo Llama imported by the real `import_model`: manifest and all."""
    dest = tmp_path_factory.mktemp("interop") / "artifact"
    import_model(ImportModelConfig(), str(tiny_llama_dir), str(dest))
    return dest


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub: the variables for whatever reads them from here on, and the flags huggingface_hub
    and datasets read when first imported (with them set, every hub request raises)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def write_tasks(root: Path) -> Path:
    """Both YAML tasks over their jsonl files in `root`; returns the include path."""
    (root / "choice.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "gold": g}) + "\n"
                                               for q, c, g in CHOICE_ITEMS), encoding="utf-8")
    (root / "answer.jsonl").write_text("".join(json.dumps({"question": q, "answer": f"... #### {a}"}) + "\n"
                                               for q, a in ANSWER_ITEMS), encoding="utf-8")
    cache = root / "hf-datasets"  # load_dataset's cache, not the user's
    (root / "choice.yaml").write_text(CHOICE_TASK.format(data=root / "choice.jsonl", cache=cache), encoding="utf-8")
    (root / "answer.yaml").write_text(ANSWER_TASK.format(data=root / "answer.jsonl", cache=cache,
                                                         max_gen_tokens=MAX_GEN_TOKENS), encoding="utf-8")
    return root


def lm_eval_run(artifact: Path, tasks: list[str], include_path: Path, apply_chat_template: bool) -> dict:
    """lm-eval's Python entry point, as `lm_eval --model hf --model_args pretrained=... --device cpu
    --include_path ... --tasks ...` runs it; batch size 1, so each request is one unpadded forward."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks_here = TaskManager(include_path=str(include_path), include_defaults=False)  # not its built-in tasks
    return lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={artifact},dtype=float32", tasks=tasks,
                                   task_manager=tasks_here, device="cpu", batch_size=1,
                                   apply_chat_template=apply_chat_template, log_samples=True)


def load(artifact: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(artifact, dtype=torch.float32).eval(), \
        AutoTokenizer.from_pretrained(artifact)


def continuation_loglik(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context): the continuation's tokens are those of context +
    continuation past the context's own tokens (how a causal LM scores a choice)."""
    context_ids = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)  # [len(whole), vocab]
    targets = torch.tensor(whole[len(context_ids):])
    return float(logprobs[len(context_ids) - 1:-1].gather(1, targets[:, None]).sum())


def check_choice_task(result: dict, model, tokenizer) -> None:
    """Each choice's loglikelihood as lm-eval logged it equals ours; so does the accuracy."""
    samples = sorted(result["samples"]["crucible_choice"], key=lambda s: s["doc_id"])
    assert len(samples) == len(CHOICE_ITEMS)
    right = 0
    for sample, (question, choices, gold) in zip(samples, CHOICE_ITEMS):
        ours = [continuation_loglik(model, tokenizer, f"Question: {question}\nAnswer:", f" {c}") for c in choices]
        theirs = [loglik for loglik, _ in sample["filtered_resps"]]
        assert theirs == pytest.approx(ours, abs=LOGLIK_TOLERANCE), question
        right += max(range(len(choices)), key=ours.__getitem__) == gold
    assert result["results"]["crucible_choice"]["acc,none"] == right / len(CHOICE_ITEMS)


def greedy_reply(model, tokenizer, ids: list[int], max_new_tokens: int) -> str:
    """transformers' `generate`, greedy, on the chat-templated prompt; the reply's text."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new_tokens)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_lm_eval_multiple_choice_equals_transformers(tiny_artifact: Path, tmp_path: Path, offline: None) -> None:
    result = lm_eval_run(tiny_artifact, ["crucible_choice"], write_tasks(tmp_path), apply_chat_template=False)
    model, tokenizer = load(tiny_artifact)
    check_choice_task(result, model, tokenizer)
    with torch.no_grad():  # the check catches lm-eval having scored other weights than ours
        model.model.embed_tokens.weight.mul_(2.0)
    with pytest.raises(AssertionError):
        check_choice_task(result, model, tokenizer)


@pytest.mark.slow
def test_lm_eval_on_the_real_model(smollm2_artifact: Path, tmp_path: Path, offline: None) -> None:
    """SmolLM2-135M-Instruct: answers generated greedily under its own chat template equal
    transformers' on the same items (loglikelihood scoring: the tiny model's test above)."""
    include = write_tasks(tmp_path)
    model, tokenizer = load(smollm2_artifact)
    result = lm_eval_run(smollm2_artifact, ["crucible_answer"], include, apply_chat_template=True)
    samples = sorted(result["samples"]["crucible_answer"], key=lambda s: s["doc_id"])
    replies = [greedy_reply(model, tokenizer, prompt_ids(tokenizer, q), MAX_GEN_TOKENS) for q, _ in ANSWER_ITEMS]
    assert [s["resps"][0][0] for s in samples] == replies
    right = [bool(NUMBER.findall(r)) and NUMBER.findall(r)[-1] == str(a) for r, (_, a) in zip(replies, ANSWER_ITEMS)]
    assert result["results"]["crucible_answer"]["exact_match,last-number"] == sum(right) / len(ANSWER_ITEMS)


@pytest.mark.slow
def test_a_trained_artifact_loads_as_is(tiny_llama_dir: Path, tmp_path: Path, offline: None) -> None:
    """What a trainer publishes (here LoRA SFT: the merged model beside `adapter/`, the manifest and
    the step metrics) reads in both tools as the imported artifact does."""
    from components.data.sft_data import SFTDataConfig, sft_data
    from components.train.config import TrainConfig
    from components.train.optim import OptimConfig
    from components.train.sft import LoraSettings, SFTConfig, sft

    records = [{"prompt": q, "completion": f"#### {a}"} for q, a in ANSWER_ITEMS]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    sft_data(SFTDataConfig(format="prompt_completion", seq_len_tokens=128, packing=False), str(tmp_path / "sft.jsonl"),
             str(tiny_llama_dir), str(tmp_path / "rows"))
    train = TrainConfig(batch_size_rows=3, max_steps=2, checkpoint_every_steps=0, optim=OptimConfig(warmup_steps=1))
    sft(SFTConfig(train=train, lora=LoraSettings()), str(tmp_path / "rows"), str(tiny_llama_dir), str(tmp_path / "sft"))
    (tmp_path / "tasks").mkdir()
    include = write_tasks(tmp_path / "tasks")
    check_choice_task(lm_eval_run(tmp_path / "sft", ["crucible_choice"], include, apply_chat_template=False),
                      *load(tmp_path / "sft"))
    assert check_pipeline(tmp_path / "sft", "What is 7 + 5?", max_new_tokens=8)


def pipeline_reply(artifact: Path, question: str, max_new_tokens: int) -> str:
    from transformers import pipeline

    generator = pipeline("text-generation", model=str(artifact), device="cpu")
    out = generator([{"role": "user", "content": question}], do_sample=False, max_new_tokens=max_new_tokens)
    return out[0]["generated_text"][-1]["content"]


def check_pipeline(artifact: Path, question: str, max_new_tokens: int) -> str:
    """The pipeline's greedy reply equals `generate` of the chat-templated prompt and our sampler's."""
    model, tokenizer = load(artifact)
    ids = prompt_ids(tokenizer, question)
    reply = pipeline_reply(artifact, question, max_new_tokens)
    assert reply == greedy_reply(model, tokenizer, ids, max_new_tokens)
    assert reply == decode(model, tokenizer, [ids], repeats=1, max_new_tokens=max_new_tokens, temperature=0.0).texts[0]
    return reply


def test_pipeline_on_an_artifact(tiny_artifact: Path, offline: None) -> None:
    assert check_pipeline(tiny_artifact, "What is 7 + 5?", max_new_tokens=12)


@pytest.mark.slow
def test_pipeline_on_the_real_model(smollm2_artifact: Path, offline: None) -> None:
    assert "12" in check_pipeline(smollm2_artifact, "What is 7 + 5?", max_new_tokens=32)
