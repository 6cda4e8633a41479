"""What a client may send before the app reads its request: its head (HTTP version, header
count and size) and its body (size and read time).

``RequestHeadMiddleware`` checks the parsed head: HTTP/1.0 and 1.1 only (505 otherwise; the
h11 parser reads any ``HTTP/d.d``), at most ``server.max_header_count`` headers and at most
``server.max_header_bytes`` of request line and headers (431). The HTTP protocol
(``server.http_server``) bounds what it buffers of an incomplete head by the same size and
enforces the head's deadline; this check also covers a head that arrived whole in one read.

Pure ASGI, in front of FastAPI, so nothing is parsed before these checks pass. A body larger
than ``server.max_request_body_bytes`` gets 413: at once when its ``Content-Length`` says so,
else as soon as its chunks add up to more. A body not fully received within
``server.request_body_timeout_s`` (a client that sent half a request and stalls) gets 408
instead of holding its connection and buffer forever. A body that passes is handed to the app
in one piece; the app still hears the client's later disconnect through ``receive``.
"""

from __future__ import annotations

import asyncio

from starlette.responses import Response

from server.errors import error_response

_HTTP_VERSIONS = ("1.0", "1.1")


def replaying(message: dict, receive):
    """An ASGI ``receive`` that first gives ``message`` (a body a middleware has read),
    then whatever ``receive`` gives (the client's later disconnect)."""
    pending = [message]

    async def receive_again():
        return pending.pop() if pending else await receive()

    return receive_again


class RequestHeadMiddleware:
    def __init__(self, app, max_header_bytes: int, max_header_count: int) -> None:
        self.app = app
        self.max_header_bytes, self.max_header_count = max_header_bytes, max_header_count

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = self._error(scope)
        if error is None:
            await self.app(scope, receive, send)
        else:
            await error(scope, receive, send)

    def _error(self, scope) -> Response | None:
        if scope.get("http_version") not in _HTTP_VERSIONS:
            return error_response(505, "this server speaks HTTP/1.0 and HTTP/1.1 only",
                                  code="http_version_not_supported",
                                  headers={"Connection": "close"})
        headers = scope.get("headers", ())
        if len(headers) > self.max_header_count:
            return error_response(
                431, f"the request has {len(headers)} headers; this server accepts "
                     f"{self.max_header_count} (server.max_header_count)",
                code="request_header_too_large", headers={"Connection": "close"})
        size = (len(scope.get("raw_path", b"")) + len(scope.get("query_string", b""))
                + sum(len(name) + len(value) + 4 for name, value in headers))
        if size > self.max_header_bytes:
            return error_response(
                431, f"the request head is larger than this server accepts "
                     f"({self.max_header_bytes} bytes, server.max_header_bytes)",
                code="request_header_too_large", headers={"Connection": "close"})
        return None


class _TooLarge(Exception):
    pass


def _declared_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP parser refuses these before the app is called
    return None


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int, timeout_s: float) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                body = await self._read(receive)
        except _TooLarge:
            await self._too_large(scope, receive, send)
            return
        except TimeoutError:
            response = error_response(
                408, f"the request body did not arrive within {self.timeout_s:g} seconds",
                code="request_timeout", headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        if body is None:  # the client left while sending: nobody reads an answer
            await Response(status_code=499)(scope, receive, send)
            return

        await self.app(scope, replaying(
            {"type": "http.request", "body": body, "more_body": False}, receive), send)

    async def _read(self, receive) -> bytes | None:
        """The whole body, or None when the client disconnects first."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, scope, receive, send) -> None:
        response = error_response(
            413, f"the request body is larger than this server accepts "
                 f"({self.max_bytes} bytes, server.max_request_body_bytes)",
            code="request_too_large", headers={"Connection": "close"})
        await response(scope, receive, send)
