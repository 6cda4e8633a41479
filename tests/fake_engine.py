"""A deterministic stand-in for the vLLM engine, for fast HTTP-layer tests.

Implements ``server.engine.interface.Engine``: tokens are drawn from a seeded RNG over the
real tiny tokenizer's vocabulary, one per chunk with a short sleep so streams interleave;
stop strings use the server's own detokenizer; aborted requests are tracked.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

from server.alignment import AlignmentSettings
from server.config import ServeConfig
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.interface import GenerationChunk, RequestStats, SamplingOptions


class FakeEngine:
    def __init__(self, config: ServeConfig, tokenizer, start_delay: float = 0.0,
                 token_delay: float = 0.002) -> None:
        self.served_model_name = config.models.served_model_name
        self.max_model_len = config.engine.max_model_len
        self.default_alignment = config.alignment
        self.tokenizer = tokenizer
        self.start_delay, self.token_delay = start_delay, token_delay
        self._ready = False
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.seen: list[tuple[str, list[int], SamplingOptions, AlignmentSettings]] = []
        self._totals: dict[str, RequestStats] = defaultdict(RequestStats)
        self._plain = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]

    async def start(self) -> None:
        await asyncio.sleep(self.start_delay)
        self._ready = True

    @property
    def ready(self) -> bool:
        return self._ready

    errored = False

    def generate(self, request_id, prompt_token_ids, sampling, alignment):
        if not prompt_token_ids:
            raise ValueError("the prompt must contain at least one token")
        if alignment.rule == "implicit_reward":
            raise ValueError("rule 'implicit_reward' needs a third model")
        self.seen.append((request_id, list(prompt_token_ids), sampling, alignment))
        return self._generate(request_id, prompt_token_ids, sampling, alignment)

    async def _generate(self, request_id, prompt, sampling: SamplingOptions, alignment):
        seed = sampling.seed if sampling.seed is not None else random.randrange(2**32)
        rng = random.Random(seed * 1_000_003 + len(prompt))
        detok = IncrementalDetokenizer(self.tokenizer, sampling.stop)
        self.running.add(request_id)
        finished = False
        try:
            for step in range(sampling.max_tokens):
                await asyncio.sleep(self.token_delay)
                token = rng.choice(self._plain)
                text = detok.add([token])
                last = step == sampling.max_tokens - 1 or detok.stopped
                if last:
                    text += "" if detok.stopped else detok.flush()
                    stats = RequestStats(drafted=2 * (step + 1), accepted=step + 1,
                                         emitted=step + 1, positions=step + 1,
                                         alpha_sum=0.5 * (step + 1),
                                         deferred_positions=step + 1)
                    self._totals[alignment.rule].add(stats)
                    finished = True
                    yield GenerationChunk([token], text, True,
                                          "stop" if detok.stopped else "length", stats,
                                          len(prompt))
                    return
                yield GenerationChunk([token], text, prompt_tokens=len(prompt))
        finally:
            self.running.discard(request_id)
            if not finished:
                self.aborted.append(request_id)

    async def abort(self, request_id: str) -> None:
        self.running.discard(request_id)

    def num_unfinished_requests(self) -> int:
        return len(self.running)

    def totals(self) -> dict[str, RequestStats]:
        return dict(self._totals)

    async def shutdown(self) -> None:
        self._ready = False
