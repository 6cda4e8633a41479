"""The FastAPI application: OpenAI endpoints, health, metrics, auth and admission control.

The engine starts in the background when the app starts, so ``/health`` answers (503)
while models load; generation endpoints answer 503 until the engine is ready, after it
died, while shutting down, and when more requests wait than the configured bound.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import generation
from server.config import ServeConfig
from server.engine import Engine, build_engine
from server.errors import APIError, error_response, install_error_handlers
from server.metrics import ServerMetrics
from server.protocol import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)

EngineFactory = Callable[[ServeConfig], Engine]


class ServerState:
    """Mutable state of one running app."""

    def __init__(self, config: ServeConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self.inflight = 0  # engine requests admitted and not yet finished
        self.start_error: BaseException | None = None
        self.start_task: asyncio.Task | None = None
        self.metrics = ServerMetrics(engine.totals, lambda: self.inflight)


def create_app(config: ServeConfig, engine_factory: EngineFactory = build_engine) -> FastAPI:
    engine = engine_factory(config)
    state = ServerState(config, engine)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        async def start() -> None:
            try:
                await engine.start()
            except BaseException as exc:  # noqa: BLE001 - kept for /health and logs
                state.start_error = exc
                logger.exception("engine failed to start")

        state.start_task = asyncio.create_task(start())
        yield
        state.start_task.cancel()
        await asyncio.gather(state.start_task, return_exceptions=True)
        await engine.shutdown()

    app = FastAPI(title="kad-serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.kad = state
    install_error_handlers(app)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        endpoint = request.url.path if request.url.path in _ROUTES else "other"
        state.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        state.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    def authorize(request: Request) -> None:
        key = config.server.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), key):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    def require_ready() -> None:
        if state.start_error is not None or engine.errored:
            raise APIError(503, "the engine is not running", code="engine_dead")
        if not engine.ready:
            raise APIError(503, "the engine is still loading", code="engine_not_ready")

    def check_model(model: str) -> None:
        if model != engine.served_model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves "
                                f"'{engine.served_model_name}'", "model", "model_not_found")

    def admit(count: int) -> None:
        if state.inflight + count > config.server.max_waiting_requests:
            raise APIError(503, "server busy: too many requests waiting; retry later",
                           code="queue_full")

    async def respond(job: generation.Job, stream: bool, endpoint: str) -> Any:
        count = len(job.choices)
        state.inflight += count
        if not stream:
            try:
                return await generation.complete(job, state.metrics, endpoint)
            finally:
                state.inflight -= count

        async def events():
            try:
                async for event in generation.stream(job, state.metrics, endpoint):
                    yield event
            finally:
                state.inflight -= count

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> Response:
        if state.start_error is not None or engine.errored:
            return error_response(503, "the engine is not running", code="engine_dead")
        if not engine.ready:
            return error_response(503, "the engine is still loading", code="engine_not_ready")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": engine.served_model_name, "object": "model", "created": 0,
            "owned_by": "kad-serve", "max_model_len": engine.max_model_len,
        }]}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest) -> Any:
        require_ready()
        check_model(body.model)
        prompts = _completion_prompts(body, engine)
        admit(len(prompts) * body.n)
        job = generation.start_job(engine, body, prompts, "text_completion")
        return await respond(job, body.stream, "/v1/completions")

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        require_ready()
        check_model(body.model)
        prompt = _chat_prompt(body, engine)
        admit(body.n)
        job = generation.start_job(engine, body, [prompt], "chat.completion")
        return await respond(job, body.stream, "/v1/chat/completions")

    return app


_ROUTES = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}


def _chat_prompt(body: ChatCompletionRequest, engine: Engine) -> list[int]:
    """The aligned model's chat template; the base model sees the same token ids."""
    try:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        text = engine.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
    except ValueError as exc:
        raise APIError(400, str(exc), "messages") from exc
    except Exception as exc:  # noqa: BLE001 - template errors are the request's fault
        raise APIError(400, f"cannot apply the chat template: {exc}", "messages") from exc
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise APIError(400, "the messages render to an empty prompt", "messages")
    return ids


def _completion_prompts(body: CompletionRequest, engine: Engine) -> list[list[int]]:
    prompt = body.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt[0], int):
        prompt = [prompt]
    vocab = len(engine.tokenizer)
    prompts: list[list[int]] = []
    for item in prompt:
        if isinstance(item, str):
            ids = engine.tokenizer.encode(item, add_special_tokens=False)
            if not ids:
                raise APIError(400, "prompt encodes to no tokens", "prompt")
            prompts.append(ids)
        else:
            if any(not isinstance(t, int) or t < 0 or t >= vocab for t in item):
                raise APIError(400, f"token ids must lie in [0, {vocab})", "prompt")
            prompts.append(list(item))
    return prompts
