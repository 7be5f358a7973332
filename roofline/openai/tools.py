"""Tool calling: OpenAI `tools` / `tool_choice` -> the prompt (and a grammar), the model's text -> `tool_calls`.

A chat template that takes `tools` (Llama 3.1+, Qwen 2.5+, Hermes-style) renders them itself; for one that
does not (the default SmolLM2 template) the tools go into the system message in the Hermes format, and tool
results and earlier calls are written the way such templates write them. The model's output is parsed for
calls in the Hermes / Qwen format (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`) and the Llama
3.1/3.2 one (`{"name": ..., "parameters": ...}`, several joined by `;`). `tool_choice` "required" or a named
function constrains the output with the grammar engine to one call whose arguments follow the function's
parameter schema, so it always parses.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from roofline.engine.structured import GRAMMAR_MISSING, grammar_available
from roofline.errors import InvalidRequestError
from roofline.sampling_params import StructuredSpec
from roofline.openai.errors import APIError
from roofline.server.protocol import ChatCompletionRequest, ChatMessage

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_HERMES_SYSTEM = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> XML "
    "tags. You may call one or more functions to assist with the user query. Don't make assumptions about what "
    "values to plug into functions. Here are the available tools: <tools>\n{tools}\n</tools>\n"
    "For each function call return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags as follows:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-dict>}}\n</tool_call>")
_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, code="invalid_value", param=param)


@dataclass
class ParsedCall:
    """A call found in the model's output: the function's name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass
class ToolPlan:
    """A request's tools, what it lets the model do with them, and the grammar that enforces it."""

    tools: list[dict[str, Any]]  # OpenAI tool objects, checked
    choice: str  # "auto", "required", or the name of the function that must be called
    structured: StructuredSpec | None  # the one-call grammar of "required" and a named choice
    is_parallel: bool = True  # several calls may be returned (parallel_tool_calls is not false)

    @property
    def names(self) -> set[str]:
        """The functions the model may call."""
        return {t["function"]["name"] for t in self.tools}

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content, calls) of the model's text: parse_tool_calls, the first call only unless parallel."""
        content, calls = parse_tool_calls(text, self.names)
        return content, calls if self.is_parallel else calls[:1]


def _check_tools(tools: list[Any]) -> list[dict[str, Any]]:
    checked = []
    for i, tool in enumerate(tools):
        param = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" \
                or not isinstance(tool.get("function"), dict):
            raise _bad(f"{param} must be {{\"type\": \"function\", \"function\": {{\"name\": ..., ...}}}}", param)
        fn = tool["function"]
        if not isinstance(fn.get("name"), str) or not _NAME.match(fn["name"]):
            raise _bad(f"{param}.function.name must be 1-64 letters, digits, '_', '.' or '-'", f"{param}.function.name")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise _bad(f"{param}.function.parameters must be a JSON schema object", f"{param}.function.parameters")
        checked.append({"type": "function", "function": {**fn, "parameters": params}})
    names = [t["function"]["name"] for t in checked]
    if len(set(names)) != len(names):
        raise _bad("tools name the same function twice", "tools")
    return checked


def _call_schema(tool: dict[str, Any]) -> dict[str, Any]:
    fn = tool["function"]
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": fn["parameters"]},
            "required": ["name", "arguments"]}


def plan_tools(req: ChatCompletionRequest) -> ToolPlan | None:
    """The request's ToolPlan, or None when it offers no tools (or tool_choice is "none")."""
    if req.functions:
        raise APIError(400, "functions is deprecated and not supported; send tools instead",
                       code="unsupported_parameter", param="functions")
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none", "auto"):
            raise _bad("tool_choice needs tools", "tool_choice")
        return None
    tools = _check_tools(req.tools)
    if choice is None or choice == "auto":
        choice = "auto"
    elif choice == "none":
        return None
    elif choice == "required":
        pass
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        choice = choice["function"].get("name")
        if choice not in {t["function"]["name"] for t in tools}:
            raise _bad(f"tool_choice names the function {choice!r}, which is not in tools", "tool_choice")
    else:
        raise _bad("tool_choice must be \"none\", \"auto\", \"required\" or "
                   "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    structured = None
    if choice != "auto":
        if req.response_format and req.response_format.get("type", "text") != "text" or req.guided_regex \
                or req.guided_grammar:
            raise _bad("a forced tool call (tool_choice required or named) cannot take an output constraint too",
                       "tool_choice")
        if not grammar_available():
            raise APIError(400, GRAMMAR_MISSING, code="grammar_engine_missing", param="tool_choice")
        chosen = [t for t in tools if choice == "required" or t["function"]["name"] == choice]
        schema = _call_schema(chosen[0]) if len(chosen) == 1 else {"anyOf": [_call_schema(t) for t in chosen]}
        try:
            structured = StructuredSpec.json(schema)
        except InvalidRequestError as exc:
            raise _bad(str(exc), "tools") from None
    return ToolPlan(tools, choice, structured, req.parallel_tool_calls is not False)


# --- the prompt ------------------------------------------------------------------------------------------
def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def render_messages(messages: list[ChatMessage], texts: list[str], plan: ToolPlan | None,
                    takes_tools: bool) -> list[dict[str, Any]]:
    """The conversation as the chat template takes it; `texts` are the messages' contents as text."""
    out: list[dict[str, Any]] = []
    for msg, text in zip(messages, texts):
        role = "system" if msg.role == "developer" else msg.role
        if takes_tools:  # the template knows tool calls and tool results: hand them over as HF templates want
            entry: dict[str, Any] = {"role": role, "content": text}
            if msg.tool_calls:
                entry["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in msg.tool_calls]
            if msg.role == "tool":
                entry["tool_call_id"] = msg.tool_call_id
                if msg.name:
                    entry["name"] = msg.name
            out.append(entry)
            continue
        if msg.tool_calls:  # written as the Hermes format the model was told to use
            calls = "\n".join(f"{TOOL_CALL_OPEN}\n" + json.dumps(
                {"name": c.function.name, "arguments": _arguments(c.function.arguments)}) + f"\n{TOOL_CALL_CLOSE}"
                for c in msg.tool_calls)
            text = f"{text}\n{calls}" if text else calls
        if msg.role in ("tool", "function"):
            role, text = "user", f"<tool_response>\n{text}\n</tool_response>"
        out.append({"role": role, "content": text})
    if plan is not None and not takes_tools:
        system = _HERMES_SYSTEM.format(tools="\n".join(json.dumps(t) for t in plan.tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{system}"}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


# --- the output ------------------------------------------------------------------------------------------
def _call_of(obj: Any, names: set[str]) -> ParsedCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as JSON text already
        args = _arguments(args)
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[ParsedCall]]:
    """(content left, calls) of a model's output; no calls when it holds none that parse and name a tool."""
    if TOOL_CALL_OPEN in text:  # Hermes / Qwen 2.5+
        calls = []
        for block in _HERMES_BLOCK.findall(text):
            try:
                call = _call_of(json.loads(block), names)
            except ValueError:
                call = None
            if call is not None:
                calls.append(call)
        if calls:
            content = _HERMES_BLOCK.sub("", text).strip()
            return content or None, calls
        return text, []
    stripped = text.strip().removeprefix("<|python_tag|>").strip()
    if stripped.startswith("{"):  # Llama 3.1/3.2 (and a forced call): JSON objects, several joined by ';'
        calls = []
        for part in stripped.split(";") if ";" in stripped else [stripped]:
            try:
                call = _call_of(json.loads(part), names)
            except ValueError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        return None, calls
    return text, []


class ToolCallStream:
    """Which part of a streamed choice's text is content: text that may still be a tool call is held back."""

    def __init__(self) -> None:
        self.num_sent = 0  # characters of the text already sent as content

    def content_delta(self, text: str) -> str:
        """The content that can be sent now: up to a tool call's start (or what may begin one)."""
        stripped = text.lstrip()
        if self.num_sent == 0 and (not stripped or stripped.startswith("{") or any(
                tag.startswith(stripped[:len(tag)]) for tag in (TOOL_CALL_OPEN, "<|python_tag|>"))):
            return ""  # the output opens like a call (or has not opened yet): hold it until it is known
        safe = text.find(TOOL_CALL_OPEN)
        if safe == -1:  # hold back a tail that could be the start of the tag
            safe = len(text)
            for k in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1):
                if TOOL_CALL_OPEN.startswith(text[-k:]):
                    safe = len(text) - k
                    break
        delta = text[self.num_sent:max(safe, self.num_sent)]
        self.num_sent += len(delta)
        return delta

    def rest(self, content: str | None, text: str) -> str:
        """At the end: the content not sent yet (all of it is known now)."""
        if content is None:
            return ""
        # the content is the text with its calls cut out (and stripped): what was sent is a prefix of it, up to
        # whitespace
        return content[len(os.path.commonprefix([content, text[:self.num_sent]])):]
