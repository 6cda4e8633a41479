"""Server lifecycle with a fake engine: API keys, /health while loading, after the engine
died or failed to start, the queue bound, draining at shutdown (in-process and a real
``server.cli.run`` process under SIGTERM) and the command line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
from fake_engine import MODEL, fake_config, load_tokenizer, serve_fake
from serving import free_port
from waiting import wait_ready, wait_until

from server.cli import apply_overrides, parse_args

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
BODY = {"model": MODEL, "prompt": "x", "max_tokens": 2}


@pytest.fixture(scope="module")
def tokenizer(tiny_pair):
    return load_tokenizer(str(tiny_pair.draft))


def test_api_key(tokenizer):
    thread, _ = serve_fake(tokenizer, api_key="sekret")
    try:
        url, auth = thread.url, {"Authorization": "Bearer sekret"}
        wait_until(lambda: httpx.get(f"{url}/health").status_code == 200)  # open
        assert httpx.get(f"{url}/metrics").status_code == 200  # open
        missing = httpx.post(f"{url}/v1/completions", json=BODY)
        assert missing.status_code == 401
        assert missing.json()["error"] == {
            "message": missing.json()["error"]["message"], "type": "authentication_error",
            "param": None, "code": "invalid_api_key"}
        for header in ("Bearer nope", "sekret", "Basic sekret", "Bearer sekret2", "Bearer"):
            response = httpx.post(f"{url}/v1/completions", json=BODY,
                                  headers={"Authorization": header})
            assert response.status_code == 401, header
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.post(f"{url}/v1/chat/completions", json={}).status_code == 401
        assert httpx.post(f"{url}/v1/completions", json=BODY, headers=auth).status_code == 200
        served = httpx.get(f"{url}/v1/models", headers=auth).json()["data"][0]
        assert served["id"] == MODEL
        assert served["num_speculative_tokens"] == 5  # the config's gamma
        assert served["kad"] == {"rule": "kad_dual", "param": 0.4}
    finally:
        thread.stop()


def test_health_until_ready_and_after_the_engine_dies(tokenizer):
    thread, engine = serve_fake(tokenizer, engine_options={"start_delay": 1.0})
    try:
        url = thread.url
        loading = httpx.get(f"{url}/health")
        assert loading.status_code == 503
        assert loading.json()["error"]["code"] == "engine_not_ready"
        early = httpx.post(f"{url}/v1/completions", json=BODY)
        assert early.status_code == 503 and early.json()["error"]["code"] == "engine_not_ready"
        wait_until(lambda: httpx.get(f"{url}/health").status_code == 200)
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        assert httpx.post(f"{url}/v1/completions", json=BODY).status_code == 200
        engine.errored = True  # the engine died
        dead = httpx.get(f"{url}/health")
        assert dead.status_code == 503 and dead.json()["error"]["code"] == "engine_dead"
        refused = httpx.post(f"{url}/v1/completions", json=BODY)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_dead"
    finally:
        thread.stop()
    assert engine.shut_down


def test_engine_that_fails_to_start(tokenizer):
    thread, _ = serve_fake(tokenizer, engine_options={"fail_start": True})
    try:
        wait_until(lambda: httpx.get(f"{thread.url}/health").json()["error"]["code"]
                 == "engine_dead")
        response = httpx.post(f"{thread.url}/v1/completions", json=BODY)
        assert response.status_code == 503
    finally:
        thread.stop()


def test_queue_bound(tokenizer):
    thread, engine = serve_fake(tokenizer, engine_options={"token_delay": 0.01},
                                max_waiting_requests=3)
    try:
        url = thread.url
        wait_until(lambda: httpx.get(f"{url}/health").status_code == 200)
        # More than the bound on its own: it can never be admitted, so 400, not "retry".
        too_many = httpx.post(f"{url}/v1/completions", json={**BODY, "n": 4})
        assert too_many.status_code == 400
        assert too_many.json()["error"]["param"] == "n"
        with httpx.stream("POST", f"{url}/v1/completions", json={
                **BODY, "max_tokens": 200, "n": 2, "stream": True}) as holding:
            assert holding.status_code == 200
            lines = holding.iter_lines()  # (kept: dropping it would close the stream)
            next(lines)  # two engine requests are now running
            busy = httpx.post(f"{url}/v1/completions", json={**BODY, "n": 2})
            assert busy.status_code == 503 and busy.json()["error"]["code"] == "queue_full"
            assert httpx.post(f"{url}/v1/completions", json=BODY).status_code == 200
        wait_until(lambda: engine.num_unfinished_requests() == 0)
        assert httpx.post(f"{url}/v1/completions", json={**BODY, "n": 3}).status_code == 200
    finally:
        thread.stop()


def _read_stream(url: str, max_tokens: int, out: dict) -> None:
    payloads, events = [], []
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
            **BODY, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                out.setdefault("started", True)
    payloads = [json.loads(e) for e in events if e != "[DONE]"]
    out["done"] = events[-1] == "[DONE]"
    out["reasons"] = [c["finish_reason"] for p in payloads for c in p.get("choices", [])
                      if c["finish_reason"]]
    out["errors"] = [p["error"] for p in payloads if "error" in p]
    out["text"] = "".join(c["text"] for p in payloads for c in p.get("choices", []))
    out["usage"] = payloads[-1].get("usage")


def test_draining_finishes_short_requests_and_aborts_long_ones(tokenizer):
    thread, engine = serve_fake(tokenizer, engine_options={"token_delay": 0.02},
                                shutdown_grace_s=1.0)
    try:
        url = thread.url
        wait_until(lambda: httpx.get(f"{url}/health").status_code == 200)
        short, long = {}, {}
        workers = [threading.Thread(target=_read_stream, args=(url, 10, short)),
                   threading.Thread(target=_read_stream, args=(url, 240, long))]
        for worker in workers:
            worker.start()
        wait_until(lambda: short.get("started") and long.get("started"))
        thread.server.config.app.state.kad.begin_shutdown()  # what SIGTERM does
        wait_until(lambda: httpx.get(f"{url}/health").status_code == 503, timeout=5)
        assert httpx.get(f"{url}/health").json()["error"]["code"] == "shutting_down"
        refused = httpx.post(f"{url}/v1/completions", json=BODY)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "shutting_down"
        for worker in workers:
            worker.join(timeout=30)
        assert short["done"] and short["reasons"] == ["length"]
        assert short["usage"]["completion_tokens"] == 10
        assert long["done"] and long["reasons"] == ["abort"]
        assert 0 < long["usage"]["completion_tokens"] < 240
        assert engine.num_unfinished_requests() == 0
    finally:
        thread.stop()


# --- a real process: server.cli.run with the fake engine, then SIGTERM --------------------
_SERVE_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    from fake_engine import FakeEngine, load_tokenizer
    from server.cli import run
    from server.config import ServeConfig

    config = ServeConfig.model_validate(json.loads(sys.argv[1]))
    tokenizer = load_tokenizer(sys.argv[2])
    engines = []

    options = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {{"token_delay": 0.02}}

    def factory(config):
        engines.append(FakeEngine(config, tokenizer, **options))
        return engines[-1]

    status = run(config, engine_factory=factory, log_level="warning")
    if not engines:
        print(json.dumps({{"engines": 0}}))
        sys.exit(status)
    engine = engines[0]
    print(json.dumps({{"unfinished": engine.num_unfinished_requests(),
                      "aborted": len(engine.aborted), "shut_down": engine.shut_down}}))
    sys.exit(status)
""")


def _serve_process(tiny_pair, port: int, options: dict, **server) -> subprocess.Popen:
    """``server.cli.run`` in a process with a fake engine built with ``options``."""
    config = fake_config(host="127.0.0.1", port=port, **server)
    return subprocess.Popen(
        [sys.executable, "-c", _SERVE_SCRIPT.format(tests=str(TESTS)),
         config.model_dump_json(), str(tiny_pair.draft), json.dumps(options)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _health(url: str) -> int | None:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code
    except httpx.TransportError:
        return None


def test_sigterm_drains_and_exits_zero(tiny_pair):
    port = free_port()
    config = fake_config(host="127.0.0.1", port=port, shutdown_grace_s=1.5)
    process = subprocess.Popen(
        [sys.executable, "-c", _SERVE_SCRIPT.format(tests=str(TESTS)),
         config.model_dump_json(), str(tiny_pair.draft)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=120, process=process,
                   output=lambda: process.communicate()[1])
        short, long = {}, {}
        workers = [threading.Thread(target=_read_stream, args=(url, 10, short)),
                   threading.Thread(target=_read_stream, args=(url, 240, long))]
        for worker in workers:
            worker.start()
        wait_until(lambda: short.get("started") and long.get("started"))
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
        for worker in workers:
            worker.join(timeout=30)
        assert process.returncode == 0, stderr[-3000:]
        assert short["done"] and short["reasons"] == ["length"]
        assert long["done"] and long["reasons"] == ["abort"]
        report = json.loads(stdout.strip().splitlines()[-1])
        assert report == {"unfinished": 0, "aborted": 1, "shut_down": True}
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize(("options", "message", "report"), [
    ({"fail_start": True}, "RuntimeError: fake engine failed to load", {"shut_down": True}),
    # Raised while building the engine (vLLM's: tokenizer, context-length checks).
    ({"fail_init": True}, "RuntimeError: fake engine cannot be built", {"engines": 0}),
])
def test_engine_that_fails_to_start_exits_1_with_one_clear_line(tiny_pair, options, message,
                                                                 report):
    process = _serve_process(tiny_pair, free_port(), options)
    try:
        stdout, stderr = process.communicate(timeout=60)  # python, tokenizer: seconds
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 1, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if "engine failed to start" in line]
    assert len(lines) == 1 and message in lines[0], stderr
    assert "exiting with status 1" in lines[0]
    assert "Traceback" not in stderr
    assert report.items() <= json.loads(stdout.strip().splitlines()[-1]).items()


def _complete(url: str, out: dict) -> None:
    response = httpx.post(f"{url}/v1/completions", timeout=60,
                          json={**BODY, "max_tokens": 240})
    out["status"], out["body"] = response.status_code, response.json()


def test_engine_death_fails_in_flight_requests_and_exits_1(tiny_pair):
    """The engine dies mid-generation: streams end with an error event and [DONE], a
    non-streaming request gets an OpenAI-shaped 500, and the process exits 1 at once."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = _serve_process(tiny_pair, port, {"token_delay": 0.02, "die_after": 100},
                             shutdown_grace_s=30)
    try:
        wait_until(lambda: process.poll() is None and _health(url) == 200, timeout=120)
        streams = [{}, {}]
        plain: dict = {}
        workers = [threading.Thread(target=_read_stream, args=(url, 240, out))
                   for out in streams] + [threading.Thread(target=_complete, args=(url, plain))]
        for worker in workers:
            worker.start()
        stdout, stderr = process.communicate(timeout=30)  # far below the 30 s grace + 5
        for worker in workers:
            worker.join(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 1, stderr[-3000:]
    for out in streams:
        assert out["done"] and out["reasons"] == []
        assert out["errors"] and out["errors"][0]["type"] == "internal_server_error"
    assert plain["status"] == 500
    assert set(plain["body"]["error"]) == {"message", "type", "param", "code"}
    died = [line for line in stderr.splitlines() if "the engine died" in line]
    assert len(died) == 1 and "exiting with status 1" in died[0], stderr[-3000:]
    assert json.loads(stdout.strip().splitlines()[-1])["shut_down"] is True


def test_busy_port_fails_fast_before_the_engine_is_built(tiny_pair):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        process = _serve_process(tiny_pair, port, {"start_delay": 600})
        try:
            stdout, stderr = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == 1, stderr[-3000:]
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in stderr
    assert "Traceback" not in stderr and "engine failed to start" not in stderr
    assert json.loads(stdout.strip().splitlines()[-1]) == {"engines": 0}


def test_sigterm_while_the_engine_loads_exits_0_at_once(tiny_pair):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = _serve_process(tiny_pair, port, {"start_delay": 600})
    try:
        wait_until(lambda: process.poll() is None and _health(url) == 503, timeout=120)
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        stdout, stderr = process.communicate(timeout=30)
        elapsed = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr[-3000:]
    assert elapsed < 10
    assert "engine failed to start" not in stderr and "Traceback" not in stderr
    assert json.loads(stdout.strip().splitlines()[-1])["shut_down"] is True


# --- engine processes: their own process group, and they die with their parent ------------
_GUARD_SCRIPT = textwrap.dedent("""
    import multiprocessing, os, signal, sys, time
    from server.engine import process_guard

    def report(signum, frame):
        print(f"{os.getpid()} got signal {signum}", flush=True)

    def engine(spawned):
        if spawned:  # what vLLM's plugin loader does in a spawned engine process
            process_guard.guard_spawned_process()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # so a SIGTERM that arrives kills it
        print(f"engine {os.getpid()} {os.getpgrp()}", flush=True)
        time.sleep(600)

    if __name__ == "__main__":
        signal.signal(signal.SIGTERM, report)
        process_guard.enable()  # what VllmEngine.start does before vLLM starts processes
        method = sys.argv[1]
        child = multiprocessing.get_context(method).Process(target=engine,
                                                            args=(method == "spawn",))
        child.start()
        time.sleep(600)
""")


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_engine_processes_leave_the_group_and_die_with_the_server(tmp_path, method):
    import psutil

    script = tmp_path / "guard.py"
    script.write_text(_GUARD_SCRIPT)
    server = subprocess.Popen([sys.executable, str(script), method], cwd=REPO,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = server.stdout.readline().split()
        assert line[0] == "engine", line
        engine_pid, engine_pgid = int(line[1]), int(line[2])
        assert engine_pgid == engine_pid != os.getpgid(server.pid) == server.pid
        engine = psutil.Process(engine_pid)
        os.killpg(server.pid, signal.SIGTERM)  # Ctrl-C, kill -TERM -<pgid>: the server only
        assert server.stdout.readline().strip() == f"{server.pid} got signal {signal.SIGTERM}"
        time.sleep(0.5)
        assert engine.is_running() and engine.status() != psutil.STATUS_ZOMBIE
        server.kill()  # the server killed outright: the engine notices and exits
        server.wait()
        wait_until(lambda: not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE,
                   10, "the orphaned engine process is still running")
    finally:
        if server.poll() is None:
            server.kill()  # (its engine process then exits by itself)
            server.wait()


# --- the command line ----------------------------------------------------------------------
def test_bad_config_exits_2_with_a_clear_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  target: a\nengine:\n  max_model_len: -4\n")
    env = {k: v for k, v in os.environ.items() if k != "KAD_API_KEY"}
    result = subprocess.run([sys.executable, "-m", "server", "--config", str(bad)], cwd=REPO,
                            capture_output=True, text=True, timeout=120, env=env, check=False)
    assert result.returncode == 2
    assert "models.draft" in result.stderr and "engine.max_model_len" in result.stderr
    assert "Traceback" not in result.stderr
    missing = subprocess.run([sys.executable, "-m", "server", "--config",
                              str(tmp_path / "none.yaml")], cwd=REPO, capture_output=True,
                             text=True, timeout=120, env=env, check=False)
    assert missing.returncode == 2 and "cannot read config" in missing.stderr


def test_command_line_overrides_the_config(monkeypatch, tmp_path):
    config = fake_config(port=8000)
    monkeypatch.delenv("KAD_API_KEY", raising=False)
    args = parse_args(["--config", "x.yaml", "--host", "0.0.0.0", "--port", "9001",
                       "--num-speculative-tokens", "3"])
    merged = apply_overrides(config, args)
    assert (merged.server.host, merged.server.port) == ("0.0.0.0", 9001)
    assert merged.engine.num_speculative_tokens == 3 and merged.server.api_key is None
    monkeypatch.setenv("KAD_API_KEY", "from-env")
    assert apply_overrides(config, args).server.api_key == "from-env"
    flagged = parse_args(["--config", "x.yaml", "--api-key", "from-flag"])
    assert apply_overrides(config, flagged).server.api_key == "from-flag"
    with pytest.raises(ValueError, match="port"):
        apply_overrides(config, parse_args(["--config", "x.yaml", "--port", "70000"]))


def test_tiny_cpu_config_is_valid():
    from server.config import load_config

    config = load_config(REPO / "configs" / "tiny-cpu.yaml")
    assert config.build_tiny_models and config.engine.dtype == "float32"
    assert config.engine.max_model_len == 1024 and config.engine.num_speculative_tokens == 5
    assert config.engine.cpu_kv_cache_gib == 1
    assert (config.alignment.rule, config.alignment.lam) == ("kad_dual", 0.4)
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8000)
    assert config.models.target.endswith("models/tiny/target")
    assert config.models.draft.endswith("models/tiny/draft")
