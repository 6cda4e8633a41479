"""The server's YAML config, validated by pydantic so a bad file fails with a clear message.

One file describes a model pair (large base target ``p``, small aligned draft ``q*``), the
vLLM engine around it, the default alignment rule and the HTTP server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from server.alignment import AlignmentSettings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelPair(_Strict):
    target: str = Field(description="large base model p: a local Hugging Face model directory "
                        "or a hub repo id (org/name; needs the hub)")
    draft: str = Field(description="small aligned model q* with the same tokenizer (directory "
                       "or hub repo id)")
    served_model_name: str = "kad"
    # The aligned model's tokenizer owns the chat template; the base model sees the same ids.
    tokenizer: str | None = None
    # A Jinja chat template file that replaces the tokenizer's (e.g. one that renders tools).
    chat_template: str | None = None


class EngineSettings(_Strict):
    num_speculative_tokens: int = Field(5, ge=1, le=16, description="gamma: drafts per step")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    tensor_parallel_size: int = Field(1, ge=1)
    draft_tensor_parallel_size: int | None = Field(None, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    distributed_executor_backend: Literal["mp", "ray", "uni"] | None = None
    max_model_len: int = Field(2048, ge=16)
    max_num_seqs: int = Field(64, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    cpu_kv_cache_gib: float | None = Field(
        None, gt=0, description="KV-cache size in GiB (vLLM kv_cache_memory_bytes); set it on CPU"
    )
    enforce_eager: bool = False
    # Scheduler token budget per step and chunked prefill; None: vLLM's platform default
    # (on CPU: whole prefills, budget max(context, 4096); see docs/deployment.md).
    max_num_batched_tokens: int | None = Field(None, ge=1)
    enable_chunked_prefill: bool | None = None
    seed: int = 0
    # JSON under response_format / structured_outputs without optional whitespace between
    # tokens (vLLM's structured_outputs_config.disable_any_whitespace, engine-wide in vLLM
    # 0.32): compact answers, and no model can spend its tokens on blank space.
    json_compact: bool = False


class ServerSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = None
    max_waiting_requests: int = Field(256, ge=1, description="queue bound; beyond it 503")
    # Checked before the body is parsed: larger bodies get 413, bodies still incomplete after
    # the timeout (a client that sent half a request) get 408.
    max_request_body_bytes: int = Field(8 * 2**20, ge=1, description="request body bound")
    request_body_timeout_s: float = Field(60.0, gt=0, description="time to receive a body")
    shutdown_grace_s: float = Field(30.0, ge=0)
    # Connections, enforced by the HTTP protocol before the app sees a request
    # (server.http_server): a request head (request line and headers) larger than
    # max_header_bytes or with more than max_header_count headers gets 431; one not complete
    # header_timeout_s after the connection opened (or the previous response ended) gets 408
    # (or a silent close when nothing of it arrived); an idle keep-alive connection is
    # closed after keep_alive_timeout_s; beyond max_connections open connections a new one
    # gets 503 and is closed. Idle connections must outlive the clients' own idle expiry
    # (httpx, so the openai client: 5 s), else a client reuses a connection the server is
    # closing and its request fails with a broken pipe: both bounds default to 10 s.
    max_header_bytes: int = Field(32 * 2**10, ge=1024, description="request head bound")
    max_header_count: int = Field(100, ge=8, description="headers per request")
    header_timeout_s: float = Field(10.0, gt=0, description="time to receive a request head")
    keep_alive_timeout_s: float = Field(10.0, gt=0, description="idle keep-alive time")
    max_connections: int = Field(1024, ge=1, description="open connections")
    # /tokenize and /detokenize (server.tokenizer_endpoints): a /tokenize prompt (or the
    # content of its messages) longer than max_tokenize_chars characters gets 400 before it
    # is tokenized; one that encodes to more than max_tokenize_tokens tokens, and a
    # /detokenize list longer than that, get 400 too. Deliberately not the context window:
    # evaluation harnesses (lm-evaluation-harness' remote tokenizer) tokenize whole
    # documents and cut them into windows themselves.
    max_tokenize_chars: int = Field(2**20, ge=1, description="characters per /tokenize")
    max_tokenize_tokens: int = Field(2**18, ge=1,
                                     description="tokens per /tokenize or /detokenize")
    # vLLM's tool-call parser (its --tool-call-parser) for tool_choice "auto": extracts the
    # calls from what the model wrote ("hermes" for Qwen2.5 / Qwen3). None: "auto" with
    # tools is a 400; "required" and a named function need no parser (a JSON grammar).
    tool_call_parser: str | None = None

    @field_validator("tool_call_parser")
    @classmethod
    def _known_parser(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from server.tool_calls import check_parser_name

        return check_parser_name(value)

    @field_validator("api_key")
    @classmethod
    def _key_not_blank(cls, value: str | None) -> str | None:
        # An empty key would mean "no auth" (fail open): leave it out (null) for that.
        if value is not None and not value.strip():
            raise ValueError("is empty; set a key, or leave it out to serve without one")
        return value


class ServeConfig(_Strict):
    models: ModelPair
    engine: EngineSettings = EngineSettings()
    alignment: AlignmentSettings = AlignmentSettings(rule="kad_dual", lam=0.4)
    server: ServerSettings = ServerSettings()
    # Demo configs only: build the tiny random model pair into models.* if it is missing.
    build_tiny_models: bool = False


class ConfigError(ValueError):
    """A config file that cannot be read or does not validate; the message says where."""


def load_config(path: str | Path) -> ServeConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a YAML mapping, got {type(raw).__name__}")
    try:
        config = ServeConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"config {path} is invalid: {problems}") from exc
    return _resolve_paths(config, path.parent)


def looks_like_hub_id(value: str) -> bool:
    """``org/name`` (one slash, no leading ``.``/``~``): a Hugging Face repo id, which vLLM
    downloads where the hub is reachable, when no such local path exists."""
    parts = value.split("/")
    return len(parts) == 2 and all(parts) and not value.startswith((".", "~"))


def _resolve_paths(config: ServeConfig, base: Path) -> ServeConfig:
    """Relative model paths are taken from the repository root when they exist there, else
    relative to the config file, so `configs/tiny-cpu.yaml` works from the checkout; a value
    that exists nowhere and has the shape ``org/name`` stays a hub id."""
    def resolve(value: str | None) -> str | None:
        if value is None or Path(value).is_absolute():
            return value
        for root in (Path.cwd(), base, base.parent):
            candidate = root / value
            if candidate.exists():
                return str(candidate.resolve())
        if looks_like_hub_id(value):
            return value
        return str((Path.cwd() / value).resolve())

    models = config.models.model_copy(update={
        "target": resolve(config.models.target),
        "draft": resolve(config.models.draft),
        "tokenizer": resolve(config.models.tokenizer),
        "chat_template": resolve(config.models.chat_template),
    })
    template = models.chat_template
    if template is not None and not Path(template).is_file():
        raise ConfigError(f"models.chat_template: no such file {template}")
    return config.model_copy(update={"models": models})
