"""Probe a running server's front door with what hostile or careless clients send.

``python -m bench.front_door_probe --base-url http://127.0.0.1:8000`` prints one line per
probe: what was sent, the status (or what happened to the connection) and how long it
took. It measures; it asserts nothing (the tests do). Used to compare two builds side by
side: run it against each.
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from collections.abc import Callable
from urllib.parse import urlparse

import httpx

MIB = 2**20


def _raw(host: str, port: int, chunks: list[bytes], pause: float = 0.0,
         timeout: float = 120.0) -> str:
    """Sends ``chunks`` (stopping when the server refuses more) and reads until close;
    returns the status line or what became of the connection."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            for chunk in chunks:
                sock.sendall(chunk)
                if pause:
                    time.sleep(pause)
        except OSError:
            pass
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except OSError:
            pass
    return received.split(b"\r\n", 1)[0].decode(errors="replace") or "closed, no answer"


def _open_after(host: str, port: int, count: int, wait: float, slow: bool) -> str:
    """Opens ``count`` sockets (each sending one header line per second when ``slow``) and
    says how many the server still holds open after ``wait`` seconds."""
    sockets = [socket.create_connection((host, port), timeout=5) for _ in range(count)]
    for sock in sockets:
        sock.setblocking(False)
        if slow:
            sock.send(b"POST /v1/completions HTTP/1.1\r\n")
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        time.sleep(1.0)
        for i, sock in enumerate(sockets):
            if slow and sock.fileno() != -1:
                try:
                    sock.send(b"X-Slow-%d: 1\r\n" % i)
                except OSError:
                    pass
    still_open = 0
    for sock in sockets:
        try:
            data = sock.recv(65536)
            still_open += 0 if data == b"" or data.startswith(b"HTTP/1.1 408") else 1
        except BlockingIOError:
            still_open += 1
        except OSError:
            pass
        sock.close()
    return f"{still_open} of {count} still open after {wait:g} s"


def probes(base_url: str, model: str) -> list[tuple[str, Callable[[], str]]]:
    url = urlparse(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80

    def post(path: str, body: bytes | dict, **headers: str) -> str:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = httpx.post(f"{base_url}{path}", content=content, timeout=300,
                              headers={"content-type": "application/json", **headers})
        message = ""
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        return f"{response.status_code} ({len(response.content)} bytes){': ' + message[:90] if message else ''}"

    def completion(**fields) -> str:
        return post("/v1/completions", {"model": model, "prompt": "Hi", "max_tokens": 2,
                                        **fields})

    request = b"GET /health HTTP/1.1\r\nHost: kad\r\n"
    return [
        ("one 256 MiB header", lambda: _raw(host, port, [request + b"X-Big: "]
                                            + [b"a" * MIB] * 256 + [b"\r\n\r\n"])),
        ("20,000 headers", lambda: _raw(host, port, [request + b"".join(
            b"X-H%d: 1\r\n" % i for i in range(20_000)) + b"\r\n"])),
        ("50 slow-header sockets (a line a second)", lambda: _open_after(host, port, 50, 15,
                                                                          True)),
        ("200 sockets that send nothing", lambda: _open_after(host, port, 200, 15, False)),
        ("request line HTTP/2.0", lambda: _raw(
            host, port, [b"GET /health HTTP/2.0\r\nHost: kad\r\n\r\n"])),
        ("/tokenize 8 MB text, return_token_strs", lambda: post("/tokenize", {
            "model": model, "prompt": "hello world " * (8_000_000 // 12),
            "return_token_strs": True})),
        ("top_k 2**64", lambda: completion(top_k=2**64)),
        ("top_k 1e30 written as an integer", lambda: completion(top_k=10**30)),
        ("repetition_penalty 1e-38", lambda: completion(repetition_penalty=1e-38)),
        ("unknown kad rule 100 kB long", lambda: completion(kad={"rule": "x" * 100_000})),
        ("UTF-16 body", lambda: post("/v1/completions", json.dumps(
            {"model": model, "prompt": "Hi", "max_tokens": 2}).encode("utf-16"))),
        ("UTF-8 BOM body", lambda: post("/v1/completions", b"\xef\xbb\xbf" + json.dumps(
            {"model": model, "prompt": "Hi", "max_tokens": 2}).encode())),
        ("UTF-8-encoded surrogate in user", lambda: post(
            "/v1/completions", (b'{"model": "%s", "prompt": "Hi", "max_tokens": 2, '
                                b'"user": "\xed\xa0\x80"}') % model.encode())),
        ("duplicate key max_tokens", lambda: post(
            "/v1/completions", (b'{"model": "%s", "prompt": "Hi", "max_tokens": 2, '
                                b'"max_tokens": 3}') % model.encode())),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", help="served model name (default: read from /v1/models)")
    parser.add_argument("--skip", nargs="*", default=[],
                        help="skip the probes whose name contains any of these")
    args = parser.parse_args(argv)
    base = args.base_url.rstrip("/")
    model = args.model or httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
    for name, probe in probes(base, model):
        if any(part in name for part in args.skip):
            continue
        started = time.perf_counter()
        try:
            outcome = probe()
        except Exception as exc:  # noqa: BLE001 - a probe that breaks the client is a result
            outcome = f"client error: {type(exc).__name__}: {exc}"[:150]
        health = time.perf_counter()
        httpx.get(f"{base}/health", timeout=60)
        print(f"{name:45s} {outcome[:120]:120s} {health - started:7.2f} s  "
              f"(then /health {1000 * (time.perf_counter() - health):.0f} ms)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
