"""``kad-bench serve`` against a live streaming OpenAI-compatible stub server.

The stub streams canned text word by word (SSE), ends with the usage chunk carrying the
``kad`` statistics when asked for them, and can report gamma, omit ``kad`` (a plain
OpenAI server) or fail some requests on purpose.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from bench import cli as bench_cli
from bench.serve_bench import BenchSetting, merge_records, tables_markdown

PNG = b"\x89PNG\r\n\x1a\n"
DATA = Path(__file__).parent / "data"
ACCEPTANCE = {"kad_dual": (8, 6), "nudging": (8, 4)}  # (drafted, accepted) per request
WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


class StreamingStub:
    """``/v1/models`` and streaming ``/v1/completions`` + ``/v1/chat/completions``."""

    def __init__(self, gamma: int | None = None, with_kad: bool = True,
                 fail_word: str | None = None) -> None:
        self.gamma, self.with_kad, self.fail_word = gamma, with_kad, fail_word
        self.bodies: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()

    def events(self, body: dict[str, Any], chat: bool) -> list[dict[str, Any]]:
        count = min(body["max_tokens"], len(WORDS))
        base = {"id": "x", "created": 0, "model": body["model"],
                "object": "chat.completion.chunk" if chat else "text_completion"}

        def choice(text: str, finish: str | None) -> dict[str, Any]:
            entry: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
            if chat:
                entry["delta"] = {"content": text} if text else {}
            else:
                entry["text"] = text
            return {**base, "choices": [entry]}

        chunks = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                              "content": ""}}]}] if chat else []
        chunks += [choice(WORDS[i] + " ", None) for i in range(count)]
        chunks.append(choice("", "length"))
        if (body.get("stream_options") or {}).get("include_usage"):
            final: dict[str, Any] = {**base, "choices": [], "usage": {
                "prompt_tokens": 5, "completion_tokens": count, "total_tokens": 5 + count}}
            kad = body.get("kad")
            if self.with_kad and kad:
                drafted, accepted = ACCEPTANCE[kad["rule"]]
                prompt = body["messages"][-1]["content"] if chat else body["prompt"]
                accepted -= 2 if "multiple-choice" in prompt else 0  # harder task, lower rate
                final["kad"] = {"rule": kad["rule"], "param": kad.get("lam"),
                                "drafted_tokens": drafted, "accepted_tokens": accepted,
                                "emitted_tokens": count, "acceptance_rate": accepted / drafted,
                                "mean_deferred_mass": 0.3, "deferred_share": 0.4}
                if self.gamma is not None:
                    final["kad"]["gamma"] = self.gamma
            chunks.append(final)
        return chunks

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                model = {"id": "stub", "object": "model", "created": 0, "owned_by": "t"}
                data = json.dumps({"object": "list", "data": [model]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                chat = self.path.endswith("/chat/completions")
                prompt = body["messages"][-1]["content"] if chat else body["prompt"]
                with stub.lock:
                    stub.bodies.append(body)
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                try:
                    if stub.fail_word and stub.fail_word in prompt:
                        data = json.dumps({"error": {"message": "planned"}}).encode()
                        self.send_response(500)
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data)
                        return
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    for event in stub.events(body, chat):
                        self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                        self.wfile.flush()
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.close_connection = True
                finally:
                    with stub.lock:
                        stub.in_flight -= 1

        return Handler


@pytest.fixture
def make_stub():
    stubs: list[StreamingStub] = []

    def make(**kwargs: Any) -> StreamingStub:
        stubs.append(StreamingStub(**kwargs))
        return stubs[-1]

    yield make
    for stub in stubs:
        stub.stop()


def serve(url: str, out: Path, *extra: str) -> list[dict[str, Any]]:
    assert bench_cli.main(["serve", "--base-url", url, "--out", str(out), "--max-tokens", "6",
                           "--warmup", "1", "--repeats", "2", *extra]) == 0
    return json.loads((out / "serve.json").read_text())


def assert_png(path: Path) -> None:
    content = path.read_bytes()
    assert content.startswith(PNG) and len(content) > 5000


def test_records_per_setting_and_concurrency(make_stub, tmp_path, capsys):
    stub = make_stub(gamma=5)
    records = serve(stub.url, tmp_path, "--concurrency", "1", "2",
                    "--settings", "kad_dual:0.4", "nudging")
    assert [(r["system"], r["concurrency"]) for r in records] == [
        ("kad:kad_dual:0.4", 1), ("kad:kad_dual:0.4", 2), ("kad:nudging:0.4", 1),
        ("kad:nudging:0.4", 2)]
    for record in records:
        drafted, accepted = ACCEPTANCE[record["rule"]]
        assert record["acceptance_rate"] == pytest.approx(accepted / drafted)
        assert record["acceptance_repeats"] == pytest.approx([accepted / drafted] * 2)
        assert record["mean_deferred_mass"] == pytest.approx(0.3)
        assert record["param"] == 0.4 and record["gamma"] == record["gamma_reported"] == 5
        assert len(record["repeats"]) == 2 and record["errors"] == 0
        assert record["tokens_per_s_min"] <= record["tokens_per_s"] <= record[
            "tokens_per_s_max"]
        assert record["tokens_per_s"] > 0 and record["per_request_tokens_per_s"] > 0
        assert record["ttft_s"] is not None and record["ttft_s"] > 0
        assert record["requests_per_round"] == 2 * record["concurrency"]
    # Warm-up + 2 repeats, 2 requests per slot, for concurrency 1 and 2, for 2 settings.
    assert len(stub.bodies) == 2 * (3 * 2 * 1 + 3 * 2 * 2)
    assert stub.max_in_flight <= 2
    assert all(b["stream"] and b["stream_options"] == {"include_usage": True}
               and b["ignore_eos"] is True and b["max_tokens"] == 6 for b in stub.bodies)
    assert {json.dumps(b["kad"], sort_keys=True) for b in stub.bodies} == {
        '{"lam": 0.4, "rule": "kad_dual"}', '{"lam": 0.4, "rule": "nudging"}'}
    for name in ("acceptance.png", "throughput.png", "ttft.png"):
        assert_png(tmp_path / name)
    assert "kad:nudging:0.4" in capsys.readouterr().out


def test_gamma_labels_merge_runs_into_one_json(make_stub, tmp_path):
    plain = make_stub(with_kad=False, fail_word="sky")  # an OpenAI server without kad stats
    for gamma in ("3", "7", "3"):
        records = serve(plain.url, tmp_path, "--concurrency", "1", "--gamma-label", gamma,
                        "--settings", "kad_dual", "--endpoint", "chat")
    assert sorted((r["system"], r["gamma"]) for r in records) == [
        ("kad:kad_dual:0.4", 3), ("kad:kad_dual:0.4", 7)]  # the second gamma-3 run replaced
    for record in records:
        assert record["acceptance_rate"] is None and record["gamma_reported"] is None
        # The prompt about the sky fails once per round (one of its two requests).
        assert record["errors"] == 2 and record["tokens_per_s"] > 0
        assert record["ttft_s"] > 0 and record["endpoint"] == "chat"
    assert_png(tmp_path / "acceptance.png")  # no acceptance data: still a valid image

    records = serve(plain.url, tmp_path / "fresh", "--concurrency", "1", "--settings",
                    "default", "--no-plots")
    assert [(r["system"], r["gamma"], r["rule"]) for r in records] == [
        ("server-default", None, None)]
    assert "kad" not in plain.bodies[-1] and not (tmp_path / "fresh" / "throughput.png").exists()


def test_settings_and_merging():
    assert BenchSetting.parse("kad_primal:0.8").kad() == {"rule": "kad_primal", "budget": 0.8}
    assert BenchSetting.parse("kad_primal").system == "kad:kad_primal:0.9"
    assert BenchSetting.parse("kad_zero_one").system == "kad:kad_zero_one"
    assert BenchSetting.parse("default").kad() is None
    with pytest.raises(SystemExit, match="takes no parameter"):
        BenchSetting.parse("base:0.3")
    with pytest.raises(SystemExit, match="unknown rule"):
        BenchSetting.parse("bogus")
    old = [{"system": "a", "gamma": 3, "concurrency": 1, "tokens_per_s": 1.0},
           {"system": "a", "gamma": 5, "concurrency": 1, "tokens_per_s": 2.0}]
    new = [{"system": "a", "gamma": 3, "concurrency": 1, "tokens_per_s": 9.0}]
    assert merge_records(old, new) == [old[1], new[0]]


def test_task_prompts_give_the_papers_table_4_and_5_layout(make_stub, tmp_path):
    data = tmp_path / "data"
    for task, name, sample in [("gsm8k", "test.jsonl", "gsm8k_sample.jsonl"),
                               ("arc", "ARC-Challenge-Test.jsonl", "arc_sample.jsonl")]:
        (data / task).mkdir(parents=True)
        (data / task / name).write_text((DATA / sample).read_text())
    for gamma in (3, 5):
        stub = make_stub(gamma=gamma)
        records = serve(stub.url, tmp_path / "out", "--concurrency", "1", "2", "--task",
                        "gsm8k", "--task", "arc", "--data-dir", str(data), "--task-prompts",
                        "2", "--settings", "kad_dual:0.4", "nudging:0.4")
        prompts = {b["messages"][-1]["content"] for b in stub.bodies}
        assert len(prompts) == 4 and all("stream" in b for b in stub.bodies)
        assert sum(p.startswith("Choose the correct answer to the following multiple-choice "
                                "question.\n\nWhat happens if a planet") for p in prompts) == 1
        assert sum(p.startswith("Janet's ducks") for p in prompts) == 1
    assert len(records) == 2 * 2 * 2 * 2  # gamma x task x setting x concurrency
    assert {r["task"] for r in records} == {"gsm8k", "arc"}
    assert {r["gamma"] for r in records} == {3, 5}

    tables = (tmp_path / "out" / "tables.md").read_text()
    assert tables == tables_markdown(records)
    lines = tables.splitlines()
    assert lines[0] == "### Throughput, tokens/s (Table 4 layout), concurrency 1"
    assert lines[2] == "| system | gamma | arc | gsm8k | Avg. |"
    start = lines.index("### Acceptance rate, % (Table 5 layout), concurrency 1")
    assert lines[start + 4: start + 8] == [
        "| kad:kad_dual:0.4 | 3 | 50.0 | 75.0 | 62.5 |",
        "| kad:kad_dual:0.4 | 5 | 50.0 | 75.0 | 62.5 |",
        "| kad:nudging:0.4 | 3 | 25.0 | 50.0 | 37.5 |",
        "| kad:nudging:0.4 | 5 | 25.0 | 50.0 | 37.5 |"]
    throughput = lines[4].split(" | ")
    assert throughput[0] == "| kad:kad_dual:0.4" and float(throughput[2]) > 0
    assert "concurrency 2" in tables_markdown(records, concurrency=2).splitlines()[0]
    assert_png(tmp_path / "out" / "throughput.png")
