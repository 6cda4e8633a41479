"""Per-request alignment statistics from vLLM's sampling worker to the API process.

The verification hook runs in vLLM's worker, possibly on another host (pipeline parallel
over Ray), where the API process cannot see it; vLLM's outputs carry no custom
per-request fields. The worker that owns the sampled tokens pushes one small msgpack
message per engine step over ZeroMQ TCP (what vLLM itself uses between its processes);
the API process binds the socket and sums the rows per request. The endpoint reaches the
workers inside vLLM's engine config (``hook_settings.HookSettings``). Sending never
blocks a step: without a listener, messages are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence

import msgspec
import zmq
import zmq.asyncio

from server.engine.verification_hook import RowStepStats

logger = logging.getLogger(__name__)

_HIGH_WATER_MARK = 100_000
_ENCODER = msgspec.msgpack.Encoder()


class StatsSender:
    """Worker side: PUSH the stats of each step to the API process, never blocking."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._pid = os.getpid()
        self._socket: zmq.Socket | None = None

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
            self._connect().send(_ENCODER.encode(list(stats)), flags=zmq.NOBLOCK)
        except zmq.Again:
            logger.warning("kad stats dropped: the API process is not reading them")

    def __repr__(self) -> str:
        return f"StatsSender({self.endpoint})"


class StatsReceiver:
    """API side: bind a TCP port on ``host``, PULL step stats, hand each to ``on_stats``.

    ``endpoint`` is the address workers connect to: ``host`` must be reachable from every
    worker (loopback for a single node, the node's address for a multi-node engine).
    """

    def __init__(self, on_stats: Callable[[list[RowStepStats]], None],
                 host: str = "127.0.0.1") -> None:
        from vllm.utils.network_utils import make_zmq_path

        self._on_stats = on_stats
        self._decoder = msgspec.msgpack.Decoder(list[RowStepStats])
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.RCVHWM, _HIGH_WATER_MARK)
        self._socket.setsockopt(zmq.LINGER, 0)
        if ":" in host:
            self._socket.setsockopt(zmq.IPV6, 1)
        port = self._socket.bind_to_random_port(make_zmq_path("tcp", host))
        self.endpoint = make_zmq_path("tcp", host, port)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            payload = await self._socket.recv()
            try:
                stats = self._decoder.decode(payload)
            except msgspec.DecodeError:
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
