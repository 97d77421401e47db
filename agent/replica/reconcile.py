"""Start-up: bring pending/ and the replica into agreement before anything is sent.

Until that has happened once, the drain holds (``StartupReconcile.done``): a
takeover may have delivered any of these files while this server was away, and
CONTRACT 11 says a returning agent never sends those again. A replica that
cannot be read at start is asked again every few seconds; new orders are taken
meanwhile (forwarded, or buffered under the usual replication rules).

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
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from agent.base.tasks import cancel_and_wait
from agent.errors import CorruptRecordError, ReplicaError
from agent.replica.replicator import Replicator
from agent.replica.stream import (
    DELIVERED,
    PENDING,
    REJECTED,
    UNDELIVERED,
    Change,
    same_order,
)
from agent.spool.record import PendingRecord
from agent.spool.writer import PendingSpool
from agent.state.journal import MERGED, Journal
from agent.state.journal import REJECTED as JOURNAL_REJECTED

log = logging.getLogger("agent.replica")
# How often a replica that could not be read at start is asked again.
RETRY_EVERY_S = 2.0


@dataclass
class Reconciled:
    moved: int = 0  # delivered elsewhere: moved to merged/ unsent
    rejected: int = 0
    published: int = 0  # local files the replica lacked
    caught_up: int = 0  # later states the replica lacked
    foreign: int = 0  # the serial holds another agent's order (node_id not unique)
    elsewhere: int = 0  # undelivered in the replica, in no directory here


async def reconcile_with_replica(
    replica: Replicator, spool: PendingSpool, journal: Journal
) -> Reconciled:
    """ReplicaError when the replica cannot be read: nothing was changed then."""
    known = await replica.listing()
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
            elif not same_order(change.record, held.record):
                # Another agent's order under this serial: its state says nothing of ours.
                log.error(
                    "replica: %s of node %s there is another order (dedupe key %r, not %r): "
                    "two servers share agent.node_id; this file stays and is delivered",
                    serial,
                    held.record.node_id,
                    change.record.dedupe_key,
                    held.record.dedupe_key,
                )
                done.foreign += 1
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
        else:
            done.elsewhere += 1
    log.info(
        "replica reconciled: %d delivered elsewhere moved to merged/ unsent, %d rejected, "
        "%d written to the replica, %d later states caught up",
        done.moved,
        done.rejected,
        done.published,
        done.caught_up,
    )
    if done.foreign or done.elsewhere:
        log.warning(
            "replica: %d undelivered orders of this node_id are in no directory here and %d "
            "serials hold another order: if another server uses the same agent.node_id, "
            "give each its own; orders of a lost buffer are merged with "
            "edge-recover --from-replica",
            done.elsewhere,
            done.foreign,
        )
    return done


class StartupReconcile:
    """Owns the start-up reconcile and, if the replica could not be read, its retries.

    ``done`` gates the drain; ``on_done`` is told once it turns true (the service
    then lets the drain look at pending/).
    """

    def __init__(
        self,
        replica: Replicator,
        spool: PendingSpool,
        journal: Journal,
        on_done: Callable[[], None],
        retry_every_s: float = RETRY_EVERY_S,
    ) -> None:
        self._replica = replica
        self._spool = spool
        self._journal = journal
        self._on_done = on_done
        self._retry_every_s = retry_every_s
        self._task: asyncio.Task[None] | None = None
        self.done = False
        self.failures = 0

    async def start(self) -> None:
        """One try now (before the drain starts); retries in the background if it failed."""
        if await self._try():
            return
        self._task = asyncio.create_task(self._retry(), name="replica-reconcile")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _try(self) -> bool:
        try:
            await reconcile_with_replica(self._replica, self._spool, self._journal)
        except ReplicaError as exc:
            if self.failures == 0:
                log.error(
                    "replica not reconciled (%s): pending/ is held, not sent, until it is; "
                    "asking again every %.0f s",
                    exc,
                    self._retry_every_s,
                )
            self.failures += 1
            return False
        if self.failures:
            log.info("replica reconciled after %d failed tries: the drain may send", self.failures)
        self.done = True
        self._on_done()
        return True

    async def _retry(self) -> None:
        while not self.done:
            await asyncio.sleep(self._retry_every_s)
            await self._try()


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
