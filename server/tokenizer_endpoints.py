"""vLLM's tokenizer endpoints: ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``.

Shapes as vLLM 0.32's OpenAI server has them (``vllm/entrypoints/serve/tokenize``), so
clients written for vLLM (lm-evaluation-harness' ``tokenizer_backend=remote``, token
counters) work unchanged. The token ids are the ones this server's own endpoints send to
the engine: chat messages go through the same rendering as ``/v1/chat/completions`` (special
-token strings in content stay plain text), a text prompt through the same encoding as
``/v1/completions`` (plus the tokenizer's special tokens when ``add_special_tokens`` asks).

The tokenizer is loaded with the engine object, before the models are, so these endpoints
answer while the engine loads; they need the API key like the OpenAI endpoints.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from server.engine import Engine
from server.errors import APIError
from server.prompts import encode_chat, encode_text, render_messages
from server.protocol import (
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    tokenize_request,
)

ROUTES = ("/tokenize", "/detokenize", "/tokenizer_info")
# tokenizer_config.json fields that are paths on this machine: not the client's business
# (vLLM drops the first two).
_PATH_FIELDS = ("vocab_file", "merges_file", "tokenizer_file", "name_or_path")
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def add_tokenizer_routes(app: FastAPI, engine: Engine, authorize: Callable[..., None],
                         check_model: Callable[[str], None]) -> None:
    """Registers the three endpoints with the app's auth and model check."""

    def tokenizer() -> Any:
        if getattr(engine, "tokenizer", None) is None:
            raise APIError(503, "the tokenizer is still loading", code="engine_not_ready")
        return engine.tokenizer

    def checked(model: str | None) -> None:
        if model is not None:  # optional here, as in vLLM
            check_model(model)

    @app.post("/tokenize", dependencies=[Depends(authorize)])
    async def tokenize(body: dict[str, Any]) -> dict[str, Any]:
        request = _validated(body)
        checked(request.model)
        # Tokenizing megabytes takes seconds: off the event loop, like the OpenAI endpoints.
        return await asyncio.to_thread(_tokenize, tokenizer(), request, engine.max_model_len)

    @app.post("/detokenize", dependencies=[Depends(authorize)])
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        checked(body.model)
        return {"prompt": await asyncio.to_thread(_detokenize, tokenizer(), body.tokens)}

    @app.get("/tokenizer_info", dependencies=[Depends(authorize)])
    async def get_tokenizer_info() -> dict[str, Any]:
        return tokenizer_info(tokenizer(), engine.max_model_len)


def _validated(body: dict[str, Any]) -> TokenizeCompletionRequest | TokenizeChatRequest:
    """The body as one of vLLM's two forms; a bad one is the same 400 as any bad body."""
    try:
        request = tokenize_request(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None
    if isinstance(request, TokenizeChatRequest):
        request.reject_unsupported()
    return request


def _tokenize(tokenizer, request: TokenizeCompletionRequest | TokenizeChatRequest,
              max_model_len: int) -> dict[str, Any]:
    """vLLM's TokenizeResponse. Blocking."""
    ids = token_ids(tokenizer, request)
    strs = tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
    return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids,
            "token_strs": strs}


def _detokenize(tokenizer, tokens: list[int]) -> str:
    """The text of ``tokens``, special tokens included (as vLLM decodes); an id outside the
    vocabulary is a 400 (the tokenizer would drop it silently). Blocking."""
    vocab = len(tokenizer)
    if any(t >= vocab for t in tokens):
        raise APIError(400, f"token ids must lie in [0, {vocab})", "tokens")
    return tokenizer.decode(tokens)


def token_ids(tokenizer, request: TokenizeCompletionRequest | TokenizeChatRequest
              ) -> list[int]:
    """What the chat or completions endpoint would send the engine for this input, with the
    tokenizer's special tokens around it when asked. Blocking."""
    if isinstance(request, TokenizeChatRequest):
        chat = render_messages(tokenizer, request.messages,
                               add_generation_prompt=request.add_generation_prompt,
                               continue_final_message=request.continue_final_message)
        ids = encode_chat(tokenizer, chat)
    else:
        ids = encode_text(tokenizer, request.prompt)
    if not request.add_special_tokens:
        return ids
    prefix, suffix = special_affixes(tokenizer)
    return prefix + ids + suffix


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens ``add_special_tokens=True`` puts before and after a text (BOS,
    EOS, ...), read off one probe encoded both ways: transformers 5 has no
    ``build_inputs_with_special_tokens`` for every tokenizer, and encoding the rendered
    chat with them would make special-token strings in content control tokens."""
    bare = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    raise RuntimeError("cannot tell the tokenizer's special tokens from its text tokens")


def tokenizer_info(tokenizer, max_model_len: int) -> dict[str, Any]:
    """vLLM's ``/tokenizer_info``: the tokenizer's configuration (tokenizer_config.json as
    loaded, special tokens as strings) plus its class, the chat template this server
    renders with, and the served context length."""
    config = {key: value for key, value in (getattr(tokenizer, "init_kwargs", None) or {})
              .items() if key not in _PATH_FIELDS}
    config = _json_safe(config)
    for name in _SPECIAL_TOKENS:  # the tokenizer's own, also when set outside its config
        config[name] = _json_safe(getattr(tokenizer, name, None))
    config["tokenizer_class"] = type(tokenizer).__name__
    config["chat_template"] = _chat_template(tokenizer)
    config["max_model_len"] = max_model_len
    return config


def _chat_template(tokenizer) -> str | None:
    """The template ``apply_chat_template`` uses by default (a named set's "default")."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) else None


def _json_safe(value: Any) -> Any:
    """JSON for a tokenizer config value: an AddedToken is its string (as vLLM sends it),
    keys are strings, anything else unknown is its ``str``; JSON has no NaN or infinity."""
    if hasattr(value, "content"):
        return value.content
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        value = sorted(value, key=str)
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
