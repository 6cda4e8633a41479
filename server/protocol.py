"""Request bodies of the OpenAI endpoints, validated before anything reaches the engine.

Fields follow the OpenAI API (and vLLM's server where OpenAI is silent: ``top_k``).
Unknown fields that are harmless are ignored, as OpenAI does; fields that would change the
output and that this server does not implement are rejected by name, never silently
dropped. ``kad`` carries the per-request alignment settings.

Types are strict, as JSON has them: ``"stream": "yes"``, ``"n": "2"`` or token ids
``[true, false]`` are errors, not coerced (an integer is a number: ``"temperature": 1`` is
fine). Lists stop at their first bad item (``fail_fast``), so a body of a million bad items
costs one error, not a million. Strings must be valid Unicode (JSON can escape a lone
surrogate, ``"\\ud800"``, which no tokenizer or response can encode).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from server.alignment import AlignmentSettings
from server.engine.interface import STRUCTURED_KINDS, StructuredOutput
from server.errors import APIError, clip
from server.tool_calls import TOOL_FIELDS, ToolRequest, forced_constraint, tool_request

# Fields that change semantics and are not implemented: a 400 naming the field.
# ``functions`` / ``function_call``: OpenAI's deprecated forerunners of tools (refused, with a
# pointer to ``tools`` / ``tool_choice``, as vLLM does not serve them either).
UNSUPPORTED_FIELDS = (
    "functions", "function_call",
    "best_of", "suffix", "guided_json", "guided_regex",
    "guided_choice", "guided_grammar", "audio", "modalities",
    "prediction",
)
_DEPRECATED = {"functions": "tools", "function_call": "tool_choice"}
# Harmless when set to their "off" value (clients often send these defaults explicitly).
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
"best_of": (None, 1), "suffix": (None, ""),
    # Tools are a chat feature: on /v1/completions only their "off" values pass.
    "parallel_tool_calls": (None, True, False), "tools": (None, []),
    "tool_choice": (None, "none"),
}
MAX_N = 16
MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI and vLLM's default max_logprobs
MAX_STOP = 8
MAX_LOGIT_BIAS = 300  # tokens in one logit_bias, as OpenAI takes
MAX_BAD_WORDS = 128  # vLLM's VLLM_MAX_NUM_BAD_WORDS default bounds the tokenized variants
MAX_MESSAGES = 8192
# Integers a request hands to vLLM are bounded at int64's largest, the range of its tensors:
# its requests reach the engine core as msgpack, which has no integer above 2**64 - 1 (a
# top_k of 2**64 failed there, a 500 with nothing logged). A choice's seed is the request's
# plus the choice's index: below 2**64 too, which torch's generators take.
INT64_MAX = 2**63 - 1
# The smallest repetition_penalty served. vLLM divides a repeated token's positive logit by
# the penalty (and multiplies a negative one), in float32, and then divides by the
# temperature, which vLLM raises to at least 0.01 (SamplingParams; greedy rows: 1): a logit
# x becomes at most |x| / (0.01 * 0.01) = 1e4 |x|, finite in float32 (largest 3.4e38) for
# every |x| up to 3.4e34, and the softmax of finite logits is finite. fp16 models cannot
# emit a logit above 65504, and trained bf16 or float32 models emit logits of some tens (one
# near 1e34 is a broken model, the fault the hook's "degraded" alarm is for): p and pi stay
# finite. Far below the bound they do not: 1e-38 turns an ordinary logit of 10 into inf and
# every position degrades (verified against p alone). Nobody wants a smaller penalty:
# 0.01 already scales a repeated token's positive logit by 100.
MIN_REPETITION_PENALTY = 0.01
# Clients (and OpenAI itself) treat an explicit null as "use the default".
_NULL_MEANS_DEFAULT = ("temperature", "top_p", "n", "stream", "ignore_eos", "max_tokens",
                       "logprobs", "top_logprobs", "echo", "repetition_penalty",
                       "presence_penalty", "frequency_penalty", "logit_bias", "bad_words",
                       "min_tokens")


def _valid_unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode: a lone surrogate "
                         f"({value[exc.start]!a} at character {exc.start})") from None
    return value


def _list(item: Any, **constraints: Any) -> Any:
    """A JSON array of ``item`` that stops at its first invalid element."""
    return Annotated[list[item], Field(fail_fast=True, **constraints)]


def _response_format_constraint(response_format: dict[str, Any] | None,
                                ) -> StructuredOutput | None:
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind != "json_schema":
        what = f"type {clip(kind)!r}" if isinstance(kind, str) else "a value without a type"
        raise APIError(400, f"response_format {what} is not supported; it must be 'text', "
                            "'json_object' or 'json_schema'", "response_format")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise APIError(400, "response_format json_schema needs a 'json_schema' object with a "
                            "'name'", "response_format")
    schema = spec.get("schema")
    if schema is None:  # OpenAI: no schema, any JSON object
        return StructuredOutput("json_object")
    if not isinstance(schema, dict):
        raise APIError(400, "response_format json_schema.schema must be a JSON object",
                       "response_format")
    return StructuredOutput("json", schema)


def _structured_outputs_constraint(spec: dict[str, Any]) -> StructuredOutput:
    unknown = sorted(set(spec) - set(STRUCTURED_KINDS))
    if unknown:
        raise APIError(400, f"structured_outputs has unsupported key {clip(unknown[0])!r}; "
                            f"one of {', '.join(STRUCTURED_KINDS)} is expected",
                       "structured_outputs")
    kinds = [k for k in STRUCTURED_KINDS if spec.get(k) not in (None, False)]
    if len(kinds) != 1:
        raise APIError(400, "structured_outputs needs exactly one of "
                            f"{', '.join(STRUCTURED_KINDS)}", "structured_outputs")
    kind, value = kinds[0], spec[kinds[0]]
    expected = {"json": (dict, str), "json_object": (bool,), "regex": (str,),
                "choice": (list,), "grammar": (str,)}[kind]
    if not isinstance(value, expected) or (
            kind == "choice" and not (value and all(isinstance(c, str) for c in value))):
        raise APIError(400, f"structured_outputs.{kind} has the wrong type",
                       "structured_outputs")
    return StructuredOutput(kind, value)


TokenIds = _list(StrictInt)
StopList = _list(StrictStr, max_length=MAX_STOP)
ContentParts = _list(dict[str, Any])


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, strict=True)
    top_p: float = Field(1.0, gt=0.0, le=1.0, strict=True)
    # -1 and 0: no top-k; at most the vocabulary (``check_vocabulary``, with the engine's).
    top_k: StrictInt | None = Field(None, ge=-1, le=INT64_MAX)
    seed: StrictInt | None = Field(None, ge=0, le=INT64_MAX)
    stop: StrictStr | StopList | None = None
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: StrictBool = False  # vLLM extension: generate max_tokens even past end-of-text
    # vLLM extension: logits of tokens already in the prompt or output are divided (if
    # positive) or multiplied by it, on p before mixing, as vLLM does for its target. Bounded
    # below where pi stays finite (MIN_REPETITION_PENALTY).
    repetition_penalty: float = Field(1.0, ge=MIN_REPETITION_PENALTY, le=2.0, strict=True)
    # OpenAI's: subtracted from p's logit of each token already generated (presence: once;
    # frequency: per occurrence), before mixing, as vLLM applies them to its target.
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, strict=True)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, strict=True)
    # OpenAI's {"token id": bias}: added to p's logits before mixing, as vLLM biases its
    # target; a bias of -100 bans the token from pi itself. ``_logit_bias`` checks it.
    logit_bias: dict[str, Any] | None = None
    # vLLM extensions. bad_words: no output contains them (vLLM tokenizes each word with and
    # without a leading space); min_tokens: end-of-text and stop strings are forbidden
    # before this many tokens. Both forbid tokens in pi itself.
    bad_words: _list(Annotated[StrictStr, Field(min_length=1)],
                     max_length=MAX_BAD_WORDS) | None = None
    min_tokens: StrictInt = Field(0, ge=0, le=INT64_MAX)
    # OpenAI's {"type": "text" | "json_object" | "json_schema", "json_schema": {...}} and
    # vLLM's structured_outputs extension: checked by ``structured_output``.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    kad: AlignmentSettings | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items()
                    if not (v is None and k in _NULL_MEANS_DEFAULT)}
        return data

    # The fields this endpoint refuses (a 400 naming the field unless "off").
    refused: ClassVar[tuple[str, ...]] = UNSUPPORTED_FIELDS

    def reject_unsupported(self) -> None:
        """400 naming the first field that would change the output and is not implemented."""
        extra = self.model_extra or {}
        for name in self.refused:
            if name in extra and extra[name] not in _OFF_VALUES.get(name, (None,)):
                message = f"field '{name}' is not supported by this server"
                if name.startswith("guided_"):
                    message += "; use structured_outputs (vLLM's current name) instead"
                if name in _DEPRECATED:
                    message += (f"; it is deprecated by OpenAI: use '{_DEPRECATED[name]}' "
                                "instead")
                if name in TOOL_FIELDS:
                    message += "; tools are served on /v1/chat/completions"
                raise APIError(400, message, name, "unsupported_field")

    def structured_output(self) -> StructuredOutput | None:
        """The request's constraint on its text: ``response_format`` (OpenAI's
        ``json_object`` / ``json_schema``) or vLLM's ``structured_outputs`` extension
        (``json``, ``regex``, ``choice``, ``grammar``, ``json_object``); 400 naming the
        field when it is malformed or both are given."""
        found = _response_format_constraint(self.response_format)
        if self.structured_outputs is not None:
            if found is not None:
                raise APIError(400, "give either response_format or structured_outputs, "
                                    "not both", "structured_outputs")
            found = _structured_outputs_constraint(self.structured_outputs)
        return found

    def check_vocabulary(self, vocab_size: int) -> None:
        """400 naming ``top_k`` when it is larger than the vocabulary (``len`` of the served
        tokenizer), or ``logit_bias`` when it names a token outside it: bounds that need
        the engine, checked before anything is submitted."""
        if self.top_k is not None and self.top_k > vocab_size:
            raise APIError(400, f"invalid value for 'top_k': it must be at most the "
                                f"vocabulary size {vocab_size} (0 or -1: no top-k), got "
                                f"{self.top_k}", "top_k")
        outside = sorted(token for token in self.logit_bias or {} if token >= vocab_size)
        if outside:
            raise APIError(400, f"token_id(s) {outside[:8]} in logit_bias contain "
                                f"out-of-vocab token ids. Vocabulary size: {vocab_size}",
                           "logit_bias")

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, Any] | None) -> dict[int, float] | None:
        """Token ids (decimal strings, as JSON keys are) to finite biases in [-100, 100]."""
        if value is None:
            return None
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens can be biased, got {len(value)}")
        biases: dict[int, float] = {}
        for key, bias in value.items():
            if not (key.isascii() and key.isdigit()) or int(key) > INT64_MAX:
                raise ValueError(f"keys must be token ids (non-negative integers as strings), "
                                 f"got {clip(key)!r}")
            if isinstance(bias, bool) or not isinstance(bias, int | float) \
                    or not -100 <= bias <= 100:
                raise ValueError(f"the bias of token {key} must be a number from -100 to "
                                 f"100, got {clip(repr(bias))}")
            biases[int(key)] = float(bias)
        return biases

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        return _valid_unicode(value)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        for stop in stops:
            _valid_unicode(stop)
        return value

    @property
    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


def _text_parts(value: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    if isinstance(value, str):
        return _valid_unicode(value)
    for part in value:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ValueError("only text content parts are supported")
        _valid_unicode(part["text"])
    return value


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr
    arguments: StrictStr  # JSON text, as OpenAI returns it

    @field_validator("name", "arguments")
    @classmethod
    def _check_text(cls, value: str) -> str:
        return _valid_unicode(value)


class AssistantToolCall(BaseModel):
    """A call an earlier assistant turn made (``messages[i].tool_calls``)."""

    model_config = ConfigDict(extra="ignore")
    id: StrictStr
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    # None only in an assistant turn that made tool calls (OpenAI's rule).
    content: StrictStr | ContentParts | None = None
    name: str | None = None
    tool_calls: _list(AssistantToolCall) | None = None  # assistant turns
    tool_call_id: StrictStr | None = None  # tool turns: the call this answers

    @field_validator("content")
    @classmethod
    def _check_content(cls, value: str | list[dict[str, Any]] | None,
                       ) -> str | list[dict[str, Any]] | None:
        return value if value is None else _text_parts(value)

    @model_validator(mode="after")
    def _check_roles(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be null only in an assistant "
                             "message with tool_calls)")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls is only allowed in assistant messages")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs 'tool_call_id' (the call it answers)")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part["text"] for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template gets it, as vLLM passes it: tool calls with
        their arguments as an object (a string that is no JSON object becomes ``{}``, so a
        bad turn in the history cannot fail every later one), a tool turn's call id."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name,
                              "arguments": _arguments_object(call.function.arguments)}}
                for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def _arguments_object(arguments: str) -> dict[str, Any]:
    try:
        parsed = json.loads(arguments) if arguments else {}
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


Messages = _list(ChatMessage, min_length=1, max_length=MAX_MESSAGES)


class ChatCompletionRequest(_Common):
    messages: Messages
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # OpenAI's tools: validated by vLLM's own request model (``tools``).
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    _tools: ToolRequest | None = PrivateAttr(None)
    _tools_read: bool = PrivateAttr(False)

    def tools_request(self) -> ToolRequest | None:
        """The tool fields validated (400 naming the field when malformed); None: no tools."""
        if not self._tools_read:
            self._tools = tool_request(self.tools, self.tool_choice, self.parallel_tool_calls)
            self._tools_read = True
        return self._tools

    def structured_output(self) -> StructuredOutput | None:
        """The text's constraint: a forced tool call's JSON (``tool_choice`` ``required`` or
        a named function) or the request's own, never both (vLLM's rule)."""
        own = super().structured_output()
        tools = self.tools_request()
        forced = forced_constraint(tools) if tools is not None else None
        if forced is not None and own is not None:
            raise APIError(400, "You can only either use constraints for structured outputs "
                                "or tools, not both.", "tool_choice")
        return forced or own

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return value

    @property
    def num_logprobs(self) -> int | None:
        """Top alternatives per generated token (0: the token's own), None: no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None

    # Not given: the rest of the context window.
    default_max_tokens: ClassVar[int | None] = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Common):
    refused: ClassVar[tuple[str, ...]] = UNSUPPORTED_FIELDS + TOOL_FIELDS
    prompt: StrictStr | _list(StrictStr) | TokenIds | _list(TokenIds)
    # 0 only with echo: score the prompt, generate nothing (what scoring clients send).
    max_tokens: StrictInt | None = Field(None, ge=0)
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = Field(False, validate_default=True)

    @field_validator("echo")
    @classmethod
    def _zero_tokens_need_echo(cls, value: bool, info: ValidationInfo) -> bool:
        if info.data.get("max_tokens") == 0 and not value:
            raise ValueError("max_tokens 0 is only meaningful with echo (it returns the "
                             "prompt)")
        return value
    # Not given: OpenAI's 16, clamped to the rest of the context window (as vLLM does).
    default_max_tokens: ClassVar[int | None] = 16

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, str):
            if not value:
                raise ValueError("prompt must not be empty")
            return _valid_unicode(value)
        if not value:
            raise ValueError("prompt must not be empty")
        if isinstance(value[0], list) and any(not item for item in value):
            raise ValueError("token prompts must not be empty")
        if isinstance(value[0], str):
            if any(not item for item in value):
                raise ValueError("prompts must not be empty")
            for item in value:
                _valid_unicode(item)
        return value

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def prompt_count(self) -> int:
        """How many prompts (each one engine request per choice)."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return 1
        return len(self.prompt)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


# --- tokenizer endpoints (vLLM's /tokenize, /detokenize) ------------------------------------
# vLLM's chat-tokenize fields with no counterpart in this server's chat endpoint: a count
# made with them would not be what /v1/chat/completions sends, so they are refused.
# (``tools`` has one: rendered as the chat endpoint renders them.)
TOKENIZE_CHAT_UNSUPPORTED = ("chat_template", "chat_template_kwargs",
                             "media_io_kwargs", "mm_processor_kwargs")


class _TokenizerRequest(BaseModel):
    """Fields of every tokenizer request; ``model`` is optional, as in vLLM."""

    model_config = ConfigDict(extra="allow")
    model: StrictStr | None = None

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str | None) -> str | None:
        return value if value is None else _valid_unicode(value)


class TokenizeCompletionRequest(_TokenizerRequest):
    """``POST /tokenize`` with a text prompt (vLLM's shape and defaults)."""

    prompt: StrictStr
    add_special_tokens: StrictBool = True
    return_token_strs: StrictBool | None = False

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str) -> str:
        return _valid_unicode(value)


class TokenizeChatRequest(_TokenizerRequest):
    """``POST /tokenize`` with chat messages (vLLM's shape and defaults)."""

    messages: Messages
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    add_special_tokens: StrictBool = False
    return_token_strs: StrictBool | None = False
    tools: Any = None  # rendered by the chat template as /v1/chat/completions renders them

    def template_tools(self) -> tuple[dict[str, Any], ...] | None:
        """The tools as the chat template gets them (400 naming ``tools`` when malformed)."""
        tools = tool_request(self.tools, None, None) if self.tools is not None else None
        return tools.tools if tools is not None else None

    @field_validator("continue_final_message")
    @classmethod
    def _one_ending(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("add_generation_prompt"):
            raise ValueError("cannot be true while 'add_generation_prompt' is true (its "
                             "default): set 'add_generation_prompt' to false")
        return value

    def reject_unsupported(self) -> None:
        """400 naming the first vLLM field this server's chat rendering does not implement."""
        extra = self.model_extra or {}
        for name in TOKENIZE_CHAT_UNSUPPORTED:
            if extra.get(name) not in (None, [], {}):
                raise APIError(400, f"field '{name}' is not supported by this server", name,
                               "unsupported_field")


def tokenize_request(body: dict[str, Any]) -> TokenizeCompletionRequest | TokenizeChatRequest:
    """The form a ``/tokenize`` body is in: chat when it has ``messages`` (vLLM tells them
    apart the same way); pydantic's ValidationError for a bad body."""
    model = TokenizeChatRequest if "messages" in body else TokenizeCompletionRequest
    return model.model_validate(body)


class DetokenizeRequest(_TokenizerRequest):
    """``POST /detokenize``: token ids back to text (the vocabulary bound is the app's)."""

    tokens: _list(Annotated[StrictInt, Field(ge=0)])
