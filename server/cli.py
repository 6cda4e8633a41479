"""``kad-serve``: load a config, apply command-line overrides, serve until SIGTERM.

SIGHUP, SIGUSR1 and SIGUSR2 are logged and ignored. On SIGTERM (or Ctrl-C) uvicorn stops accepting connections while the app answers 503 to
new requests, lets in-flight requests finish for ``server.shutdown_grace_s`` seconds and
then aborts the rest in the engine (their streams end with ``finish_reason: "abort"``);
then the engine shuts down and the process exits 0. The same holds for SIGTERM or SIGINT
sent to the whole process group: vLLM's engine processes run in a group of their own
(``server.engine.process_guard``) and stop only when the API process stops them. SIGTERM
during start-up cancels the engine start (its processes are killed) and exits 0 at once.

Exit status 1: the port cannot be bound (checked before the engine loads), the engine
failed to start, or it died while serving (in-flight requests get an error first); an
orchestrator's restart policy then restarts the server. Status 2: a bad config.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import uvicorn

from server.config import ConfigError, ServeConfig, load_config, looks_like_hub_id
from server.http_server import protocol_drift, uvicorn_config

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kad-serve", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--host", help="override server.host")
    parser.add_argument("--port", type=int, help="override server.port")
    parser.add_argument("--api-key", help="require this bearer key (or set KAD_API_KEY)")
    parser.add_argument("--api-key-file", help="read the key from this file (docker secrets)")
    parser.add_argument("--target", help="override models.target (directory or hub id org/name)")
    parser.add_argument("--draft", help="override models.draft (directory or hub id org/name)")
    parser.add_argument("--tensor-parallel-size", type=int, help="override engine.tensor_parallel_size")
    parser.add_argument("--num-speculative-tokens", type=int, help="override engine gamma")
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"])
    return parser.parse_args(argv)


def apply_overrides(config: ServeConfig, args: argparse.Namespace) -> ServeConfig:
    """Command-line flags (and KAD_API_KEY) win over the file; re-validated as a whole."""
    raw = config.model_dump()
    if args.host is not None:
        raw["server"]["host"] = args.host
    if args.port is not None:
        raw["server"]["port"] = args.port
    api_key = args.api_key or os.environ.get("KAD_API_KEY")
    if not api_key and args.api_key_file:
        try:
            with open(args.api_key_file) as handle:
                api_key = handle.read().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --api-key-file {args.api_key_file}: {exc.strerror}")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"--api-key-file {args.api_key_file} is not UTF-8 text") from exc
        if not api_key:  # serving without auth because a secret was not mounted: fail closed
            raise ConfigError(f"--api-key-file {args.api_key_file} is empty: it must hold "
                              "the API key (drop the flag to serve without a key)")
    if api_key:
        raw["server"]["api_key"] = api_key
    for field in ("target", "draft"):
        value = getattr(args, field, None)
        if value is not None:  # as given on the command line: relative to the working dir
            path = Path(value).expanduser()
            raw["models"][field] = (str(path.resolve()) if path.exists()
                                    or not looks_like_hub_id(value) else value)
            raw["build_tiny_models"] = False
    if args.tensor_parallel_size is not None:
        raw["engine"]["tensor_parallel_size"] = args.tensor_parallel_size
    if args.num_speculative_tokens is not None:
        raw["engine"]["num_speculative_tokens"] = args.num_speculative_tokens
    raw["alignment"] = {k: v for k, v in raw["alignment"].items() if v is not None}
    return ServeConfig.model_validate(raw)


# uvicorn's own deadline, a backstop behind the app's drain (which aborts at the grace end).
_BACKSTOP_S = 5.0


class DrainingServer(uvicorn.Server):
    """A uvicorn server that tells the app to drain as soon as the exit signal arrives."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)


def _bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound (as uvicorn binds it) before anything slow happens."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


# Signals whose default action would kill the server at once, cutting every stream. None
# has a job here: there is no config to reload and logs go to stderr, rotated by whoever
# collects them, and a closed terminal (SIGHUP) should not stop a server. Logged, ignored.
IGNORED_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def _ignore(sig: int, frame: FrameType | None) -> None:
    logger.warning("%s ignored (kad-serve stops on SIGTERM or SIGINT)",
                   signal.Signals(sig).name)


def run(config: ServeConfig, engine_factory: Callable | None = None,
        log_level: str = "info") -> int:
    """Serve ``config`` until SIGTERM/SIGINT; returns the exit status (0 after a clean drain,
    1 when the port is taken or the engine failed to start or died).

    ``engine_factory`` (default: the vLLM engine) is how tests serve a fake engine.
    """
    from server.app import create_app
    from server.engine import process_guard

    for sig in IGNORED_SIGNALS:  # from the start: loading the models takes minutes
        signal.signal(sig, _ignore)
    drift = protocol_drift()
    if drift:  # the connection limits would not hold (or the first connection would fail)
        logger.critical("uvicorn's h11 protocol is not the one server.http_server is pinned "
                        "to: %s; exiting with status 1", "; ".join(drift))
        return 1
    host, port = config.server.host, config.server.port
    try:
        sock = _bind(host, port)
    except OSError as exc:
        logger.critical("cannot listen on %s:%d: %s", host, port, exc.strerror or exc)
        return 1
    if config.build_tiny_models:
        from kad_kernels.tiny_models import build_tiny_pair

        build_tiny_pair(Path(config.models.target).parent)
    kwargs = {} if engine_factory is None else {"engine_factory": engine_factory}
    try:
        app = create_app(config, **kwargs)  # builds the engine: tokenizer, context checks
    except Exception as exc:  # one line, as when the engine fails to start
        logger.debug("engine construction failure", exc_info=exc)
        logger.critical("engine failed to start: %s; exiting with status 1",
                        " ".join(f"{type(exc).__name__}: {exc}".split()))
        sock.close()
        return 1
    server = DrainingServer(
        uvicorn_config(app, config.server, log_level=log_level,
                       timeout_graceful_shutdown=config.server.shutdown_grace_s + _BACKSTOP_S),
        on_exit=app.state.kad.begin_shutdown,
    )
    app.state.kad.request_exit = lambda: setattr(server, "should_exit", True)
    process_guard.keep_from_children(sock.fileno())
    # uvicorn re-raises the captured signal after draining, under the handler it found on
    # start: with these no-ops that ends `run` normally, so the process exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    logger.info("serving on http://%s:%d (the engine loads in the background)",
                host, sock.getsockname()[1])
    server.run(sockets=[sock])
    return app.state.kad.exit_status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = apply_overrides(load_config(args.config), args)
    except (ConfigError, ValueError) as exc:
        print(f"kad-serve: {exc}", file=sys.stderr)
        return 2
    return run(config, log_level=args.log_level)
