"""``edge-recover`` command line."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("edge-recover: not implemented yet", file=sys.stderr)
    return 2
