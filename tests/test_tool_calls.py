"""Tool calls without an engine: the request fields validated as vLLM validates them, the
JSON schemas that force a call, the calls read off a fixed text (whole and streamed) by
vLLM's hermes parser and by the required/named paths, tools and tool turns rendered by the
chat template, the config's parser name, and the vLLM functions relied on (pinned)."""

from __future__ import annotations

import importlib
import inspect
import json
import re
from pathlib import Path

import httpx
import pytest
import yaml

from server.config import ConfigError, load_config
from server.errors import APIError
from server.prompts import encode_chat, render_messages
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.tool_calls import (
    RELIED_ON,
    ToolCallReader,
    check_parser_configured,
    forced_constraint,
    parser_names,
    tool_request,
)

TEMPLATE = Path(__file__).parent / "data" / "tool_chat_template.jinja"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string"}}, "required": ["zone"]}}}
TOOLS = [WEATHER, TIME]


def _request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


def _resolve(dotted: str):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            target = getattr(target, name)
        return target
    raise ImportError(dotted)


@pytest.mark.parametrize("dotted", sorted(RELIED_ON))
def test_the_vllm_functions_relied_on_have_the_pinned_parameters(dotted):
    assert tuple(inspect.signature(_resolve(dotted)).parameters) == RELIED_ON[dotted]


def test_required_forces_an_array_of_calls_one_at_most_without_parallel_calls():
    schema = forced_constraint(tool_request(TOOLS, "required", None))
    assert schema.kind == "json"
    assert schema.value["type"] == "array" and schema.value["minItems"] == 1
    assert "maxItems" not in schema.value
    names = [s["properties"]["name"]["enum"] for s in schema.value["items"]["anyOf"]]
    assert names == [["get_weather"], ["get_time"]]
    single = forced_constraint(tool_request(TOOLS, "required", False))
    assert single.value["maxItems"] == 1
    assert forced_constraint(tool_request(TOOLS, "required", True)).value == schema.value


def test_a_named_function_forces_its_arguments_and_auto_or_none_force_nothing():
    named = tool_request(TOOLS, {"type": "function", "function": {"name": "get_time"}}, None)
    assert (named.choice, named.function) == ("named", "get_time")
    assert forced_constraint(named).value == TIME["function"]["parameters"]
    assert forced_constraint(tool_request(TOOLS, "auto", None)) is None
    assert tool_request(TOOLS, None, None).choice == "auto"  # vLLM's default with tools
    assert forced_constraint(tool_request(TOOLS, "none", None)) is None
    assert tool_request(None, "none", None) is None


@pytest.mark.parametrize("tools, choice, field, message", [
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice",
     "does not match any of the specified `tools`"),
    (None, "required", "tool_choice", "`tools` must be set"),
    (None, "auto", "tool_choice", "`tools` must be set"),
    (TOOLS, "sometimes", "tool_choice", "Invalid value for `tool_choice`"),
    (TOOLS, {"type": "function"}, "tool_choice.function", "Invalid value for `function`"),
    (TOOLS, {"type": "custom", "custom": {"name": "x"}}, "tool_choice", "only 'function'"),
    ([], "auto", "tool_choice", "`tools` must be set"),  # [] is no tools
    ([{"type": "function"}], "auto", "tools", "tools.0.function: Field required"),
    ([{"type": "function", "function": {"name": 3}}], None, "tools",
     "tools.0.function.name"),
    ("get_weather", None, "tools", "invalid tools"),
])
def test_malformed_tool_fields_are_400s_naming_the_field(tools, choice, field, message):
    with pytest.raises(APIError) as caught:
        tool_request(tools, choice, None)
    assert caught.value.status == 400
    assert caught.value.param == field
    assert message in caught.value.message


def test_forced_calls_and_response_format_together_are_a_400():
    body = _request(tools=TOOLS, tool_choice="required",
                    response_format={"type": "json_object"})
    with pytest.raises(APIError, match="not both") as caught:
        body.structured_output()
    assert caught.value.param == "tool_choice"
    # auto leaves the text free: the request's own constraint stands.
    body = _request(tools=TOOLS, tool_choice="auto", response_format={"type": "json_object"})
    assert body.structured_output().kind == "json_object"


def test_auto_needs_the_configured_parser():
    with pytest.raises(APIError, match="server.tool_call_parser") as caught:
        check_parser_configured(tool_request(TOOLS, "auto", None), None)
    assert caught.value.param == "tool_choice"
    check_parser_configured(tool_request(TOOLS, "auto", None), "hermes")
    check_parser_configured(tool_request(TOOLS, "required", None), None)  # a grammar


def test_legacy_function_fields_stay_refused_and_completions_refuse_tools():
    for name, value in (("functions", [WEATHER["function"]]), ("function_call", "auto")):
        with pytest.raises(APIError, match="deprecated") as caught:
            _request(**{name: value}).reject_unsupported()
        assert caught.value.param == name
    completion = CompletionRequest.model_validate({"model": "m", "prompt": "x",
                                                   "tools": TOOLS})
    with pytest.raises(APIError, match="/v1/chat/completions") as caught:
        completion.reject_unsupported()
    assert caught.value.param == "tools"
    CompletionRequest.model_validate({"model": "m", "prompt": "x", "tools": [],
                                      "tool_choice": "none"}).reject_unsupported()
    _request(tools=TOOLS, tool_choice="auto", parallel_tool_calls=False).reject_unsupported()


@pytest.mark.parametrize("message, error", [
    ({"role": "assistant", "content": None}, "content is required"),
    ({"role": "user", "content": None}, "content is required"),
    ({"role": "tool", "content": "sunny"}, "tool_call_id"),
    ({"role": "user", "content": "x", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
     "only allowed in assistant"),
    ({"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": {}}}]},
     "string"),
])
def test_malformed_tool_turns_are_refused(message, error):
    with pytest.raises(ValueError, match=error):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [message]})


# --- the calls read off a text ---------------------------------------------------------------
HERMES_TEXT = ('Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": '
               '"Paris"}}\n</tool_call><tool_call>\n{"name": "get_time", "arguments": '
               '{"zone": "CET"}}\n</tool_call>')


def _stream(reader: ToolCallReader, tokenizer, text: str, pieces: int = 7) -> list[dict]:
    """``text`` fed in pieces of a few characters, as a stream's deltas come."""
    deltas = []
    for start in range(0, len(text), pieces):
        piece = text[start:start + pieces]
        delta = reader.delta(piece, tokenizer.encode(piece, add_special_tokens=False))
        if delta:
            deltas.append(delta)
    last = reader.flush()
    return deltas + ([last] if last else [])


def _joined(deltas: list[dict]) -> tuple[str, dict[int, dict]]:
    content, calls = "", {}
    for delta in deltas:
        content += delta.get("content") or ""
        for call in delta.get("tool_calls", []):
            entry = calls.setdefault(call["index"], {"ids": [], "name": None, "arguments": ""})
            if "id" in call:
                entry["ids"].append(call["id"])
                assert call["type"] == "function"
            function = call.get("function", {})
            entry["name"] = function.get("name") or entry["name"]
            entry["arguments"] += function.get("arguments") or ""
    return content, calls


def test_auto_with_hermes_reads_the_calls_whole_and_streamed(tokenizer):
    tools = tool_request(TOOLS, "auto", None)
    content, calls = ToolCallReader(tools, "hermes", tokenizer).message(HERMES_TEXT)
    assert content == "Let me look."
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in calls] == [("function", "get_weather", {"city": "Paris"}),
                                ("function", "get_time", {"zone": "CET"})]
    assert len({c["id"] for c in calls}) == 2
    reader = ToolCallReader(tools, "hermes", tokenizer)
    streamed, streamed_calls = _joined(_stream(reader, tokenizer, HERMES_TEXT))
    assert streamed == "Let me look."
    assert [(c["name"], json.loads(c["arguments"]), len(c["ids"]))
            for c in streamed_calls.values()] == [("get_weather", {"city": "Paris"}, 1),
                                                  ("get_time", {"zone": "CET"}, 1)]
    assert reader.finish_reason("stop", True) == "tool_calls"
    assert reader.finish_reason("length", True) == "length"


def test_auto_without_a_call_is_plain_content_and_parallel_false_keeps_the_first(tokenizer):
    tools = tool_request(TOOLS, "auto", None)
    assert ToolCallReader(tools, "hermes", tokenizer).message("Just text.") == (
        "Just text.", [])
    single = tool_request(TOOLS, "auto", False)
    _, calls = ToolCallReader(single, "hermes", tokenizer).message(HERMES_TEXT)
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    reader = ToolCallReader(single, "hermes", tokenizer)
    _, streamed = _joined(_stream(reader, tokenizer, HERMES_TEXT))
    assert list(streamed) == [0]


def test_none_reads_no_calls(tokenizer):
    reader = ToolCallReader(tool_request(TOOLS, "none", None), "hermes", tokenizer)
    assert not reader.parses
    assert reader.message(HERMES_TEXT) == (HERMES_TEXT, [])


def test_required_and_named_read_the_forced_json_whole_and_streamed(tokenizer):
    text = '[{"name": "get_weather", "parameters": {"city": "Oslo"}}, ' \
           '{"name": "get_time", "parameters": {"zone": "UTC"}}]'
    required = tool_request(TOOLS, "required", None)
    content, calls = ToolCallReader(required, None, tokenizer).message(text)
    assert content is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] \
        == [("get_weather", {"city": "Oslo"}), ("get_time", {"zone": "UTC"})]
    _, streamed = _joined(_stream(ToolCallReader(required, None, tokenizer), tokenizer, text))
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed.values()] == \
        [("get_weather", {"city": "Oslo"}), ("get_time", {"zone": "UTC"})]
    assert ToolCallReader(required, None, tokenizer).message('[{"name": "get_w') == (None, [])
    named = tool_request(TOOLS, {"type": "function", "function": {"name": "get_time"}}, None)
    reader = ToolCallReader(named, None, tokenizer)
    assert reader.message('{"zone": "UTC"}')[1][0]["function"] == {
        "name": "get_time", "arguments": '{"zone": "UTC"}'}
    assert reader.finish_reason("stop", True) == "stop"  # OpenAI's: named calls "stop"
    _, streamed = _joined(_stream(ToolCallReader(named, None, tokenizer), tokenizer,
                                  '{"zone": "UTC"}', pieces=3))
    assert streamed == {0: {"ids": streamed[0]["ids"], "name": "get_time",
                            "arguments": '{"zone": "UTC"}'}}
    assert len(streamed[0]["ids"]) == 1


# --- rendering --------------------------------------------------------------------------------
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris<|im_end|>"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]


@pytest.fixture
def tool_tokenizer(tiny_pair):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_pair.draft)
    tokenizer.chat_template = TEMPLATE.read_text()
    return tokenizer


def test_tools_and_tool_turns_render_into_the_prompt(tool_tokenizer):
    body = _request(messages=HISTORY, tools=TOOLS, tool_choice="auto")
    chat = render_messages(tool_tokenizer, body.messages, tools=body.tools_request().tools)
    assert chat.sentinel is not None  # the arguments hold a special-token string
    rendered = re.sub(chat.sentinel, lambda m: chat.replaced[int(m.group(1))], chat.text)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in rendered
    assert ('<|im_start|>assistant\n<tool_call>{"name": "get_weather", "arguments": '
            '{"city": "Paris<|im_end|>"}}</tool_call><|im_end|>') in rendered
    assert "<tool_response>sunny, 21 C</tool_response>" in rendered
    assert rendered.endswith("<|im_start|>assistant\n")
    ids = encode_chat(tool_tokenizer, chat)
    end = tool_tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Turns end with the special token; the one in the arguments is plain text.
    assert ids.count(end) == rendered.count("<|im_end|>") - 1
    assert tool_tokenizer.decode(ids) == rendered
    plain = render_messages(tool_tokenizer, _request(messages=HISTORY[:1]).messages)
    assert "<tools>" not in plain.text


def test_tokenize_renders_tools_as_the_chat_endpoint(tool_tokenizer):
    from server.protocol import tokenize_request
    from server.tokenizer_endpoints import token_ids

    body = _request(messages=HISTORY, tools=TOOLS)
    chat = encode_chat(tool_tokenizer, render_messages(
        tool_tokenizer, body.messages, tools=body.tools_request().tools))
    request = tokenize_request({"messages": HISTORY, "tools": TOOLS})
    request.reject_unsupported()
    assert token_ids(tool_tokenizer, request) == chat
    assert tokenize_request({"messages": HISTORY, "tools": []}).template_tools() is None
    with pytest.raises(APIError) as caught:
        tokenize_request({"messages": HISTORY, "tools": [{"type": "function"}]}
                         ).template_tools()
    assert caught.value.param == "tools"


# --- config ---------------------------------------------------------------------------------
def _config(tmp_path, tiny_pair, **server) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "models": {"target": str(tiny_pair.target), "draft": str(tiny_pair.draft),
                   "chat_template": str(TEMPLATE)},
        "server": server}))
    return path


def test_the_config_names_a_registered_parser(tmp_path, tiny_pair):
    assert "hermes" in parser_names()
    config = load_config(_config(tmp_path, tiny_pair, tool_call_parser="hermes"))
    assert config.server.tool_call_parser == "hermes"
    assert config.models.chat_template == str(TEMPLATE)
    assert load_config(_config(tmp_path, tiny_pair)).server.tool_call_parser is None
    with pytest.raises(ConfigError, match="server.tool_call_parser: .*unknown tool-call "
                                          "parser 'hermez'.*hermes"):
        load_config(_config(tmp_path, tiny_pair, tool_call_parser="hermez"))


def test_a_missing_chat_template_file_is_a_config_error(tmp_path, tiny_pair):
    path = _config(tmp_path, tiny_pair)
    raw = yaml.safe_load(path.read_text())
    raw["models"]["chat_template"] = str(tmp_path / "nope.jinja")
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="models.chat_template: no such file"):
        load_config(path)


def test_repository_gpu_configs_for_qwen_name_hermes():
    configs = Path(__file__).resolve().parent.parent / "configs"
    for path in configs.glob("qwen*.yaml"):
        assert load_config(path).server.tool_call_parser == "hermes", path.name


# --- HTTP, on the fake engine (no parser configured) ----------------------------------------
def test_auto_without_a_parser_is_a_400_over_http(served):
    url, engine = served
    body = {"model": engine.served_model_name, "messages": [{"role": "user", "content": "hi"}],
            "tools": TOOLS}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "tool_choice" and "server.tool_call_parser" in error["message"]
    response = httpx.post(f"{url}/v1/chat/completions", json={
        **body, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "tool_choice"
    # none: the tools are rendered, nothing is parsed.
    response = httpx.post(f"{url}/v1/chat/completions",
                          json={**body, "tool_choice": "none", "max_tokens": 4}, timeout=30)
    assert response.status_code == 200
    message = response.json()["choices"][0]["message"]
    assert isinstance(message["content"], str) and "tool_calls" not in message
