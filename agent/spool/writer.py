"""Durable, group-committed writes to pending/, with capacity accounting.

Many concurrent intakes share one directory fsync per batch; file fsyncs run
in parallel on a small thread pool. The spool also keeps the count and bytes
of pending orders, for the 507 check, /status and /metrics.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from agent.errors import BufferFullError, PersistError
from agent.spool.buffer import BufferDirs, PendingRecord, list_pending, write_pending_batch
from agent.state.batching import GroupCommit

log = logging.getLogger("agent.spool")


class PendingSpool:
    """Owns the fsync thread pool and the group-commit task for pending/ writes.

    The pool is as large as the usual client concurrency: on virtualised disks a
    file fsync mostly waits, so more of them in flight means more orders per batch.
    """

    def __init__(self, dirs: BufferDirs, max_bytes: int, fsync_threads: int = 32) -> None:
        self.dirs = dirs
        self.max_bytes = max_bytes
        self.count = 0
        self.bytes = 0
        self.last_error: str | None = None
        self._reserved = 0
        self._pool = ThreadPoolExecutor(fsync_threads, thread_name_prefix="fsync")
        self._writer = GroupCommit[PendingRecord]("pending", self._flush, max_batch=128)

    async def start(self) -> None:
        files = await asyncio.to_thread(list_pending, self.dirs)
        self.count = len(files)
        self.bytes = sum(size for _, size in files)
        self._writer.start()

    async def stop(self) -> None:
        await self._writer.stop()
        self._pool.shutdown(wait=True)

    @property
    def writable(self) -> bool:
        return self.last_error is None and self.bytes < self.max_bytes

    async def write(self, record: PendingRecord) -> None:
        """Return only once ``record`` is durable in pending/; else raise PersistError."""
        size = len(record.to_bytes())
        if self.bytes + self._reserved + size > self.max_bytes:
            raise BufferFullError(
                f"buffer is full: {self.bytes} bytes pending, buffer.max_bytes is "
                f"{self.max_bytes}; retry later"
            )
        self._reserved += size
        try:
            await self._writer.submit(record)
        except PersistError as exc:
            self.last_error = str(exc)
            raise
        finally:
            self._reserved -= size
        self.last_error = None
        self.count += 1
        self.bytes += size

    def released(self, size: int) -> None:
        """A pending file left the directory (merged or rejected)."""
        self.count = max(0, self.count - 1)
        self.bytes = max(0, self.bytes - size)

    async def _flush(self, records: list[PendingRecord]) -> list[BaseException | None]:
        loop = asyncio.get_running_loop()
        results: list[Any] = await loop.run_in_executor(
            None, write_pending_batch, self.dirs, records, self._pool
        )
        return results
