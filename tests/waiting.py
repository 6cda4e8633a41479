"""Waiting in tests: poll until a condition holds, failing with a message at a deadline.

The one polling loop of the test suite; every test that waits for a server, a count or a
process state uses these instead of its own ``while time.time() < deadline`` loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import httpx

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 15.0,
               message: str | Callable[[], str] = "condition not reached",
               interval: float = 0.02) -> T:
    """Call ``predicate`` until it returns something truthy and return that; an
    AssertionError with ``message`` (a string, or a function giving one) after ``timeout``
    seconds. The predicate may itself assert (a process that died: fail at once)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, message() if callable(message) else message
        time.sleep(interval)


def health_status(url: str, timeout: float = 2.0) -> int | None:
    """GET /health's status code, or None when nothing answers (yet)."""
    try:
        return httpx.get(f"{url}/health", timeout=timeout).status_code
    except httpx.TransportError:
        return None


def wait_ready(url: str, timeout: float = 30.0, process=None,
               output: Callable[[], str] | None = None, interval: float = 0.05) -> bool:
    """Until /health answers 200; fails at once if ``process`` (a Popen) exits, with the
    tail of ``output()``. Returns whether /health answered 503 (loading) on the way."""
    seen: set[int | None] = set()

    def ready() -> bool:
        if process is not None and process.poll() is not None:
            raise AssertionError("server process exited"
                                 + (f":\n{output()[-3000:]}" if output else ""))
        seen.add(health_status(url))
        return 200 in seen

    wait_until(ready, timeout, "server did not become ready", interval)
    return 503 in seen
