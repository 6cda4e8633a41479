"""The FastAPI application: OpenAI endpoints, health, metrics, auth and admission control
(and vLLM's tokenizer endpoints, from ``server.tokenizer_endpoints``).

The engine starts in the background when the app starts, so ``/health`` answers (503)
while models load; generation endpoints answer 503 until the engine is ready, after it
died, while shutting down, and when more requests wait than the configured bound. A client
that disconnects (streaming or not) has its engine requests aborted. An engine that fails
to start or dies makes the server exit with status 1 (``ServerState.fail``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import generation
from server.admission import Admission
from server.config import ServeConfig
from server.engine import Engine, build_engine
from server.errors import APIError, clip, error_response, install_error_handlers
from server.json_body import StrictJSONMiddleware
from server.limits import BodyLimitMiddleware, RequestHeadMiddleware
from server.metrics import MetricsMiddleware, ServerMetrics
from server.prompts import encode_chat, encode_text, render_messages, surely_too_long
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.tokenizer_endpoints import ROUTES as TOKENIZER_ROUTES
from server.tokenizer_endpoints import add_tokenizer_routes
from server.tool_calls import check_parser_configured

logger = logging.getLogger(__name__)

EngineFactory = Callable[[ServeConfig], Engine]

_WATCHDOG_S = 0.5  # how often the lifespan checks that the engine is alive
_DEAD_ENGINE_GRACE_S = 2.0  # in-flight requests' time to end after the engine died


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


class ServerState:
    """Mutable state of one running app."""

    def __init__(self, config: ServeConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self.admission = Admission(config.server.max_waiting_requests)
        self.start_error: BaseException | None = None
        self.start_task: asyncio.Task | None = None
        self.drain_task: asyncio.Future | None = None
        self.watchdog_task: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.metrics = ServerMetrics(engine.totals, lambda: self.admission.running,
                                     engine.metrics_registry)
        # What the process exits with; 1 once the engine failed to start or died.
        self.exit_status = 0
        # Set by the CLI: asks uvicorn to stop (without it, e.g. in tests, the app stays up
        # and answers 503 "engine_dead").
        self.request_exit: Callable[[], None] | None = None

    def fail(self, message: str) -> None:
        """The engine failed to start or died: log one line, end the in-flight requests (the
        engine's own errors reach them first; the short grace is a backstop) and exit 1, so
        that an orchestrator restarts the server."""
        if self.exit_status:
            return
        self.exit_status = 1
        logger.critical("%s; exiting with status 1", message)
        if self.drain_task is None:
            self.drain_task = asyncio.ensure_future(self.admission.drain(_DEAD_ENGINE_GRACE_S))
        if self.request_exit is not None:
            self.request_exit()

    def begin_shutdown(self) -> None:
        """Called on SIGTERM (from the signal handler): refuse new requests, let in-flight
        ones finish for ``server.shutdown_grace_s``, then abort the rest cleanly."""
        if self.loop is None:
            return

        def drain() -> None:
            if self.drain_task is None:
                grace = self.config.server.shutdown_grace_s
                self.drain_task = asyncio.ensure_future(self.admission.drain(grace))

        self.loop.call_soon_threadsafe(drain)


class JobStreamingResponse(StreamingResponse):
    """An SSE response that always closes its generator and releases its job, whether it
    ran to the end, the client left, or it never started (client gone before headers)."""

    def __init__(self, events: AsyncIterator[str], release: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self._events, self._release = events, release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._events.aclose()  # cancels the choices: the engine aborts them
            finally:
                self._release()


async def _until_disconnect(receive) -> None:
    """Returns when the client hangs up (FastAPI has read the whole body by then)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_client_leaves(request: Request, work: Awaitable[Any]) -> Any:
    """Run a non-streaming job, cancelling it (so the engine aborts it) if the client goes."""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_until_disconnect(request.receive))
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, listener):
            if not pending.done():
                pending.cancel()
        await asyncio.gather(task, listener, return_exceptions=True)
    if task.cancelled():
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    return task.result()


def create_app(config: ServeConfig, engine_factory: EngineFactory = build_engine) -> FastAPI:
    """The app; ``engine_factory`` lets tests serve a fake engine through the same code."""
    engine = engine_factory(config)
    if config.models.chat_template is not None:  # the config's template replaces the model's
        engine.tokenizer.chat_template = Path(config.models.chat_template).read_text()
    state = ServerState(config, engine)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        async def start() -> None:
            try:
                await engine.start()
            except asyncio.CancelledError:  # shutdown during start-up: not a failure
                raise
            except BaseException as exc:  # kept for /health
                state.start_error = exc
                logger.debug("engine start failure", exc_info=exc)
                state.fail(f"engine failed to start: {_one_line(exc)}")

        async def watchdog() -> None:
            """vLLM's engine core died (crash, kill -9): the process must not live on."""
            while not engine.errored:
                await asyncio.sleep(_WATCHDOG_S)
            state.fail("the engine died (vLLM's engine core process exited or failed)")

        state.loop = asyncio.get_running_loop()
        state.start_task = asyncio.create_task(start())
        state.watchdog_task = asyncio.create_task(watchdog())
        yield
        state.watchdog_task.cancel()
        state.start_task.cancel()
        await asyncio.gather(state.start_task, state.watchdog_task, return_exceptions=True)
        if state.drain_task is not None:
            await asyncio.gather(state.drain_task, return_exceptions=True)
        await engine.shutdown()

    app = FastAPI(title="kad-serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.kad = state
    install_error_handlers(app)
    # Outermost last: metrics, then the head's checks, the body's size and time, strict JSON.
    app.add_middleware(StrictJSONMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.server.max_request_body_bytes,
                       timeout_s=config.server.request_body_timeout_s)
    app.add_middleware(RequestHeadMiddleware, max_header_bytes=config.server.max_header_bytes,
                       max_header_count=config.server.max_header_count)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics, routes=_ROUTES)  # outermost

    def authorize(request: Request) -> None:
        key = config.server.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), key.encode()
        ):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    def unavailable() -> APIError | None:
        if state.start_error is not None or engine.errored:
            return APIError(503, "the engine is not running", code="engine_dead")
        if not engine.ready:
            return APIError(503, "the engine is still loading", code="engine_not_ready")
        if state.admission.draining:
            return APIError(503, "the server is shutting down", code="shutting_down")
        return None

    def require_ready() -> None:
        error = unavailable()
        if error is not None:
            raise error

    def check_model(model: str) -> None:
        if model != engine.served_model_name:
            raise APIError(404, f"The model {clip(model)!r} does not exist; this server serves "
                                f"'{engine.served_model_name}'", "model", "model_not_found")

    async def run_job(body: ChatCompletionRequest | CompletionRequest, prompts: list[list[int]],
                      kind: str, endpoint: str, request: Request) -> Any:
        state.admission.check(len(prompts) * body.n)
        job = generation.start_job(engine, body, prompts, kind,
                                   tool_parser=config.server.tool_call_parser)
        state.admission.add(job)  # no await since check(): the bound holds
        if body.stream:
            events = generation.stream(job, state.metrics, endpoint)
            return JobStreamingResponse(events, lambda: state.admission.release(job))
        try:
            return await _unless_client_leaves(
                request, generation.complete(job, state.metrics, endpoint)
            )
        finally:
            state.admission.release(job)

    @app.get("/health")
    async def health() -> Response:
        error = unavailable()
        if error is not None:
            return error_response(error.status, error.message, code=error.code)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": engine.served_model_name, "object": "model", "created": 0,
            "owned_by": "kad-serve", "max_model_len": engine.max_model_len,
            # What clients and kad-bench need to label results: gamma and the default rule.
            "num_speculative_tokens": config.engine.num_speculative_tokens,
            "kad": {"rule": config.alignment.rule, "param": config.alignment.param},
        }]}

    # Tokenizing can take seconds (long prompts, many prompts): it runs in a worker thread
    # so /health and every other request keep being answered meanwhile.
    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        body.reject_unsupported()
        require_ready()
        check_model(body.model)
        count = body.prompt_count
        state.admission.check_size(count * body.n,
                                   "prompt" if count > state.admission.limit else "n")
        prompts = await asyncio.to_thread(_completion_prompts, body, engine)
        require_ready()
        return await run_job(body, prompts, "text_completion", "/v1/completions", request)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        body.reject_unsupported()
        check_parser_configured(body.tools_request(), config.server.tool_call_parser)
        require_ready()
        check_model(body.model)
        state.admission.check_size(body.n, "n")
        prompt = await asyncio.to_thread(_chat_prompt, body, engine)
        require_ready()
        return await run_job(body, [prompt], "chat.completion", "/v1/chat/completions",
                             request)

    add_tokenizer_routes(app, engine, authorize, check_model, config.server)
    return app


_ROUTES = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
           *TOKENIZER_ROUTES}


def _over_context(engine: Engine, chars: int, param: str) -> APIError | None:
    """A prompt too long for the context window by its length alone: refused untokenized."""
    limit = engine.max_model_len
    if not surely_too_long(engine.tokenizer, chars, limit):
        return None
    return APIError(400, f"This model's maximum context length is {limit} tokens. However, "
                         f"your prompt has {chars} characters, which is more than {limit} "
                         "tokens.", param, "context_length_exceeded")


def _chat_prompt(body: ChatCompletionRequest, engine: Engine) -> list[int]:
    """The aligned model's chat template; the base model sees the same token ids. Message
    content is text: special-token strings in it do not become control tokens."""
    tools = body.tools_request()
    chat = render_messages(engine.tokenizer, body.messages,
                           tools=tools.tools if tools is not None else None)
    error = _over_context(engine, chat.chars, "messages")
    if error is not None:
        raise error
    ids = encode_chat(engine.tokenizer, chat)
    if not ids:
        raise APIError(400, "the messages render to an empty prompt", "messages")
    return ids


def _completion_prompts(body: CompletionRequest, engine: Engine) -> list[list[int]]:
    """Completions prompts as given (special-token strings in text prompts are tokens)."""
    prompt = body.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt[0], int):
        prompt = [prompt]
    vocab = len(engine.tokenizer)
    token_prompts: list[list[int]] = []
    for item in prompt:
        if isinstance(item, str):
            error = _over_context(engine, len(item), "prompt")
            if error is not None:
                raise error
            ids = encode_text(engine.tokenizer, item)
            if not ids:
                raise APIError(400, "prompt encodes to no tokens", "prompt")
            token_prompts.append(ids)
        else:
            if any(type(t) is not int or t < 0 or t >= vocab for t in item):
                raise APIError(400, f"token ids must lie in [0, {vocab})", "prompt")
            token_prompts.append(list(item))
    return token_prompts
