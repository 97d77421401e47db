"""Where answered orders end up: checkpoint rows first, then the file moves, in groups.

Workers hand over each settled order without waiting; one thread takes
everything queued so far and, in this order:

1. appends the outcomes to the checkpoint (so a crash after this point
   finishes the move on rerun without asking the center again);
2. writes the merged/ copies and makes them durable with one filesystem sync,
   then unlinks the source files (``agent.buffer.finish_merged_batch``);
3. quarantines refused and corrupt files to rejected/ with their reason;
4. releases the claims of orders left where they are.

Under load the groups grow by themselves: one sync covers thousands of files.
The queue is bounded, which also bounds the open claims (file descriptors).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from agent.buffer import BufferDirs, Claim, MergedMove, finish_merged_batch, quarantine
from agent.errors import PersistError

from .checkpoint import Checkpoint, ResultRow

log = logging.getLogger("recovery.finisher")

MERGE, QUARANTINE, LEAVE, NOTE = "merge", "quarantine", "leave", "note"


@dataclass
class Settled:
    """One order whose outcome is known, and what to do with its file."""

    row: ResultRow
    action: str                        # MERGE, QUARANTINE, LEAVE or NOTE (no file)
    claim: Claim | None = None
    merged_name: str = ""
    document: bytes | None = None      # MERGE: a new merged/ copy ...
    added: dict[str, Any] | None = None  # ... or move the file, adding these keys
    reason: dict[str, Any] = field(default_factory=dict)
    error: str | None = None           # set when the file could not be moved


OnSettled = Callable[[list[Settled]], None]


class Finisher:
    def __init__(self, dirs: BufferDirs, checkpoint: Checkpoint, on_settled: OnSettled,
                 limit: int = 2048) -> None:
        self._dirs = dirs
        self._checkpoint = checkpoint
        self._on_settled = on_settled
        self._room = asyncio.Semaphore(limit)
        self._queue: list[Settled] = []
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        # One thread: the checkpoint connection and the move order stay serial.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="finisher")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="finisher")

    async def put(self, items: list[Settled]) -> None:
        for item in items:
            await self._room.acquire()
            self._queue.append(item)
            self._idle.clear()
            self._wakeup.set()

    async def drain(self) -> None:
        """Return once everything handed over so far is flushed."""
        while self._queue or not self._idle.is_set():
            self._wakeup.set()
            await self._idle.wait()

    async def stop(self) -> None:
        await self.drain()
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._pool.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    await loop.run_in_executor(self._pool, self._flush, batch)
                except Exception as exc:  # e.g. the checkpoint cannot be written
                    log.error("cannot record %d outcomes: %s", len(batch), exc)
                    for item in batch:
                        item.error = item.error or f"not recorded: {exc}"
                        if item.claim is not None:
                            item.claim.release()
                for _ in batch:
                    self._room.release()
                self._on_settled(batch)
            self._idle.set()
            if self._closing:
                return

    def _flush(self, batch: list[Settled]) -> None:
        self._checkpoint.write(item.row for item in batch)
        merges = [i for i in batch if i.action == MERGE and i.claim is not None]
        moves = [MergedMove(i.claim, i.merged_name, i.document, i.added)
                 for i in merges if i.claim is not None]
        if moves:
            for item, err in zip(merges, finish_merged_batch(self._dirs.merged, moves),
                                 strict=True):
                if err is not None:
                    item.error = f"left in place: {err}"
                    log.error("%s: confirmed by the center but not moved: %s",
                              item.row.file, err)
        for item in batch:
            if item.action == QUARANTINE and item.claim is not None:
                try:
                    quarantine(self._dirs, item.claim.path, item.reason)
                except (PersistError, OSError) as exc:
                    item.error = f"not quarantined: {exc}"
                    log.error("%s: cannot quarantine: %s", item.row.file, exc)
                finally:
                    item.claim.release()
            elif item.action == LEAVE and item.claim is not None:
                item.claim.release()
