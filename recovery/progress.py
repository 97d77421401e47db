"""Progress of a long run: a rich bar with rate and ETA on a TTY, a log line per 10% elsewhere.

rich is the project's one terminal UI library (it also draws the drill table); the
bar goes to stderr and is transient-free, so the summary printed after it stays readable.
"""

from __future__ import annotations

import logging
import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress

log = logging.getLogger("recovery")


class Progress:
    def __init__(self, total: int, what: str, tty: bool | None = None) -> None:
        self.total = total
        self.done = 0
        self._what = what
        self._started = time.monotonic()
        self._next_tenth = 1
        use_bar = sys.stderr.isatty() if tty is None else tty
        self._bar: RichProgress | None = None
        self._task: TaskID | None = None
        if use_bar and total:
            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(file=sys.stderr),
                refresh_per_second=4,
            )
            self._task = self._bar.add_task(what, total=total, rate="")
            self._bar.start()

    def update(self, n: int) -> None:
        if n <= 0:
            return
        self.done += n
        elapsed = time.monotonic() - self._started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, advance=n, rate=f"{rate:,.0f} orders/s")
            return
        if not self.total:
            return
        tenth = min(10, self.done * 10 // self.total)
        if tenth >= self._next_tenth:
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            log.info(
                "%s: %d%% (%d/%d), %.0f orders/s, ETA %.0fs",
                self._what,
                tenth * 10,
                self.done,
                self.total,
                rate,
                eta,
            )
            self._next_tenth = tenth + 1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
