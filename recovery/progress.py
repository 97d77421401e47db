"""Progress of a long run: a tqdm bar with rate and ETA on a TTY, a log line per 10% elsewhere.

tqdm is used because it is small, typed (types-tqdm) and prints rate and ETA
to stderr without taking over the terminal.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from tqdm import tqdm

log = logging.getLogger("recovery")


class Progress:
    def __init__(self, total: int, what: str, tty: bool | None = None) -> None:
        self.total = total
        self.done = 0
        self._what = what
        self._started = time.monotonic()
        self._next_tenth = 1
        use_bar = sys.stderr.isatty() if tty is None else tty
        self._bar: tqdm[Any] | None = (
            tqdm(total=total, unit=" orders", desc=what, dynamic_ncols=True, smoothing=0.1)
            if use_bar and total else None)

    def update(self, n: int) -> None:
        if n <= 0:
            return
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        if not self.total:
            return
        tenth = min(10, self.done * 10 // self.total)
        if tenth >= self._next_tenth:
            elapsed = time.monotonic() - self._started
            rate = self.done / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            log.info("%s: %d%% (%d/%d), %.0f orders/s, ETA %.0fs", self._what,
                     tenth * 10, self.done, self.total, rate, eta)
            self._next_tenth = tenth + 1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
