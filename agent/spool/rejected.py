"""How many files wait in rejected/ for ops to review: counted on a timer, never per request.

At a million files a directory listing takes seconds, so /status and /metrics read a cached
count. The timer first looks at the directory's modification time (one stat): only when it
changed (a file arrived or left, whoever moved it: the agent, edge-recover or an operator)
is the directory listed again, in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

from agent.base.tasks import cancel_and_wait
from agent.spool.record import BufferDirs, is_order_file

log = logging.getLogger("agent.spool.rejected")
RECOUNT_INTERVAL_S = 5.0
# A listing may take at most this share of the time (200,000 files took 0.8 s here: at a
# million, while files keep arriving, the directory is listed every ~40 s, not every 5 s).
LISTING_SHARE = 0.1


def count_rejected(dirs: BufferDirs) -> int:
    """Order files in rejected/ (their ``.reason.json`` companions are not counted)."""
    try:
        with os.scandir(dirs.rejected) as entries:
            return sum(1 for e in entries if is_order_file(e.name))
    except FileNotFoundError:
        return 0


class RejectedCount:
    """Owns the recount task; ``count`` is the last count (None before the first)."""

    def __init__(
        self,
        dirs: BufferDirs,
        interval_s: float = RECOUNT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._dirs = dirs
        self._clock = clock
        self._interval = interval_s
        self.count: int | None = None
        self._seen: tuple[int, int] | None = None  # (st_mtime_ns, st_ino) when last counted
        self._listing_s = 0.0  # how long the last listing took
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="rejected-count")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def refresh(self) -> None:
        """List rejected/ again if it changed since the last count."""
        try:
            st = await asyncio.to_thread(os.stat, self._dirs.rejected)
        except FileNotFoundError:
            self.count, self._seen = 0, None
            return
        seen = (st.st_mtime_ns, st.st_ino)
        if seen == self._seen and self.count is not None:
            return
        # Stat before listing: a file that arrives during the listing changes the
        # directory after `seen`, so the next round counts again.
        started = self._clock()
        self.count = await asyncio.to_thread(count_rejected, self._dirs)
        self._listing_s = self._clock() - started
        self._seen = seen

    def next_wait(self) -> float:
        """The timer's pause: the interval, longer when listings are slow."""
        return max(self._interval, self._listing_s / LISTING_SHARE)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.next_wait())
            try:
                await self.refresh()
            except OSError as exc:  # keep the last count; say why once per round
                log.warning("cannot count rejected/: %s", exc)
