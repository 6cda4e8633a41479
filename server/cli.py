"""``kad-serve``: load a config, apply command-line overrides, serve until SIGTERM.

uvicorn owns the signals: on SIGTERM it stops accepting connections, lets in-flight
requests finish for ``server.shutdown_grace_s`` seconds, cancels what is left (which aborts
those requests in the engine), shuts the engine down and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from server.config import ConfigError, ServeConfig, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kad-serve", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--host", help="override server.host")
    parser.add_argument("--port", type=int, help="override server.port")
    parser.add_argument("--api-key", help="require this bearer key (or set KAD_API_KEY)")
    parser.add_argument("--api-key-file", help="read the key from this file (docker secrets)")
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
    if api_key:
        raw["server"]["api_key"] = api_key
    if args.tensor_parallel_size is not None:
        raw["engine"]["tensor_parallel_size"] = args.tensor_parallel_size
    if args.num_speculative_tokens is not None:
        raw["engine"]["num_speculative_tokens"] = args.num_speculative_tokens
    raw["alignment"] = {k: v for k, v in raw["alignment"].items() if v is not None}
    return ServeConfig.model_validate(raw)


def run(config: ServeConfig, engine_factory=None, log_level: str = "info") -> int:
    import uvicorn

    from server.app import create_app

    if config.build_tiny_models:
        from pathlib import Path

        from kad_kernels.tiny_models import build_tiny_pair

        build_tiny_pair(Path(config.models.target).parent)
    kwargs = {} if engine_factory is None else {"engine_factory": engine_factory}
    app = create_app(config, **kwargs)
    server = uvicorn.Server(uvicorn.Config(
        app, host=config.server.host, port=config.server.port, log_level=log_level,
        timeout_graceful_shutdown=config.server.shutdown_grace_s, access_log=False,
    ))
    # uvicorn drains on SIGTERM, restores the previous handler and re-raises the signal;
    # this handler turns that into a clean exit status 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.run()
    return 0


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
