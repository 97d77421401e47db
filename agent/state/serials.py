"""Local serials: unique per node, never reused, sortable.

Format: ``{NODE}-{YYYYMMDD}-{counter:09d}``, e.g. ``WH-SH-01-20261125-000000123``.
NODE is ``agent.node_id`` upper-cased; the date is the UTC day of issue; the
counter is per node, never resets and is what makes the serial unique. The
high-water mark is reserved durably in blocks before any serial of a block is
handed out, so a crash skips numbers and never repeats one. It is kept twice:
in the journal and in a small file beside the buffer (``.serial-{NODE}``), so
that losing ``state_dir`` (or restoring it from an old backup) cannot make the
agent hand out a serial again: at start-up the counter starts above both, and
above every serial found in the buffer's files.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

from agent.base.durable import fsync_dir, translate
from agent.errors import PersistError
from agent.state.journal import Journal

_SERIAL = re.compile(r"^(?P<node>[A-Z0-9-]+)-(?P<day>\d{8})-(?P<n>\d{9,})$")
_WIDTH = 20  # digits in the high-water file: rewritten in place, never grows


def parse_counter(serial: str, node_prefix: str) -> int | None:
    """The counter of a serial issued by this node, else None."""
    m = _SERIAL.match(serial)
    if m is None or m["node"] != node_prefix:
        return None
    return int(m["n"])


class HighWaterFile:
    """The last reserved counter, in a fixed-width file rewritten in place.

    In place (pwrite + fsync, no temp file) so that a full disk cannot stop
    reservations once the file exists: the forward path needs serials too.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> int:
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return 0
        except (OSError, UnicodeDecodeError) as exc:
            raise PersistError(
                f"cannot read the serial high-water file {self.path}: {exc}; "
                "fix or remove it (the counter also lives in the journal)"
            ) from exc
        if not text.isdigit():
            raise PersistError(
                f"the serial high-water file {self.path} holds {text[:40]!r}, "
                "not a number; fix or remove it"
            )
        return int(text)

    def write(self, value: int) -> None:
        created = not self.path.exists()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.pwrite(fd, f"{value:0{_WIDTH}d}\n".encode("ascii"), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                fsync_dir(self.path.parent)
        except OSError as exc:
            raise translate(exc, str(self.path)) from exc


class SerialIssuer:
    """Hands out serials from a durably reserved block."""

    def __init__(self, journal: Journal, node_id: str, spool_root: Path, block: int = 1000) -> None:
        self.prefix = node_id.upper()
        self._journal = journal
        self._mark = HighWaterFile(spool_root / f".serial-{self.prefix}")
        self._block = block
        self._next = 1
        self._last = 0  # nothing reserved yet
        self._floor = 0
        self._lock = asyncio.Lock()
        self._day = ""
        self._day_checked = -1

    def raise_floor(self, counter: int) -> None:
        """Never issue at or below ``counter`` (seen on disk at start-up)."""
        self._floor = max(self._floor, counter)

    async def start(self) -> None:
        self.raise_floor(await asyncio.to_thread(self._mark.read))

    async def next(self) -> str:
        if self._next > self._last:
            async with self._lock:
                if self._next > self._last:
                    first, last = await self._journal.reserve_serials(
                        f"serial:{self.prefix}", self._block, floor=self._floor
                    )
                    await asyncio.to_thread(self._mark.write, last)
                    self._next, self._last = first, last
        n = self._next
        self._next += 1
        now = int(time.time())
        if now != self._day_checked:  # the UTC day, looked up once a second, not per order
            self._day = time.strftime("%Y%m%d", time.gmtime(now))
            self._day_checked = now
        return f"{self.prefix}-{self._day}-{n:09d}"
