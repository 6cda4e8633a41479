"""The real server process (`python -m server`) on the tiny pair, for tests that need it
whole: launched in a session of its own on a free port, waited for, and killed with its
engine processes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import yaml
from serving import free_port
from waiting import wait_ready

REPO = Path(__file__).resolve().parent.parent


def launch(tiny_pair, directory: Path, port: int | None = None,
           max_model_len: int = 512, alignment: dict | None = None,
           gamma: int = 3, server: dict | None = None, engine: dict | None = None,
           models: dict | None = None) -> dict:
    """`python -m server` on the tiny pair, in a session of its own (so that a test can
    signal its whole process group); its log goes to ``directory/server.log``. ``server``
    / ``engine`` / ``models``: more ``server.*`` / ``engine.*`` / ``models.*`` settings
    (e.g. ``max_waiting_requests``, ``json_compact``, ``chat_template``)."""
    port = port or free_port()
    config = {
        "models": {"target": str(tiny_pair.target), "draft": str(tiny_pair.draft),
                   "served_model_name": "kad-tiny", **(models or {})},
        "engine": {"num_speculative_tokens": gamma, "dtype": "float32",
                   "max_model_len": max_model_len,
                   "cpu_kv_cache_gib": 1, "max_num_seqs": 32, "enforce_eager": True,
                   **(engine or {})},
        "alignment": alignment or {"rule": "kad_dual", "lam": 0.4},
        "server": {"host": "127.0.0.1", "port": port, "shutdown_grace_s": 20,
                   **(server or {})},
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    log = directory / "server.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "server", "--config", str(path), "--log-level", "warning"],
            cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
            # Not this test process's own engine settings (in-process engines of earlier
            # tests leave the API-process marker of process_guard in the environment).
            env={k: v for k, v in os.environ.items() if k != "KAD_SERVE_API_PROCESS"},
            start_new_session=True,
        )
    return {"url": f"http://127.0.0.1:{port}", "process": process, "log": log, "port": port}


def wait_until_ready(server: dict) -> bool:
    """Waits (generously: a loaded machine) until /health is 200; True if it saw 503."""
    return wait_ready(server["url"], timeout=600, process=server["process"],
                      output=server["log"].read_text, interval=0.25)


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def stop(server: dict) -> None:
    """SIGKILL the server and its engine processes (which run in a group of their own)."""
    process = server["process"]
    if process.poll() is None:
        engine = descendants(process.pid)
        process.kill()
        process.wait()
        for child in engine:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass


@contextlib.contextmanager
def running_server(tiny_pair, prefix: str, **settings) -> Iterator[dict]:
    """``launch`` (``settings``: its keyword arguments) in a fresh temporary directory,
    waited for until ready, and stopped on exit, whatever the test did."""
    running = launch(tiny_pair, Path(tempfile.mkdtemp(prefix=prefix)), **settings)
    try:
        wait_until_ready(running)
        yield running
    finally:
        stop(running)
