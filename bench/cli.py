"""``kad-bench <subcommand>``: each subcommand lives in its own module, imported on demand."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module exposing add_arguments(parser) and run(args) -> int
SUBCOMMANDS: dict[str, str] = {
    "kernels": "bench.kernels",
    "engine": "bench.engine",
    "serve": "bench.serve_bench",
    "hook": "bench.hook",
    "soak": "bench.soak",
    "score": "bench.score",
    "dashboard": "bench.dashboard",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kad-bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=(module.__doc__ or "").splitlines()[0]))
    args = parser.parse_args(argv)
    return importlib.import_module(SUBCOMMANDS[args.command]).run(args)


if __name__ == "__main__":
    sys.exit(main())
