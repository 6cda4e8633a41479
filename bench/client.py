"""The OpenAI client both benchmark tools use, pointed at a kad-serve (or any) deployment."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def openai_base_url(url: str) -> str:
    """``http://host:8000`` -> ``http://host:8000/v1``; a URL with a path is kept as given.

    The openai client wants the API root (``.../v1``); users naturally pass the server's
    address, which would otherwise end in a 404 on ``/models``.
    """
    parts = urlsplit(url.rstrip("/"))
    if parts.path in ("", "/"):
        parts = parts._replace(path="/v1")
    return urlunsplit(parts)


def server_root_url(url: str) -> str:
    """``http://host:8000/v1`` -> ``http://host:8000``: where ``/health`` and ``/metrics`` are."""
    return openai_base_url(url).removesuffix("/v1")
