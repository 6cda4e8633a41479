"""Request bodies of the OpenAI endpoints, validated before anything reaches the engine.

Fields follow the OpenAI API (and vLLM's server where OpenAI is silent: ``top_k``).
Unknown fields that are harmless are ignored, as OpenAI does; fields that would change the
output and that this server does not implement are rejected by name, never silently
dropped. ``kad`` carries the per-request alignment settings.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator, model_validator

from server.alignment import AlignmentSettings
from server.errors import APIError

# Fields that change semantics and are not implemented: a 400 naming the field.
UNSUPPORTED_FIELDS = (
    "tools", "tool_choice", "functions", "function_call", "logit_bias", "logprobs",
    "top_logprobs", "response_format", "best_of", "echo", "suffix", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "min_tokens", "guided_json", "guided_regex",
    "guided_choice", "guided_grammar", "structured_outputs", "audio", "modalities",
    "prediction", "parallel_tool_calls",
)
# Harmless when set to their "off" value (clients often send these defaults explicitly).
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0), "best_of": (None, 1), "suffix": (None, ""),
    "logit_bias": (None, {}), "parallel_tool_calls": (None, True, False),
    "tools": (None, []), "tool_choice": (None, "none"), "response_format": (None,),
    "min_tokens": (None, 0),
}
MAX_N = 16
MAX_STOP = 8
# Clients (and OpenAI itself) treat an explicit null as "use the default".
_NULL_MEANS_DEFAULT = ("temperature", "top_p", "n", "stream", "ignore_eos", "max_tokens")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM extension: generate max_tokens even past end-of-text
    kad: AlignmentSettings | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items()
                    if not (v is None and k in _NULL_MEANS_DEFAULT)}
        return data

    def reject_unsupported(self) -> None:
        """400 naming the first field that would change the output and is not implemented."""
        extra = self.model_extra or {}
        for name in UNSUPPORTED_FIELDS:
            if name in extra and extra[name] not in _OFF_VALUES.get(name, (None,)):
                raise APIError(400, f"field '{name}' is not supported by this server", name,
                               "unsupported_field")

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return value

    @property
    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    # Not given: the rest of the context window.
    default_max_tokens: ClassVar[int | None] = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    # Not given: OpenAI's 16, clamped to the rest of the context window (as vLLM does).
    default_max_tokens: ClassVar[int | None] = 16

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, str):
            if not value:
                raise ValueError("prompt must not be empty")
            return value
        if not value:
            raise ValueError("prompt must not be empty")
        if isinstance(value[0], list) and any(not item for item in value):
            raise ValueError("token prompts must not be empty")
        if isinstance(value[0], str) and any(not item for item in value):
            raise ValueError("prompts must not be empty")
        return value

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens
