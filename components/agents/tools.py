"""Tools: plain Python functions an agent calls, their schemas, and the one call format.

Invariant: a call reaches a tool only after it was checked against the tool's JSON schema;
whatever goes wrong on the way (a malformed call, a failing tool) is a one-line error
message the agent can read as its observation.

Call format (Hermes / Qwen2.5, what Qwen2.5's chat template asks for): inside its turn the
assistant writes
    <tool_call>
    {"name": "calculator", "arguments": {"expression": "12*7"}}
    </tool_call>
at most once per turn. Schemas reach the model through the chat template's `tools=` where the
template renders them (detected: rendering with and without `tools=` differs), and otherwise
appended to the system message as `HERMES_TOOLS_PROMPT` (Qwen2.5's tools text, one call per turn).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from transformers.utils import get_json_schema
from transformers.utils.chat_template_utils import DocstringParsingException, TypeHintParsingException

from components.agents.search import DocumentStore
from components.errors import ConfigError, CrucibleError
from components.tasks.calculator import evaluate_arithmetic, format_number

if TYPE_CHECKING:
    from components.agents.sandbox import SandboxLimits

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
HERMES_TOOLS_PROMPT = """# Tools

You may call one function per turn to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{schemas}
</tools>

For a function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""
_JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list, "object": dict,
    "null": type(None)}
_PROBE_TOOL = {"type": "function", "function": {"name": "probe", "description": "Detects tools support.",
                                                 "parameters": {"type": "object", "properties": {}}}}


class ToolCallError(CrucibleError):
    """The assistant's tool call is malformed: bad tags or JSON, unknown tool, wrong arguments."""


class ToolError(CrucibleError):
    """A well-formed call whose tool failed (e.g. division by zero); the message is for the agent."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema: {"type": "object", "properties": {...}, "required": [...]}
    function: Callable[..., str]


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict


def tool_from_function(function: Callable[..., str]) -> Tool:
    """A tool whose schema comes from the function's type hints and Google-style docstring
    (an `Args:` line per parameter), by transformers' `get_json_schema`."""
    try:
        schema = get_json_schema(function)["function"]
    except (DocstringParsingException, TypeHintParsingException) as error:
        raise ConfigError(f"tool {getattr(function, '__name__', function)!r}: {error}") from None
    return Tool(schema["name"], schema["description"], schema["parameters"], function)


class ToolRegistry:
    """The tools of an episode, by name, in the order given."""

    def __init__(self, tools: list[Tool]):
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            if tool.name in self._tools:
                raise ConfigError(f"two tools are named {tool.name!r}")
            self._tools[tool.name] = tool

    def __len__(self) -> int:
        return len(self._tools)

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def tool(self, name: str) -> Tool:
        if name not in self._tools:
            raise ToolCallError(f"unknown tool {name!r}; available: {', '.join(self._tools) or 'none'}")
        return self._tools[name]

    def schemas(self) -> list[dict]:
        """OpenAI-style function schemas, as chat templates' `tools=` takes them."""
        return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                  "parameters": t.parameters}} for t in self._tools.values()]

    def call(self, call: ToolCall) -> str:
        """The tool's output; its failure, whatever the exception, becomes a ToolError: the tool
        runs on the agent's input, and every failure is an observation the agent can act on."""
        tool = self.tool(call.name)
        try:
            return tool.function(**call.arguments)
        except Exception as error:
            detail = str(error) if isinstance(error, CrucibleError) else f"{type(error).__name__}: {error}"
            raise ToolError(f"tool {call.name!r} failed: {detail}") from error


def parse_tool_call(text: str, registry: ToolRegistry) -> ToolCall | None:
    """The turn's tool call checked against its tool's schema, None when the turn has none
    (a final answer), ToolCallError (one line, for the agent) when it is malformed."""
    opened = text.count(CALL_OPEN)
    if opened == 0:
        if CALL_CLOSE in text:
            raise ToolCallError(f"{CALL_CLOSE} without a {CALL_OPEN} before it")
        return None
    if opened > 1:
        raise ToolCallError(f"{opened} tool calls in one turn; call one tool per turn")
    start = text.index(CALL_OPEN) + len(CALL_OPEN)
    end = text.find(CALL_CLOSE, start)
    if end < 0:
        raise ToolCallError(f"unterminated tool call: no {CALL_CLOSE} after {CALL_OPEN}")
    body = text[start:end].strip()
    try:
        payload = json.loads(body)
    except json.JSONDecodeError as error:
        raise ToolCallError(f"the tool call is not valid JSON ({error.msg} at character {error.pos}): "
                            f"{body!r:.120}") from None
    if not isinstance(payload, dict) or set(payload) != {"name", "arguments"}:
        raise ToolCallError('the tool call must be a JSON object {"name": ..., "arguments": {...}}, '
                            f"got {body!r:.120}")
    name, arguments = payload["name"], payload["arguments"]
    if not isinstance(name, str) or not isinstance(arguments, dict):
        raise ToolCallError(f'the tool call\'s "name" must be a string and "arguments" an object, got {body!r:.120}')
    problems = argument_errors(arguments, registry.tool(name).parameters)
    if problems:
        raise ToolCallError(f"tool {name!r}: {'; '.join(problems)}")
    return ToolCall(name, arguments)


def argument_errors(arguments: dict, parameters: dict) -> list[str]:
    """What is wrong with the arguments for a tool's JSON schema: missing, unknown, wrong-typed."""
    properties = parameters.get("properties", {})
    problems = [f"missing argument {name!r}" for name in parameters.get("required", []) if name not in arguments]
    problems += [f"unknown argument {name!r} (it takes: {', '.join(properties) or 'none'})"
                 for name in arguments if name not in properties]
    problems += [problem for name, value in arguments.items() if name in properties
                 if (problem := _type_error(value, properties[name], f"argument {name!r}"))]
    return problems


def _type_error(value: Any, schema: dict, where: str) -> str | None:
    """Why the value does not have the schema's type (or enum, or item type), else None."""
    if value is None and schema.get("nullable"):
        return None
    kinds = [schema["type"]] if isinstance(schema.get("type"), str) else schema.get("type", [])
    if kinds and not any(_has_type(value, kind) for kind in kinds):
        return f"{where} must be {' or '.join(kinds)}, got {type(value).__name__} {value!r:.40}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} must be one of {schema['enum']}, got {value!r:.40}"
    if isinstance(value, list) and "items" in schema:
        return next(filter(None, (_type_error(item, schema["items"], f"{where}[{i}]") for i, item in enumerate(value))),
                    None)
    return None


def _has_type(value: Any, kind: str) -> bool:
    if isinstance(value, bool) and kind in ("integer", "number"):
        return False  # JSON true is not a number, though Python's bool is an int
    return isinstance(value, _JSON_TYPES.get(kind, object))


def template_uses_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders `tools=` (rendering with a probe tool differs)."""
    def render(**tools: Any) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": "?"}], tokenize=False,
                                             add_generation_prompt=True, **tools)
    return render(tools=[_PROBE_TOOL]) != render()


def hermes_tools_text(registry: ToolRegistry) -> str:
    """The tools as `HERMES_TOOLS_PROMPT` lists them: one schema's JSON per line."""
    return HERMES_TOOLS_PROMPT.format(schemas="\n".join(json.dumps(s, ensure_ascii=False) for s in registry.schemas()))


def _schemas_in_system(messages: list[dict], registry: ToolRegistry) -> list[dict]:
    """The messages with the Hermes tools text ending the system message (a system message is
    opened when there is none); unchanged when it is already there or there are no tools."""
    if not len(registry):
        return list(messages)
    text = hermes_tools_text(registry)
    if messages and messages[0]["role"] == "system":
        if text in messages[0]["content"]:
            return list(messages)
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def system_prompt(tokenizer: Any, registry: ToolRegistry, instructions: str) -> list[dict]:
    """The messages that open an episode: the instructions as the system message, followed by
    the Hermes tools text when the template cannot render `tools=`, so that the messages are
    complete however they are rendered (`render_prompt_ids`, or an SFT trace through the plain
    chat template)."""
    messages = [{"role": "system", "content": instructions}]
    return messages if template_uses_tools(tokenizer) else _schemas_in_system(messages, registry)


def render_prompt_ids(tokenizer: Any, messages: list[dict], registry: ToolRegistry) -> list[int]:
    """The conversation's ids plus the assistant generation prompt, with the tools rendered by
    the template (`tools=`) where it can, else in the system message (`HERMES_TOOLS_PROMPT`)."""
    native = template_uses_tools(tokenizer)
    rendered = tokenizer.apply_chat_template(
        messages if native else _schemas_in_system(messages, registry), tools=registry.schemas() if native else None,
        tokenize=True, add_generation_prompt=True, return_dict=True)
    return list(rendered["input_ids"])


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly: numbers, + - * / and parentheses.

    Args:
        expression: The expression, for example "(1234 + 5678) * 9".
    """
    return format_number(evaluate_arithmetic(expression))


def calculator_tool() -> Tool:
    """The GSM8K calculator (components.tasks.calculator) as a tool."""
    return tool_from_function(calculator)


def search_tool(store: DocumentStore, k: int = 3) -> Tool:
    """BM25 search over the store (semantic memory): the k best documents' titles and texts."""
    def search(query: str) -> str:
        """Search the knowledge base; returns the best matching documents, each as "title: text".

        Args:
            query: Words to look for, for example an entity's name and the attribute wanted.
        """
        hits = store.search(query, k)
        return "\n".join(f"{hit['title']}: {hit['text']}" for hit in hits) or f"no document matches {query!r}"
    return tool_from_function(search)


def python_tool(limits: SandboxLimits | None = None) -> Tool:
    """Python in the sandbox (components.agents.sandbox), default limits when None. The sandbox is
    imported here, so that the other tools do not need it."""
    from components.agents.sandbox import SandboxLimits, run_python

    sandbox_limits = limits or SandboxLimits()

    def python(code: str) -> str:
        """Run a Python program in a sandbox (no network, no files but a fresh temporary directory,
        limited CPU time, memory and output) and return what it printed.

        Args:
            code: The program; print the values you need.
        """
        return run_python(code, sandbox_limits).observation()
    return tool_from_function(python)


def _store(store: DocumentStore | None) -> DocumentStore:
    if store is None:
        raise ConfigError("tool 'search' needs a document store (store=...)")
    return store


ToolFactory = Callable[[DocumentStore | None, "SandboxLimits | None"], Tool]  # (store, sandbox limits) -> Tool
TOOL_FACTORIES: dict[str, ToolFactory] = {
    "calculator": lambda store, limits: calculator_tool(),
    "search": lambda store, limits: search_tool(_store(store)),
    "python": lambda store, limits: python_tool(limits),
}


def registry_of(names: list[str] | tuple[str, ...], store: DocumentStore | None = None,
                sandbox_limits: SandboxLimits | None = None) -> ToolRegistry:
    """The registry of the named tools (TOOL_FACTORIES), in the order named."""
    unknown = [name for name in names if name not in TOOL_FACTORIES]
    if unknown:
        raise ConfigError(f"unknown tool {unknown[0]!r}; known tools: {', '.join(sorted(TOOL_FACTORIES))}")
    return ToolRegistry([TOOL_FACTORIES[name](store, sandbox_limits) for name in names])
