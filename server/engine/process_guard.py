"""vLLM's engine processes: out of the server's process group, tied to the server's life.

Signals sent to a whole process group (Ctrl-C in a terminal, ``kill -TERM -<pgid>``) would
otherwise reach vLLM's engine core and workers directly: they abort every request at once
while the API process is still draining. kad-serve moves the processes vLLM starts into a
process group of their own, so only the API process sees such signals; it drains, then
stops the engine the way vLLM does (SIGTERM to the engine core from its parent).

Outside the server's group, an engine whose API process was killed (SIGKILL, the OOM
killer) is no longer cleaned up by the next group signal either, and vLLM 0.32 has no
parent-death watch for its engine core: every engine process therefore watches its parent
and shuts itself down (SIGTERM to itself, SIGKILL after a while) when the parent is gone.

Forked children (vLLM's default start method) are moved by an ``os.register_at_fork`` hook
before they run any code; spawned children (a fresh interpreter) when vLLM loads the
kad-serve plugin in them (``server.engine.plugin.register``). ``start_engine_processes``
runs vLLM's engine construction in a thread and, when the start is cancelled (SIGTERM
during start-up), kills what it started instead of waiting for the models to load.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

# "<pid>:<pgid>" of the API process, inherited by spawned engine processes.
SERVER_ENV = "KAD_SERVE_API_PROCESS"
_PARENT_POLL_S = 1.0
_ORPHAN_KILL_S = 15.0  # after its own SIGTERM, an orphaned engine process is SIGKILLed
_CANCEL_WAIT_S = 8.0  # a cancelled start waits this long for vLLM's constructor to return

_server: tuple[int, int] | None = None  # (pid, pgid) of the API process; copied by fork
_server_fds: set[int] = set()  # the API process's listening sockets
_hook_registered = False
_watching: int | None = None  # pid of the process whose parent watch runs


def enable() -> None:
    """In the API process, before vLLM starts its processes: move them out of our group."""
    global _server, _hook_registered
    _server = (os.getpid(), os.getpgrp())
    os.environ[SERVER_ENV] = f"{_server[0]}:{_server[1]}"
    if not _hook_registered:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _hook_registered = True


def keep_from_children(fd: int) -> None:
    """A forked engine process gets /dev/null in place of ``fd`` (the server's listening
    socket), so that a lingering engine process never holds the server's port."""
    _server_fds.add(fd)


def _after_fork_in_child() -> None:
    if _server is None:
        return
    if os.getpid() != _server[0] and _server_fds:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in _server_fds:
            try:
                os.dup2(devnull, fd)  # not close: the socket object still owns the number
            except OSError:
                pass
        os.close(devnull)
        _server_fds.clear()
    guard_engine_process(*_server)


def guard_spawned_process() -> None:
    """In a spawned vLLM process (from the plugin): the same as the fork hook does."""
    value = os.environ.get(SERVER_ENV, "")
    pid, _, pgid = value.partition(":")
    if pid.isdigit() and pgid.isdigit():
        guard_engine_process(int(pid), int(pgid))


def guard_engine_process(server_pid: int, server_pgid: int) -> None:
    """Leave the server's process group and watch the parent; no-op in the API process."""
    global _watching
    me = os.getpid()
    if me == server_pid or _watching == me:
        return
    _watching = me
    if os.getpgrp() == server_pgid:  # the engine core; its own children are already out
        try:
            os.setpgid(0, 0)
        except OSError:  # a session leader cannot; nothing else would refuse
            pass
    parent = os.getppid()
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True,
                     name="kad-parent-watch").start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_PARENT_POLL_S)
    logger.warning("engine process %d: its parent process %d is gone; shutting down",
                   os.getpid(), parent)
    os.kill(os.getpid(), signal.SIGTERM)  # vLLM's own handler: a clean exit
    time.sleep(_ORPHAN_KILL_S)
    os.kill(os.getpid(), signal.SIGKILL)


async def start_engine_processes(factory: Callable[[], T], discard: Callable[[T], None]) -> T:
    """``factory()`` (vLLM's engine constructor, which starts processes and waits until the
    models are loaded) in a thread. Cancelled, it SIGKILLs the processes started since the
    call, waits briefly for ``factory`` to fail, and ``discard``s a result that came anyway.
    """
    enable()
    before = {child.pid for child in multiprocessing.active_children()}
    result: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        if not result.set_running_or_notify_cancel():
            return
        try:
            result.set_result(factory())
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            result.set_exception(exc)

    thread = threading.Thread(target=run, daemon=True, name="kad-engine-start")
    thread.start()
    waiting = asyncio.wrap_future(result)
    waiting.add_done_callback(lambda f: f.cancelled() or f.exception())  # always retrieved
    try:
        return await asyncio.shield(waiting)
    except asyncio.CancelledError:
        deadline = time.monotonic() + _CANCEL_WAIT_S
        while thread.is_alive() and time.monotonic() < deadline:
            _kill_started(before)
            await asyncio.sleep(0.1)
        if thread.is_alive():
            logger.warning("the cancelled engine start did not return within %.0f s",
                           _CANCEL_WAIT_S)
        elif result.exception() is None:
            discard(result.result())
        raise


def _kill_started(before: set[int | None]) -> None:
    """SIGKILL the process trees of multiprocessing children not in ``before``."""
    import psutil

    for child in multiprocessing.active_children():
        if child.pid in before or child.pid is None:
            continue
        try:
            root = psutil.Process(child.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for process in tree:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
