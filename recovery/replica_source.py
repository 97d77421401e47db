"""``edge-recover --from-replica NODE_ID``: a lost server's orders, from the replica.

The replica (CONTRACT 11) is a source beside the directory source, not a second
merge engine: its undelivered records are written as pending files into a work
directory, and the directory merge runs there unchanged (dedupe, ranking,
``pinned_to``, checkpoint, report, exit codes). What ends in merged/ or
rejected/ there is then marked delivered or rejected in the replica, and a pin
an unclear answer set is written back too, so another machine taking over
later respects it.

Resume after kill -9: a record already in the work directory (pending with its
pin, or merged) is never written again; the next run merges what is left and
marks what an earlier run merged but did not mark yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import tempfile
import time
from pathlib import Path

import orjson

from agent.base.durable import TMP_SUFFIX, fsync_dir, write_tmp
from agent.config import ReplicationSection
from agent.errors import CorruptRecordError, ReplicaError
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
from agent.spool.moves import merged_document
from agent.spool.record import BufferDirs, PendingRecord, parse_tolerant
from recovery.app import EXIT_UNREACHABLE, Job, run

log = logging.getLogger("recovery.replica")
MARK_BATCH = 2000
MARK_EVERY_S = 1.0


async def takeover(job: Job, replication: ReplicationSection, node: str) -> int:
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
        started = time.monotonic()
        written = await asyncio.to_thread(_materialize, job.root, known, False)
        log.info(
            "%d records written to %s/pending for the merge in %.1fs",
            written,
            job.root,
            time.monotonic() - started,
        )
        started = time.monotonic()
        marker = Marker(Publisher(nc), job.root, known, replication.timeout_s)
        merged = asyncio.Event()
        marking = asyncio.create_task(marker.follow(merged))
        try:
            code = await run(job)
        finally:
            merged.set()
            await marking
        log.info("merge done in %.1fs", time.monotonic() - started)
        started = time.monotonic()
        await marker.mark(final=True)
        log.info(
            "%d orders marked in the replica (%.1fs after the merge)",
            len(marker.marked),
            time.monotonic() - started,
        )
        return code
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def _materialize(root: Path, known: dict[str, Change], delivered: bool) -> int:
    """Write the undelivered records into root/pending (or, for verify, the delivered
    ones into root/merged); never over an order file an earlier run left.

    Not synced: the replica is the durable copy. A file a crash left torn (it does not
    parse as this order) is written again; what the merge itself changes (a pin, the
    move to merged/) it makes durable on its own.
    """
    dirs = BufferDirs(root)
    dirs.ensure()
    into = dirs.merged if delivered else dirs.pending
    present = {sub: set(os.listdir(root / sub)) for sub in ("pending", "merged", "rejected")}
    written = 0
    for serial, change in known.items():
        name = f"{serial}.json"
        if delivered:
            if change.state != DELIVERED:
                continue
            data = merged_document(change.record, change.order_id, change.cluster or "")
        else:
            if change.state not in UNDELIVERED:
                continue
            if name in present["merged"] or name in present["rejected"]:
                continue
            if name in present["pending"] and _whole(dirs.pending / name, change.record):
                continue
            data = change.record.to_bytes()
        tmp = into / f".{name}{TMP_SUFFIX}"
        write_tmp(tmp, data, sync=False)
        os.replace(tmp, into / name)
        written += 1
    fsync_dir(into)
    return written


def _whole(path: Path, record: PendingRecord) -> bool:
    """Does ``path`` hold ``record`` (maybe pinned since, by the merge)?"""
    try:
        found = parse_tolerant(path.read_bytes(), str(path))
    except (OSError, CorruptRecordError):
        return False
    return (found.serial, found.dedupe_key, found.body) == (
        record.serial,
        record.dedupe_key,
        record.body,
    )


def _outcomes(root: Path, known: dict[str, Change], skip: set[str], final: bool) -> list[Change]:
    """The changes the replica lacks: merged (and, at the end, rejected or newly pinned).

    While the merge runs only merged/ is listed (one listdir a pass); ``skip``: marked.
    """
    dirs = BufferDirs(root)
    merged = set(os.listdir(dirs.merged))
    out: list[Change] = []
    for serial, change in known.items():
        if change.state not in UNDELIVERED or serial in skip:
            continue
        name = f"{serial}.json"
        if name in merged:
            try:
                doc = orjson.loads((dirs.merged / name).read_bytes())
            except (OSError, orjson.JSONDecodeError):
                doc = {}
            order_id = doc.get("order_id") if isinstance(doc, dict) else None
            cluster = doc.get("cluster") if isinstance(doc, dict) else None
            out.append(Change(DELIVERED, change.record, order_id, cluster))
        elif not final:
            continue
        elif (dirs.rejected / name).exists():
            out.append(Change(REJECTED, change.record))
        else:
            with contextlib.suppress(OSError, CorruptRecordError):
                record: PendingRecord = parse_tolerant(
                    (dirs.pending / name).read_bytes(), f"pending/{name}"
                )
                if record.pinned_to != change.record.pinned_to:
                    out.append(Change(PINNED, record, None, record.pinned_to))
    return out


class Marker:
    """Marks in the replica what the merge finished: while it runs, and once at the end."""

    def __init__(
        self, publisher: Publisher, root: Path, known: dict[str, Change], timeout_s: float
    ) -> None:
        self._publisher = publisher
        self._root = root
        self._known = known
        self._timeout_s = timeout_s
        self.marked: set[str] = set()

    async def follow(self, done: asyncio.Event) -> None:
        """Mark what reached merged/ every MARK_EVERY_S until ``done``."""
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), MARK_EVERY_S)
            if not done.is_set():
                await self.mark(final=False)

    async def mark(self, final: bool) -> None:
        changes = await asyncio.to_thread(
            _outcomes, self._root, self._known, set(self.marked), final
        )
        for i in range(0, len(changes), MARK_BATCH):
            batch = changes[i : i + MARK_BATCH]
            results = await self._publisher.publish_all(batch, self._timeout_s)
            for change, err in zip(batch, results, strict=True):
                if err is None:
                    if change.state != PINNED:
                        self.marked.add(change.record.serial)
                elif final:
                    log.error("not marked in the replica (the next run does): %s", err)
