"""Hostile and oversized inputs against the app with a fake engine: the body size and read
time limits, tokenizing off the event loop, prompts far over the context window, requests
larger than the whole queue, special tokens in chat content, internal failure messages, and
an empty API key file.

Most tests drive the app in-process through httpx's ASGI transport (no lifespan: the fake
engine is started by hand); the half-sent request goes through a real uvicorn socket.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest
from fake_engine import MODEL, FakeEngine, fake_config, load_tokenizer, serve_fake

from server.app import create_app
from server.cli import apply_overrides, main, parse_args
from server.config import ConfigError


@pytest.fixture(scope="module")
def tokenizer(tiny_pair):
    return load_tokenizer(str(tiny_pair.draft))


def make_app(tokenizer, max_model_len: int = 256, engine_class=FakeEngine, **server):
    """The app and its started fake engine, to be called through ``request``."""
    engines: list[FakeEngine] = []

    def factory(config):
        engines.append(engine_class(config, tokenizer))
        return engines[-1]

    app = create_app(fake_config(max_model_len, **server), engine_factory=factory)
    asyncio.run(engines[0].start())
    return app, engines[0]


def client(app) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://kad", timeout=30)


def request(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go() -> httpx.Response:
        async with client(app) as http:
            return await http.request(method, path, **kwargs)

    return asyncio.run(go())


def check_error(response: httpx.Response, status: int, param: str | None = None,
                code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code), error
    return error


class CountingTokenizer:
    """A tokenizer that counts its ``encode`` calls on long texts and can make them slow."""

    def __init__(self, inner, delay: float = 0.0, long: int = 1000) -> None:
        self._inner, self.delay, self.long = inner, delay, long
        self.long_calls = 0
        self.started = threading.Event()
        self.started_at = 0.0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __len__(self) -> int:
        return len(self._inner)

    def encode(self, text, **kwargs):
        if len(text) > self.long:
            self.long_calls += 1
            self.started_at = time.perf_counter()
            self.started.set()
            time.sleep(self.delay)
        return self._inner.encode(text, **kwargs)


# --- the API key file --------------------------------------------------------------------
@pytest.mark.parametrize("content", ["", "  \n", "\n\n"])
def test_empty_api_key_file_is_a_startup_error(tmp_path, monkeypatch, capsys, content):
    monkeypatch.delenv("KAD_API_KEY", raising=False)
    key_file = tmp_path / "key"
    key_file.write_text(content)
    args = parse_args(["--config", "x.yaml", "--api-key-file", str(key_file)])
    with pytest.raises(ConfigError, match="is empty"):
        apply_overrides(fake_config(), args)
    # The command line exits 2 with the message instead of serving without a key.
    config = tmp_path / "config.yaml"
    config.write_text("models: {target: t, draft: d}\n")
    assert main(["--config", str(config), "--api-key-file", str(key_file)]) == 2
    assert "is empty" in capsys.readouterr().err


def test_api_key_file_with_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv("KAD_API_KEY", raising=False)
    key_file = tmp_path / "key"
    key_file.write_text("sekret\n")
    args = parse_args(["--config", "x.yaml", "--api-key-file", str(key_file)])
    assert apply_overrides(fake_config(), args).server.api_key == "sekret"
