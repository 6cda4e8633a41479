"""The real server process (`python -m server`) on the tiny pair with the vLLM engine:
health before/after ready, the openai client end to end, disconnects; process lifecycle:
SIGTERM to the process group drains, a killed engine core makes the server exit 1, SIGTERM
during start-up and a busy port end the process within seconds."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import threading
import time

import httpx
import openai
import psutil
import pytest
from server_process import descendants as _descendants
from server_process import launch as _launch
from server_process import stop as _stop
from server_process import wait_until_ready as _wait_ready
from waiting import wait_until

from bench.eval import cli as eval_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_pair, tmp_path_factory):
    started = _launch(tiny_pair, tmp_path_factory.mktemp("server"))
    try:
        started["saw_loading"] = _wait_ready(started)
        yield started
    finally:
        _stop(started)


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
    wait_until(lambda: _running(server["url"]) == 0, 30, "requests still running",
               interval=0.2)


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


def _stream(url: str, max_tokens: int, out: dict) -> None:
    """One streaming completion; ``out`` gets its events (and "started" at the first)."""
    events = []
    try:
        with httpx.stream("POST", f"{url}/v1/completions", timeout=120, json={
                "model": "kad-tiny", "prompt": "Tell me", "max_tokens": max_tokens,
                "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    out["started"] = True
    except httpx.HTTPError as exc:
        out["transport_error"] = repr(exc)
    payloads = [json.loads(e) for e in events if e != "[DONE]"]
    out["done"] = bool(events) and events[-1] == "[DONE]"
    out["reasons"] = [c["finish_reason"] for p in payloads for c in p.get("choices", [])
                      if c["finish_reason"]]
    out["errors"] = [p["error"] for p in payloads if "error" in p]
    out["usage"] = payloads[-1].get("usage") if payloads else None
    out["finished"] = True


def _running(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics", timeout=5).text
    return next(float(line.split()[1]) for line in metrics.splitlines()
                if line.startswith("kad_requests_running"))


def _complete(url: str, out: dict, **fields) -> None:
    """One non-streaming completion (past end-of-text); ``out["response"]`` gets it."""
    out["response"] = httpx.post(f"{url}/v1/completions", timeout=120, json={
        "model": "kad-tiny", "prompt": "Count", "ignore_eos": True, **fields})


def test_sighup_and_sigusr_to_the_process_group_change_nothing(server):
    """A terminal hangup, a log rotator's HUP or a stray USR1/USR2 (each to the whole
    group): every stream runs to its end with [DONE], the server keeps serving."""
    url = server["url"]
    streams = [{} for _ in range(4)]
    workers = [threading.Thread(target=_stream, args=(url, 150, out)) for out in streams]
    plain = {}
    workers.append(threading.Thread(target=_complete, args=(url, plain), kwargs={
        "max_tokens": 150}))
    for worker in workers:
        worker.start()
    wait_until(lambda: all(out.get("started") for out in streams), 120, "streams did not start")
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        os.killpg(server["process"].pid, sig)
        time.sleep(0.2)
    for worker in workers:
        worker.join(timeout=120)
    for out in streams:
        assert out["done"] and not out["errors"] and out["reasons"] == ["length"], out
        assert out["usage"]["completion_tokens"] == 150
    assert plain["response"].status_code == 200
    assert plain["response"].json()["usage"]["completion_tokens"] == 150
    assert server["process"].poll() is None, server["log"].read_text()[-3000:]
    assert httpx.get(f"{url}/health").status_code == 200
    log = server["log"].read_text()
    for name in ("SIGHUP", "SIGUSR1", "SIGUSR2"):
        assert f"{name} ignored" in log


def test_sigterm_to_the_process_group_drains_16_streams_and_exits_zero(server):
    """What Ctrl-C or `kill -TERM -<pgid>` does: the engine processes do not see it (their
    own group), the API process drains: every stream finishes (or ends with finish_reason
    and usage at the grace deadline), a non-streaming request too, and the exit status is 0."""
    url = server["url"]
    streams = [{} for _ in range(16)]
    workers = [threading.Thread(target=_stream, args=(url, 200, out)) for out in streams]
    plain = {}
    complete = functools.partial(_complete, url, plain, max_tokens=400, seed=1)

    # Every request is admitted before the signal (a connection made after it is refused:
    # the listening socket closes first, which is the drain's design). The engine core is
    # frozen meanwhile, so the non-streaming request cannot finish before it is seen
    # admitted however fast the machine (admission does not involve the core).
    (core,) = [p for p in _descendants(server["process"].pid) if "EngineCor" in p.name()]
    first = threading.Thread(target=complete)
    core.suspend()
    try:
        first.start()
        wait_until(lambda: _running(url) >= 1, 120, "the non-streaming request was not admitted")
        for worker in workers:
            worker.start()
        wait_until(lambda: _running(url) >= 17, 120, "the streams were not admitted")
    finally:
        core.resume()
    workers.append(first)
    wait_until(lambda: all(out.get("started") for out in streams), 120, "streams did not start")
    os.killpg(server["process"].pid, signal.SIGTERM)
    for worker in workers:
        worker.join(timeout=120)
    for out in streams:
        assert out["done"] and not out["errors"], out
        assert out["reasons"] in (["length"], ["abort"]), out
        assert out["usage"]["completion_tokens"] > 0
    assert plain["response"].status_code == 200
    assert plain["response"].json()["usage"]["completion_tokens"] > 0
    assert server["process"].wait(timeout=120) == 0, server["log"].read_text()[-3000:]
    log = server["log"].read_text()
    assert "EngineCore encountered" not in log and "exiting with status" not in log


def test_killing_the_engine_core_fails_requests_and_exits_1(tiny_pair, tmp_path):
    """kill -9 of vLLM's engine core: in-flight requests get an error instead of hanging,
    the server exits 1 within seconds (an orchestrator restarts it), nothing is left."""
    server = _launch(tiny_pair, tmp_path, max_model_len=2000)
    try:
        _wait_ready(server)
        url = server["url"]
        # Freeze the engine core (SIGSTOP) before any request: nothing can finish before
        # the kill however fast the machine (the tiny pair writes 1950 tokens in about a
        # second), while the API process still admits the requests (admission does not
        # involve the core).
        engine = _descendants(server["process"].pid)
        (core,) = [p for p in engine if "EngineCor" in p.name()]
        core.suspend()
        streams = [{} for _ in range(4)]
        workers = [threading.Thread(target=_stream, args=(url, 1950, out)) for out in streams]
        plain = {}

        def complete():
            response = httpx.post(f"{url}/v1/completions", timeout=120, json={
                "model": "kad-tiny", "prompt": "Count", "max_tokens": 1950,
                "ignore_eos": True})
            plain["status"], plain["body"] = response.status_code, response.json()

        workers.append(threading.Thread(target=complete))
        for worker in workers:
            worker.start()
        wait_until(lambda: _running(url) == 5, 60, "the five requests were not admitted")
        assert not any(out.get("finished") for out in streams), streams
        core.kill()
        killed = time.monotonic()
        status = server["process"].wait(timeout=120)
        exited_after = time.monotonic() - killed
        for worker in workers:
            worker.join(timeout=60)
        log = server["log"].read_text()
        assert status == 1, log[-3000:]
        assert exited_after < 30, exited_after
        for out in streams:
            assert out["finished"] and out["done"] and out["reasons"] == [], out
            assert out["errors"][0]["type"] == "internal_server_error", out
        assert plain["status"] == 500, plain
        assert set(plain["body"]["error"]) == {"message", "type", "param", "code"}
        assert log.count("the engine died") == 1, log[-3000:]
        wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                                   for p in engine), 30, "engine processes left behind")
    finally:
        _stop(server)


def test_sigterm_during_start_up_exits_within_10_s(tiny_pair, tmp_path):
    """SIGTERM while vLLM loads the models: the start is cancelled, what vLLM started is
    killed, the process exits 0 within 10 s (not after the whole load)."""
    server = _launch(tiny_pair, tmp_path)
    try:
        pid = server["process"].pid
        wait_until(lambda: any("EngineCor" in p.name() for p in _descendants(pid)), 600,
               "no engine core process was started")
        engine = _descendants(pid)
        server["process"].send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        status = server["process"].wait(timeout=60)
        exited_after = time.monotonic() - signalled
        log = server["log"].read_text()
        assert status == 0, log[-3000:]
        assert exited_after < 10, exited_after
        assert "engine failed to start" not in log
        wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                               for p in engine), 15, "engine processes left behind")
    finally:
        _stop(server)


def test_busy_port_fails_fast_with_one_clear_line(tiny_pair, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = _launch(tiny_pair, tmp_path, port=busy.getsockname()[1])
        try:
            status = server["process"].wait(timeout=120)
        finally:
            _stop(server)
    log = server["log"].read_text()
    assert status == 1, log[-3000:]
    assert f"cannot listen on 127.0.0.1:{server['port']}: Address already in use" in log
    assert "Traceback" not in log and "EngineCore" not in log
