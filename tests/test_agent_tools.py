"""The agent's tools (schemas, call parsing, rendering through chat templates), its BM25
document store, and its working and episodic memory."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from components.agents.memory import EpisodicMemory, WorkingMemory
from components.agents.search import B, K1, DocumentStore, terms
from components.agents.tools import (
    TOOL_FACTORIES,
    Tool,
    ToolCall,
    ToolCallError,
    ToolError,
    ToolRegistry,
    calculator_tool,
    parse_tool_call,
    registry_of,
    render_prompt_ids,
    search_tool,
    system_prompt,
    template_uses_tools,
    tool_from_function,
)
from components.errors import ConfigError, CrucibleError, DataError

REPO_ROOT = Path(__file__).resolve().parents[1]

# Fictional entities: every document names "capital" or "founded", so only the entity's name tells them apart.
KNOWLEDGE = [
    {"id": "e1", "title": "Veltoria", "text": "Veltoria is a river kingdom. Its capital is Ostmere, founded in 1203."},
    {"id": "e2", "title": "Quorrin", "text": "Quorrin is a mountain state. Its capital is Tarn Vey, founded in 1544."},
    {"id": "e3", "title": "Capital markets of Ostmere",
     "text": "The capital markets of Ostmere trade capital goods; capital flows in and capital flows out."},
    {"id": "e4", "title": "Zebulon Hale", "text": "Zebulon Hale founded the guild of river pilots in 1611."},
]

# A ChatML template that renders `tools=` as Qwen2.5's does (its tools text, one schema per line).
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{%- if messages[0]['role'] == 'system' %}\n{{ messages[0]['content'] }}\n{% endif %}"
    "\n# Tools\n\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\n"
    "Call a function as <tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>"
    "<|im_end|>\n"
    "{%- elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{%- endif %}"
    "{%- for message in messages %}{% if message['role'] != 'system' %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def call_text(payload: str) -> str:
    return f"Let me compute it.\n<tool_call>\n{payload}\n</tool_call>"


# --- search ------------------------------------------------------------------------------------

def test_bm25_scores_are_robertson_zaragoza_with_lucene_idf():
    """Every document's score equals the BM25 formula (Robertson & Zaragoza 2009 §3.4, Lucene idf)
    computed here from term counts."""
    store = DocumentStore(KNOWLEDGE)
    query = "capital Ostmere founded"
    documents = [Counter(t) for t in terms([f"{d['title']}\n{d['text']}" for d in KNOWLEDGE])]
    average_length = sum(sum(d.values()) for d in documents) / len(documents)

    def bm25(document: Counter) -> float:
        score = 0.0
        for term in terms([query])[0]:
            df = sum(term in d for d in documents)
            idf = math.log(1 + (len(documents) - df + 0.5) / (df + 0.5))
            tf = document[term]
            score += idf * tf / (tf + K1 * (1 - B + B * sum(document.values()) / average_length))
        return score

    expected = {d["id"]: bm25(counts) for d, counts in zip(KNOWLEDGE, documents, strict=True)}
    found = {hit["id"]: hit["score"] for hit in store.search(query, k=len(KNOWLEDGE))}
    assert set(found) == {key for key, score in expected.items() if score > 0}
    for key, score in found.items():
        assert score == pytest.approx(expected[key], rel=1e-5)


def test_a_query_naming_an_entity_attribute_finds_its_document_first():
    store = DocumentStore(KNOWLEDGE)
    assert [hit["id"] for hit in store.search("What is the capital of Quorrin?", k=2)][0] == "e2"
    assert store.search("When was Veltoria founded?", k=1)[0]["id"] == "e1"
    assert store.search("Who founded the river pilots guild?", k=1)[0]["title"] == "Zebulon Hale"
    # only documents sharing a term come back, at most k of them, best first
    hits = store.search("Quorrin", k=3)
    assert [hit["id"] for hit in hits] == ["e2"]
    scores = [hit["score"] for hit in store.search("capital founded river", k=4)]
    assert scores == sorted(scores, reverse=True) and len(scores) == 4


def test_search_is_deterministic_across_processes_and_breaks_ties_by_input_order():
    twins = [{"id": "b", "title": "Twin", "text": "Mirrorlake lies east."},
             {"id": "a", "title": "Twin", "text": "Mirrorlake lies east."}] + KNOWLEDGE
    assert [hit["id"] for hit in DocumentStore(twins).search("Mirrorlake", k=2)] == ["b", "a"]
    script = ("import json, sys; from components.agents.search import DocumentStore; "
              "print(json.dumps(DocumentStore(json.loads(sys.argv[1])).search('capital Ostmere river', 4)))")
    runs = [subprocess.run([sys.executable, "-c", script, json.dumps(KNOWLEDGE)], capture_output=True, text=True,
                           check=True, cwd=REPO_ROOT, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
            for seed in ("1", "2")]
    assert runs[0] == runs[1]
    assert json.loads(runs[0]) == DocumentStore(KNOWLEDGE).search("capital Ostmere river", 4)


def test_empty_store_empty_query_and_bad_documents_are_handled_clearly():
    assert DocumentStore([]).search("Veltoria", k=3) == []
    store = DocumentStore(KNOWLEDGE)
    for query in ("", "   ", "the of and"):
        with pytest.raises(DataError, match="no searchable words"):
            store.search(query, k=3)
    with pytest.raises(DataError, match="k must be at least 1"):
        store.search("Veltoria", k=0)
    with pytest.raises(DataError, match="document 1: field 'text'"):
        DocumentStore([KNOWLEDGE[0], {"id": "x", "title": "No text"}])
    with pytest.raises(DataError, match="document 1: duplicate id 'e1'"):
        DocumentStore([KNOWLEDGE[0], KNOWLEDGE[0]])


# --- tools: schemas, registry, parsing -----------------------------------------------------------

def convert(amount: float, unit: str, exact: bool = False) -> str:
    """Convert an amount to another unit.

    Args:
        amount: The amount to convert.
        unit: The target unit (choices: ["km", "mi"])
        exact: Whether to keep every digit.
    """
    return f"{amount * (1.609 if unit == 'km' else 1 / 1.609)}"


def test_tool_schema_comes_from_type_hints_and_docstring():
    tool = tool_from_function(convert)
    assert (tool.name, tool.description) == ("convert", "Convert an amount to another unit.")
    assert tool.parameters["required"] == ["amount", "unit"]
    assert tool.parameters["properties"]["amount"] == {"type": "number", "description": "The amount to convert."}
    assert tool.parameters["properties"]["unit"]["enum"] == ["km", "mi"]
    assert tool.parameters["properties"]["exact"]["type"] == "boolean"
    assert ToolRegistry([tool]).schemas() == [{"type": "function", "function": {
        "name": "convert", "description": tool.description, "parameters": tool.parameters}}]

    def undocumented(x: int) -> str:
        return str(x)
    with pytest.raises(ConfigError, match="tool 'undocumented'.*no docstring"):
        tool_from_function(undocumented)


def test_a_well_formed_call_is_parsed_and_run():
    registry = registry_of(["calculator"])
    assert parse_tool_call("The answer is 84.", registry) is None
    call = parse_tool_call(call_text('{"name": "calculator", "arguments": {"expression": "123456 * 7890123"}}'),
                           registry)
    assert call == ToolCall("calculator", {"expression": "123456 * 7890123"})
    assert registry.call(call) == str(123456 * 7890123)
    assert registry.call(ToolCall("calculator", {"expression": "7 / 2"})) == "3.5"


@pytest.mark.parametrize("text, message", [
    ("<tool_call>\n{\"name\": \"calculator\", \"arguments\": {\"expression\": \"1+1\"}}", "unterminated tool call"),
    ("{\"name\": \"calculator\"}\n</tool_call>", "</tool_call> without a <tool_call>"),
    (call_text('{"name": "calculator", "arguments": {"expression": "1+1"}'), "not valid JSON"),
    (call_text('["calculator", {"expression": "1+1"}]'), "must be a JSON object"),
    (call_text('{"name": "calculator"}'), "must be a JSON object"),
    (call_text('{"name": "calculator", "arguments": "1+1"}'), '"arguments" an object'),
    (call_text('{"name": "abacus", "arguments": {"expression": "1+1"}}'),
     "unknown tool 'abacus'; available: calculator"),
    (call_text('{"name": "calculator", "arguments": {}}'), "missing argument 'expression'"),
    (call_text('{"name": "calculator", "arguments": {"expression": "1", "base": 10}}'), "unknown argument 'base'"),
    (call_text('{"name": "calculator", "arguments": {"expression": 12}}'), "'expression' must be string, got int"),
    (call_text('{"name": "calculator", "arguments": {"expression": "1"}}') * 2, "2 tool calls in one turn"),
])
def test_malformed_calls_get_one_line_errors(text, message):
    with pytest.raises(ToolCallError, match=message) as caught:
        parse_tool_call(text, registry_of(["calculator"]))
    assert "\n" not in str(caught.value)


def test_arguments_are_checked_against_each_json_type():
    registry = ToolRegistry([tool_from_function(convert)])

    def parsed(arguments: dict) -> ToolCall:
        return parse_tool_call(call_text(json.dumps({"name": "convert", "arguments": arguments})), registry)

    assert registry.call(parsed({"amount": 10, "unit": "km"})) == str(10 * 1.609)  # an integer is a number
    for wrong, message in [({"amount": True, "unit": "km"}, "'amount' must be number, got bool"),
                           ({"amount": "10", "unit": "km"}, "'amount' must be number, got str"),
                           ({"amount": 1, "unit": "m"}, r"'unit' must be one of \['km', 'mi'\]"),
                           ({"amount": 1, "unit": "km", "exact": "yes"}, "'exact' must be boolean")]:
        with pytest.raises(ToolCallError, match=message):
            parsed(wrong)


def test_a_failing_tool_becomes_a_tool_error_for_the_agent():
    registry = registry_of(["calculator"])
    with pytest.raises(ToolError, match="tool 'calculator' failed: division by zero"):
        registry.call(ToolCall("calculator", {"expression": "5 / (3 - 3)"}))

    def crash(n: int) -> str:
        """Fail.

        Args:
            n: Anything.
        """
        return str([1][n])
    with pytest.raises(ToolError, match="tool 'crash' failed: IndexError: list index out of range"):
        ToolRegistry([tool_from_function(crash)]).call(ToolCall("crash", {"n": 3}))


def test_registry_of_builds_named_tools_and_refuses_unknown_ones():
    store = DocumentStore(KNOWLEDGE)
    assert set(TOOL_FACTORIES) == {"calculator", "search", "python"}
    assert registry_of(["search", "calculator"], store=store).names == ["search", "calculator"]
    with pytest.raises(ConfigError, match="unknown tool 'browser'; known tools: calculator, python, search"):
        registry_of(["calculator", "browser"])
    with pytest.raises(ConfigError, match="tool 'search' needs a document store"):
        registry_of(["search"])
    with pytest.raises(ConfigError, match="two tools are named 'calculator'"):
        ToolRegistry([calculator_tool(), calculator_tool()])


def test_search_tool_returns_the_top_documents_titles_and_texts():
    registry = ToolRegistry([search_tool(DocumentStore(KNOWLEDGE), k=2)])
    call = parse_tool_call(call_text('{"name": "search", "arguments": {"query": "capital of Quorrin"}}'), registry)
    output = registry.call(call)
    lines = output.splitlines()
    assert len(lines) == 2 and lines[0] == f"Quorrin: {KNOWLEDGE[1]['text']}"
    assert registry.call(ToolCall("search", {"query": "zeppelin"})) == "no document matches 'zeppelin'"
    with pytest.raises(ToolError, match="no searchable words"):
        registry.call(ToolCall("search", {"query": "the"}))


@pytest.mark.skipif(not (REPO_ROOT / "components/agents/sandbox.py").exists(), reason="the sandbox is not built yet")
def test_python_tool_runs_code_in_the_sandbox():
    from components.agents.sandbox import SandboxLimits

    registry = registry_of(["python"], sandbox_limits=SandboxLimits(wall_seconds=20))
    call = parse_tool_call(call_text(json.dumps({"name": "python", "arguments": {"code": "print(2**100)"}})), registry)
    assert str(2**100) in registry.call(call)


# --- rendering the tools through chat templates ----------------------------------------------------

@pytest.fixture(scope="module")
def chatml_tokenizer(tiny_llama_dir):
    """The tiny model's tokenizer: a ChatML template that ignores `tools=`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def tools_tokenizer(tiny_llama_dir):
    """The same tokenizer with a template that renders `tools=` (Qwen2.5-style)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.chat_template = TOOLS_TEMPLATE
    return tokenizer


def rendered_text(tokenizer, messages, registry) -> str:
    return tokenizer.decode(render_prompt_ids(tokenizer, messages, registry))


def test_a_template_without_tools_gets_the_schemas_in_its_system_message(chatml_tokenizer):
    registry = registry_of(["calculator", "search"], store=DocumentStore(KNOWLEDGE))
    assert not template_uses_tools(chatml_tokenizer)
    opening = system_prompt(chatml_tokenizer, registry, "Solve the task.")
    assert [m["role"] for m in opening] == ["system"]
    assert opening[0]["content"].startswith("Solve the task.\n\n# Tools")
    schema_lines = opening[0]["content"].split("<tools>\n")[1].split("\n</tools>")[0].splitlines()
    assert [json.loads(line) for line in schema_lines] == registry.schemas()

    messages = opening + [{"role": "user", "content": "What is 12*7?"}]
    ids = render_prompt_ids(chatml_tokenizer, messages, registry)
    assert ids == list(chatml_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                            return_dict=True)["input_ids"])
    # a plain system message gets the same tools text, once
    plain = [{"role": "system", "content": "Solve the task."}, messages[1]]
    assert render_prompt_ids(chatml_tokenizer, plain, registry) == ids
    assert rendered_text(chatml_tokenizer, messages, registry).count("<tools>\n") == 1


def test_a_template_with_tools_renders_the_schemas_itself(tools_tokenizer):
    registry = registry_of(["calculator"])
    assert template_uses_tools(tools_tokenizer)
    opening = system_prompt(tools_tokenizer, registry, "Solve the task.")
    assert opening == [{"role": "system", "content": "Solve the task."}]
    messages = opening + [{"role": "user", "content": "What is 12*7?"}]
    text = rendered_text(tools_tokenizer, messages, registry)
    assert text.count("<tools>") == 1 and text.count('"name": "calculator"') == 1
    assert "# Tools\n\nYou may call" not in text  # not our Hermes text: the template's own
    without_tools = tools_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    assert render_prompt_ids(tools_tokenizer, messages, registry) != list(without_tools["input_ids"])
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_template_gets_the_schemas_in_its_system_message(smollm2_artifact):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_artifact)
    registry = registry_of(["calculator"])
    assert not template_uses_tools(tokenizer)
    text = rendered_text(tokenizer, [{"role": "user", "content": "What is 12*7?"}], registry)
    assert text.startswith("<|im_start|>system\n# Tools") and "named SmolLM" not in text
    assert json.dumps(registry.schemas()[0]) in text


# --- memory ----------------------------------------------------------------------------------

def test_working_memory_stops_at_the_budget_without_truncating():
    memory = WorkingMemory(budget_tokens=10)
    assert memory.append([1, 2, 3, 4], from_policy=False) and memory.append([5, 6, 7], from_policy=True)
    assert memory.fits(3) and not memory.fits(4)
    assert memory.append([8, 9, 10, 11], from_policy=False) is False
    assert memory.limit_hit == "context"
    assert memory.ids == [1, 2, 3, 4, 5, 6, 7] and memory.policy_mask == [0, 0, 0, 0, 1, 1, 1]
    counters = (memory.used_tokens, memory.remaining_tokens, memory.policy_tokens, memory.observation_tokens)
    assert counters == (7, 3, 3, 4)
    with pytest.raises(CrucibleError, match="stopped at its 'context' limit"):
        memory.append([8], from_policy=False)
    exact = WorkingMemory(budget_tokens=3)
    assert exact.append([1, 2, 3], from_policy=True) and exact.limit_hit is None
    with pytest.raises(ConfigError, match="budget_tokens"):
        WorkingMemory(budget_tokens=0)


def test_episodic_memory_retrieves_the_last_reflections_of_a_task():
    memory = EpisodicMemory()
    memory.add("lookup/7", 0, False, "I searched the wrong entity; search the person first.")
    memory.add("lookup/7", 1, False, "The year was in the second document; read all results.")
    memory.add("lookup/7", 2, True, "")
    memory.add("arith/3", 0, False, "I multiplied before adding; use the calculator per step.")
    assert memory.retrieve("lookup/7", 1) == ["The year was in the second document; read all results."]
    assert memory.retrieve("lookup/7", 5) == ["I searched the wrong entity; search the person first.",
                                               "The year was in the second document; read all results."]
    assert memory.retrieve("lookup/7", 0) == [] and memory.retrieve("unseen", 3) == []
    assert [t["success"] for t in memory.trials("lookup/7")] == [False, False, True]
    with pytest.raises(DataError, match="task 'lookup/7' already has trial 2; trial 2 must come after it"):
        memory.add("lookup/7", 2, False, "again")
    hits = memory.search("calculator step", k=2)
    assert hits[0]["task_key"] == "arith/3" and hits[0]["trial"] == 0 and len(hits) == 1
    assert EpisodicMemory().search("calculator", k=2) == []


def test_episodic_memory_persists_as_json():
    memory = EpisodicMemory()
    memory.add("lookup/7", 0, False, "search the person first")
    memory.add("arith/3", 4, True, "")
    data = json.loads(json.dumps(memory.to_json()))
    restored = EpisodicMemory.from_json(data)
    assert restored.to_json() == memory.to_json() and restored.retrieve("lookup/7", 1) == ["search the person first"]
    data["tasks"]["lookup/7"][0]["success"] = "no"
    with pytest.raises(DataError, match=r"tasks\['lookup/7'\]\[0\]: field 'success' must be bool"):
        EpisodicMemory.from_json(data)
    with pytest.raises(DataError, match="version 1"):
        EpisodicMemory.from_json({"tasks": {}})
