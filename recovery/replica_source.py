"""``edge-recover --from-replica NODE_ID``: a lost server's orders, from the replica.

The replica (CONTRACT 11) is a source beside the directory source, not a second
merge engine: the directory merge's engine runs with the replica's undelivered
records as its orders (``ReplicaSource``: in serial order, like pending/) and
marks each settled one in the replica instead of moving a file
(``ReplicaMarks``): delivered with its order_id, or rejected. Ranking,
decisions, the sender, the checkpoint in the work directory, the report and
the exit codes are the directory merge's. A pin an unclear answer sets is
written to the replica before the order is sent again, so another machine
taking over later respects it.

No work files: listing the replica and writing every record as a file cost as
much as the merge itself (issue 22). Resume after kill -9: the checkpoint says
what the center confirmed; a rerun finds those orders still undelivered in the
replica, settles them from the checkpoint without a request, and marks them.
A mark that fails keeps the checkpoint (exit 1): the next run marks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from agent.base.durable import TMP_SUFFIX, write_tmp
from agent.config import ReplicationSection
from agent.delivery.pacing import Backoff
from agent.errors import ReplicaError
from agent.replica.stream import (
    DELIVERED,
    PINNED,
    REJECTED,
    UNDELIVERED,
    Change,
    Publisher,
    connect,
    states,
)
from agent.spool.claims import Claim
from agent.spool.moves import merged_document
from agent.spool.record import BufferDirs, PendingRecord
from recovery.app import EXIT_UNREACHABLE, Job, Origin, run
from recovery.decide import CLUSTER, Held, Opened, Work
from recovery.finisher import MERGE, QUARANTINE, Settled
from recovery.item import Item
from recovery.source import Found

log = logging.getLogger("recovery.replica")
PREFIX = "replica/"  # an order's "file" in the report: replica/{serial}


async def takeover(job: Job, replication: ReplicationSection, node: str, config: str | Path) -> int:
    try:
        nc = await connect(replication, f"edge-recover-{node}")
    except ReplicaError as exc:
        log.error("the replica is unreachable: %s", exc)
        return EXIT_UNREACHABLE
    try:
        started = time.monotonic()
        try:
            known: dict[str, Change] = {}
            async for batch in states(nc, node, replication.timeout_s):
                known.update((c.record.serial, c) for c in batch)
        except ReplicaError as exc:
            log.error("%s", exc)
            return EXIT_UNREACHABLE
        left = sum(1 for c in known.values() if c.state in UNDELIVERED)
        log.info(
            "replica holds %d orders of %s, %d not delivered (listed in %.1fs)",
            len(known),
            node,
            left,
            time.monotonic() - started,
        )
        if job.mode != "merge":
            with tempfile.TemporaryDirectory(prefix="edge-recover-replica-") as tmp:
                root = Path(tmp)
                await asyncio.to_thread(_materialize, root, known, job.mode == "verify")
                return await run(dataclasses.replace(job, root=root))
        job.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        publisher = Publisher(nc)
        source = ReplicaSource(known, publisher, replication.timeout_s)
        marks = ReplicaMarks(source, publisher, replication.timeout_s)
        started = time.monotonic()
        args = f"--from-replica {node} --config {config} --path {job.root}"
        code = await run(job, Origin(source, marks, args))
        log.info(
            "merge done in %.1fs; %d orders marked in the replica, %d not",
            time.monotonic() - started,
            marks.marked,
            marks.failed,
        )
        return code
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


class ReplicaSource:
    """The replica's undelivered records as the merge's orders, in serial order."""

    def __init__(self, known: dict[str, Change], publisher: Publisher, timeout_s: float) -> None:
        self.records = {s: c.record for s, c in known.items() if c.state in UNDELIVERED}
        self._publisher = publisher
        self._timeout_s = timeout_s

    def list(self) -> tuple[list[Found], Iterable[Item], int]:
        serials = sorted(self.records)
        return [], (Item(f"{PREFIX}{s}", False) for s in serials), len(serials)

    def open(self, item: Item) -> Opened | Settled | Held:
        """Nothing to claim: one takeover per node at a time (the work directory's lock);
        a lost server that returns meanwhile reconciles with the replica at start."""
        record = self.records[item.file.removeprefix(PREFIX)]
        item.serial, item.key, item.pinned_to = record.serial, record.dedupe_key, record.pinned_to
        return Opened(item, Claim(item.file, None, b""), record)

    async def pin(self, work: Work, pin: str, why: str) -> PendingRecord:
        record = work.record
        if record.pinned_to == pin:
            return record
        pinned = record.pinned(pin)
        (result,) = await self._publisher.publish_all(
            [Change(PINNED, pinned, None, pin)], self._timeout_s
        )
        if isinstance(result, BaseException):
            raise ReplicaError(f"{result} ({why})")
        self.records[pinned.serial] = pinned
        return pinned


# How long a takeover keeps publishing a mark the stream did not take: JetStream
# re-elects a lost stream leader within seconds; past this the mark is the next run's.
MARK_PATIENCE_S = 20.0


class ReplicaMarks:
    """The outcomes of a takeover: each settled order marked in the replica, a group at a
    time, after the checkpoint has it (``recovery.finisher``)."""

    def __init__(self, source: ReplicaSource, publisher: Publisher, timeout_s: float) -> None:
        self._records = source.records
        self._publisher = publisher
        self._timeout_s = timeout_s
        self._refused_since: float | None = None  # marks refused since (monotonic)
        self.marked = self.failed = 0

    async def place(self, batch: list[Settled]) -> None:
        items: list[Settled] = []
        changes: list[Change] = []
        for item in batch:
            record = self._records.get(item.row.file.removeprefix(PREFIX))
            if record is None:
                continue
            if item.action == MERGE:
                changes.append(Change(DELIVERED, record, item.row.order_id, CLUSTER))
            elif item.action == QUARANTINE:
                changes.append(Change(REJECTED, record))
            else:
                continue
            items.append(item)
        if not changes:
            return
        results = await self._marks(changes)
        for item, result in zip(items, results, strict=True):
            if not isinstance(result, BaseException):
                self.marked += 1
            else:
                self.failed += 1
                item.error = f"not marked in the replica (the next run does): {result}"
                log.error("%s", item.error)

    async def _marks(self, changes: list[Change]) -> list[int | BaseException]:
        """Publish the marks; those the stream did not take are published again until
        the stream has refused marks for MARK_PATIENCE_S in a row (one budget for the
        whole run: a replica gone for good costs the 20 s once, not per batch). Typically
        the lost server's NATS node led the stream: until JetStream elects a new leader
        (seconds) every write is answered "no responders". Publishing a mark again is
        safe: it carries its Nats-Msg-Id, so a first copy that was stored after all makes
        the second a duplicate JetStream drops."""
        latest = await self._publisher.publish_all(changes, self._timeout_s)
        results = list(latest)
        waits = Backoff(0.25, 2.0)
        while True:
            if any(not isinstance(r, BaseException) for r in latest):
                self._refused_since = None  # the stream takes marks
            again = [n for n, r in enumerate(results) if isinstance(r, ReplicaError)]
            if not again:
                return results
            now = time.monotonic()
            if self._refused_since is None:
                self._refused_since = now
            left = self._refused_since + MARK_PATIENCE_S - now
            if left <= 0:
                return results
            log.warning(
                "replica: %d of %d marks not stored yet (%s); trying again for up to %.0fs",
                len(again),
                len(changes),
                results[again[0]],
                left,
            )
            await asyncio.sleep(min(waits.next(), left))
            latest = await self._publisher.publish_all([changes[n] for n in again], self._timeout_s)
            for n, result in zip(again, latest, strict=True):
                results[n] = result

    async def complete(self, batch: list[Settled], placed: None) -> None:
        """Nothing is claimed, nothing to sync: the marks are on a quorum already."""

    def close(self) -> None:
        pass


def _materialize(root: Path, known: dict[str, Change], delivered: bool) -> int:
    """For dry-run and verify: the undelivered records into root/pending, or the delivered
    ones into root/merged, of a fresh temporary directory (not synced: read at once)."""
    dirs = BufferDirs(root)
    dirs.ensure()
    into = dirs.merged if delivered else dirs.pending
    written = 0
    wanted = (DELIVERED,) if delivered else UNDELIVERED
    for serial, change in known.items():
        if change.state not in wanted:
            continue
        if delivered:
            data = merged_document(change.record, change.order_id, change.cluster or "")
        else:
            data = change.record.to_bytes()
        tmp = into / f".{serial}.json{TMP_SUFFIX}"
        write_tmp(tmp, data, sync=False)
        os.replace(tmp, into / f"{serial}.json")
        written += 1
    return written
