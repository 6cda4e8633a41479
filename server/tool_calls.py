"""OpenAI tool calls on the chat endpoint, built from vLLM's own pieces.

What vLLM's server does, done around pi: the request's ``tools`` / ``tool_choice`` /
``parallel_tool_calls`` are validated by vLLM's ``ChatCompletionRequest`` (its messages);
``required`` and a named function become a JSON schema (vLLM's ``get_json_schema_from_tools``)
that the structured-output path enforces on pi, and the constrained text is read back as
the calls (a JSON array of ``{"name", "parameters"}``, or the named function's arguments);
``auto`` lets the model write freely and the configured vLLM tool parser
(``server.tool_call_parser``, e.g. ``hermes``) extracts the calls, streamed through its
``extract_tool_calls_streaming``; ``none`` parses nothing (the template still shows the
tools, as vLLM does unless told otherwise).

vLLM is imported lazily (its protocol module takes seconds to import) and only here, so the
functions this server relies on are in one place (``RELIED_ON``, pinned by a test).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from server.engine.interface import StructuredOutput
from server.errors import MESSAGE_LIMIT, APIError, clip

TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")
# What the config's ``server.tool_call_parser`` names; the error a request gets without it.
PARSER_SETTING = "server.tool_call_parser"
# vLLM's functions and classes this module calls: dotted name -> parameter names (checked
# by tests/test_tool_calls.py against the installed vLLM).
RELIED_ON = {
    "vllm.tool_parsers.utils.get_json_schema_from_tools":
        ("tool_choice", "tools", "parallel_tool_calls"),
    "vllm.tool_parsers.streaming.extract_named_tool_call_streaming":
        ("delta_text", "function_name", "function_name_returned", "tool_call_idx",
         "tool_call_id_type", "tokenizer", "tool_call_array_index"),
    "vllm.tool_parsers.streaming.extract_required_tool_call_streaming":
        ("previous_text", "current_text", "tool_call_idx", "tool_call_id_type"),
    "vllm.tool_parsers.abstract_tool_parser.ToolParser.__init__":
        ("self", "tokenizer", "tools"),
    "vllm.tool_parsers.abstract_tool_parser.ToolParser.extract_tool_calls":
        ("self", "model_output", "request"),
    "vllm.tool_parsers.abstract_tool_parser.ToolParser.extract_tool_calls_streaming":
        ("self", "previous_text", "current_text", "delta_text", "previous_token_ids",
         "current_token_ids", "delta_token_ids", "request"),
    "vllm.tool_parsers.abstract_tool_parser.ToolParserManager.get_tool_parser": ("name",),
    "vllm.renderers.chat_utils.make_tool_call_id": ("id_type", "func_name", "idx"),
}


def parser_names() -> tuple[str, ...]:
    """The tool-call parsers vLLM registers (``hermes``, ``llama3_json``, ...)."""
    from vllm.tool_parsers import ToolParserManager

    return tuple(sorted({*ToolParserManager.tool_parsers, *ToolParserManager.lazy_parsers}))


def check_parser_name(name: str) -> str:
    """``name`` if vLLM has a tool parser of that name (config validation), else ValueError
    listing the names it has."""
    names = parser_names()
    if name not in names:
        raise ValueError(f"unknown tool-call parser {name!r}; vLLM has: {', '.join(names)}")
    return name


@dataclass(frozen=True)
class ToolRequest:
    """A request's tools, validated. ``choice``: ``none``, ``auto``, ``required`` or
    ``named`` (then ``function`` is the name); ``vllm_request``: vLLM's
    ``ChatCompletionRequest`` holding them, which vLLM's parsers and schema builder read."""

    tools: tuple[dict[str, Any], ...]  # as the chat template gets them (vLLM's model_dump)
    choice: str
    function: str | None
    parallel: bool | None
    vllm_request: Any = field(repr=False)


def tool_request(tools: Any, tool_choice: Any, parallel_tool_calls: bool | None,
                 ) -> ToolRequest | None:
    """The request's tool fields validated as vLLM validates them (a 400 with vLLM's
    message, naming the field); None when the request has no tools and no tool_choice."""
    if tools == []:  # no tools (vLLM and OpenAI refuse it; clients send it as a default)
        tools = None
    if tools is None and tool_choice in (None, "none"):
        return None
    from pydantic import ValidationError
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionNamedToolChoiceParam,
        ChatCompletionRequest,
    )
    from vllm.exceptions import VLLMValidationError

    data: dict[str, Any] = {"model": "", "messages": []}
    for name, value in zip(TOOL_FIELDS, (tools, tool_choice, parallel_tool_calls)):
        if value is not None:
            data[name] = value
    if isinstance(tool_choice, dict) and tool_choice.get("type", "function") != "function":
        raise APIError(400, f"tool_choice of type {clip(str(tool_choice['type']))!r} is not "
                            "supported; only 'function'", "tool_choice")
    try:
        parsed = ChatCompletionRequest.model_validate(data)
    except VLLMValidationError as exc:
        raise APIError(400, exc.args[0] if exc.args else str(exc),
                       exc.parameter or "tools") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise APIError(400, clip(f"invalid {where}: {first['msg']}", MESSAGE_LIMIT),
                       str(first["loc"][0]) if first["loc"] else "tools") from None
    except ValueError as exc:
        raise APIError(400, clip(str(exc), MESSAGE_LIMIT), "tools") from None
    choice = parsed.tool_choice or "none"
    function = None
    if isinstance(choice, ChatCompletionNamedToolChoiceParam):
        choice, function = "named", choice.function.name
    if parsed.tools is None:  # tool_choice "none" alone
        return None
    return ToolRequest(tuple(tool.model_dump() for tool in parsed.tools), choice, function,
                       parallel_tool_calls, parsed)


def forced_constraint(request: ToolRequest) -> StructuredOutput | None:
    """The JSON schema that forces a call for ``required`` (an array of calls, one at most
    when ``parallel_tool_calls`` is false) or a named function (its arguments), as vLLM
    builds it; None for ``auto`` and ``none``."""
    if request.choice not in ("required", "named"):
        return None
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    vllm_request = request.vllm_request
    try:
        schema = get_json_schema_from_tools(
            tool_choice=vllm_request.tool_choice, tools=vllm_request.tools,
            parallel_tool_calls=vllm_request.parallel_tool_calls)
    except ValueError as exc:  # vLLM's VLLMValidationError ($defs clashes) is one
        raise APIError(400, clip(str(exc), MESSAGE_LIMIT), "tools") from None
    return None if schema is None else StructuredOutput("json", schema)


def _call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _new_id(name: str | None = None) -> str:
    from vllm.renderers.chat_utils import make_tool_call_id

    return make_tool_call_id(func_name=name)


def _delta_dict(message: Any) -> dict[str, Any] | None:
    """vLLM's ``DeltaMessage`` as an OpenAI delta: content and/or tool_calls."""
    if message is None:
        return None
    delta: dict[str, Any] = {}
    if message.content:
        delta["content"] = message.content
    calls = []
    for call in message.tool_calls or []:
        item: dict[str, Any] = {"index": call.index}
        if call.id:
            item.update(id=call.id, type="function")
        function = call.function
        if function is not None:
            if isinstance(function, dict):
                item["function"] = {k: v for k, v in function.items() if v is not None}
            else:
                item["function"] = function.model_dump(exclude_none=True)
        calls.append(item)
    if calls:
        delta["tool_calls"] = calls
    return delta or None


class ToolCallReader:
    """One choice's tool calls, read off its text (whole, or streamed delta by delta);
    stateful like vLLM's parsers, so one per choice."""

    def __init__(self, request: ToolRequest, parser_name: str | None, tokenizer: Any) -> None:
        self.request = request
        self.tokenizer = tokenizer
        self.parser = None
        if request.choice == "auto":
            if parser_name is None:  # refused before generation (check_parser_configured)
                raise APIError(400, _AUTO_NEEDS_PARSER, "tool_choice")
            from vllm.tool_parsers import ToolParserManager

            parser_cls = ToolParserManager.get_tool_parser(parser_name)
            self.parser = parser_cls(tokenizer, list(request.vllm_request.tools))
        self.text = ""
        self.token_ids: list[int] = []
        self.calls_started = 0  # tool calls announced while streaming
        self.name_sent = False  # named choice: its first delta went out

    @property
    def parses(self) -> bool:
        return self.request.choice != "none"

    # --- the whole text --------------------------------------------------------------------
    def message(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """``(content, tool_calls)`` of a finished choice's text."""
        choice = self.request.choice
        if choice == "none":
            return text, []
        if choice == "named":
            if not text.strip():
                return None, []
            name = self.request.function or ""
            return None, [_call(_new_id(name), name, text)]
        if choice == "required":
            return None, [_call(_new_id(name), name, args)
                          for name, args in _required_calls(text)]
        info = self.parser.extract_tool_calls(text, self.request.vllm_request)
        if not info.tools_called:
            return text, []
        calls = [_call(call.id or _new_id(call.function.name), call.function.name,
                       call.function.arguments) for call in info.tool_calls]
        content = info.content if info.content and info.content.strip() else None
        return content, self._parallel(calls)

    def _parallel(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # vLLM's maybe_filter_parallel_tool_calls: only the first when explicitly false.
        return calls[:1] if self.request.parallel is False else calls

    # --- streaming ------------------------------------------------------------------------
    def delta(self, text: str, token_ids: Sequence[int]) -> dict[str, Any] | None:
        """The OpenAI delta (``content`` and/or ``tool_calls``) for a streamed piece."""
        previous_text, previous_ids = self.text, self.token_ids
        self.text += text
        self.token_ids = previous_ids + list(token_ids)
        choice = self.request.choice
        if choice == "none":
            return {"content": text} if text else None
        if not text and choice != "auto":
            return None
        if choice == "named":
            from vllm.tool_parsers.streaming import extract_named_tool_call_streaming

            message, self.name_sent = extract_named_tool_call_streaming(
                delta_text=text, function_name=self.request.function or "",
                function_name_returned=self.name_sent, tool_call_idx=None,
                tool_call_id_type="random", tokenizer=self.tokenizer)
        elif choice == "required":
            from vllm.tool_parsers.streaming import extract_required_tool_call_streaming

            message, _ = extract_required_tool_call_streaming(
                previous_text=previous_text, current_text=self.text, tool_call_idx=None,
                tool_call_id_type="random")
        else:
            message = self.parser.extract_tool_calls_streaming(
                previous_text, self.text, text, previous_ids, self.token_ids,
                list(token_ids), self.request.vllm_request)
        delta = _delta_dict(message)
        if delta and "tool_calls" in delta:
            if self.request.parallel is False:
                delta["tool_calls"] = [c for c in delta["tool_calls"] if c["index"] == 0]
                if not delta["tool_calls"]:
                    del delta["tool_calls"]
            self.calls_started += sum("id" in c for c in delta.get("tool_calls", []))
        return delta or None

    def flush(self) -> dict[str, Any] | None:
        """At the end of a streamed choice: arguments the parser parsed but did not stream
        yet (vLLM's ``get_remaining_unstreamed_args``), as a last delta."""
        if self.parser is None or not self.calls_started:
            return None
        rest = self.parser.get_remaining_unstreamed_args()
        if not rest:
            return None
        index = len(self.parser.prev_tool_call_arr) - 1
        if self.request.parallel is False and index != 0:
            return None
        return {"tool_calls": [{"index": index, "function": {"arguments": rest}}]}

    def finish_reason(self, engine_reason: str | None, called: bool) -> str | None:
        """OpenAI's (and vLLM's): "tool_calls" when ``auto`` or ``required`` called a tool
        and generation stopped by itself; a named function keeps "stop"."""
        if called and self.request.choice in ("auto", "required") and engine_reason == "stop":
            return "tool_calls"
        return engine_reason


def _required_calls(text: str) -> list[tuple[str, str]]:
    """``(name, arguments)`` of the JSON array ``required`` forces, as vLLM reads it (a text
    that is not such an array, cut by max_tokens, has no calls)."""
    try:
        items = json.loads(text)
    except ValueError:
        return []
    if not isinstance(items, list):
        return []
    calls = []
    for item in items:
        if not (isinstance(item, dict) and isinstance(item.get("name"), str)):
            return []
        calls.append((item["name"], json.dumps(item.get("parameters"), ensure_ascii=False)))
    return calls


_AUTO_NEEDS_PARSER = (f'"auto" tool choice requires a tool-call parser: set '
                      f"{PARSER_SETTING} in the server config (e.g. 'hermes' for Qwen "
                      "models; vLLM's --enable-auto-tool-choice and --tool-call-parser)")


def check_parser_configured(request: ToolRequest | None, parser_name: str | None) -> None:
    """400 for ``tool_choice: auto`` (the default with tools) when no parser is configured."""
    if request is not None and request.choice == "auto" and parser_name is None:
        raise APIError(400, _AUTO_NEEDS_PARSER, "tool_choice")
