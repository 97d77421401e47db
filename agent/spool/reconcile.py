"""Start-up reconciliation: the files are the truth, the journal is an index.

Every pending file gets a "buffered" journal row (a crash may have come
between the fsync and the journal commit); a "buffered" row whose file has
left pending/ takes the state of where the file is now. Every disagreement is
logged. Also finds the highest serial counter on disk, so a lost or reset
state database can never make the agent issue a serial twice.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

from agent.errors import CorruptRecordError
from agent.spool.buffer import BufferDirs, PendingRecord, is_order_file
from agent.state.journal import BUFFERED, MERGED, REJECTED, Entry, Journal, body_digest
from agent.state.serials import parse_counter

log = logging.getLogger("agent.reconcile")


@dataclass(frozen=True)
class DiskView:
    pending: dict[str, PendingRecord]  # serial -> record (parsable files only)
    merged: frozenset[str]
    rejected: frozenset[str]
    max_counter: int


def _serials_in(directory: os.PathLike[str] | str) -> set[str]:
    with os.scandir(directory) as it:
        return {e.name[: -len(".json")] for e in it if is_order_file(e.name)}


def read_disk(dirs: BufferDirs, node_prefix: str, known_buffered: set[str]) -> DiskView:
    pending: dict[str, PendingRecord] = {}
    pending_names = _serials_in(dirs.pending)
    for serial in pending_names - known_buffered:
        path = dirs.pending / f"{serial}.json"
        try:
            record = PendingRecord.from_bytes(path.read_bytes(), origin=str(path))
        except (OSError, CorruptRecordError) as exc:
            log.warning("pending file not indexed: %s", exc)  # the drain quarantines it
            continue
        pending[record.serial] = record
    merged = _serials_in(dirs.merged)
    rejected = _serials_in(dirs.rejected)
    counters = (parse_counter(s, node_prefix) for s in pending_names | merged | rejected)
    return DiskView(pending, frozenset(merged), frozenset(rejected),
                    max((c for c in counters if c is not None), default=0))


async def reconcile(journal: Journal, dirs: BufferDirs, node_prefix: str) -> DiskView:
    buffered = await journal.buffered_serials()
    view = await asyncio.to_thread(read_disk, dirs, node_prefix, buffered)
    for serial, record in view.pending.items():
        log.warning("pending file %s had no journal row; indexed from the file", serial)
        await journal.record(Entry(record.dedupe_key, serial, BUFFERED, None, None,
                                   body_digest(record.raw_body), record.received_at))
    pending_now = await asyncio.to_thread(_serials_in, dirs.pending)
    for serial in buffered - pending_now:
        if serial in view.rejected:
            state = REJECTED
        else:
            state = MERGED
            if serial not in view.merged:
                log.warning("journal row %s is buffered but its file is gone from pending/, "
                            "merged/ and rejected/; assuming another tool (edge-recover) "
                            "delivered it", serial)
        await journal.mark(serial, state)
    return view
