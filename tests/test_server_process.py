"""The real server process (`python -m server`) on the tiny pair with the vLLM engine:
health before/after ready, the openai client end to end, disconnects, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from bench.eval import cli as eval_cli

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_pair, tmp_path_factory):
    port = _free_port()
    config = {
        "models": {"target": str(tiny_pair.target), "draft": str(tiny_pair.draft),
                   "served_model_name": "kad-tiny"},
        "engine": {"num_speculative_tokens": 3, "dtype": "float32", "max_model_len": 512,
                   "cpu_kv_cache_gib": 1, "max_num_seqs": 32},
        "alignment": {"rule": "kad_dual", "lam": 0.4},
        "server": {"host": "127.0.0.1", "port": port, "shutdown_grace_s": 20},
    }
    path = tmp_path_factory.mktemp("server") / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    log = open(path.parent / "server.log", "w")  # noqa: SIM115 - closed at fixture teardown
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "--config", str(path), "--log-level", "warning"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ},
    )
    url = f"http://127.0.0.1:{port}"
    saw_loading = False
    deadline = time.time() + 600
    while True:
        assert process.poll() is None, (path.parent / "server.log").read_text()[-3000:]
        assert time.time() < deadline, "server did not become ready"
        try:
            status = httpx.get(f"{url}/health", timeout=2).status_code
        except httpx.TransportError:
            status = None
        if status == 503:
            saw_loading = True
        if status == 200:
            break
        time.sleep(0.25)
    yield {"url": url, "process": process, "saw_loading": saw_loading, "log": path.parent}
    if process.poll() is None:
        process.kill()
    log.close()


def test_health_reports_loading_then_ready(server):
    assert server["saw_loading"]
    assert httpx.get(f"{server['url']}/health").json() == {"status": "ok"}


def test_openai_client_against_the_real_engine(server):
    client = openai.OpenAI(base_url=f"{server['url']}/v1", api_key="x", max_retries=0)
    chat = client.chat.completions.create(
        model="kad-tiny", messages=[{"role": "user", "content": "What is 2+2?"}],
        max_tokens=16, seed=11, extra_body={"kad": {"rule": "kad_primal", "budget": 0.9}},
    )
    again = client.chat.completions.create(
        model="kad-tiny", messages=[{"role": "user", "content": "What is 2+2?"}],
        max_tokens=16, seed=11, extra_body={"kad": {"rule": "kad_primal", "budget": 0.9}},
    )
    assert chat.choices[0].message.content == again.choices[0].message.content
    kad = chat.model_extra["kad"]
    assert kad["rule"] == "kad_primal" and kad["param"] == 0.9
    assert kad["emitted_tokens"] == chat.usage.completion_tokens
    assert kad["accepted_tokens"] <= kad["drafted_tokens"]
    # Rule aligned (pi = q*) accepts every draft, also when max_tokens cuts the last step
    # (gamma 3 here: drafts past max_tokens must not count as rejected).
    for max_tokens in (7, 10, 13):
        aligned = client.completions.create(
            model="kad-tiny", prompt="Once upon a time", max_tokens=max_tokens, seed=3,
            extra_body={"kad": {"rule": "aligned"}, "ignore_eos": True},
        ).model_extra["kad"]
        assert aligned["acceptance_rate"] == 1.0, aligned
        assert aligned["accepted_tokens"] == aligned["drafted_tokens"] > 0
        assert aligned["emitted_tokens"] == max_tokens
    stream = client.completions.create(
        model="kad-tiny", prompt="Once upon a time", max_tokens=12, n=2, seed=4, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert chunks[-1].usage.completion_tokens <= 24
    assert all(texts.values()) or chunks[-1].usage.completion_tokens < 24


def test_disconnects_free_the_engine(server):
    import asyncio

    async def leave_early():
        async with httpx.AsyncClient(base_url=server["url"], timeout=60) as http:
            async def one():
                async with http.stream("POST", "/v1/completions", json={
                    "model": "kad-tiny", "prompt": "Tell me", "max_tokens": 400,
                    "stream": True, "ignore_eos": True,
                }) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            break
            await asyncio.gather(*(one() for _ in range(10)))

    asyncio.run(leave_early())
    deadline = time.time() + 30
    running = None
    while time.time() < deadline:
        metrics = httpx.get(f"{server['url']}/metrics").text
        running = next(float(line.split()[1]) for line in metrics.splitlines()
                       if line.startswith("kad_requests_running"))
        if running == 0:
            break
        time.sleep(0.2)
    assert running == 0


def test_sweep_against_the_tiny_server(server, tmp_path):
    """The same sweep through the real server (tiny model pair): every request answered,
    alignment statistics per request consistent with the rule sent."""
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + {i}?",
                                        "answer": str(2 * i)}) + "\n" for i in range(5)))
    out = tmp_path / "out"
    assert eval_cli.main(["--base-url", server["url"], "--task", "toy", "--data", str(data),
                          "--rule", "base", "--rule", "kad_dual", "--param", "0.4",
                          "--max-tokens", "16", "--concurrency", "4", "--out", str(out),
                          "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for label, slug, rule in [("base", "base", "base"),
                              ("kad_dual 0.4", "kad_dual_0.4", "kad_dual")]:
        records = [json.loads(line) for line in (out / f"toy__{slug}.jsonl").read_text().splitlines()]
        assert len(records) == 5 and all(r["error"] is None for r in records)
        assert all(r["kad"]["rule"] == rule for r in records)
        assert all(0 <= r["kad"]["accepted_tokens"] <= r["kad"]["drafted_tokens"]
                   for r in records)
        assert all(0 < r["completion_tokens"] <= 16 for r in records)
        assert summary[label]["toy"]["items"] == 5 and summary[label]["toy"]["errors"] == 0
        rate = summary[label]["toy"]["acceptance_rate"]
        assert rate is None or 0.0 <= rate <= 1.0
    assert summary["kad_dual 0.4"]["toy"]["mean_deferred_mass"] >= 0.0
    assert summary["base"]["toy"]["mean_deferred_mass"] == pytest.approx(0.0)


def test_sigterm_finishes_in_flight_request_and_exits_zero(server):
    import threading

    result = {}

    def long_request():
        result["response"] = httpx.post(f"{server['url']}/v1/completions", json={
            "model": "kad-tiny", "prompt": "Count", "max_tokens": 40, "seed": 1,
        }, timeout=120)

    worker = threading.Thread(target=long_request)
    worker.start()
    time.sleep(0.5)
    server["process"].send_signal(signal.SIGTERM)
    worker.join(timeout=120)
    assert result["response"].status_code == 200
    assert result["response"].json()["usage"]["completion_tokens"] > 0
    assert server["process"].wait(timeout=120) == 0
