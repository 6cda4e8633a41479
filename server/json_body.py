"""Request bodies are strict JSON: UTF-8 without a byte-order mark, valid Unicode in every
string, no key twice in one object.

Python's ``json.loads`` (which FastAPI uses) is lenient where a server should not be: given
bytes it guesses UTF-16 or UTF-32 and skips a UTF-8 BOM, it decodes UTF-8-encoded surrogates
(``surrogatepass``), and a repeated key silently keeps its last value, so two parsers of
the same body (a proxy, an audit log, this server) can disagree on what was asked. This
check runs on the body before the app parses it, and a body that fails it is a 400.
Malformed JSON is left to the app's own parser, which reports it.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import re
from typing import Any

from server.errors import clip, error_response
from server.limits import replaying

_OFF_LOOP_BYTES = 256 * 2**10  # larger bodies are checked in a worker thread
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


class BodyRefused(ValueError):
    """The body is not strict JSON; ``param`` names the key at fault when there is one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise BodyRefused(f"the key '{clip(key)}' appears twice in one JSON object "
                              "of the request body", clip(key))
        result[key] = value
    return result


def _lone_surrogate(value: Any) -> str | None:
    """Where (a dotted path such as ``messages.0.content``) a string, key or value, that
    UTF-8 cannot encode sits in ``value``; None when there is none."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return path
        elif isinstance(item, dict):
            for key, child in item.items():
                inner = f"{path}.{clip(key)}" if path else clip(key)
                stack.append((path, key))
                stack.append((inner, child))
        elif isinstance(item, list):
            stack.extend((f"{path}.{i}" if path else str(i), child)
                         for i, child in enumerate(item))
    return None


def check_body(body: bytes) -> None:
    """Raises ``BodyRefused`` when ``body`` is JSON but not strict JSON."""
    if body.startswith(codecs.BOM_UTF8):
        raise BodyRefused("the request body starts with a UTF-8 byte-order mark: send "
                          "UTF-8 JSON without one")
    try:
        text = body.decode("utf-8")  # strict: UTF-16, encoded surrogates, stray bytes fail
    except UnicodeDecodeError as exc:
        raise BodyRefused(f"the request body is not UTF-8 (invalid byte at offset "
                          f"{exc.start}): send UTF-8 JSON") from None
    try:
        parsed = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except BodyRefused:
        raise
    except ValueError:
        return  # not JSON at all: the app's parser says so
    # Strict UTF-8 decoding refused encoded surrogates: a lone one can only come from a
    # \\uD800-\\uDFFF escape. Without one in the text (nearly every body) nothing is walked.
    where = _lone_surrogate(parsed) if _SURROGATE_ESCAPE.search(text) else None
    if where is not None:
        raise BodyRefused(f"a string in the request body{f' at {where!r}' if where else ''} "
                          "is not valid Unicode (it escapes a lone surrogate, such as "
                          "\\ud800)", where or None)


class StrictJSONMiddleware:
    """Pure ASGI, inside ``BodyLimitMiddleware`` (which hands over the whole body in one
    message): checks each non-empty request body and replays it to the app."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        message = await receive()
        body = message.get("body", b"") if message["type"] == "http.request" else b""
        if body:
            try:
                if len(body) > _OFF_LOOP_BYTES:  # megabytes parse for tens of milliseconds
                    await asyncio.to_thread(check_body, body)
                else:
                    check_body(body)
            except BodyRefused as exc:
                await error_response(400, str(exc), exc.param, "invalid_json_body")(
                    scope, receive, send)
                return
        await self.app(scope, replaying(message, receive), send)
