"""The command line: a usage error in one line and exit 2 (CONTRACT 2); a closed pipe is
no error (``edge-agent status | head -1``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import NoReturn

# What a shell reports for a process that SIGPIPE ended: 128 + 13.
EXIT_BROKEN_PIPE = 141


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def pipe_safe(main: Callable[[], int]) -> int:
    """Run a command's ``main``; a reader that closed our stdout early ends it quietly.

    Without this, ``edge-agent status | head -1`` ends in a BrokenPipeError traceback
    (and Python's own flush at exit adds an "Exception ignored" line).
    """
    try:
        code = main()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # Python flushes stdout again at exit: let that go to /dev/null, silently.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
