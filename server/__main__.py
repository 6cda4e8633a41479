"""``python -m server --config ...`` (the ``kad-serve`` console script)."""

from __future__ import annotations

import sys

from server.cli import main

if __name__ == "__main__":  # vLLM's engine processes are spawned: keep the guard
    sys.exit(main())
