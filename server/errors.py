"""Errors in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a client can see goes through here, so status codes and bodies are uniform
and no framework internals (pydantic's error lists, tracebacks) leak into responses.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


# How much of a client's value an error message quotes ("unknown rule 'xxx...'"): enough to
# recognise it, never the 100 kB a client sent. Every message is cut at MESSAGE_LIMIT too
# (``error_body``), a backstop for text that quotes a client's value in a way no caller cut.
ECHO_LIMIT = 200
MESSAGE_LIMIT = 1000


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` as an error message may quote it: its first ``limit`` characters, then
    "..." when it was longer. Every value a client sent that an error message echoes goes
    through here (``f"unknown rule {clip(rule)!r}"``)."""
    return text if len(text) <= limit else text[:limit] + "..."


class APIError(Exception):
    """Raised anywhere in a request; rendered as the OpenAI error object."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": clip(message, MESSAGE_LIMIT),
                      "type": _TYPES.get(status, "invalid_request_error"),
                      "param": None if param is None else clip(param), "code": code}}


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None
                   ) -> JSONResponse:
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer", **(headers or {})}
    return JSONResponse(error_body(status, message, param, code), status_code=status,
                        headers=headers)


# What a field that takes one of several shapes expects (its union members' errors name
# pydantic's internal types: "prompt.list[int].0" is reported as "prompt").
_SHAPES = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "a string or a list of at most 8 strings",
    "content": "a string or a list of text content parts",
}
_TYPE_TAGS = ("str", "int", "float", "bool", "list", "dict", "none")


def _is_type_tag(part: Any) -> bool:
    """A loc entry naming a pydantic schema (a union member), not a field or an index."""
    return isinstance(part, str) and (
        "[" in part or part in _TYPE_TAGS
        or part.startswith(("function-", "constrained-", "lax-", "json-or-")))


def _describe(error: dict[str, Any]) -> tuple[str, str | None]:
    """One readable sentence for a pydantic error, and the field it is about."""
    raw_loc = [part for part in error.get("loc", ()) if part != "body"]
    in_union = any(_is_type_tag(part) for part in raw_loc)
    if in_union:  # the field itself, not where inside one of its shapes it failed
        raw_loc = raw_loc[:next(i for i, part in enumerate(raw_loc) if _is_type_tag(part))]
    loc = [clip(str(part)) for part in raw_loc]  # keys of a client's object are its values
    field = clip(".".join(loc)) or None
    message = str(error.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    if in_union and field and error.get("type") != "value_error":
        expected = _SHAPES.get(loc[-1])
        if expected:
            return f"invalid value for '{field}': expected {expected}", field
    if error.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    if not field and error.get("type") in ("model_attributes_type", "dict_type"):
        return ("request body must be a JSON object (send Content-Type: application/json)",
                None)
    if error.get("type") == "missing":
        if not field:  # no body, or JSON null
            return "request body is required: a JSON object", None
        return f"field '{field}' is required", field
    if error.get("type") == "extra_forbidden":
        return f"unknown field '{field}'", field
    return (f"invalid value for '{field}': {message}" if field else message), field


_INTERNAL_HINTS = re.compile(
    r"[,;]?\s*\(?(please\s+)?(see|check)\s+(the\s+)?(python\s+)?stack\s*trace\b[^.]*\.?",
    re.IGNORECASE)


def failure_message(exc: BaseException) -> str:
    """What a client is told about an internal failure: the exception's first line without
    pointers into the server's logs ("See stack trace (above) for the root cause")."""
    lines = str(exc).strip().splitlines()
    text = _INTERNAL_HINTS.sub("", lines[0] if lines else "").strip()
    return clip(text, 300) or type(exc).__name__


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        message, field = _describe(errors[0]) if errors else ("invalid request", None)
        return error_response(400, message, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "route not found" if exc.status_code == 404 else str(exc.detail)
        return error_response(exc.status_code, message)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}")
