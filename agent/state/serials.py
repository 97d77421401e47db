"""Local serials: unique per node, never reused, sortable.

Format: ``{NODE}-{YYYYMMDD}-{counter:09d}``, e.g. ``WH-SH-01-20261125-000000123``.
NODE is ``agent.node_id`` upper-cased; the date is the UTC day of issue; the
counter is per node, never resets and is what makes the serial unique. The
high-water mark is reserved durably in blocks before any serial of a block is
handed out, so a crash skips numbers and never repeats one.
"""

from __future__ import annotations

import asyncio
import re
import time

from agent.state.journal import Journal

_SERIAL = re.compile(r"^(?P<node>[A-Z0-9-]+)-(?P<day>\d{8})-(?P<n>\d{9,})$")


def parse_counter(serial: str, node_prefix: str) -> int | None:
    """The counter of a serial issued by this node, else None."""
    m = _SERIAL.match(serial)
    if m is None or m["node"] != node_prefix:
        return None
    return int(m["n"])


class SerialIssuer:
    """Hands out serials from a durably reserved block."""

    def __init__(self, journal: Journal, node_id: str, block: int = 1000) -> None:
        self.prefix = node_id.upper()
        self._journal = journal
        self._block = block
        self._next = 1
        self._last = 0  # nothing reserved yet
        self._floor = 0
        self._lock = asyncio.Lock()

    def raise_floor(self, counter: int) -> None:
        """Never issue at or below ``counter`` (seen on disk at start-up)."""
        self._floor = max(self._floor, counter)

    async def next(self) -> str:
        if self._next > self._last:
            async with self._lock:
                if self._next > self._last:
                    first, last = await self._journal.reserve_serials(
                        f"serial:{self.prefix}", self._block, floor=self._floor
                    )
                    self._next, self._last = first, last
        n = self._next
        self._next += 1
        day = time.strftime("%Y%m%d", time.gmtime())
        return f"{self.prefix}-{day}-{n:09d}"
