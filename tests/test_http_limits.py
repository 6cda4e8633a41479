"""The front door on raw sockets: request heads bounded in size, count, time and version,
connections bounded in number and idle time, bodies strict UTF-8 JSON; ``/health`` stays
fast meanwhile. The real app on the fake engine, served as ``kad-serve`` serves it."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from fake_engine import MODEL, check_openai_error, post_json, serve_fake
from uvicorn.protocols.http.h11_impl import H11Protocol
from waiting import wait_ready, wait_until

HEAD_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def limited(tokenizer):
    """A server with short deadlines (1 s head, 1 s keep-alive) and 32 connections."""
    thread, _ = serve_fake(tokenizer, header_timeout_s=HEAD_TIMEOUT_S,
                           keep_alive_timeout_s=1.0, max_connections=32)
    wait_ready(thread.url)
    yield thread
    thread.stop()


def _connect(thread) -> socket.socket:
    return socket.create_connection(("127.0.0.1", thread.port), timeout=10)


def _read_all(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    started, received = time.perf_counter(), b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
    return received, time.perf_counter() - started


def _status_and_error(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return status, error


def _health_ms(thread) -> float:
    started = time.perf_counter()
    assert httpx.get(f"{thread.url}/health", timeout=5).status_code == 200
    return (time.perf_counter() - started) * 1000


# --- request heads ----------------------------------------------------------------------
def test_a_header_larger_than_the_limit_streamed_in_pieces_is_431(limited):
    """uvicorn's h11 stops buffering at server.max_header_bytes (32 KiB): a 1 MiB header
    sent in 64 KiB writes is refused after the first ones, not read whole."""
    with _connect(limited) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: kad\r\nX-Big: ")
        try:
            for _ in range(16):
                sock.sendall(b"a" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the client finished: the point
        response, _ = _read_all(sock)
    status, error = _status_and_error(response)
    assert status == 431 and error["code"] == "request_header_too_large"
    assert "server.max_header_bytes" in error["message"]


def test_a_head_over_the_limit_arriving_in_one_read_is_431(limited):
    with _connect(limited) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: kad\r\nX-Big: " + b"a" * 40_000
                     + b"\r\n\r\n")
        status, error = _status_and_error(_read_all(sock)[0])
    assert status == 431 and "32768 bytes" in error["message"]


def test_more_headers_than_the_limit_is_431(limited):
    headers = b"".join(b"X-H%d: 1\r\n" % i for i in range(150))
    with _connect(limited) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: kad\r\n" + headers + b"\r\n")
        status, error = _status_and_error(_read_all(sock)[0])
    assert status == 431 and "151 headers" in error["message"]
    assert "server.max_header_count" in error["message"]


def test_headers_at_the_limits_are_served(limited):
    headers = {f"X-H{i}": "v" for i in range(90)}
    headers["X-Big"] = "a" * 20_000
    response = httpx.get(f"{limited.url}/health", headers=headers)
    assert response.status_code == 200


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/3.1"])
def test_a_request_line_that_is_not_http_1_is_505(limited, version):
    with _connect(limited) as sock:
        sock.sendall(b"GET /health " + version + b"\r\nHost: kad\r\n\r\n")
        status, error = _status_and_error(_read_all(sock)[0])
    assert status == 505 and error["code"] == "http_version_not_supported"


def test_http_1_0_is_served(limited):
    with _connect(limited) as sock:
        sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        response, _ = _read_all(sock)
    assert response.startswith(b"HTTP/1.1 200 ")


def test_a_slow_header_client_gets_408_at_the_deadline(limited):
    """One header line every 0.3 s: each byte would reset uvicorn's keep-alive timer, the
    head's deadline runs from the connection's start."""
    with _connect(limited) as sock:
        started = time.perf_counter()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\n")
        try:
            for i in range(20):
                time.sleep(0.3)
                sock.sendall(b"X-Slow-%d: 1\r\n" % i)
        except (BrokenPipeError, ConnectionResetError):
            pass
        response, _ = _read_all(sock)
        elapsed = time.perf_counter() - started
    status, error = _status_and_error(response)
    assert status == 408 and error["code"] == "request_timeout"
    assert HEAD_TIMEOUT_S <= elapsed < HEAD_TIMEOUT_S + 1.5


def test_idle_sockets_are_closed_at_the_head_deadline_while_health_stays_fast(limited):
    sockets = [_connect(limited) for _ in range(20)]
    try:
        health = [_health_ms(limited) for _ in range(5)]
        closed_after = []
        for sock in sockets:
            received, waited = _read_all(sock)
            assert received == b""  # nothing of a request arrived: closed without an answer
            closed_after.append(waited)
    finally:
        for sock in sockets:
            sock.close()
    assert max(closed_after) < HEAD_TIMEOUT_S + 1.0
    assert max(health) < 2000, health


def test_an_idle_keep_alive_connection_is_closed(limited):
    with _connect(limited) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: kad\r\n\r\n")
        response, waited = _read_all(sock)
    assert response.startswith(b"HTTP/1.1 200 ") and b'{"status":"ok"}' in response
    assert 0.9 < waited < 2.5


def test_idle_connections_outlive_the_openai_clients_own_idle_expiry(tokenizer):
    """At the default settings a connection idle for longer than httpx keeps an idle
    connection for reuse (5 s, the ``openai`` client's transport) still serves the next
    request: the server never closes a connection such a client may still reuse, which
    fails that request with a broken pipe (``bench/soak`` recorded one as lost)."""
    from server.config import ServerSettings

    expiry = httpx.Limits().keepalive_expiry
    defaults = ServerSettings()
    assert expiry == 5.0
    assert min(defaults.keep_alive_timeout_s, defaults.header_timeout_s) >= 2 * expiry
    thread, _ = serve_fake(tokenizer)
    try:
        wait_ready(thread.url)
        request = b"GET /health HTTP/1.1\r\nHost: kad\r\n\r\n"
        with _connect(thread) as sock:
            sock.sendall(request)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
            time.sleep(expiry + 1.5)
            sock.sendall(request)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    finally:
        thread.stop()


def test_a_keep_alive_connection_serves_several_requests(limited):
    with httpx.Client(base_url=limited.url) as client:
        for _ in range(3):
            assert client.get("/health").status_code == 200
            time.sleep(0.3)


def test_connections_beyond_the_cap_get_503_and_health_recovers(tokenizer):
    thread, _ = serve_fake(tokenizer, max_connections=8, header_timeout_s=30.0)
    try:
        wait_ready(thread.url)
        held = [_connect(thread) for _ in range(8)]
        time.sleep(0.2)  # the server has accepted them
        with _connect(thread) as extra:
            status, error = _status_and_error(_read_all(extra)[0])
        assert status == 503 and error["code"] == "too_many_connections"
        assert "server.max_connections" in error["message"]
        for sock in held:
            sock.close()
        wait_until(lambda: httpx.get(f"{thread.url}/health").status_code == 200, 10,
                   "health did not recover after the held connections closed")
    finally:
        thread.stop()


def test_health_stays_fast_beside_slow_and_oversized_clients(limited):
    stop = threading.Event()

    def slow_client():
        while not stop.is_set():
            with _connect(limited) as sock:
                try:
                    sock.sendall(b"GET /health HTTP/1.1\r\n")
                    while not stop.is_set():
                        sock.sendall(b"X: 1\r\n")
                        time.sleep(0.1)
                except OSError:
                    pass

    def big_client():
        while not stop.is_set():
            with _connect(limited) as sock:
                try:
                    sock.sendall(b"GET /health HTTP/1.1\r\nX: " + b"a" * 2**20)
                except OSError:
                    pass
                _read_all(sock)

    workers = [threading.Thread(target=slow_client) for _ in range(4)]
    workers += [threading.Thread(target=big_client) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(0.5)
        latencies = sorted(_health_ms(limited) for _ in range(20))
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=10)
    # Fast means the event loop is never held: a median of milliseconds, no answer near a
    # second (generous bounds: a loaded 2-core CI machine, not a benchmark).
    assert latencies[len(latencies) // 2] < 500 and latencies[-1] < 2000, latencies


# --- bodies -----------------------------------------------------------------------------
_GOOD = {"model": MODEL, "prompt": "hello", "max_tokens": 2}


@pytest.mark.parametrize("body, fragment", [
    (b"\xef\xbb\xbf" + json.dumps(_GOOD).encode(), "byte-order mark"),
    (json.dumps(_GOOD).encode("utf-16"), "not UTF-8"),
    (json.dumps(_GOOD).encode("utf-32"), "not UTF-8"),
    (b'{"model": "%s", "prompt": "hi", "user": "\xed\xa0\x80"}' % MODEL.encode(),
     "not UTF-8"),
    (b'{"model": "%s", "prompt": "hi", "user": "\\ud800"}' % MODEL.encode(),
     "lone surrogate"),
    (b'{"model": "%s", "prompt": ["ok", "\\udfff"]}' % MODEL.encode(), "lone surrogate"),
    (b'{"model": "%s", "prompt": "hi", "kad": {"rule": "kad_dual", "\\ud800": 1}}'
     % MODEL.encode(), "lone surrogate"),
    (b'{"model": "%s", "prompt": "hi", "latin": "\xe9"}' % MODEL.encode(), "not UTF-8"),
])
def test_a_body_that_is_not_strict_utf8_json_is_400(served, body, fragment):
    url, _ = served
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
        response = post_json(url, path, body)
        check_openai_error(response, 400, None)
        assert fragment in response.json()["error"]["message"]
        assert response.json()["error"]["code"] == "invalid_json_body"


@pytest.mark.parametrize("body, key", [
    (b'{"model": "%s", "prompt": "a", "max_tokens": 1, "max_tokens": 500}'
     % MODEL.encode(), "max_tokens"),
    (b'{"model": "%s", "prompt": "a", "kad": {"rule": "kad_dual", "lam": 0.1, "lam": 0.9}}'
     % MODEL.encode(), "lam"),
])
def test_a_key_twice_in_one_object_is_400_naming_it(served, body, key):
    url, _ = served
    response = post_json(url, "/v1/completions", body)
    check_openai_error(response, 400, key)
    assert "appears twice" in response.json()["error"]["message"]


def test_strict_json_still_serves_unicode_and_leaves_bad_json_to_the_parser(served):
    url, _ = served
    text = "caf\u00e9 \u4e2d\u6587 \U0001f600"
    response = post_json(url, "/v1/completions", {**_GOOD, "prompt": text, "user": text})
    assert response.status_code == 200, response.text
    response = post_json(url, "/v1/completions", b'{"model": "kad", "prompt": ')
    check_openai_error(response, 400, None)
    assert response.json()["error"]["message"] == "request body is not valid JSON"


# --- the uvicorn internals the protocol builds on -----------------------------------------
def test_the_h11_protocol_methods_it_overrides_are_pinned_and_unchanged(monkeypatch):
    """Each overridden method is pinned, the pins hold on this uvicorn, and a changed
    signature or a handler that no longer calls send_400_response is reported."""
    from server import http_server

    overridden = {name for name in vars(http_server.BoundedH11Protocol)
                  if callable(vars(http_server.BoundedH11Protocol)[name])
                  and not name.startswith("_") or name == "__init__"}
    overridden &= set(dir(H11Protocol))
    assert overridden == set(http_server.PINNED_H11_SIGNATURES)
    assert http_server.protocol_drift() == []

    def data_received(self, data, extra=None) -> None:
        pass

    monkeypatch.setattr(H11Protocol, "data_received", data_received)
    drift = http_server.protocol_drift()
    assert any("H11Protocol.data_received" in line and "extra" in line for line in drift)
    assert any("_unset_keepalive_if_required" in line for line in drift)


def test_the_server_refuses_to_start_on_a_drifted_uvicorn(monkeypatch, caplog):
    from server import cli
    from server.config import ServeConfig

    monkeypatch.setattr(cli, "protocol_drift", lambda: ["H11Protocol.data_received(x)"])
    config = ServeConfig.model_validate({"models": {"target": "/nonexistent/t",
                                                    "draft": "/nonexistent/d"}})
    assert cli.run(config) == 1
    assert "H11Protocol.data_received(x)" in caplog.text


def _read_response(sock: socket.socket) -> bytes:
    """One response (by its content-length) from a connection that stays open; b"" when
    the server closed it instead."""
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return b""
        if not chunk:
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_a_request_that_arrived_while_the_loop_was_busy_is_answered(limited):
    """uvloop (libuv) runs due timers before it reads sockets. When the event loop was busy
    past an idle connection's keep-alive and head deadlines (1 s here), a request that
    arrived in time must be read and answered, not have its connection closed by a timer
    that fired late."""
    loop = limited.server.servers[0].get_loop()
    with _connect(limited) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: kad\r\n\r\n")
        assert _read_response(sock).startswith(b"HTTP/1.1 200 ")
        loop.call_soon_threadsafe(time.sleep, 2.5)  # the loop is busy for 2.5 s
        time.sleep(0.5)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: kad\r\n\r\n")  # in time: idle 0.5 s
        assert _read_response(sock).startswith(b"HTTP/1.1 200 ")
        # Idle again, with the loop free: closed after the keep-alive timeout as before.
        received, waited = _read_all(sock)
    assert received == b"" and 0.9 < waited < 2.5
