"""The HTTP server in front of the app: uvicorn on its h11 protocol, with the connection
limits a public endpoint needs and uvicorn does not apply by itself.

Why h11, not uvicorn's default (httptools when it is installed, as in vLLM's image):
httptools puts no bound on a request head (a 256 MiB header was read whole), while h11
stops buffering an incomplete event at ``max_incomplete_event_size``. Parsing speed does
not matter here: a request costs milliseconds of parsing against seconds of generation.

What uvicorn's h11 protocol (``uvicorn.protocols.http.h11_impl.H11Protocol``, uvicorn
0.55) leaves open, and ``BoundedH11Protocol`` closes:

- an oversized head gets uvicorn's plain-text 400; here it is 431 in the OpenAI error shape;
- a connection that never completes a request head (sends nothing, or one header line every
  few seconds) is held forever: uvicorn's keep-alive timer only runs between requests and
  any byte cancels it. Here a head must be complete ``header_timeout_s`` after the
  connection opened or the previous response ended: else 408 (or a plain close when
  nothing of it arrived);
- ``limit_concurrency`` answers 503 only once a request is parsed, so idle connections
  count for nothing; here a connection beyond ``max_connections`` gets 503 at once and is
  closed.

Header count, head size as parsed and the HTTP version are checked by
``server.limits.RequestHeadMiddleware`` (they need the parsed request, which the app has).
"""

from __future__ import annotations

import asyncio
import http
import inspect
import json
import sys
from typing import Any, ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.config import ServerSettings
from server.errors import error_body

# What BoundedH11Protocol overrides, as uvicorn 0.55 defines it, and what it relies on in
# uvicorn's code. kad-serve refuses to start on a uvicorn where these differ (the GPU image
# brings its own uvicorn through vLLM's FastAPI): read the new code before moving the pin.
PINNED_H11_SIGNATURES = {
    "__init__": "(self, config: 'Config', server_state: 'ServerState', "
                "app_state: 'dict[str, Any]', _loop: 'asyncio.AbstractEventLoop | None' = None)"
                " -> 'None'",
    "connection_made": "(self, transport: 'asyncio.Transport') -> 'None'",
    "connection_lost": "(self, exc: 'Exception | None') -> 'None'",
    "data_received": "(self, data: 'bytes') -> 'None'",
    "send_400_response": "(self, msg: 'str') -> 'None'",
    "on_response_complete": "(self) -> 'None'",
}
# (method, text its source must contain): send_400_response is called inside the handler of
# h11's RemoteProtocolError (its status hint is read there); data_received cancels the
# keep-alive timer on any byte (why the head needs a deadline of its own).
PINNED_H11_SOURCES = (
    ("handle_events", "except h11.RemoteProtocolError:"),
    ("handle_events", "self.send_400_response(msg)"),
    ("data_received", "self._unset_keepalive_if_required()"),
)


def protocol_drift() -> list[str]:
    """How uvicorn's ``H11Protocol`` differs from what this module was written against;
    empty when every pin holds."""
    drift = []
    for name, expected in PINNED_H11_SIGNATURES.items():
        found = str(inspect.signature(getattr(H11Protocol, name)))
        if found != expected:
            drift.append(f"H11Protocol.{name}{found} (pinned: {expected})")
    for name, text in PINNED_H11_SOURCES:
        if text not in inspect.getsource(getattr(H11Protocol, name)):
            drift.append(f"H11Protocol.{name} no longer contains {text!r}")
    return drift


def raw_error(status: int, message: str, code: str) -> bytes:
    """A complete HTTP/1.1 error response that closes the connection, written straight to
    the transport: for answers given before (or instead of) a parsed request, where the
    h11 state machine has no request to respond to."""
    body = json.dumps(error_body(status, message, code=code)).encode()
    head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head deadline, a connection cap and 431."""

    settings: ClassVar[ServerSettings]  # set by ``protocol_for``

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.settings.max_connections:
            self._refuse(503, f"the server holds its maximum of "
                              f"{self.settings.max_connections} connections "
                              "(server.max_connections); retry later", "too_many_connections")
            return
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is complete
            self._cancel_head_deadline()

    def on_response_complete(self) -> None:
        self._arm_head_deadline()  # before: the next pipelined request may be parsed now
        super().on_response_complete()
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            self._cancel_head_deadline()

    def send_400_response(self, msg: str) -> None:
        """Called by uvicorn inside its ``except h11.RemoteProtocolError``: the error's
        status hint tells an oversized head (431) from a malformed one (400)."""
        error = sys.exc_info()[1]
        status = getattr(error, "error_status_hint", 400)
        if status == 431:
            self._refuse(431, f"the request head is larger than this server accepts "
                              f"({self.settings.max_header_bytes} bytes, "
                              "server.max_header_bytes)", "request_header_too_large")
        else:
            self._refuse(400, "malformed HTTP request", "malformed_request")

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_deadline = self.loop.call_later(self.settings.header_timeout_s,
                                                   self._head_deadline_passed)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_deadline_passed(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:  # part of a head arrived: say why we close
            self._refuse(408, f"the request head did not arrive within "
                              f"{self.settings.header_timeout_s:g} seconds "
                              "(server.header_timeout_s)", "request_timeout")
        else:
            self.transport.close()

    def _refuse(self, status: int, message: str, code: str) -> None:
        self._cancel_head_deadline()
        self.transport.write(raw_error(status, message, code))
        self.transport.close()


def protocol_for(settings: ServerSettings) -> type[BoundedH11Protocol]:
    """The protocol class uvicorn instantiates per connection, bound to these limits."""
    return type("BoundedH11Protocol", (BoundedH11Protocol,), {"settings": settings})


def uvicorn_config(app: Any, settings: ServerSettings, **options: Any) -> uvicorn.Config:
    """uvicorn's config for serving ``app`` under ``settings`` (host, port and every
    connection limit); ``options`` are passed through (log level, graceful shutdown)."""
    options.setdefault("host", settings.host)
    options.setdefault("port", settings.port)
    return uvicorn.Config(
        app, http=protocol_for(settings),
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]
        access_log=False, **options,
    )

