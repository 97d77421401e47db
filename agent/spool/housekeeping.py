"""Periodic clean-up of what is confirmed delivered: journal rows and merged/ copies.

Only delivered (or refused) orders are ever forgotten; pending files and
buffered journal rows are never touched here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from agent.base.tasks import cancel_and_wait
from agent.spool.files import expire_merged
from agent.spool.record import BufferDirs
from agent.state.journal import Journal

log = logging.getLogger("agent.housekeeping")
DAY = 86_400.0
# The serials whose chain verification is finished (CONTRACT 10): only their merged/
# copies may expire. None: chain verification is off, every copy may.
Finished = Callable[[], Awaitable[set[str]]]
# Forget finished chain ledger rows older than the given seconds (after their merged/
# copies expired): the ledger does not grow forever.
Prune = Callable[[float], Awaitable[int]]


class Housekeeper:
    def __init__(
        self,
        journal: Journal,
        dirs: BufferDirs,
        journal_retention_days: float,
        merged_retention_days: float,
        interval_s: float = 3600.0,
        finished: Finished | None = None,
        prune: Prune | None = None,
    ) -> None:
        self._journal = journal
        self._dirs = dirs
        self._journal_keep = journal_retention_days * DAY
        self._merged_keep = merged_retention_days * DAY
        self._interval = interval_s
        self._finished = finished
        self._prune = prune
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="housekeeping")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def run_once(self) -> None:
        await self._journal.prune(self._journal_keep)
        only = None
        if self._finished is not None:
            only = {f"{serial}.json" for serial in await self._finished()}
        removed = await asyncio.to_thread(expire_merged, self._dirs, self._merged_keep, only)
        if removed:
            log.info("expired %d merged/ files past retention", removed)
        if self._prune is not None:
            forgotten = await self._prune(self._merged_keep)
            if forgotten:
                log.info("chain ledger: forgot %d finished orders past retention", forgotten)

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception as exc:  # try again next round
                log.error("housekeeping failed: %s", exc, exc_info=True)
            await asyncio.sleep(self._interval)
