"""Per-request alignment statistics from vLLM's worker process to the API process.

The verification hook runs inside vLLM's engine-core/worker process, where the API
process cannot see it; vLLM's outputs carry no custom per-request fields. The worker
pushes one small message per engine step over a local ZeroMQ socket (pyzmq ships with
vLLM); the API process pulls and sums them per request. Sending never blocks a step:
without a listener, messages are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
from collections.abc import Callable, Sequence

import zmq
import zmq.asyncio

from server.engine.verification_hook import RowStepStats

logger = logging.getLogger(__name__)

ENDPOINT_ENV = "KAD_STATS_ENDPOINT"
_HIGH_WATER_MARK = 100_000


class StatsSender:
    """Worker side: PUSH the stats of each step to the API process, never blocking."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._pid = os.getpid()
        self._socket: zmq.Socket | None = None

    @classmethod
    def from_env(cls) -> StatsSender | None:
        endpoint = os.environ.get(ENDPOINT_ENV)
        return cls(endpoint) if endpoint else None

    def _connect(self) -> zmq.Socket:
        if self._socket is None or self._pid != os.getpid():
            socket = zmq.Context.instance().socket(zmq.PUSH)
            socket.setsockopt(zmq.SNDHWM, _HIGH_WATER_MARK)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(self.endpoint)
            self._socket, self._pid = socket, os.getpid()
        return self._socket

    def send(self, stats: Sequence[RowStepStats]) -> None:
        try:
            self._connect().send(pickle.dumps(list(stats)), flags=zmq.NOBLOCK)
        except zmq.Again:
            logger.warning("kad stats dropped: the API process is not reading them")

    def __repr__(self) -> str:
        return f"StatsSender({self.endpoint})"


class StatsReceiver:
    """API side: PULL step stats and hand each message to ``on_stats``."""

    def __init__(self, endpoint: str, on_stats: Callable[[list[RowStepStats]], None]) -> None:
        self.endpoint = endpoint
        self._on_stats = on_stats
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.RCVHWM, _HIGH_WATER_MARK)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(endpoint)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            payload = await self._socket.recv()
            try:
                stats = pickle.loads(payload)
            except Exception:
                logger.exception("undecodable kad stats message dropped")
                continue
            self._on_stats(stats)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._socket.close()
        self._context.term()
