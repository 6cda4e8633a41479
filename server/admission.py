"""Admission control: which generation jobs are in flight, the bound on them, and draining.

Every admitted job is registered here until its response is fully sent or abandoned, so the
running count cannot leak (it is derived from the live jobs, not kept as a counter). At
shutdown, ``drain`` refuses new work, waits for in-flight jobs up to the grace period and
then interrupts the rest, so their streams end with ``finish_reason: "abort"`` and
``[DONE]`` instead of a cut connection.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from server.errors import APIError

logger = logging.getLogger(__name__)


class InterruptibleJob(Protocol):
    @property
    def size(self) -> int: ...

    def interrupt(self) -> None: ...


class Admission:
    """The bound ``server.max_waiting_requests`` on engine requests waiting or running."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.draining = False
        self._jobs: set[InterruptibleJob] = set()
        self._idle = asyncio.Event()  # set exactly while no job is registered
        self._idle.set()

    @property
    def running(self) -> int:
        """Engine requests admitted and not yet finished (one per choice)."""
        return sum(job.size for job in self._jobs)

    @property
    def idle(self) -> bool:
        return not self._jobs

    def check_size(self, count: int, param: str | None = None) -> None:
        """400 when one request needs more engine requests than the bound admits at all:
        waiting would never help, so it is the request's fault, not a busy server's."""
        if count > self.limit:
            raise APIError(400, f"this request needs {count} engine requests (n times the "
                                f"number of prompts); the server runs at most {self.limit} "
                                "at once", param)

    def check(self, count: int) -> None:
        """503 when shutting down or when ``count`` more engine requests exceed the bound
        (400 when they exceed it on their own)."""
        self.check_size(count)
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if self.running + count > self.limit:
            raise APIError(503, "server busy: too many requests waiting; retry later",
                           code="queue_full")

    def add(self, job: InterruptibleJob) -> None:
        self._jobs.add(job)
        self._idle.clear()

    def release(self, job: InterruptibleJob) -> None:
        self._jobs.discard(job)
        if not self._jobs:
            self._idle.set()

    async def drain(self, grace_s: float) -> None:
        """Refuse new jobs; after ``grace_s`` interrupt the jobs that are still running."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
        except TimeoutError:
            pass
        if self._jobs:
            logger.warning("shutdown grace period over: aborting %d request(s)", self.running)
        for job in list(self._jobs):
            job.interrupt()
