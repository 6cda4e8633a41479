"""``kad-bench soak``: drive a running server with mixed traffic for N minutes and check it.

    kad-bench soak --base-url http://127.0.0.1:8000 --minutes 10 --concurrency 8 --faults

``--concurrency`` workers send a mix for ``--minutes``: chat and completions, streamed and
not, ``n > 1``, prompt scoring (``echo`` + ``logprobs``), every rule the two-model engine
serves (and the server's default), greedy, seeded and sampled requests with top-k/top-p,
and streams the client closes after a few events. Every ``--burst-every`` seconds a burst
of more requests than ``--queue-bound`` (the server's ``server.max_waiting_requests``,
which it does not publish) is fired at once. ``--faults`` adds, once a minute, a SIGSTOP
of the engine core for ``--stop-seconds`` then SIGCONT, and a round of hostile requests
(a BOM body, a key twice, a lone surrogate, ``top_k: 1e30``, a string ``n``, a truncated
body, an oversized header, a gigabyte ``Content-Length``).

Before the load, each greedy and seeded probe (one per rule, chat and completions,
streamed and not) runs alone; the load starts with each probe once (spread over the
workers, so every probe runs under load however short the soak), then the probes come back
in round-robin with the rest.

Checks (each a line of the report; the exit status is 1 when one fails):

- every request answered: 200, or 503 ``queue_full`` (the documented answer past the
  bound); *lost* = no answer within ``--timeout``, a transport error that was not an
  intended disconnect, or a stream without ``[DONE]``; *unexpected* = any other status, an
  in-band stream error, a malformed body;
- ``kad.inexact_tokens`` (and ``degraded_tokens``) 0 on every response, and
  ``kad_inexact_tokens_total`` / ``kad_degraded_tokens_total`` on ``/metrics`` unchanged;
- a seeded probe gives the same text (and logprobs, within 1e-4) every time;
- a greedy probe under load gives the text it gave alone;
- ``kad_requests_running`` back to 0 after the load (within ``--settle-seconds``);
- at least one burst got a 503 ``queue_full`` (the bound was passed);
- with ``--faults``: every hostile request got a 4xx in OpenAI's error shape, and every
  SIGSTOP/SIGCONT was applied;
- ``/health`` 200 at the end.

Also reported: RSS of the server process and its descendants (the engine core) after the
warm-up and at the end (``--server-pid``, else the process listening on the URL's port);
tokens/s and p50/p95 of time to first token (streams) and of total latency per minute.
``--out`` gets ``summary.json``, ``report.txt`` (the printed report) and ``soak.png``.
The last two lines printed are ``lost: <n>`` and ``inexact: <n>``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import math
import random
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.client import openai_base_url, server_root_url
from bench.serve_bench import PROMPTS, BenchSetting

LOGPROB_TOLERANCE = 1e-4
# Traffic mix: kind -> weight (probes are drawn round-robin within their kind).
MIX = {"chat": 2, "chat_stream": 2, "completion_n": 1, "completion_stream_n": 1,
       "score": 1, "seeded": 2, "greedy": 2, "disconnect": 1}
PROBE_TOKENS = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000",
                        help="the server's address (or its API root .../v1)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--model", help="default: the server's first model")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--queue-bound", type=int, default=256,
                        help="the server's server.max_waiting_requests (bursts exceed it)")
    parser.add_argument("--burst-every", type=float, default=30.0,
                        help="seconds between bursts past the queue bound (0: none)")
    parser.add_argument("--faults", action="store_true",
                        help="SIGSTOP/SIGCONT the engine core and send hostile requests, "
                             "once a minute each")
    parser.add_argument("--stop-seconds", type=float, default=3.0)
    parser.add_argument("--server-pid", type=int,
                        help="the API server's PID (default: the process listening on the "
                             "URL's port, when local)")
    parser.add_argument("--engine-pid", type=int,
                        help="the engine core's PID (default: the server's descendant named "
                             "VLLM::EngineCore)")
    parser.add_argument("--rules", nargs="+",
                        help="rule[:param] settings, or 'default' (default: every rule the "
                             "two-model engine serves, and 'default')")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds after which an unanswered request counts as lost")
    parser.add_argument("--settle-seconds", type=float, default=30.0,
                        help="how long kad_requests_running may take to return to 0")
    parser.add_argument("--sample-every", type=float, default=2.0,
                        help="seconds between /metrics and RSS samples")
    parser.add_argument("--bucket-seconds", type=float, default=60.0,
                        help="width of the throughput/latency rows (default: per minute)")
    parser.add_argument("--seed", type=int, default=0, help="the traffic mix's random seed")
    parser.add_argument("--out", type=Path, default=Path("results/soak"))
    parser.add_argument("--no-plot", action="store_true")


# --- requests ---------------------------------------------------------------------------------

def _choice_text(choice: dict[str, Any], chat: bool, stream: bool) -> str:
    if not chat:
        return choice.get("text") or ""
    part = choice.get("delta" if stream else "message") or {}
    return part.get("content") or ""


def _choice_logprobs(choice: dict[str, Any], chat: bool) -> list[float | None]:
    logprobs = choice.get("logprobs") or {}
    if chat:
        return [entry.get("logprob") for entry in logprobs.get("content") or []]
    return list(logprobs.get("token_logprobs") or [])


def same_answer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Same texts and finish reasons per choice, logprobs equal within LOGPROB_TOLERANCE."""
    if a["texts"] != b["texts"] or a["finish"] != b["finish"]:
        return False
    for x, y in zip(a["logprobs"], b["logprobs"], strict=True):
        if len(x) != len(y) or any(
                (u is None) != (v is None) or (u is not None and abs(u - v) > LOGPROB_TOLERANCE)
                for u, v in zip(x, y, strict=True)):
            return False
    return True


def _percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _error_shape(body: Any) -> bool:
    """OpenAI's error shape: {"error": {"message": str, "type": str, "param", "code"}}."""
    error = body.get("error") if isinstance(body, dict) else None
    return (isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error)
            and isinstance(error["message"], str) and isinstance(error["type"], str))


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        import httpx

        self.args = args
        self.api = openai_base_url(args.base_url)
        self.root = server_root_url(args.base_url)
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        burst = args.queue_bound + args.concurrency + 4
        # Idle connections are dropped before the server's keep-alive timeout (5 s), so that
        # a request never races the server closing its connection.
        self.http = httpx.AsyncClient(
            base_url=self.api, headers=headers,
            timeout=httpx.Timeout(args.timeout, connect=30.0),
            limits=httpx.Limits(max_connections=burst + 4 * args.concurrency + 16,
                                max_keepalive_connections=2 * args.concurrency + 8,
                                keepalive_expiry=2.0))
        self.rng = random.Random(args.seed)
        self.settings = ([BenchSetting.parse(text) for text in args.rules] if args.rules
                         else self.default_settings())
        self.t0 = time.monotonic()
        self.outcomes: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.faults: list[dict[str, Any]] = []
        self.hostile: list[dict[str, Any]] = []
        self.bursts: list[dict[str, Any]] = []
        self.answers: dict[str, dict[str, Any]] = {}  # probe -> what it gave alone
        self.mismatches: list[dict[str, Any]] = []
        self.compared: dict[str, int] = {}
        self.model = ""

    @staticmethod
    def default_settings() -> list[BenchSetting]:
        from kad_kernels.rules import TWO_MODEL_RULES

        return [BenchSetting.parse(rule) for rule in TWO_MODEL_RULES] + [BenchSetting(None, None)]

    def now(self) -> float:
        return time.monotonic() - self.t0

    # --- one request ------------------------------------------------------------------------
    async def call(self, kind: str, endpoint: str, body: dict[str, Any], *,
                   disconnect_after: int | None = None, probe: str | None = None,
                   phase: str = "load") -> dict[str, Any]:
        """Sends one request and records its outcome (never raises)."""
        import httpx

        chat = endpoint == "chat/completions"
        stream = bool(body.get("stream"))
        record: dict[str, Any] = {
            "kind": kind, "phase": phase, "probe": probe, "start": self.now(), "end": None,
            "status": None, "code": None, "tokens": 0, "ttft": None, "lost": None,
            "unexpected": None, "disconnected": False, "inexact": None, "degraded": None,
            "rule": (body.get("kad") or {}).get("rule", "default"), "stream": stream,
        }
        texts: dict[int, str] = {}
        logprobs: dict[int, list[float | None]] = {}
        finish: dict[int, str | None] = {}
        kad: dict[str, Any] | None = None
        payload: Any = None
        start = time.monotonic()
        try:
            async with asyncio.timeout(self.args.timeout):
                if stream:
                    async with self.http.stream("POST", endpoint, json=body) as response:
                        record["status"] = response.status_code
                        if response.status_code != 200:
                            await response.aread()
                            payload = _json(response.content)
                        else:
                            done, events = False, 0
                            async for line in response.aiter_lines():
                                if not line.startswith("data: "):
                                    continue
                                data = line[6:]
                                if data == "[DONE]":
                                    done = True
                                    break
                                chunk = json.loads(data)
                                events += 1
                                if "error" in chunk:
                                    record["unexpected"] = f"in-band error: {chunk['error']}"
                                for choice in chunk.get("choices") or []:
                                    index = choice.get("index", 0)
                                    piece = _choice_text(choice, chat, stream=True)
                                    if piece and record["ttft"] is None:
                                        record["ttft"] = time.monotonic() - start
                                    texts[index] = texts.get(index, "") + piece
                                    logprobs.setdefault(index, []).extend(
                                        _choice_logprobs(choice, chat))
                                    if choice.get("finish_reason"):
                                        finish[index] = choice["finish_reason"]
                                if chunk.get("usage"):
                                    record["tokens"] = chunk["usage"].get("completion_tokens", 0)
                                    kad = chunk.get("kad")
                                if disconnect_after is not None and events >= disconnect_after:
                                    record["disconnected"] = True
                                    break  # leaving the block closes the connection
                            if not done and not record["disconnected"]:
                                record["lost"] = "stream ended without [DONE]"
                else:
                    response = await self.http.post(endpoint, json=body)
                    record["status"] = response.status_code
                    payload = _json(response.content)
                    if response.status_code == 200 and isinstance(payload, dict):
                        for choice in payload.get("choices") or []:
                            index = choice.get("index", 0)
                            texts[index] = _choice_text(choice, chat, stream=False)
                            logprobs[index] = _choice_logprobs(choice, chat)
                            finish[index] = choice.get("finish_reason")
                        record["tokens"] = (payload.get("usage") or {}).get("completion_tokens", 0)
                        kad = payload.get("kad")
        except TimeoutError:
            record["lost"] = f"no answer within {self.args.timeout:g} s"
        except httpx.HTTPError as exc:
            record["lost"] = f"transport error: {_chain(exc)}"
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            record["unexpected"] = f"malformed stream event: {exc}"
        record["end"] = self.now()
        record["seconds"] = time.monotonic() - start
        status = record["status"]
        if record["lost"] is None and status is not None and status != 200:
            record["code"] = ((payload or {}).get("error") or {}).get("code") if isinstance(
                payload, dict) else None
            if not (status == 503 and record["code"] == "queue_full"):
                record["unexpected"] = f"HTTP {status} {record['code']}: {str(payload)[:200]}"
        elif status == 200 and record["lost"] is None and not record["disconnected"]:
            expected = body.get("n") or 1
            if len(texts) != expected or len(finish) != expected:
                record["unexpected"] = record["unexpected"] or (
                    f"{len(texts)} choices ({len(finish)} finished), {expected} asked")
            if isinstance(kad, dict):
                record["inexact"] = kad.get("inexact_tokens")
                record["degraded"] = kad.get("degraded_tokens")
            if record["inexact"] is None:
                record["unexpected"] = record["unexpected"] or "no kad.inexact_tokens"
        if status == 200 and not record["disconnected"]:
            indices = sorted(texts)
            record["answer"] = {"texts": [texts[i] for i in indices],
                                "finish": [finish.get(i) for i in indices],
                                "logprobs": [logprobs.get(i, []) for i in indices]}
        self.outcomes.append(record)
        return record

    # --- the traffic ------------------------------------------------------------------------
    def _sampling(self) -> dict[str, Any]:
        rng = self.rng
        out: dict[str, Any] = {"temperature": rng.choice([0.7, 1.0, 1.3])}
        top_k = rng.choice([None, 5, 50])
        top_p = rng.choice([None, 0.9, 0.95])
        if top_k:
            out["top_k"] = top_k
        if top_p:
            out["top_p"] = top_p
        if rng.random() < 0.5:
            out["seed"] = rng.randrange(2**31)
        return out

    def _base(self, setting: BenchSetting, max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens}
        kad = setting.kad()
        if kad:
            body["kad"] = kad
        return body

    def _chat(self, body: dict[str, Any], prompt: str) -> dict[str, Any]:
        return {**body, "messages": [{"role": "user", "content": prompt}]}

    def probes(self) -> dict[str, dict[str, Any]]:
        """name -> (kind, endpoint, body): a greedy and a seeded probe per setting, chat and
        completions and streamed or not in turn, n = 2 on some seeded ones."""
        probes: dict[str, dict[str, Any]] = {}
        for i, setting in enumerate(self.settings):
            prompt = PROMPTS[i % len(PROMPTS)]
            for kind in ("greedy", "seeded"):
                chat = (i + (kind == "seeded")) % 2 == 0
                stream = (i // 2) % 2 == 1
                body = {**self._base(setting, PROBE_TOKENS), "ignore_eos": True}
                if kind == "greedy":
                    body["temperature"] = 0
                else:
                    body.update(temperature=1.0, seed=1000 + i, top_k=[None, 20][i % 2],
                                top_p=[0.95, None][i % 2], n=2 if not chat and i % 4 == 0 else 1)
                    body = {k: v for k, v in body.items() if v is not None}
                if chat:
                    body = self._chat(body, prompt)
                    body.update(logprobs=True, top_logprobs=0)
                else:
                    body.update(prompt=prompt, logprobs=0)
                if stream:
                    body.update(stream=True, stream_options={"include_usage": True})
                name = f"{kind}:{setting.system}:{'chat' if chat else 'completions'}" + (
                    ":stream" if stream else "")
                probes[name] = {"kind": kind, "body": body,
                                "endpoint": "chat/completions" if chat else "completions"}
        return probes

    def next_request(self, kind: str, probe_cycle: dict[str, Any]) -> dict[str, Any]:
        rng = self.rng
        if kind in ("seeded", "greedy"):
            name = next(probe_cycle[kind])
            return {**self.probe_table[name], "probe": name}
        setting = rng.choice(self.settings)
        prompt = rng.choice(PROMPTS)
        max_tokens = rng.randint(8, self.args.max_tokens)
        body = self._base(setting, max_tokens)
        if rng.random() < 0.7:
            body["ignore_eos"] = True
        if kind in ("chat", "chat_stream"):
            body = self._chat({**body, **self._sampling()}, prompt)
            if rng.random() < 0.3:
                body.update(logprobs=True, top_logprobs=2)
            if kind == "chat_stream":
                body.update(stream=True, stream_options={"include_usage": True})
            return {"kind": kind, "endpoint": "chat/completions", "body": body}
        if kind in ("completion_n", "completion_stream_n"):
            body.update(self._sampling(), prompt=prompt, n=2)
            if rng.random() < 0.3:
                body["logprobs"] = 1
            if kind == "completion_stream_n":
                body.update(stream=True, stream_options={"include_usage": True})
            return {"kind": kind, "endpoint": "completions", "body": body}
        if kind == "score":
            body.update(prompt=prompt, echo=True, logprobs=1, temperature=0,
                        max_tokens=rng.choice([0, 1]))
            body.pop("ignore_eos", None)
            return {"kind": kind, "endpoint": "completions", "body": body}
        assert kind == "disconnect"
        body.update(self._sampling(), prompt=prompt, max_tokens=max(self.args.max_tokens, 200),
                    ignore_eos=True, stream=True)
        return {"kind": kind, "endpoint": "completions", "body": body, "disconnect_after": 3}

    async def worker(self, deadline: float, probe_cycle: dict[str, Any],
                     first_runs: collections.deque[str]) -> None:
        """Requests until the deadline: first every probe once (shared among the workers,
        so each probe runs under load however short the soak), then the weighted mix."""
        kinds, weights = list(MIX), list(MIX.values())
        while time.monotonic() < deadline:
            if first_runs:
                name = first_runs.popleft()
                request = {**self.probe_table[name], "probe": name}
            else:
                request = self.next_request(self.rng.choices(kinds, weights)[0], probe_cycle)
            record = await self.call(request["kind"], request["endpoint"], request["body"],
                                     disconnect_after=request.get("disconnect_after"),
                                     probe=request.get("probe"))
            if request.get("probe"):
                self.compare(request["probe"], record)

    def compare(self, name: str, record: dict[str, Any]) -> None:
        """A probe's answer under load against its answer alone."""
        answer, alone = record.get("answer"), self.answers.get(name)
        if answer is None or alone is None or record["unexpected"]:
            return
        self.compared[name] = self.compared.get(name, 0) + 1
        if not same_answer(answer, alone):
            self.mismatches.append({"probe": name, "at_s": round(record["start"], 1),
                                    "alone": alone, "under_load": answer})

    async def alone(self) -> None:
        """Each probe once, one at a time, before any other traffic."""
        for name, probe in self.probe_table.items():
            for _ in range(10):  # a 503 queue_full could only be someone else's traffic
                record = await self.call(probe["kind"], probe["endpoint"], probe["body"],
                                         probe=name, phase="alone")
                if record["status"] != 503:
                    break
                await asyncio.sleep(1.0)
            if record.get("answer") is not None and not record["unexpected"]:
                self.answers[name] = record["answer"]

    async def burst(self) -> None:
        size = self.args.queue_bound + self.args.concurrency + 4
        started = self.now()

        async def one() -> dict[str, Any]:
            setting = self.rng.choice(self.settings)
            body = {**self._base(setting, 16), "prompt": self.rng.choice(PROMPTS),
                    "ignore_eos": True, "temperature": 1.0}
            return await self.call("burst", "completions", body)

        records = await asyncio.gather(*(one() for _ in range(size)))
        self.bursts.append({
            "at_s": round(started, 1), "size": size,
            "ok": sum(r["status"] == 200 for r in records),
            "queue_full": sum(r["code"] == "queue_full" for r in records),
            "seconds": round(self.now() - started, 2)})

    # --- faults -----------------------------------------------------------------------------
    async def stop_engine(self) -> None:
        import psutil

        fault: dict[str, Any] = {"at_s": round(self.now(), 1), "pid": self.engine_pid,
                                 "seconds": self.args.stop_seconds, "applied": False}
        self.faults.append(fault)
        if self.engine_pid is None:
            fault["error"] = "no engine core PID (--engine-pid / --server-pid)"
            return
        try:
            process = psutil.Process(self.engine_pid)
            process.suspend()  # SIGSTOP
            try:
                await asyncio.sleep(self.args.stop_seconds)
            finally:
                process.resume()  # SIGCONT
            fault["applied"] = True
        except psutil.Error as exc:
            fault["error"] = f"{type(exc).__name__}: {exc}"

    async def hostile_round(self) -> None:
        for name, (raw, expected) in hostile_requests(self).items():
            status, body, error = await raw_request(self.root, raw)
            self.hostile.append({
                "at_s": round(self.now(), 1), "name": name, "status": status,
                "expected": expected, "error_shape": _error_shape(body),
                "code": (body.get("error") or {}).get("code") if _error_shape(body) else None,
                "transport_error": error,
                "ok": status is not None and 400 <= status < 500 and _error_shape(body)})

    # --- observing the server ---------------------------------------------------------------
    def processes(self) -> list[Any]:
        import psutil

        if self.server_pid is None:
            return []
        try:
            server = psutil.Process(self.server_pid)
            return [server, *server.children(recursive=True)]
        except psutil.Error:
            return []

    def rss(self) -> dict[str, dict[str, Any]]:
        """pid -> name and RSS (bytes) of the server and its descendants."""
        import psutil

        out = {}
        for process in self.processes():
            try:
                out[str(process.pid)] = {"name": process.name(), "rss": process.memory_info().rss}
            except psutil.Error:
                pass
        return out

    async def metrics(self) -> dict[str, float] | None:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        try:
            text = (await self.http.get(f"{self.root}/metrics", timeout=30)).text
        except httpx.HTTPError:
            return None
        wanted = {"kad_requests_running": "running", "kad_inexact_tokens_total": "inexact",
                  "kad_degraded_tokens_total": "degraded",
                  "vllm:num_preemptions_total": "preemptions"}
        values = dict.fromkeys(wanted.values(), 0.0)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in wanted:
                    values[wanted[sample.name]] += sample.value
        return values

    async def sample(self) -> dict[str, Any] | None:
        values = await self.metrics()
        rss = self.rss()
        sample = {"t": round(self.now(), 2), **(values or {}),
                  "rss": sum(p["rss"] for p in rss.values()) if rss else None}
        self.samples.append(sample)
        return values

    async def sampler(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.sample()
            try:
                await asyncio.wait_for(stop.wait(), self.args.sample_every)
            except TimeoutError:
                pass

    def find_pids(self) -> None:
        import psutil

        self.server_pid = self.args.server_pid or _listening_pid(self.root)
        self.engine_pid = self.args.engine_pid
        if self.engine_pid is None:
            for process in self.processes()[1:]:
                try:
                    if "EngineCor" in process.name():  # VLLM::EngineCore (15-char name)
                        self.engine_pid = process.pid
                        break
                except psutil.Error:
                    pass

    # --- the run ----------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        args = self.args
        listing = (await self.http.get("models")).json()["data"]
        self.model = args.model or listing[0]["id"]
        self.find_pids()
        self.probe_table = self.probes()
        before = await self.metrics()
        self.t0 = time.monotonic()
        await self.alone()
        rss_start = self.rss()
        duration = args.minutes * 60.0
        self.load_start = self.now()
        deadline = time.monotonic() + duration
        probe_cycle = {kind: itertools.cycle([n for n, p in self.probe_table.items()
                                              if p["kind"] == kind])
                       for kind in ("seeded", "greedy")}
        stop_sampling = asyncio.Event()
        sampler = asyncio.create_task(self.sampler(stop_sampling))
        periodic = []
        if args.burst_every > 0:
            periodic.append(self.every(min(15.0, duration / 4), args.burst_every, duration,
                                       self.burst))
        if args.faults:
            periodic.append(self.every(min(5.0, duration / 10), 60.0, duration,
                                       self.hostile_round))
            periodic.append(self.every(min(30.0, duration / 2), 60.0, duration,
                                       self.stop_engine))
        first_runs = collections.deque(self.probe_table)
        await asyncio.gather(*(self.worker(deadline, probe_cycle, first_runs)
                               for _ in range(args.concurrency)), *periodic)
        self.load_end = self.now()
        # Every request is answered (or lost); now the server must be idle again.
        settle_deadline = time.monotonic() + args.settle_seconds
        running = None
        while True:
            values = await self.sample()
            running = values["running"] if values else None
            if running == 0 or time.monotonic() > settle_deadline:
                break
            await asyncio.sleep(0.5)
        settled_after = self.now() - self.load_end
        stop_sampling.set()
        await sampler
        after = await self.metrics()
        rss_end = self.rss()
        try:
            health = (await self.http.get(f"{self.root}/health", timeout=30)).status_code
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            health = f"{type(exc).__name__}: {exc}"
        await self.http.aclose()
        return self.summarise(before, after, running, settled_after, rss_start, rss_end, health)

    async def every(self, offset: float, period: float, duration: float, action: Any) -> None:
        for k in itertools.count():
            at = self.load_start + offset + k * period
            if at - self.load_start >= duration:
                return
            await asyncio.sleep(max(0.0, at - self.now()))
            await action()

    # --- the summary ------------------------------------------------------------------------
    def per_bucket(self) -> list[dict[str, Any]]:
        width = self.args.bucket_seconds
        load = [r for r in self.outcomes if r["phase"] == "load"]
        # Rows over the nominal duration; requests that end after it (the last ones sent
        # before the deadline) count in the last row, which lasts until the last answer.
        span = self.args.minutes * 60.0
        count = max(1, math.ceil(span / width - 1e-9))
        end = max([span] + [r["end"] - self.load_start for r in load])
        rows = []
        for k in range(count):
            lo = k * width
            hi = end if k == count - 1 else (k + 1) * width
            mine = [r for r in load
                    if min(count - 1, int((r["end"] - self.load_start) // width)) == k]
            done = [r for r in mine if r["status"] == 200 and not r["lost"]
                    and not r["disconnected"]]
            ttft = [r["ttft"] for r in done if r["ttft"] is not None]
            total = [r["seconds"] for r in done]
            tokens = sum(r["tokens"] for r in done)
            rows.append({
                "bucket": k + 1, "from_s": lo, "to_s": round(hi, 1), "requests": len(mine),
                "ok": len(done), "queue_full": sum(r["code"] == "queue_full" for r in mine),
                "disconnected": sum(r["disconnected"] for r in mine),
                "lost": sum(bool(r["lost"]) for r in mine),
                "unexpected": sum(bool(r["unexpected"]) for r in mine),
                "tokens": tokens, "tokens_per_s": tokens / max(hi - lo, 1e-9),
                "requests_per_s": len(done) / max(hi - lo, 1e-9),
                "ttft_p50_s": _percentile(ttft, 50), "ttft_p95_s": _percentile(ttft, 95),
                "total_p50_s": _percentile(total, 50), "total_p95_s": _percentile(total, 95)})
        return rows

    def summarise(self, before: dict[str, float] | None, after: dict[str, float] | None,
                  running: float | None, settled_after: float, rss_start: dict[str, Any],
                  rss_end: dict[str, Any], health: Any) -> dict[str, Any]:
        args, outcomes = self.args, self.outcomes
        lost = [r for r in outcomes if r["lost"]]
        unexpected = [r for r in outcomes if r["unexpected"] and not r["lost"]]
        answered = [r for r in outcomes if r["status"] == 200 and not r["lost"]
                    and not r["disconnected"]]
        inexact_responses = sum(r["inexact"] or 0 for r in answered)
        degraded_responses = sum(r["degraded"] or 0 for r in answered)

        def delta(key: str) -> float | None:
            if before is None or after is None:
                return None
            return after[key] - before[key]

        inexact_metrics, degraded_metrics = delta("inexact"), delta("degraded")
        inexact = max(inexact_responses, int(inexact_metrics or 0))
        # Seeded probes: every answer (alone and under load) the same.
        seeded = [n for n, p in self.probe_table.items() if p["kind"] == "seeded"]
        greedy = [n for n, p in self.probe_table.items() if p["kind"] == "greedy"]
        missing_alone = [n for n in self.probe_table if n not in self.answers]
        never = [n for n in self.probe_table if not self.compared.get(n)]
        seeded_bad = [m for m in self.mismatches if m["probe"] in seeded]
        greedy_bad = [m for m in self.mismatches if m["probe"] in greedy]
        burst_full = sum(b["queue_full"] for b in self.bursts)
        kinds: dict[str, dict[str, int]] = {}
        for r in outcomes:
            row = kinds.setdefault(r["kind"], {})
            label = ("lost" if r["lost"] else "disconnected" if r["disconnected"]
                     else f"{r['status']}" + (f" {r['code']}" if r["code"] else ""))
            row[label] = row.get(label, 0) + 1
        refused = sum(r["code"] == "queue_full" for r in outcomes)

        checks = []

        def check(name: str, ok: bool, detail: str) -> None:
            checks.append({"name": name, "ok": bool(ok), "detail": detail})

        check("answered", not lost and not unexpected,
              f"{len(outcomes)} requests: {len(answered)} answered 200, {refused} 503 "
              f"queue_full, {sum(r['disconnected'] for r in outcomes)} closed by the client "
              f"mid-stream, {len(lost)} lost, {len(unexpected)} unexpected")
        check("inexact", inexact_responses == 0 and degraded_responses == 0
              and inexact_metrics == 0 and degraded_metrics == 0,
              f"responses: inexact {inexact_responses}, degraded {degraded_responses}; "
              f"/metrics increase: inexact {_fmt(inexact_metrics)}, degraded "
              f"{_fmt(degraded_metrics)} (total now {_fmt(after and after['inexact'])})")
        check("seeded_identical", not seeded_bad and not any(n in seeded for n in never)
              and not any(n in seeded for n in missing_alone),
              f"{len(seeded)} probes, {sum(self.compared.get(n, 0) for n in seeded)} repeats "
              f"under load, {len(seeded_bad)} differ"
              + (f"; never repeated: {[n for n in never if n in seeded]}"
                 if any(n in seeded for n in never) else ""))
        check("greedy_equals_alone", not greedy_bad and not any(n in greedy for n in never)
              and not any(n in greedy for n in missing_alone),
              f"{len(greedy)} probes, {sum(self.compared.get(n, 0) for n in greedy)} runs "
              f"under load, {len(greedy_bad)} differ from alone"
              + (f"; never under load: {[n for n in never if n in greedy]}"
                 if any(n in greedy for n in never) else "")
              + (f"; no answer alone: {missing_alone}" if missing_alone else ""))
        check("running_back_to_0", running == 0,
              f"kad_requests_running {_fmt(running)} {settled_after:.1f} s after the load")
        if args.burst_every > 0:
            check("bursts_past_bound", burst_full > 0,
                  f"{len(self.bursts)} bursts of {args.queue_bound + args.concurrency + 4} "
                  f"(bound {args.queue_bound}): {burst_full} answered 503 queue_full")
        if args.faults:
            bad = [h for h in self.hostile if not h["ok"]]
            check("hostile_4xx", self.hostile and not bad,
                  f"{len(self.hostile)} hostile requests, "
                  f"{len(self.hostile) - len(bad)} answered 4xx in OpenAI's error shape"
                  + (f"; not: {[(h['name'], h['status']) for h in bad]}" if bad else ""))
            applied = [f for f in self.faults if f["applied"]]
            check("faults_applied", self.faults and len(applied) == len(self.faults),
                  f"{len(applied)}/{len(self.faults)} SIGSTOP/SIGCONT of the engine core "
                  f"(pid {self.engine_pid}) for {args.stop_seconds:g} s"
                  + "".join(f"; {f['error']}" for f in self.faults if f.get("error")))
        check("healthy_at_end", health == 200, f"/health {health}")

        rss = {}
        for pid, start in rss_start.items():
            end = rss_end.get(pid)
            rss[pid] = {"name": start["name"], "start": start["rss"],
                        "end": end["rss"] if end else None,
                        "growth": end["rss"] - start["rss"] if end else None}
        failures = [f"{c['name']}: {c['detail']}" for c in checks if not c["ok"]]
        return {
            "base_url": args.base_url, "model": self.model, "minutes": args.minutes,
            "concurrency": args.concurrency, "queue_bound": args.queue_bound,
            "faults_enabled": args.faults, "settings": [s.system for s in self.settings],
            "load_seconds": round(self.load_end - self.load_start, 1),
            "load_start_s": round(self.load_start, 2),
            "server_pid": self.server_pid, "engine_pid": self.engine_pid,
            "lost": len(lost), "inexact": inexact, "unexpected": len(unexpected),
            "requests": len(outcomes), "by_kind": kinds, "per_minute": self.per_bucket(),
            "bucket_seconds": args.bucket_seconds,
            "checks": checks, "failures": failures,
            "rss": rss,
            "rss_total": {"start": sum(v["start"] for v in rss.values()) if rss else None,
                          "end": sum(v["end"] or 0 for v in rss.values()) if rss else None},
            "preemptions": delta("preemptions"),
            "faults": self.faults, "hostile": self.hostile, "bursts": self.bursts,
            "probes": {n: {"kind": p["kind"], "runs_under_load": self.compared.get(n, 0),
                           "alone": self.answers.get(n)} for n, p in self.probe_table.items()},
            "mismatches": self.mismatches[:20],
            "lost_requests": [_brief(r) for r in lost[:20]],
            "unexpected_requests": [_brief(r) for r in unexpected[:20]],
            "samples": self.samples,
        }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _brief(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record[k] for k in ("kind", "rule", "stream", "start", "end", "status", "code",
                                   "lost", "unexpected")}


def _json(content: bytes) -> Any:
    try:
        return json.loads(content)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _chain(exc: BaseException) -> str:
    """``Type: message`` of an exception and of what caused it (httpx's ReadError says
    nothing by itself: the cause tells a reset by the server from a socket closed here)."""
    parts = []
    while exc is not None and len(parts) < 4:
        parts.append(f"{type(exc).__name__}: {exc}".rstrip(": "))
        exc = exc.__cause__ or exc.__context__
    return " <- ".join(parts)


def _listening_pid(root: str) -> int | None:
    """The PID listening on ``root``'s port on this machine (None if not found)."""
    import psutil

    parts = urlsplit(root)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1", "0.0.0.0"):
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                return conn.pid
    except psutil.Error:
        return None
    return None


# --- hostile requests -----------------------------------------------------------------------

def hostile_requests(soak: Soak) -> dict[str, tuple[bytes, int]]:
    """name -> (raw HTTP/1.1 request, the documented status)."""
    parts = urlsplit(soak.api)
    path = parts.path.rstrip("/") + "/completions"
    host = parts.netloc
    auth = f"Authorization: Bearer {soak.args.api_key}\r\n" if soak.args.api_key else ""
    good = json.dumps({"model": soak.model, "prompt": "hello", "max_tokens": 4})

    def post(body: bytes, extra: str = "", length: int | None = None) -> bytes:
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"{auth}{extra}Content-Length: {len(body) if length is None else length}\r\n"
                "Connection: close\r\n\r\n")
        return head.encode() + body

    model = json.dumps(soak.model)
    return {
        "bom": (post(b"\xef\xbb\xbf" + good.encode()), 400),
        "duplicate_key": (post(f'{{"model": {model}, "prompt": "a", "prompt": "b"}}'.encode()),
                          400),
        "lone_surrogate": (post(f'{{"model": {model}, "prompt": "\\ud800"}}'.encode()), 400),
        "huge_top_k": (post(f'{{"model": {model}, "prompt": "a", "top_k": 1e30}}'.encode()),
                       400),
        "string_n": (post(f'{{"model": {model}, "prompt": "a", "n": "2"}}'.encode()), 400),
        "truncated_json": (post(f'{{"model": {model}, "prompt": '.encode()), 400),
        "oversized_header": (post(good.encode(), extra=f"X-Soak-Padding: {'a' * 65536}\r\n"),
                             431),
        "gigabyte_body": (post(b"{", length=2**30), 413),
    }


async def raw_request(root: str, raw: bytes, timeout: float = 60.0
                      ) -> tuple[int | None, Any, str | None]:
    """Sends ``raw`` on a fresh connection; (status, JSON body or None, transport error)."""
    parts = urlsplit(root)
    port = parts.port or 80
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(parts.hostname, port)
            try:
                writer.write(raw)
                try:
                    await writer.drain()
                except ConnectionError:
                    pass  # the server may answer and close before reading everything
                data = b""
                while True:
                    try:
                        chunk = await reader.read(65536)
                    except ConnectionError:
                        break
                    if not chunk:
                        break
                    data += chunk
            finally:
                writer.close()
    except (TimeoutError, OSError) as exc:
        return None, None, f"{type(exc).__name__}: {exc}"
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None, None, f"no HTTP response ({len(data)} bytes)"
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return status, _json(body), None


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2:]
    return out


# --- the report -----------------------------------------------------------------------------

def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.0f}"


def report(summary: dict[str, Any]) -> list[str]:
    """The printed report; its last two lines are ``lost: <n>`` and ``inexact: <n>``."""
    width = summary["bucket_seconds"]
    unit = "minute" if width == 60 else f"{width:g}s"
    lines = [
        (f"kad-bench soak: {summary['load_seconds']:g} s of load on {summary['base_url']} "
         f"({summary['model']}), concurrency {summary['concurrency']}, queue bound "
         f"{summary['queue_bound']}, faults {'on' if summary['faults_enabled'] else 'off'}"),
        "",
        (f"{unit:>6} {'requests':>8} {'ok':>6} {'503':>5} {'closed':>6} {'lost':>4} "
         f"{'tok/s':>8} {'req/s':>6} {'ttft p50/p95 ms':>16} {'total p50/p95 ms':>17}"),
    ]
    for row in summary["per_minute"]:
        lines.append(
            f"{row['bucket']:>6} {row['requests']:>8} {row['ok']:>6} {row['queue_full']:>5} "
            f"{row['disconnected']:>6} {row['lost']:>4} {row['tokens_per_s']:>8.1f} "
            f"{row['requests_per_s']:>6.2f} "
            f"{_ms(row['ttft_p50_s']) + ' / ' + _ms(row['ttft_p95_s']):>16} "
            f"{_ms(row['total_p50_s']) + ' / ' + _ms(row['total_p95_s']):>17}")
    lines.append("")
    if summary["rss"]:
        lines.append(f"{'RSS (MiB)':<28} {'start':>9} {'end':>9} {'growth':>9}")
        for pid, row in summary["rss"].items():
            end = "-" if row["end"] is None else f"{row['end'] / 2**20:.1f}"
            growth = "-" if row["growth"] is None else f"{row['growth'] / 2**20:+.1f}"
            lines.append(f"{row['name'][:20] + ' (' + pid + ')':<28} "
                         f"{row['start'] / 2**20:>9.1f} {end:>9} {growth:>9}")
        total = summary["rss_total"]
        lines.append(f"{'total':<28} {total['start'] / 2**20:>9.1f} {total['end'] / 2**20:>9.1f}"
                     f" {(total['end'] - total['start']) / 2**20:>+9.1f}")
    else:
        lines.append("RSS: not measured (no server PID: --server-pid, or a local server)")
    lines += ["", "requests by kind: " + "; ".join(
        f"{kind} " + ", ".join(f"{label} {n}" for label, n in sorted(counts.items()))
        for kind, counts in sorted(summary["by_kind"].items()))]
    if summary["preemptions"]:
        lines.append(f"preemptions during the run: {summary['preemptions']:g} "
                     "(a seed does not reproduce across a preemption)")
    lines += ["", "checks:"]
    lines += [f"  [{'ok' if c['ok'] else 'FAIL'}] {c['name']}: {c['detail']}"
              for c in summary["checks"]]
    for m in summary["mismatches"][:3]:
        lines.append(f"  mismatch {m['probe']} at {m['at_s']} s: alone "
                     f"{m['alone']['texts']!r:.120} / under load {m['under_load']['texts']!r:.120}")
    for r in summary["lost_requests"][:5] + summary["unexpected_requests"][:5]:
        lines.append(f"  {r['kind']} at {r['start']:.1f} s: {r['lost'] or r['unexpected']}")
    lines += [f"result: {'FAIL (' + ', '.join(c['name'] for c in summary['checks'] if not c['ok']) + ')' if summary['failures'] else 'ok'}",
              f"lost: {summary['lost']}", f"inexact: {summary['inexact']}"]
    return lines


def run(args: argparse.Namespace) -> int:
    summary = asyncio.run(Soak(args).run())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    written = [args.out / "summary.json", args.out / "report.txt"]
    if not args.no_plot:
        from bench.plots import plot_soak

        written.append(plot_soak(summary, args.out / "soak.png"))
    lines = report(summary)
    lines.insert(-3, "wrote " + ", ".join(str(p) for p in written))
    (args.out / "report.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 1 if summary["failures"] else 0
