"""The inbox drop zone: local processes place ``*.json`` order files here.

Each file goes through the same intake as ``POST /v1/orders``. Once the
intake acknowledged it (forwarded, buffered or a duplicate of an accepted
order) the inbox copy is removed; a file the intake refuses for good goes to
rejected/ with the reason a 4xx would have given; a refusal that may pass
(409, 503, 507) leaves it for the next scan. Names starting with "." or not
ending in ".json" are files still being written and are ignored.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import watchfiles

from agent.base.durable import fsync_dir
from agent.base.watched_loop import WatchedLoop
from agent.intake.orders import Intake, Reply
from agent.spool.files import quarantine
from agent.spool.record import BufferDirs, is_order_file

log = logging.getLogger("agent.inbox")

_TRY_AGAIN = frozenset({409, 503, 507})


def _visible(change: watchfiles.Change, path: str) -> bool:
    return change != watchfiles.Change.deleted and is_order_file(os.path.basename(path))


class InboxWatcher:
    def __init__(self, dirs: BufferDirs, intake: Intake, max_body_bytes: int,
                 scan_interval_s: float, concurrency: int = 8) -> None:
        self._dirs = dirs
        self._intake = intake
        self._max_body = max_body_bytes
        self._interval = scan_interval_s
        self._concurrency = concurrency
        self._loop = WatchedLoop("inbox", self.scan, dirs.inbox, _visible, scan_interval_s,
                                 debounce_ms=100)
        self.scans = 0

    async def start(self) -> None:
        await self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def scan(self) -> None:
        names = sorted(n for n in await asyncio.to_thread(os.listdir, self._dirs.inbox)
                       if is_order_file(n))
        sem = asyncio.Semaphore(self._concurrency)

        async def take(name: str) -> None:
            async with sem:
                await self._take(self._dirs.inbox / name)

        await asyncio.gather(*(take(n) for n in names))
        self.scans += 1

    async def _take(self, path: Path) -> None:
        try:
            size = path.stat().st_size
            if size > self._max_body:
                reply = Reply(413, {"error": f"file is {size} bytes, over agent.max_body_bytes "
                                             f"{self._max_body}"})
            else:
                data = await asyncio.to_thread(path.read_bytes)
                reply = await self._intake.submit(data, None)
        except FileNotFoundError:
            return
        if 200 <= reply.status < 300:
            await asyncio.to_thread(_remove, path)
            log.info("inbox file %s accepted: %s", path.name, reply.body.get("status"),
                     extra={"file": path.name, "serial": reply.body.get("serial")})
        elif reply.status not in _TRY_AGAIN:
            await asyncio.to_thread(quarantine, self._dirs, path,
                                    {"reason": "invalid", "status": reply.status, **reply.body})
            log.warning("inbox file %s rejected: %s", path.name, reply.body.get("error"),
                        extra={"file": path.name, "status": reply.status})


def _remove(path: Path) -> None:
    os.unlink(path)
    fsync_dir(path.parent)
