"""The command line: a usage error in one line and exit 2 (CONTRACT 2); a closed pipe is
no error (``edge-agent status | head -1``); Ctrl-C, once or twice, prints no traceback."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

# What a shell reports for a process that SIGPIPE ended: 128 + 13.
EXIT_BROKEN_PIPE = 141
# ... and for one that SIGINT ended: 128 + 2.
EXIT_INTERRUPTED = 130


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def pipe_safe(main: Callable[[], int], prog: str = "") -> int:
    """Run a command's ``main``; a reader that closed our stdout early ends it quietly, and
    so does a Ctrl-C that the command does not handle itself (one line, exit 130).

    Without this, ``edge-agent status | head -1`` ends in a BrokenPipeError traceback
    (and Python's own flush at exit adds an "Exception ignored" line), and Ctrl-C while
    a command loads or sets up prints a KeyboardInterrupt traceback.
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
    except KeyboardInterrupt:
        # Another Ctrl-C while the interpreter winds down (joining threads) ends the
        # process quietly instead of raising into that code.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        sys.stderr.write(f"{prog + ': ' if prog else ''}interrupted\n")
        return EXIT_INTERRUPTED


def stop_on_signals(
    stop: Callable[[str], None],
    prog: str,
    aborted: str,
    before_exit: Callable[[], None] | None = None,
) -> None:
    """In the running loop: the first SIGINT or SIGTERM calls ``stop(signal name)``; a
    second one ends the process at once, exit 128 + its number, with one line
    ``prog: second signal (SIGINT): {aborted}`` and no traceback.

    For commands whose every step is safe to cut short (the agent: whatever it
    acknowledged is fsync'd; a drill: its agents die with it). ``before_exit`` runs
    before that line (the agent writes its queued log lines).
    """
    loop = asyncio.get_running_loop()
    seen: list[signal.Signals] = []

    def handler(sig: signal.Signals) -> None:
        if not seen:
            seen.append(sig)
            stop(sig.name)
            return
        if before_exit is not None:
            before_exit()
        sys.stderr.write(f"{prog}: second signal ({sig.name}): {aborted}\n")
        sys.stderr.flush()
        os._exit(128 + sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handler, sig)
