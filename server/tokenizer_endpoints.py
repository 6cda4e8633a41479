"""vLLM's tokenizer endpoints: ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``.

Shapes as vLLM 0.32's OpenAI server has them (``vllm/entrypoints/serve/tokenize``), so
clients written for vLLM (lm-evaluation-harness' ``tokenizer_backend=remote``, token
counters) work unchanged. The token ids are the ones this server's own endpoints send to
the engine: chat messages go through the same rendering as ``/v1/chat/completions`` (special
-token strings in content stay plain text), a text prompt through the same encoding as
``/v1/completions`` (plus the tokenizer's special tokens when ``add_special_tokens`` asks).

The tokenizer is loaded with the engine object, before the models are, so these endpoints
answer while the engine loads; they need the API key like the OpenAI endpoints.

Limits (``server.max_tokenize_chars``, ``server.max_tokenize_tokens``): tokenizing costs a
few hundred bytes of memory per character at its peak (the Rust tokenizer's alignments and
per-token records, then Python lists of ids and strings, then the JSON), so an unbounded
``/tokenize`` lets a handful of clients hold gigabytes. A prompt, or the content of a chat,
over the character cap is refused before it is tokenized; a result over the token cap is
refused before its token strings and JSON are built; a ``/detokenize`` list over the token
cap is refused before its ids are validated. Each is a 400 naming the field and the key.
The caps are not the context window: lm-evaluation-harness (``tokenizer_backend=remote``)
tokenizes whole documents and cuts them into windows itself.

The work runs in worker threads (``/health`` keeps answering), the response's JSON included
(FastAPI would otherwise serialize hundreds of thousands of ids on the event loop). At most
``_LARGE_AT_ONCE`` large inputs are tokenized at a time, so a burst of at-cap requests costs
that many tokenizations' memory, not one per request; small ones (nearly every document or
prompt) never wait behind them. After a large one, glibc is asked to give freed memory back
to the system: it otherwise keeps it in its per-thread arenas, and the process stays
gigabytes larger after a burst.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import json
import math
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError

from server.config import ServerSettings
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
# An input of more characters or tokens than this is "large": it waits for one of
# _LARGE_AT_ONCE slots, and glibc's free memory is trimmed after it. 64Ki characters peak at
# some tens of MB; a whole at-cap burst beyond the slots waits holding only its bodies.
_LARGE = 2**16
_LARGE_AT_ONCE = 2
_LIMIT_CODE = "tokenize_limit_exceeded"
_JSON_SLICE = 8192  # list items per json.dumps call (a millisecond or two each)

T = TypeVar("T")


def add_tokenizer_routes(app: FastAPI, engine: Engine, authorize: Callable[..., None],
                         check_model: Callable[[str], None], settings: ServerSettings) -> None:
    """Registers the three endpoints with the app's auth and model check, under the
    tokenizing limits of ``settings`` (``max_tokenize_chars``, ``max_tokenize_tokens``)."""
    max_chars, max_tokens = settings.max_tokenize_chars, settings.max_tokenize_tokens
    large_slots = asyncio.Semaphore(_LARGE_AT_ONCE)

    def tokenizer() -> Any:
        if getattr(engine, "tokenizer", None) is None:
            raise APIError(503, "the tokenizer is still loading", code="engine_not_ready")
        return engine.tokenizer

    def checked(model: str | None) -> None:
        if model is not None:  # optional here, as in vLLM
            check_model(model)

    async def in_thread(size: int, work: Callable[[], T]) -> T:
        """``work()`` in a worker thread; a large one waits for a slot, which it holds until
        the thread is done (a cancelled request's tokenizing still runs to its end)."""
        if size <= _LARGE:
            return await asyncio.to_thread(work)
        await large_slots.acquire()
        try:
            future = asyncio.ensure_future(asyncio.to_thread(_trimmed, work))
        except BaseException:
            large_slots.release()
            raise
        future.add_done_callback(lambda task: _release(large_slots, task))
        return await asyncio.shield(future)

    @app.post("/tokenize", dependencies=[Depends(authorize)])
    async def tokenize(body: dict[str, Any]) -> Response:
        request = _validated(body)
        checked(request.model)
        chars = _characters(request)
        if chars > max_chars:
            field = "messages" if isinstance(request, TokenizeChatRequest) else "prompt"
            what = "the content of 'messages'" if field == "messages" else "'prompt'"
            raise APIError(400, f"{what} has {chars} characters; /tokenize takes at most "
                                f"{max_chars} per request (server.max_tokenize_chars)",
                           field, _LIMIT_CODE)
        tok, max_model_len = tokenizer(), engine.max_model_len
        return await in_thread(chars, functools.partial(
            _tokenize, tok, request, max_model_len, max_tokens))

    @app.post("/detokenize", dependencies=[Depends(authorize)])
    async def detokenize(body: dict[str, Any]) -> Response:
        # Counted before validating: a body-limit-sized list is millions of ids.
        tokens = body.get("tokens")
        if isinstance(tokens, list) and len(tokens) > max_tokens:
            raise APIError(400, f"'tokens' has {len(tokens)} ids; /detokenize takes at most "
                                f"{max_tokens} per request (server.max_tokenize_tokens)",
                           "tokens", _LIMIT_CODE)
        request = _validated_detokenize(body)
        checked(request.model)
        tok = tokenizer()
        return await in_thread(len(request.tokens), functools.partial(
            _detokenize, tok, request.tokens))

    @app.get("/tokenizer_info", dependencies=[Depends(authorize)])
    async def get_tokenizer_info() -> dict[str, Any]:
        return tokenizer_info(tokenizer(), engine.max_model_len)


def _release(slots: asyncio.Semaphore, task: asyncio.Future) -> None:
    slots.release()
    if not task.cancelled():
        task.exception()  # retrieved: a cancelled request's error has nobody to go to


def _validated(body: dict[str, Any]) -> TokenizeCompletionRequest | TokenizeChatRequest:
    """The body as one of vLLM's two forms; a bad one is the same 400 as any bad body."""
    try:
        request = tokenize_request(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None
    if isinstance(request, TokenizeChatRequest):
        request.reject_unsupported()
        request.template_tools()  # malformed tools: the 400 before any tokenizing
    return request


def _validated_detokenize(body: dict[str, Any]) -> DetokenizeRequest:
    try:
        return DetokenizeRequest.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


def _characters(request: TokenizeCompletionRequest | TokenizeChatRequest) -> int:
    """What the character cap counts: the prompt, or the messages' content (the chat
    template's own text around it is bounded by the number of messages)."""
    if isinstance(request, TokenizeChatRequest):
        return sum(len(message.text()) for message in request.messages)
    return len(request.prompt)


def _json(content: dict[str, Any]) -> Response:
    """A JSON response built here (in the worker thread), byte for byte as Starlette's
    JSONResponse renders it."""
    return Response(_dumps(content).encode(), media_type="application/json")


def _dumps(value: Any) -> str:
    """``json.dumps`` as Starlette calls it, long lists a slice at a time: ``json.dumps``
    holds the GIL for its whole call (a tenth of a second for a quarter-million tokens and
    their strings), so the event loop gets it back between slices."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{_dumps(str(key))}:{_dumps(item)}"
                              for key, item in value.items()) + "}"
    if isinstance(value, list) and len(value) > _JSON_SLICE:
        return "[" + ",".join(_dumps(value[start:start + _JSON_SLICE])[1:-1]
                              for start in range(0, len(value), _JSON_SLICE)) + "]"
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _tokenize(tokenizer, request: TokenizeCompletionRequest | TokenizeChatRequest,
              max_model_len: int, max_tokens: int) -> Response:
    """vLLM's TokenizeResponse; 400 when it has more than ``max_tokens`` tokens. Blocking."""
    ids = token_ids(tokenizer, request)
    count = len(ids)
    if count > max_tokens:
        del ids  # not kept alive by the traceback: freed before the memory is trimmed
        field = "messages" if isinstance(request, TokenizeChatRequest) else "prompt"
        raise APIError(400, f"'{field}' encodes to {count} tokens; /tokenize returns at "
                            f"most {max_tokens} per request (server.max_tokenize_tokens): "
                            "send the text in parts", field, _LIMIT_CODE)
    strs = tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
    return _json({"count": count, "max_model_len": max_model_len, "tokens": ids,
                  "token_strs": strs})


def _detokenize(tokenizer, tokens: list[int]) -> Response:
    """The text of ``tokens``, special tokens included (as vLLM decodes); an id outside the
    vocabulary is a 400 (the tokenizer would drop it silently). Blocking."""
    vocab = len(tokenizer)
    if any(t >= vocab for t in tokens):
        raise APIError(400, f"token ids must lie in [0, {vocab})", "tokens")
    return _json({"prompt": tokenizer.decode(tokens)})


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``; None elsewhere (musl, macOS)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def _trimmed(work: Callable[[], T]) -> T:
    """``work()``, then freed memory back to the system. glibc keeps what a thread frees in
    that thread's arena (and raises its mmap threshold after large frees, so later large
    blocks come from arenas too): without this, a burst of large tokenizations leaves the
    process hundreds of MB to GB larger for good. Costs this worker thread tens of
    milliseconds (without the GIL), after large inputs only."""
    try:
        return work()
    finally:
        trim = _malloc_trim()
        if trim is not None:
            trim(0)


def token_ids(tokenizer, request: TokenizeCompletionRequest | TokenizeChatRequest
              ) -> list[int]:
    """What the chat or completions endpoint would send the engine for this input, with the
    tokenizer's special tokens around it when asked. Blocking."""
    if isinstance(request, TokenizeChatRequest):
        chat = render_messages(tokenizer, request.messages, tools=request.template_tools(),
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
