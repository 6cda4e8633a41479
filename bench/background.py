"""Run an async engine on its own event loop thread, driven from synchronous code.

Tests, benchmarks and the GPU check submit many concurrent requests to one engine from
plain functions; the engine (and vLLM's AsyncLLM inside it) lives on a loop in a
background thread for its whole life, so consecutive calls share one running engine.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from server.alignment import AlignmentSettings
from server.engine.interface import Engine, RequestStats, SamplingOptions, TokenLogprob

T = TypeVar("T")


@dataclass
class Completion:
    """A whole generation: token ids, text, finish reason and alignment statistics."""

    token_ids: list[int]
    text: str
    finish_reason: str | None
    stats: RequestStats | None
    first_token_s: float | None = None  # seconds from submission to the first token
    total_s: float = 0.0
    logprobs: list[TokenLogprob] | None = None  # when the sampling options asked for them
    prompt_logprobs: list[TokenLogprob] | None = None  # when asked to score the prompt


class LoopThread:
    """An event loop in a daemon thread; ``run`` executes a coroutine there and waits."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


@contextmanager
def target_alone(config: Any) -> Iterator[tuple[LoopThread, Any]]:
    """vLLM's own ``AsyncLLM`` for a ``ServeConfig``'s target alone (kad-serve's engine
    settings, no draft model, no hook) on a loop thread: the baseline the benchmarks put
    beside kad-serve. Yields ``(loop thread, engine)``; both are shut down after."""
    from vllm.v1.engine.async_llm import AsyncLLM

    from server.engine.vllm_engine import engine_args

    plain = engine_args(config)
    plain.speculative_config = None
    holder = LoopThread()
    llm = holder.run(asyncio.to_thread(AsyncLLM.from_engine_args, plain))
    try:
        yield holder, llm
    finally:
        llm.shutdown()
        holder.stop()
        # This generator's frame stays referenced after the block (gc.get_referrers shows
        # it); without this the engine lives until interpreter exit, where its __del__ fails.
        del llm


class BackgroundEngine(LoopThread):
    """An engine living on its own loop thread, driven from synchronous code."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine = engine
        self._counter = 0

    def start(self, timeout: float | None = None) -> None:
        self.run(self.engine.start(), timeout)

    def close(self) -> None:
        try:
            self.run(self.engine.shutdown(), timeout=120)
        finally:
            self.stop()

    def _next_id(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}-{self._counter}"

    async def complete(
        self, prompt: list[int], sampling: SamplingOptions, alignment: AlignmentSettings,
        request_id: str | None = None,
    ) -> Completion:
        """One request to the end, with its time to first token."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        ids: list[int] = []
        text = ""
        first = None
        last = None
        logprobs: list[TokenLogprob] | None = None if sampling.logprobs is None else []
        prompt_logprobs = None
        async for chunk in self.engine.generate(
            request_id or self._next_id("bg"), prompt, sampling, alignment
        ):
            if chunk.token_ids and first is None:
                first = loop.time() - started
            ids += chunk.token_ids
            text += chunk.text
            if logprobs is not None:
                logprobs += chunk.logprobs or []
            prompt_logprobs = chunk.prompt_logprobs or prompt_logprobs
            last = chunk
        return Completion(
            token_ids=ids, text=text,
            finish_reason=None if last is None else last.finish_reason,
            stats=None if last is None else last.stats,
            first_token_s=first, total_s=loop.time() - started, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )

    def complete_many(
        self,
        prompts: Sequence[list[int]],
        samplings: Sequence[SamplingOptions],
        alignments: Sequence[AlignmentSettings],
        concurrency: int | None = None,
        timeout: float | None = None,
    ) -> list[Completion]:
        """All requests concurrently (at most ``concurrency`` in flight), results in order."""

        async def gather() -> list[Completion]:
            limit = asyncio.Semaphore(concurrency or len(prompts) or 1)

            async def one(i: int) -> Completion:
                async with limit:
                    return await self.complete(prompts[i], samplings[i], alignments[i])

            return list(await asyncio.gather(*(one(i) for i in range(len(prompts)))))

        return self.run(gather(), timeout)
