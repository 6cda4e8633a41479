"""Serve an ASGI app with uvicorn on a free local port, in a background thread."""

from __future__ import annotations

import socket
import threading

import uvicorn
from waiting import wait_until

from server.config import ServerSettings
from server.http_server import uvicorn_config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """uvicorn serving an app on a free port in a background thread."""

    def __init__(self, app) -> None:
        self.port = free_port()
        # The app's own connection limits, as `kad-serve` serves it.
        state = getattr(getattr(app, "state", None), "kad", None)
        settings = state.config.server if state is not None else ServerSettings()
        self.server = uvicorn.Server(uvicorn_config(app, settings, host="127.0.0.1",
                                                    port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, 20, "server did not start")
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


