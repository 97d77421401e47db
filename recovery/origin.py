"""Where the merge's orders come from: a buffer directory, or the replica.

The merge engine (``recovery.merge``) asks its source for three things: the
orders to merge, in rank order; each order, claimed and read; and a pin
written where the order lives before it is sent again. ``DirectorySource``
is the buffer directory (files claimed with the agent's flock, pins written
into the file); ``recovery.replica_source`` has the replica's. Everything
else (ranking, decisions, sending, the checkpoint, the report) is the same
engine for both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from agent.spool.pins import pin_file
from agent.spool.record import BufferDirs, PendingRecord
from recovery.decide import Held, Opened, Work, open_file
from recovery.finisher import Settled
from recovery.item import Item
from recovery.listing import SortedNames
from recovery.source import Found, read_found


class Source(Protocol):
    def list(self) -> tuple[list[Found], Iterable[Item], int]:
        """(loose files read up front, the ordered items in name = serial order, their
        count). Blocking: run in a thread."""
        ...

    def open(self, item: Item) -> Opened | Settled | Held:
        """Claim and read one order (in the merge's claim thread)."""
        ...

    async def pin(self, work: Work, pin: str, why: str) -> PendingRecord:
        """Write the order pinned to ``pin`` where it lives; the pinned record.
        PersistError (or ReplicaError) if it could not be written."""
        ...


class DirectorySource:
    """A buffer directory: loose files in DIR, then pending/ in name order."""

    def __init__(self, root: Path, node: str) -> None:
        self._root = root
        self._node = node
        self._dirs = BufferDirs(root)

    def list(self) -> tuple[list[Found], Iterable[Item], int]:
        root, node = self._root, self._node
        loose = [
            f
            for f in (read_found(root, name, True, node) for name in SortedNames(root))
            if f is not None
        ]
        pending = SortedNames(root / "pending")
        items = (Item(f"pending/{name}", False) for name in pending)
        return loose, items, len(pending)

    def open(self, item: Item) -> Opened | Settled | Held:
        return open_file(self._root, self._dirs, self._node, item)

    async def pin(self, work: Work, pin: str, why: str) -> PendingRecord:
        return await asyncio.to_thread(pin_file, work.claim, work.record, pin, why)
