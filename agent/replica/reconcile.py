"""Start-up: bring pending/ and the replica into agreement before anything is sent.

- an order the replica shows delivered (a takeover merged it while this agent
  was gone, or this agent did before a crash) moves to merged/ without being
  sent again; one shown rejected goes to rejected/;
- a pending file the replica lacks (a crash between the local fsync and the
  acknowledgement) is written to the replica;
- an order the replica still shows undelivered whose file is already in merged/
  or rejected/ here (the replica write was lost) gets that state written.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import orjson

from agent.errors import CorruptRecordError, ReplicaError
from agent.replica.replicator import Replicator
from agent.replica.stream import DELIVERED, PENDING, REJECTED, UNDELIVERED, Change
from agent.spool.record import PendingRecord
from agent.spool.writer import PendingSpool
from agent.state.journal import MERGED, Journal
from agent.state.journal import REJECTED as JOURNAL_REJECTED

log = logging.getLogger("agent.replica")


@dataclass
class Reconciled:
    moved: int = 0  # delivered elsewhere: moved to merged/ unsent
    rejected: int = 0
    published: int = 0  # local files the replica lacked
    caught_up: int = 0  # later states the replica lacked


async def reconcile_with_replica(
    replica: Replicator, spool: PendingSpool, journal: Journal
) -> Reconciled | None:
    """None when the replica cannot be read (logged): the drain then relies on the
    center's idempotency alone for orders a takeover may have delivered."""
    try:
        known = await replica.listing()
    except ReplicaError as exc:
        log.error(
            "replica not reconciled at start (%s); repeats are left to the center's "
            "Idempotency-Key",
            exc,
        )
        return None
    done = Reconciled()
    for name, size in await spool.listing():
        serial = name.removesuffix(".json")
        change = known.pop(serial, None)
        if change is not None and change.state in UNDELIVERED:
            continue  # both sides agree: nothing to read or move (most files, most starts)
        async with spool.claim(name, size) as held:
            if held is None or held.record is None:
                continue
            if change is None:
                replica.owe(Change(PENDING, held.record))
                done.published += 1
            elif change.state == DELIVERED:
                await held.delivered(change.order_id, change.cluster or "replica")
                await journal.mark(serial, MERGED, change.cluster, change.order_id)
                done.moved += 1
            elif change.state == REJECTED:
                await held.quarantined(
                    "rejected_in_replica",
                    {
                        "error": "the replica shows this order rejected by the center",
                        "cluster": change.cluster,
                    },
                )
                await journal.mark(serial, JOURNAL_REJECTED, change.cluster)
                done.rejected += 1
    for serial, change in known.items():
        if change.state not in UNDELIVERED:
            continue
        later = await asyncio.to_thread(_local_outcome, spool, f"{serial}.json", change.record)
        if later is not None:
            replica.owe(later)
            done.caught_up += 1
    log.info(
        "replica reconciled: %d delivered elsewhere moved to merged/ unsent, %d rejected, "
        "%d written to the replica, %d later states caught up",
        done.moved,
        done.rejected,
        done.published,
        done.caught_up,
    )
    return done


def _local_outcome(spool: PendingSpool, name: str, record: PendingRecord) -> Change | None:
    dirs = spool.dirs
    try:
        doc = orjson.loads((dirs.merged / name).read_bytes())
        if isinstance(doc, dict) and doc.get("dedupe_key") == record.dedupe_key:
            return Change(DELIVERED, record, doc.get("order_id"), doc.get("cluster"))
    except (OSError, orjson.JSONDecodeError, CorruptRecordError):
        pass
    if (dirs.rejected / name).exists():
        return Change(REJECTED, record)
    return None
