"""The inbox drop zone: local processes place ``*.json`` order files here.

Each file goes through the same intake as ``POST /v1/orders``. Once the
intake acknowledged it (forwarded, buffered or a duplicate of an accepted
order) the inbox copy is removed; a file the intake refuses for good goes to
rejected/ with the reason a 4xx would have given; a refusal that may pass
(409, 503, 507) leaves it for the next scan. Names starting with "." or not
ending in ".json" are files still being written and are ignored.

Files are read as every order file is (``agent.spool.reading``): a FIFO, a
socket or a directory under a ``*.json`` name never blocks the scan; it is
moved to rejected/ unread. A file the agent may not read stays, logged once.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import watchfiles

from agent.base.durable import fsync_dir
from agent.base.watched_loop import WatchedLoop
from agent.errors import NotARegularFile, TooLarge, UnreadableFile
from agent.intake.orders import Intake, Reply
from agent.spool.files import quarantine
from agent.spool.reading import ORDER_FILE_CAP, read_order_file
from agent.spool.record import BufferDirs, is_order_file

log = logging.getLogger("agent.inbox")

_TRY_AGAIN = frozenset({409, 503, 507})


def _visible(change: watchfiles.Change, path: str) -> bool:
    return change != watchfiles.Change.deleted and is_order_file(os.path.basename(path))


class InboxWatcher:
    def __init__(
        self,
        dirs: BufferDirs,
        intake: Intake,
        max_body_bytes: int,
        scan_interval_s: float,
        concurrency: int = 8,
    ) -> None:
        self._dirs = dirs
        self._intake = intake
        self._max_body = max_body_bytes
        # Never more than any order file may be (agent.spool.reading): one cap for all.
        self._cap = min(max_body_bytes, ORDER_FILE_CAP)
        self._unreadable: dict[str, str] = {}  # name -> the trouble already logged
        self._interval = scan_interval_s
        self._concurrency = concurrency
        self._loop = WatchedLoop(
            "inbox", self.scan, dirs.inbox, _visible, scan_interval_s, debounce_ms=100
        )
        self.scans = 0

    async def start(self) -> None:
        await self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def scan(self) -> None:
        names = sorted(
            n for n in await asyncio.to_thread(os.listdir, self._dirs.inbox) if is_order_file(n)
        )
        sem = asyncio.Semaphore(self._concurrency)

        async def take(name: str) -> None:
            async with sem:
                await self._take(self._dirs.inbox / name)

        await asyncio.gather(*(take(n) for n in names))
        self.scans += 1

    async def _take(self, path: Path) -> None:
        try:
            data = await asyncio.to_thread(read_order_file, path, self._cap)
        except FileNotFoundError:
            return
        except TooLarge as exc:
            reply = Reply(
                413,
                {
                    "error": f"file is {exc.size} bytes, over agent.max_body_bytes {self._max_body}"
                    if exc.cap == self._max_body
                    else str(exc)
                },
            )
        except NotARegularFile as exc:  # a FIFO, a socket, a directory: never read
            await asyncio.to_thread(
                quarantine, self._dirs, path, {"reason": "not_a_regular_file", "error": str(exc)}
            )
            log.warning(
                "inbox entry %s moved to rejected/ unread: %s",
                path.name,
                exc,
                extra={"file": path.name},
            )
            return
        except UnreadableFile as exc:  # not ours to move: it stays, said once
            if self._unreadable.get(path.name) != str(exc):
                self._unreadable[path.name] = str(exc)
                log.error("inbox file left in place: %s", exc, extra={"file": path.name})
            return
        else:
            self._unreadable.pop(path.name, None)
            reply = await self._intake.submit(data, None)
        if 200 <= reply.status < 300:
            await asyncio.to_thread(_remove, path)
            log.info(
                "inbox file %s accepted: %s",
                path.name,
                reply.body.get("status"),
                extra={"file": path.name, "serial": reply.body.get("serial")},
            )
        elif reply.status not in _TRY_AGAIN:
            await asyncio.to_thread(
                quarantine,
                self._dirs,
                path,
                {"reason": "invalid", "status": reply.status, **reply.body},
            )
            log.warning(
                "inbox file %s rejected: %s",
                path.name,
                reply.body.get("error"),
                extra={"file": path.name, "status": reply.status},
            )


def _remove(path: Path) -> None:
    os.unlink(path)
    fsync_dir(path.parent)
