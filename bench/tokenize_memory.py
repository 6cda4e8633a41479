"""The API process's memory and ``/health`` latency under bursts of large tokenizer requests.

``python -m bench.tokenize_memory`` starts the real server (``server.cli.run``: the app,
uvicorn, the body limit) in a subprocess with a tokenizer-only stand-in for the engine (ready
at once, generates nothing), one fresh process per scenario, and reads its resident memory
(``VmRSS`` in ``/proc/<pid>/status``) before a burst, at its peak (sampled every few
milliseconds while the requests run) and after it (the requests answered, a moment later).
Scenarios, each ``--concurrency`` requests at once:

* the largest ``/tokenize`` the limits allow, with ``return_token_strs`` (200);
* ``server.max_tokenize_chars`` characters that encode to more tokens than
  ``server.max_tokenize_tokens`` (tokenized, then refused: 400);
* a prompt as large as the body limit allows (refused before tokenizing: 400);
* ``/detokenize`` of ``server.max_tokenize_tokens`` ids (200) and of a body-limit-sized list
  (400).

Then ``/health``'s latency (polled every 10 ms) while the server receives one body-limit
sized chat completion and one body-limit-sized ``/tokenize``, and during the first burst.

The tokenizer is the tiny test pair's (a 512-entry byte-level BPE, ~1.4 characters per token:
far more tokens per character than a real model's, so the token cap binds first). Numbers are
for the machine it runs on; compare runs on the same machine only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
MODEL = "kad-bench"


# --- the server side ------------------------------------------------------------------------
class TokenizerOnlyEngine:
    """Enough of ``server.engine.Engine`` for the HTTP layer: ready once started, holding the
    tokenizer, generating nothing (a chat completion that gets that far is a 400)."""

    metrics_registry = None
    errored = False

    def __init__(self, config, tokenizer) -> None:
        self.served_model_name = config.models.served_model_name
        self.max_model_len = config.engine.max_model_len
        self.tokenizer = tokenizer
        self.ready = False

    async def start(self) -> None:
        self.ready = True

    def generate(self, *args, **kwargs):
        raise ValueError("this benchmark's engine does not generate")

    def num_unfinished_requests(self) -> int:
        return 0

    def totals(self) -> dict:
        return {}

    async def shutdown(self) -> None:
        self.ready = False


def serve(config_json: str, tokenizer_path: str) -> int:
    from transformers import AutoTokenizer

    from server.cli import run
    from server.config import ServeConfig

    config = ServeConfig.model_validate(json.loads(config_json))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    return run(config, engine_factory=lambda c: TokenizerOnlyEngine(c, tokenizer),
               log_level="warning")


# --- the client side ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"process {pid} has ended")


class Server:
    """One server process on a free port; ``stop`` sends SIGTERM and waits."""

    def __init__(self, tokenizer_path: str, settings: dict[str, Any],
                 max_model_len: int) -> None:
        self.port = _free_port()
        config = {"models": {"target": "unused", "draft": "unused",
                             "served_model_name": MODEL},
                  "engine": {"max_model_len": max_model_len},
                  "server": {"host": "127.0.0.1", "port": self.port, "shutdown_grace_s": 1,
                             **settings}}
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.tokenize_memory", "--serve", json.dumps(config),
             "--tokenizer", tokenizer_path], cwd=REPO)
        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                raise RuntimeError("the server process exited")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready")
            time.sleep(0.1)

    def rss(self) -> float:
        return rss_mib(self.process.pid)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Sampler(threading.Thread):
    """Reads a process's RSS every ``interval`` seconds until stopped; ``peak`` is the max."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = 0.0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, rss_mib(self.pid))
            time.sleep(self.interval)

    def stop(self) -> float:
        self._done.set()
        self.join()
        return self.peak


class HealthPoller(threading.Thread):
    """GETs /health every ``interval`` seconds on one connection; ``latencies`` in seconds."""

    def __init__(self, url: str, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.url, self.interval = url, interval
        self.latencies: list[float] = []
        self._done = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self._done.is_set():
                start = time.perf_counter()
                client.get(f"{self.url}/health")
                self.latencies.append(time.perf_counter() - start)
                time.sleep(self.interval)

    def stop(self) -> list[float]:
        self._done.set()
        self.join()
        return self.latencies


def _post(url: str, path: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{url}{path}", content=body, timeout=600,
                      headers={"content-type": "application/json"})


def burst(server: Server, path: str, body: bytes, concurrency: int,
          settle_s: float) -> dict[str, Any]:
    """``concurrency`` identical requests at once: RSS before, peak and after; statuses."""
    before = server.rss()
    sampler = Sampler(server.process.pid)
    poller = HealthPoller(server.url)
    sampler.start()
    poller.start()
    results: list[tuple[int, int, float]] = []

    def one() -> None:
        start = time.perf_counter()
        response = _post(server.url, path, body)
        results.append((response.status_code, len(response.content),
                        time.perf_counter() - start))

    threads = [threading.Thread(target=one) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    latencies = poller.stop()
    time.sleep(settle_s)
    peak = sampler.stop()
    return {"before": before, "peak": peak, "after": server.rss(),
            "statuses": sorted({r[0] for r in results}),
            "response_mib": max(r[1] for r in results) / 2**20, "seconds": elapsed,
            "health_max_s": max(latencies, default=0.0)}


def health_during(server: Server, path: str, body: bytes) -> dict[str, Any]:
    """``/health`` latencies while one request with ``body`` is received and answered."""
    poller = HealthPoller(server.url)
    poller.start()
    time.sleep(0.2)
    start = time.perf_counter()
    response = _post(server.url, path, body)
    elapsed = time.perf_counter() - start
    time.sleep(0.1)
    latencies = poller.stop()
    return {"status": response.status_code, "seconds": elapsed,
            "health_p50_s": statistics.median(latencies), "health_max_s": max(latencies),
            "polls": len(latencies)}


def words_text(chars: int, seed: int = 0) -> str:
    """English-like text of exactly ``chars`` characters: README words in random order."""
    words = re.findall(r"[A-Za-z]+", (REPO / "README.md").read_text()) or ["word"]
    rng = random.Random(seed)
    pieces, size = [], 0
    while size < chars:
        word = rng.choice(words)
        pieces.append(word)
        size += len(word) + 1
    return " ".join(pieces)[:chars]


def text_within(tokenizer, text: str, max_tokens: int) -> str:
    """The longest prefix of ``text`` ending at a word boundary with at most ``max_tokens``
    tokens (without special tokens)."""
    encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    if len(encoding.ids) <= max_tokens:
        return text
    cut = text.rfind(" ", 0, encoding.offsets[max_tokens - 1][1])
    while len(tokenizer.encode(text[:cut], add_special_tokens=False)) > max_tokens:
        cut = text.rfind(" ", 0, cut - 1)
    return text[:cut]


def _body(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


def _fill_to(limit: int, make) -> bytes:
    """The largest body ``make(n)`` no larger than ``limit`` bytes (``n`` grows the body
    by about a byte per unit)."""
    overhead = len(make(0))
    body = make(limit - overhead)
    while len(body) > limit:
        body = make(limit - overhead - (len(body) - limit) - 8)
    return body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the tiny test "
                        "pair's, built if missing)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds between the last answer and the 'after' reading")
    parser.add_argument("--skip", nargs="*", default=[], help="scenario names to leave out")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.serve, args.tokenizer)

    from transformers import AutoTokenizer

    from server.config import ServerSettings

    tokenizer_path = args.tokenizer
    if tokenizer_path is None:
        from kad_kernels.tiny_models import build_tiny_pair

        root = Path(os.environ.get("KAD_TEST_MODELS", REPO / "models" / "tiny-test"))
        tokenizer_path = str(build_tiny_pair(root).draft)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    defaults = ServerSettings()
    max_body = defaults.max_request_body_bytes
    # The pre-cap server had no such settings: the same sizes, for before/after numbers.
    max_chars = getattr(defaults, "max_tokenize_chars", 2**20)
    max_tokens = getattr(defaults, "max_tokenize_tokens", 2**18)
    max_model_len = 1024

    at_char_cap = words_text(max_chars)
    largest = text_within(tokenizer, at_char_cap, max_tokens)
    ids = tokenizer.encode(largest, add_special_tokens=False)
    big_ids = (ids * (max_tokens // max(len(ids), 1) + 1))[:max_tokens]
    scenarios = {
        "tokenize_largest_allowed": ("/tokenize", _body(
            {"prompt": largest, "add_special_tokens": False, "return_token_strs": True})),
        "tokenize_char_cap_over_tokens": ("/tokenize", _body(
            {"prompt": at_char_cap, "add_special_tokens": False, "return_token_strs": True})),
        "tokenize_body_limit": ("/tokenize", _fill_to(max_body, lambda n: _body(
            {"prompt": words_text(n, 1), "return_token_strs": True}))),
        "detokenize_token_cap": ("/detokenize", _body({"tokens": big_ids})),
        "detokenize_body_limit": ("/detokenize", _fill_to(max_body, lambda n: _body(
            {"tokens": [7] * (n // 3)}))),
    }
    print(f"tokenizer {tokenizer_path} ({len(tokenizer)} entries); caps: {max_chars} chars, "
          f"{max_tokens} tokens; largest allowed /tokenize: {len(largest)} chars, "
          f"{len(ids)} tokens; body limit {max_body} bytes; concurrency {args.concurrency}",
          flush=True)
    results: dict[str, Any] = {}
    for name, (path, body) in scenarios.items():
        if name in args.skip:
            continue
        server = Server(tokenizer_path, {}, max_model_len)
        try:
            httpx.post(f"{server.url}/tokenize", json={"prompt": "warm up"})
            time.sleep(0.5)
            results[name] = {"path": path, "body_mib": len(body) / 2**20,
                             **burst(server, path, body, args.concurrency, args.settle)}
        finally:
            server.stop()
        print(name, json.dumps(results[name]), flush=True)

    chat_body = _fill_to(max_body, lambda n: _body(
        {"model": MODEL, "max_tokens": 1,
         "messages": [{"role": "user", "content": words_text(n, 2)}]}))
    health: dict[str, Any] = {}
    server = Server(tokenizer_path, {}, max_model_len)
    try:
        idle = HealthPoller(server.url)
        idle.start()
        time.sleep(1.0)
        latencies = idle.stop()
        health["idle"] = {"health_p50_s": statistics.median(latencies),
                          "health_max_s": max(latencies), "polls": len(latencies)}
        health["chat_body_limit"] = health_during(server, "/v1/chat/completions", chat_body)
        health["tokenize_body_limit"] = health_during(server, "/tokenize",
                                                      scenarios["tokenize_body_limit"][1])
    finally:
        server.stop()
    for name, row in health.items():
        print("health", name, json.dumps(row), flush=True)

    print()
    print(f"{'scenario':32} {'status':>8} {'body MiB':>8} {'resp MiB':>8} {'before':>7} "
          f"{'peak':>7} {'after':>7} {'secs':>6} {'health max':>10}")
    for name, row in results.items():
        print(f"{name:32} {','.join(map(str, row['statuses'])):>8} {row['body_mib']:8.1f} "
              f"{row['response_mib']:8.1f} {row['before']:7.0f} {row['peak']:7.0f} "
              f"{row['after']:7.0f} {row['seconds']:6.1f} {row['health_max_s']:10.3f}")
    print("(RSS in MiB; health max: the slowest /health answer during the burst, seconds)")
    for name, row in health.items():
        extra = f" status {row['status']}, request {row['seconds']:.2f}s" if "status" in row \
            else ""
        print(f"/health while {name}: p50 {row['health_p50_s'] * 1000:.1f} ms, max "
              f"{row['health_max_s'] * 1000:.1f} ms{extra}")
    if args.json:
        Path(args.json).write_text(json.dumps({"bursts": results, "health": health},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
