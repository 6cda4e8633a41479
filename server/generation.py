"""From a validated request to engine jobs, and from engine chunks to OpenAI responses.

One HTTP request becomes ``len(prompts) * n`` engine requests ("choices"). They run as
tasks feeding one queue, so a streaming response interleaves every choice's deltas as they
come; cancelling the response (client gone) cancels the tasks, and each task's engine
generator aborts its engine request on the way out. ``Job.interrupt`` (shutdown grace over)
does the same from outside and lets the response end cleanly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from server.alignment import AlignmentSettings
from server.engine.interface import (
    Engine,
    GenerationChunk,
    InvalidSamplingFieldError,
    InvalidStructuredOutputError,
    RequestStats,
    SamplingOptions,
    TokenLogprob,
)
from server.errors import MESSAGE_LIMIT, APIError, clip, error_body, failure_message
from server.logprobs_format import chat_logprobs, completion_logprobs
from server.metrics import ServerMetrics
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.tool_calls import ToolCallReader


@dataclass
class Choice:
    """One engine request of an HTTP request and what it produced so far."""

    index: int
    request_id: str
    prompt_tokens: int
    stream: AsyncIterator[GenerationChunk]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stats: RequestStats | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None  # echo with logprobs: the prompt's
    echo_ids: list[int] = field(default_factory=list)  # the prompt, returned first (echo)
    text_offset: int = 0  # completions logprobs: where the next token's text starts
    tools: ToolCallReader | None = None  # chat with tools: reads the calls off the text
    called: bool = False  # a tool call was streamed


@dataclass(eq=False)  # identity semantics: admission control keeps jobs in a set
class Job:
    """Everything one HTTP generation request needs."""

    kind: str  # "chat.completion" | "text_completion"
    request_id: str
    model: str
    alignment: AlignmentSettings
    choices: list[Choice]
    include_usage: bool
    prompt_lengths: list[int]
    created: int = field(default_factory=lambda: int(time.time()))
    interrupted: bool = False
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    # Logprobs asked for: top alternatives per token (None: none).
    num_logprobs: int | None = None
    tokenizer: Any = None  # token texts of logprobs and echo

    @property
    def size(self) -> int:
        """Engine requests this job holds (what admission control counts)."""
        return len(self.choices)

    def interrupt(self) -> None:
        """Stop generating now (shutdown): unfinished choices end with reason "abort"."""
        if not self.interrupted:
            self.interrupted = True
            self.queue.put_nowait(_INTERRUPT)


_INTERRUPT = object()  # queue item: stop every choice of the job


def plan_sampling(body: ChatCompletionRequest | CompletionRequest, prompt_len: int,
                  max_model_len: int, choice: int) -> SamplingOptions:
    """The sampling options of one choice; 400 when the prompt or max_tokens do not fit."""
    room = max_model_len - prompt_len
    if room < 1:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt has {prompt_len} tokens, which leaves no room for a completion.",
            "messages" if isinstance(body, ChatCompletionRequest) else "prompt",
            "context_length_exceeded",
        )
    requested = body.requested_max_tokens
    field = ("max_completion_tokens" if getattr(body, "max_completion_tokens", None)
             else "max_tokens")  # the one the client set (chat takes either)
    if requested is not None and requested > room:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
            f"{requested} for the completion). Please reduce the prompt or {field}.",
            field,
            "context_length_exceeded",
        )
    if requested is None:  # not given: the endpoint's default, clamped to what remains
        requested = min(body.default_max_tokens or room, room)
    if body.min_tokens > requested:  # vLLM's own check and words
        raise APIError(400, f"min_tokens must be less than or equal to max_tokens="
                            f"{requested}, got {body.min_tokens}.", "min_tokens")
    return SamplingOptions(
        max_tokens=requested,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k if body.top_k and body.top_k > 0 else None,
        seed=None if body.seed is None else body.seed + choice,
        stop=body.stop_list,
        ignore_eos=body.ignore_eos,
        logprobs=body.num_logprobs,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=tuple(sorted((body.logit_bias or {}).items())),
        bad_words=tuple(body.bad_words or ()),
        min_tokens=body.min_tokens,
        structured=body.structured_output(),
    )


def start_job(engine: Engine, body: ChatCompletionRequest | CompletionRequest,
              prompts: list[list[int]], kind: str, tool_parser: str | None = None) -> Job:
    """Submit every choice to the engine (errors in the settings surface here as 400);
    ``tool_parser``: the config's vLLM tool-call parser, for ``tool_choice`` "auto"."""
    body.check_vocabulary(len(engine.tokenizer))
    alignment = body.kad or engine.default_alignment
    echo = isinstance(body, CompletionRequest) and body.echo
    prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
    request_id = f"{prefix}-{uuid.uuid4().hex}"
    choices = []
    tools = body.tools_request() if isinstance(body, ChatCompletionRequest) else None
    plans = [
        (p_index * body.n + i, prompt, plan_sampling(body, len(prompt), engine.max_model_len, i))
        for p_index, prompt in enumerate(prompts) for i in range(body.n)
    ]
    if echo and body.num_logprobs is not None:  # score the prompt too (log pi of each token)
        plans = [(index, prompt, dataclasses.replace(sampling, prompt_logprobs=True))
                 for index, prompt, sampling in plans]
    for index, prompt, sampling in plans:
        choice_id = f"{request_id}-{index}"
        try:
            stream = engine.generate(choice_id, prompt, sampling, alignment)
        except InvalidStructuredOutputError as exc:
            raise APIError(400, clip(str(exc), MESSAGE_LIMIT), _constraint_field(body)) \
                from exc
        except InvalidSamplingFieldError as exc:
            raise APIError(400, clip(str(exc), MESSAGE_LIMIT), exc.field) from exc
        except ValueError as exc:
            raise APIError(400, clip(str(exc), MESSAGE_LIMIT), "kad") from exc
        choice = Choice(index, choice_id, len(prompt), stream)
        if tools is not None:
            choice.tools = ToolCallReader(tools, tool_parser, engine.tokenizer)
        if echo:
            choice.echo_ids = list(prompt)
        choices.append(choice)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return Job(kind, request_id, body.model, alignment, choices, include_usage,
               [len(prompt) for prompt in prompts], num_logprobs=body.num_logprobs,
               tokenizer=engine.tokenizer)


def _constraint_field(body: ChatCompletionRequest | CompletionRequest) -> str:
    if isinstance(body, ChatCompletionRequest) and body.tools_request() is not None \
            and body.tools_request().choice in ("required", "named"):
        return "tools"
    return "structured_outputs" if body.structured_outputs is not None else "response_format"


def merged_stats(job: Job) -> dict[str, Any]:
    total = RequestStats()
    for choice in job.choices:
        if choice.stats is not None:
            total.add(choice.stats)
    return {"rule": job.alignment.rule, "param": job.alignment.param, **total.as_dict()}


def usage(job: Job) -> dict[str, int]:
    """Token counts; each prompt counted once whatever ``n`` is, as OpenAI does."""
    prompt_tokens = sum(job.prompt_lengths)
    completion_tokens = sum(len(choice.token_ids) for choice in job.choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _pump(choice: Choice, queue: asyncio.Queue) -> None:
    """Feed one choice's chunks into the shared queue; ``None`` chunk marks its end."""
    try:
        async for chunk in choice.stream:
            choice.text += chunk.text
            choice.token_ids += chunk.token_ids
            choice.logprobs += chunk.logprobs or []
            choice.prompt_logprobs = chunk.prompt_logprobs or choice.prompt_logprobs
            if chunk.finished:
                choice.finish_reason = chunk.finish_reason
                choice.stats = chunk.stats
            await queue.put((choice, chunk, None))
    except Exception as exc:  # noqa: BLE001 - reported to the client, not swallowed
        await queue.put((choice, None, exc))
        return
    await queue.put((choice, None, None))


async def _events(job: Job, metrics: ServerMetrics, endpoint: str) -> AsyncIterator[tuple]:
    """Chunks of every choice as they come; cancels the choices if the consumer leaves.

    On ``Job.interrupt`` each unfinished choice gets a final empty chunk with reason "abort".
    """
    queue = job.queue
    tasks = [asyncio.create_task(_pump(choice, queue)) for choice in job.choices]
    started = time.perf_counter()
    first = True
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is _INTERRUPT:
                break
            choice, chunk, error = item
            if chunk is None:
                remaining -= 1
                if error is not None:
                    raise error
                continue
            if first and chunk.token_ids:
                metrics.first_token.labels(endpoint).observe(time.perf_counter() - started)
                first = False
            yield choice, chunk
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for choice in job.choices:  # only after an interrupt
        if choice.finish_reason is None:
            choice.finish_reason = "abort"
            yield choice, GenerationChunk([], "", finished=True, finish_reason="abort")


def _record(job: Job, metrics: ServerMetrics) -> None:
    metrics.prompt_tokens.inc(usage(job)["prompt_tokens"])
    metrics.generation_tokens.labels(job.alignment.rule).inc(usage(job)["completion_tokens"])


async def complete(job: Job, metrics: ServerMetrics, endpoint: str) -> dict[str, Any]:
    """Run a non-streaming job to the end and build the response body."""
    try:
        async for _ in _events(job, metrics, endpoint):
            pass
    except APIError:
        raise
    except Exception as exc:
        raise APIError(500, f"generation failed: {failure_message(exc)}") from exc
    _record(job, metrics)
    if job.interrupted:
        raise APIError(503, "the server is shutting down; the request was aborted",
                       code="shutting_down")
    choices = []
    for choice in sorted(job.choices, key=lambda c: c.index):
        entries = (choice.prompt_logprobs or []) + choice.logprobs
        entry: dict[str, Any] = {"index": choice.index, "finish_reason": choice.finish_reason,
                                 "logprobs": _logprobs(job, choice, entries)}
        if job.kind == "chat.completion":
            entry["message"] = {"role": "assistant", "content": choice.text}
            if choice.tools is not None and choice.tools.parses:
                content, calls = choice.tools.message(choice.text)
                entry["message"] = {"role": "assistant", "content": content}
                if calls:  # OpenAI leaves the key out when there are none
                    entry["message"]["tool_calls"] = calls
                entry["finish_reason"] = choice.tools.finish_reason(choice.finish_reason,
                                                                    bool(calls))
        else:
            entry["text"] = _echo_text(job, choice) + choice.text
        choices.append(entry)
    return {"id": job.request_id, "object": job.kind, "created": job.created,
            "model": job.model, "choices": choices, "usage": usage(job),
            "kad": merged_stats(job)}


def _echo_text(job: Job, choice: Choice) -> str:
    """The prompt as text when the request asked for ``echo`` (else empty)."""
    return job.tokenizer.decode(choice.echo_ids) if choice.echo_ids else ""


def _logprobs(job: Job, choice: Choice, entries: list[TokenLogprob]) -> dict[str, Any] | None:
    """A choice's (or a delta's) logprobs object, None when the request asked for none."""
    if job.num_logprobs is None:
        return None

    def token_text(token_id: int) -> str:
        return job.tokenizer.decode([token_id])

    if job.kind == "chat.completion":
        return chat_logprobs(entries, token_text, job.num_logprobs)
    body, choice.text_offset = completion_logprobs(entries, token_text, choice.text_offset)
    return body


def _merge(delta: dict[str, Any] | None, last: dict[str, Any] | None,
           ) -> dict[str, Any] | None:
    """Two deltas as one (the last piece of a stream and the parser's flushed arguments)."""
    if not last:
        return delta
    if not delta:
        return last
    merged = dict(delta)
    merged["tool_calls"] = delta.get("tool_calls", []) + last["tool_calls"]
    return merged


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def stream(job: Job, metrics: ServerMetrics, endpoint: str) -> AsyncIterator[str]:
    """OpenAI server-sent events for a streaming job, ending with ``data: [DONE]``."""
    chat = job.kind == "chat.completion"
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk_body(choice: Choice, delta: dict[str, Any] | str, finish: str | None,
                   logprobs: list[TokenLogprob] | None = None) -> dict:
        body: dict[str, Any] = {
            "index": choice.index, "finish_reason": finish,
            "logprobs": None if logprobs is None else _logprobs(job, choice, logprobs)}
        if chat:
            body["delta"] = delta
        else:
            body["text"] = delta
        return {"id": job.request_id, "object": obj, "created": job.created,
                "model": job.model, "choices": [body]}

    want_logprobs = job.num_logprobs is not None
    for choice in job.choices:
        if chat:
            yield _sse(chunk_body(choice, {"role": "assistant", "content": ""}, None))
        elif choice.echo_ids and not want_logprobs:
            yield _sse(chunk_body(choice, _echo_text(job, choice), None))
    try:
        async for choice, chunk in _events(job, metrics, endpoint):
            if chunk.prompt_logprobs:  # echo with logprobs: the prompt, once it is scored
                yield _sse(chunk_body(choice, _echo_text(job, choice), None,
                                      chunk.prompt_logprobs))
            # A token whose text is still held back (an incomplete character) still sends
            # its logprobs.
            reader = choice.tools
            if reader is not None and reader.parses:
                delta = reader.delta(chunk.text, chunk.token_ids) if (
                    chunk.text or chunk.token_ids) else None
                if chunk.finished:
                    delta = _merge(delta, reader.flush())
                if delta or (want_logprobs and chunk.token_ids):
                    choice.called |= "tool_calls" in (delta or {})
                    yield _sse(chunk_body(choice, delta or {}, None,
                                          chunk.logprobs or [] if want_logprobs else None))
                if chunk.finished:
                    yield _sse(chunk_body(choice, {}, reader.finish_reason(
                        chunk.finish_reason, choice.called)))
                continue
            if chunk.text or (want_logprobs and chunk.token_ids):
                delta = {"content": chunk.text} if chat else chunk.text
                yield _sse(chunk_body(choice, delta, None,
                                      chunk.logprobs or [] if want_logprobs else None))
            if chunk.finished:
                yield _sse(chunk_body(choice, {} if chat else "", chunk.finish_reason))
    except Exception as exc:  # noqa: BLE001 - the stream is open: report in-band
        yield _sse(error_body(500, f"generation failed: {failure_message(exc)}"))
        yield "data: [DONE]\n\n"
        return
    _record(job, metrics)
    if job.include_usage:
        yield _sse({"id": job.request_id, "object": obj, "created": job.created,
                    "model": job.model, "choices": [], "usage": usage(job),
                    "kad": merged_stats(job)})
    yield "data: [DONE]\n\n"
