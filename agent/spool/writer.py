"""The one owner of pending/: durable writes, claims ending in a move, and accounting.

Writes go to a process of their own (``file_client``/``file_proc``): each order's
file is written, fsync'd and renamed by a thread there as soon as it arrives, and
one directory fsync acknowledges every file renamed before it began. Every client
that takes a file out of pending/ (the drain, start-up repair) goes through
``claim()``, whose holder ends it with ``delivered()``, ``quarantined()`` or
nothing (the file stays). The count and bytes (507 check, /status, /metrics)
follow the directory itself, so a file moved by another process (edge-recover)
is no longer counted after the next look.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

from agent.errors import (
    BufferFullError,
    CorruptRecordError,
    NotARegularFile,
    PersistError,
    TooLarge,
)
from agent.spool.claims import Claim, try_claim
from agent.spool.file_client import FileProcess
from agent.spool.files import list_pending, quarantine, withdraw_pending
from agent.spool.moves import MergedState, merged_state, move_to_merged
from agent.spool.pins import pin_file
from agent.spool.record import BufferDirs, PendingRecord, parse_tolerant

log = logging.getLogger("agent.spool")
T = TypeVar("T")
# How stale the count may be before a 507 or /status looks at the directory again.
RECOUNT_AFTER_S = 1.0


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run a file step in a thread; on cancellation wait for it before unwinding.

    A move must never be half-abandoned by a cancelled task: the claim (the fd
    holding the flock) is released only after the thread is done with it.
    """
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait({fut})
        raise


class Held:
    """A claimed pending file: the record (or why it is unreadable) and how it may end.

    A file that cannot be claimed as an order at all (a FIFO, a symlink, over the
    size cap: ``refused``) is held without a lock; it can only be quarantined,
    and it is moved as it is, never read.
    """

    def __init__(
        self,
        spool: PendingSpool,
        claim: Claim | None,
        size: int,
        path: Path,
        refused: CorruptRecordError | None = None,
    ) -> None:
        self._spool = spool
        self._claim = claim
        self.path = path
        self.name = path.name
        self.size = size
        self.done = False
        self.record: PendingRecord | None = None
        self.corrupt: str | None = None if refused is None else str(refused)
        # The reason rejected/ gives: what kind of trouble the file is.
        self.problem = (
            "not_a_regular_file"
            if isinstance(refused, NotARegularFile)
            else "too_large"
            if isinstance(refused, TooLarge)
            else "corrupt"
        )
        if claim is not None:
            try:
                self.record = parse_tolerant(claim.data, f"pending/{self.name}")
            except CorruptRecordError as exc:
                self.corrupt = str(exc)

    @property
    def claim(self) -> Claim:
        if self._claim is None:
            raise RuntimeError(
                f"{self.name} was refused unread ({self.corrupt}): quarantine it instead"
            )
        return self._claim

    async def merged_copy(self) -> MergedState:
        """Is this order already in merged/ (a crash came before the pending copy went)?"""
        return await _in_thread(merged_state, self._spool.dirs, self.name, self.record)

    async def delivered(self, order_id: Any, cluster: str) -> None:
        """The center confirmed: move the file to merged/ (a rename: no free space needed)."""
        if self.record is None:
            raise RuntimeError(
                f"delivered() needs a parsed record; {self.name} is corrupt: quarantine it instead"
            )
        await _in_thread(
            move_to_merged, self._spool.dirs, self.claim, self.record, order_id, cluster
        )
        self._left()

    async def quarantined(self, reason: str, details: dict[str, Any]) -> Path:
        where = await _in_thread(
            quarantine, self._spool.dirs, self.path, {"reason": reason, **details}
        )
        self._left()
        log.warning(
            "quarantined %s to rejected/: %s",
            self.name,
            reason,
            extra={"file": self.name, "reason": reason},
        )
        return where

    async def pin(self, target: str, why: str) -> None:
        """Rewrite the record durably with ``pinned_to=target`` (CONTRACT 5)."""
        if self.record is None:
            raise RuntimeError(
                f"pin() needs a parsed record; {self.name} is corrupt: quarantine it instead"
            )
        self.record = await _in_thread(pin_file, self.claim, self.record, target, why)
        size = len(self.claim.data)
        self._spool.bytes += size - self.size
        self.size = size

    def _left(self) -> None:
        self.done = True
        self._spool.left(self.size)


class PendingSpool:
    """Owns the pending/ writer process and the count of pending/.

    The writer has as many file threads as the usual client concurrency: on
    virtualised disks a file fsync mostly waits, so more of them in flight means
    more orders acknowledged per directory fsync.
    """

    def __init__(self, dirs: BufferDirs, max_bytes: int, file_threads: int = 32) -> None:
        self.dirs = dirs
        self.max_bytes = max_bytes
        self.count = 0
        self.bytes = 0
        self.last_error: str | None = None
        self._counted_at = 0.0
        self._reserved = 0
        self._writer = FileProcess(str(dirs.pending), file_threads)

    async def start(self) -> None:
        await self.listing()
        await self._writer.start()

    async def stop(self) -> None:
        await self._writer.stop()

    @property
    def writable(self) -> bool:
        return self.last_error is None and self.bytes < self.max_bytes

    # -- accounting -------------------------------------------------------------------

    async def listing(self) -> list[tuple[str, int]]:
        """(name, size) of every pending file, oldest serial first; recounts on the way."""
        files = await asyncio.to_thread(list_pending, self.dirs)
        self.count = len(files)
        self.bytes = sum(size for _, size in files)
        self._counted_at = time.monotonic()
        return files

    async def recount(self, max_age_s: float = RECOUNT_AFTER_S) -> None:
        """Look at the directory again if the count is older than ``max_age_s``."""
        if time.monotonic() - self._counted_at >= max_age_s:
            await self.listing()

    def left(self, size: int) -> None:
        """A pending file left the directory (merged or rejected)."""
        self.count = max(0, self.count - 1)
        self.bytes = max(0, self.bytes - size)

    # -- writes -------------------------------------------------------------------------

    async def write(self, record: PendingRecord) -> None:
        """Return only once ``record`` is durable in pending/; else raise PersistError."""
        size = len(record.to_bytes())
        if self.bytes + self._reserved + size > self.max_bytes:
            await self.recount()  # another process may have emptied pending/ meanwhile
            if self.bytes + self._reserved + size > self.max_bytes:
                raise BufferFullError(
                    f"buffer is full: {self.bytes} bytes pending, buffer.max_bytes is "
                    f"{self.max_bytes}; retry later"
                )
        self._reserved += size
        try:
            await self._writer.write(record)
        except PersistError as exc:
            self.last_error = str(exc)
            raise
        finally:
            self._reserved -= size
        self.last_error = None
        self.count += 1
        self.bytes += size

    async def withdraw(self, record: PendingRecord) -> None:
        """Take back a file written for an order that is then refused (no 2xx): unlinked
        and the directory fsync'd, so nothing delivers it later. PersistError if not."""
        await _in_thread(withdraw_pending, self.dirs, record.filename)
        self.left(len(record.to_bytes()))

    # -- claims -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def claim(self, name: str, size: int) -> AsyncIterator[Held | None]:
        """Hold ``pending/{name}`` exclusively; None if it is gone or another process has it.

        The agent wrote every file in pending/ as a regular file: a symlink, a FIFO or
        anything over the size cap is not its order and is held only to be quarantined
        (a link is moved as a link: its target is never touched). UnreadableFile
        (EACCES, EIO) is raised: such a file stays where it is.
        """
        path = self.dirs.pending / name
        try:
            claim = await asyncio.to_thread(try_claim, path, False, False)
        except CorruptRecordError as exc:  # NotARegularFile, TooLarge
            yield Held(self, None, size, path, refused=exc)
            return
        if claim is None:
            yield None
            return
        try:
            yield Held(self, claim, size, path)
        finally:
            claim.release()
