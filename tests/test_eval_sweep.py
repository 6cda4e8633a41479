"""kad-eval end to end against a live OpenAI-compatible server: sweeps, resume, retries.

The server here is a small stub (``http.server`` on a free port) with canned answers and
``kad`` statistics that fails on purpose for some prompts; ``tests/test_server_process.py``
runs a sweep against the real tiny-model server.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from bench.eval import cli as eval_cli
from bench.eval.cli import parse_settings
from bench.eval.report import wilson
from bench.eval.runner import Setting

# Stub acceptance per rule setting: (drafted, accepted, mean deferred mass) per request.
KAD_STATS = {("kad_dual", 0.3): (10, 8, 0.25), ("kad_dual", 0.4): (10, 6, 0.5),
             ("base", None): (10, 9, 0.0)}


class StubServer:
    """OpenAI chat API with canned replies chosen by a keyword of the prompt.

    ``replies``: keyword -> assistant text. ``failures``: keyword -> (status, times): the
    first ``times`` requests whose prompt holds the keyword get ``status`` (-1: forever).
    Requests without a ``kad`` object get responses without one (a plain OpenAI server).
    """

    def __init__(self, replies: dict[str, str], failures: dict[str, tuple[int, int]]) -> None:
        self.replies, self.failures = replies, failures
        self.calls: list[dict[str, Any]] = []
        self.served: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()

    def keyword(self, prompt: str) -> str:
        return next((k for k in self.replies if k in prompt), "")

    def respond(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        prompt = body["messages"][-1]["content"]
        key = self.keyword(prompt)
        with self.lock:
            self.calls.append(body)
            self.served[key] += 1
            status, times = self.failures.get(key, (200, 0))
            if status != 200 and (times < 0 or self.served[key] <= times):
                return status, {"error": {"message": f"planned {status}", "type": "stub"}}
        text = self.replies.get(key, "I do not know.")
        words = text.split()
        cut = len(words) > body.get("max_tokens", len(words))  # a "token" is a word here
        text = " ".join(words[:body["max_tokens"]]) if cut else text
        response: dict[str, Any] = {
            "id": f"chatcmpl-{len(self.calls)}", "object": "chat.completion", "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "length" if cut else "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 20, "completion_tokens": len(text.split()),
                      "total_tokens": 20 + len(text.split())},
        }
        kad = body.get("kad")
        if kad:
            param = next((v for k, v in kad.items() if k != "rule"), None)
            drafted, accepted, alpha = KAD_STATS[kad["rule"], param]
            response["kad"] = {
                "rule": kad["rule"], "param": param, "drafted_tokens": drafted,
                "accepted_tokens": accepted, "emitted_tokens": accepted + 1,
                "acceptance_rate": accepted / drafted, "mean_deferred_mass": alpha,
                "deferred_share": alpha,
            }
        return 200, response

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                with stub.lock:
                    stub.calls.append({"path": self.path})
                self._send(200, {"object": "list", "data": [
                    {"id": "stub-model", "object": "model", "created": 0, "owned_by": "t"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self._send(*stub.respond(body))

        return Handler


# Five GSM8K items and five SVAMP items; the stub gets 3 + 4 of them right.
GSM8K = [("ducks lay 16 eggs", "9 * 2 = $18 a day, so she makes 18 dollars.", "#### 18"),
         ("3 bikes for $400", "3 * 400 = 1,200. The revenue is $1,200.", "#### 1,200"),
         ("owes 50 and pays 70", "50 - 70 = -20, so the balance is -20.", "#### -20"),
         ("half of 7 pies", "7 / 2 = 3.5 pies. Answer: 3.4", "#### 3.5"),
         ("21 pencils", "There are 7 boxes of 3 pencils.", "#### 21")]
SVAMP = [("packs of dvds", "76 - 25 = 51", 51.0), ("candy bar cost", "4 - 3 = 1", 1.0),
         ("salty cookies", "26 - 9 = 17", 17.0), ("marbles left", "12 + 5 = 17", 18.0),
         ("red balloons", "so 2,000 in total", 2000.0)]


def write_data(root: Path) -> None:
    (root / "gsm8k").mkdir(parents=True)
    (root / "gsm8k" / "test.jsonl").write_text("".join(
        json.dumps({"question": f"Question about {key}?", "answer": f"work\n{gold}"}) + "\n"
        for key, _, gold in GSM8K))
    (root / "svamp").mkdir()
    (root / "svamp" / "SVAMP.json").write_text(json.dumps([
        {"ID": f"chal-{i}", "Body": f"A story of {key}.", "Question": "How many?",
         "Equation": "", "Answer": gold, "Type": "x"} for i, (key, _, gold) in enumerate(SVAMP)]))


@pytest.fixture
def stub():
    servers: list[StubServer] = []

    def make(failures: dict[str, tuple[int, int]] | None = None) -> StubServer:
        replies = {key: reply for key, reply, _ in GSM8K + SVAMP}
        servers.append(StubServer(replies, failures or {}))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_eval(server_url: str, data_dir: Path, out: Path, *extra: str) -> int:
    return eval_cli.main(["--base-url", server_url, "--data-dir", str(data_dir),
                          "--task", "gsm8k", "--task", "svamp", "--out", str(out),
                          "--no-progress", *extra])


def test_answers_cut_at_max_tokens_are_counted_per_task_and_in_the_table(stub, tmp_path,
                                                                         capsys):
    """At 8 "tokens" three GSM8K replies (11, 9 and 9 words) end with finish_reason length."""
    write_data(tmp_path / "data")
    out = tmp_path / "out"
    assert run_eval(stub().url, tmp_path / "data", out, "--limit", "5", "--rule", "base",
                    "--max-tokens", "8") == 0
    summary = json.loads((out / "summary.json").read_text())["base"]
    assert (summary["gsm8k"]["cut"], summary["svamp"]["cut"]) == (3, 0)
    records = read_jsonl(out / "gsm8k__base.jsonl")
    assert sorted(r["id"] for r in records if r["finish_reason"] == "length") == \
        ["gsm8k-0", "gsm8k-1", "gsm8k-2"]
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("| base |")).split(" | ")
    assert row[-2:] == ["3", "0 |"]


def test_settings_pair_params_with_the_preceding_rule():
    parser = eval_cli.build_parser()
    args = parser.parse_args(["--task", "t", "--rule", "base", "--rule", "kad_dual",
                              "--param", "0.3", "--param", "0.4", "--rule", "nudging",
                              "--rule", "kad_primal", "--param", "0.8"])
    assert parse_settings(args.ordered_settings) == [
        Setting("base"), Setting("kad_dual", 0.3), Setting("kad_dual", 0.4),
        Setting("nudging", 0.4), Setting("kad_primal", 0.8)]  # nudging: paper default
    assert parse_settings(None) == [Setting(None)]
    assert Setting("kad_primal", 0.8).kad() == {"rule": "kad_primal", "budget": 0.8}
    assert Setting("kad_perceptron", 0.05).kad() == {"rule": "kad_perceptron", "mu": 0.05}
    for bad, message in [(["--param", "0.3", "--rule", "kad_dual"], "must follow"),
                         (["--rule", "base", "--param", "0.3"], "takes no parameter"),
                         (["--rule", "nope"], "unknown rule"),
                         (["--rule", "kad_dual", "--rule", "kad_dual"], "given twice")]:
        with pytest.raises(SystemExit, match=message):
            parse_settings(parser.parse_args(["--task", "t", *bad]).ordered_settings)


def test_sweep_writes_comparison_table_and_per_item_jsonl(stub, tmp_path, capsys):
    server = stub()
    write_data(tmp_path / "data")
    out = tmp_path / "out"
    assert run_eval(server.url, tmp_path / "data", out, "--limit", "5", "--rule", "base",
                    "--rule", "kad_dual", "--param", "0.3", "--param", "0.4") == 0

    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["base", "kad_dual 0.3", "kad_dual 0.4"]
    for label, (drafted, accepted, alpha) in [("base", KAD_STATS["base", None]),
                                              ("kad_dual 0.3", KAD_STATS["kad_dual", 0.3])]:
        gsm8k, svamp = summary[label]["gsm8k"], summary[label]["svamp"]
        assert (gsm8k["items"], gsm8k["correct"], svamp["correct"]) == (5, 3, 4)
        assert gsm8k["ci95"] == pytest.approx(list(wilson(3, 5)))
        assert gsm8k["acceptance_rate"] == pytest.approx(accepted / drafted)
        assert gsm8k["mean_deferred_mass"] == pytest.approx(alpha)
        assert gsm8k["errors"] == 0 and gsm8k["tokens_per_s"] > 0

    table = (out / "summary.md").read_text()
    assert table == capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0] == ("| setting | gsm8k | svamp | avg | acceptance | deferred mass | tok/s "
                        "| cut | failed |")
    low, high = wilson(3, 5)
    row = next(line for line in lines if line.startswith("| kad_dual 0.3 |")).split(" | ")
    assert row[1] == f"60.0 [{100 * low:.1f}, {100 * high:.1f}]"
    assert row[2].startswith("80.0 [") and row[3] == "70.0"
    assert row[4:6] == ["0.800", "0.250"] and row[-2:] == ["0", "0 |"]

    records = read_jsonl(out / "gsm8k__kad_dual_0.4.jsonl")
    assert len(records) == 5
    by_id = {r["id"]: r for r in records}
    assert [by_id[f"gsm8k-{i}"]["extracted"] for i in range(5)] == ["18", "1200", "-20", "3.4",
                                                                    "3"]
    assert [by_id[f"gsm8k-{i}"]["correct"] for i in range(5)] == [True, True, True, False, False]
    first = by_id["gsm8k-0"]
    assert first["gold"] == "18" and first["output"].startswith("9 * 2")
    assert first["prompt"].startswith("Question about ducks lay 16 eggs?\n")
    assert first["kad"]["rule"] == "kad_dual" and first["kad"]["acceptance_rate"] == 0.6
    assert first["setting"] == "kad_dual 0.4" and first["error"] is None
    assert first["completion_tokens"] > 0 and first["attempts"] == 1

    bodies = [c for c in server.calls if "messages" in c]
    assert len(bodies) == 3 * 10
    assert Counter(json.dumps(b.get("kad"), sort_keys=True) for b in bodies) == {
        '{"rule": "base"}': 10, '{"lam": 0.3, "rule": "kad_dual"}': 10,
        '{"lam": 0.4, "rule": "kad_dual"}': 10}
    assert {b["temperature"] for b in bodies} == {0.7} and {b["model"] for b in bodies} == {
        "stub-model"}
    # Each item has its own fixed seed, the same under every setting.
    seeds = {(b["messages"][0]["content"], b["kad"].get("lam")): b["seed"] for b in bodies}
    assert len(set(seeds.values())) == 10
    assert all(seeds[p, 0.3] == seeds[p, 0.4] for p, lam in seeds if lam == 0.3)


def test_failures_are_retried_then_recorded(stub, tmp_path, capsys):
    server = stub({"21 pencils": (500, 2),        # recovers on the third attempt
                   "half of 7 pies": (503, -1),   # never recovers
                   "red balloons": (400, -1)})    # a bad request: not retried
    write_data(tmp_path / "data")
    out = tmp_path / "out"
    assert run_eval(server.url, tmp_path / "data", out, "--retries", "2") == 0

    assert server.served["21 pencils"] == 3
    assert server.served["half of 7 pies"] == 3
    assert server.served["red balloons"] == 1
    gsm8k = {r["id"]: r for r in read_jsonl(out / "gsm8k__default.jsonl")}
    svamp = {r["id"]: r for r in read_jsonl(out / "svamp__default.jsonl")}
    assert len(gsm8k) == len(svamp) == 5
    assert gsm8k["gsm8k-4"]["error"] is None and gsm8k["gsm8k-4"]["attempts"] == 3
    broken = gsm8k["gsm8k-3"]
    assert broken["attempts"] == 3 and broken["correct"] is False and broken["output"] is None
    assert "InternalServerError" in broken["error"] and "planned 503" in broken["error"]
    rejected = svamp["chal-4"]
    assert rejected["attempts"] == 1 and "BadRequestError" in rejected["error"]

    summary = json.loads((out / "summary.json").read_text())["server-default"]
    assert (summary["gsm8k"]["errors"], summary["svamp"]["errors"]) == (1, 1)
    assert (summary["gsm8k"]["correct"], summary["svamp"]["correct"]) == (3, 3)
    # A server without kad statistics: no acceptance, the table says so.
    assert summary["gsm8k"]["acceptance_rate"] is None
    row = (out / "summary.md").read_text().splitlines()[2].split(" | ")
    assert row[4:6] == ["-", "-"] and row[-1] == "2 |"
    assert "2 request(s) failed after retries" in capsys.readouterr().err

    # --retry-failed redoes exactly the failed items; the newest line of an id wins.
    server.failures.clear()
    assert run_eval(server.url, tmp_path / "data", out, "--retry-failed") == 0
    assert server.served["half of 7 pies"] == 4 and server.served["red balloons"] == 2
    assert server.served["21 pencils"] == 3
    summary = json.loads((out / "summary.json").read_text())["server-default"]
    assert (summary["gsm8k"]["errors"], summary["svamp"]["errors"]) == (0, 0)
    assert (summary["gsm8k"]["items"], summary["svamp"]["correct"]) == (5, 4)


def test_resume_skips_finished_items(stub, tmp_path):
    server = stub()
    write_data(tmp_path / "data")
    out = tmp_path / "out"
    assert run_eval(server.url, tmp_path / "data", out, "--limit", "3",
                    "--rule", "kad_dual") == 0
    assert sum(server.served.values()) == 6
    path = out / "gsm8k__kad_dual_0.4.jsonl"
    # A run killed mid-write leaves a cut line: that item is redone, later lines stay intact.
    with path.open("a") as handle:
        handle.write('{"id": "gsm8k-3", "output": "cut sh')

    assert run_eval(server.url, tmp_path / "data", out, "--limit", "5",
                    "--rule", "kad_dual") == 0
    assert sum(server.served.values()) == 10
    assert server.served["half of 7 pies"] == 1 and server.served["21 pencils"] == 1
    lines = path.read_text().splitlines()
    assert len(lines) == 6 and lines[3].startswith('{"id": "gsm8k-3", "output": "cut sh')
    assert sorted(json.loads(line)["id"] for i, line in enumerate(lines) if i != 3) == [
        f"gsm8k-{i}" for i in range(5)]
    summary = json.loads((out / "summary.json").read_text())["kad_dual 0.4"]
    assert summary["gsm8k"]["items"] == 5 and summary["gsm8k"]["correct"] == 3

    # Everything done: nothing is sent, not even the model listing; files unchanged.
    before = {p.name: p.read_text() for p in out.glob("*.jsonl")}
    calls = len(server.calls)
    assert run_eval(server.url, tmp_path / "data", out, "--limit", "5",
                    "--rule", "kad_dual") == 0
    assert len(server.calls) == calls
    assert {p.name: p.read_text() for p in out.glob("*.jsonl")} == before
    # A smaller --limit summarises only the selected items.
    assert run_eval(server.url, tmp_path / "data", out, "--limit", "2",
                    "--rule", "kad_dual") == 0
    assert json.loads((out / "summary.json").read_text())["kad_dual 0.4"]["gsm8k"]["items"] == 2


def test_base_url_without_path_gets_the_api_root():
    from bench.client import openai_base_url

    assert openai_base_url("http://h:8000") == "http://h:8000/v1"
    assert openai_base_url("http://h:8000/") == "http://h:8000/v1"
    assert openai_base_url("http://h:8000/v1") == "http://h:8000/v1"
    assert openai_base_url("https://gw.example/kad/v1/") == "https://gw.example/kad/v1"
