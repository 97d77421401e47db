"""The agent's side of the replica: one owned connection, group-committed writes.

``replicate`` is the 202 path's step after the local fsync: records from many
concurrent intakes are published as one batch and awaited together (like the
pending files' group commit), so replication adds a wait, not a round trip per
order. ``change`` writes a later state (pinned, delivered, rejected) with a
bounded retry; what could not be written is remembered and written by the
background task when the quorum returns, and shown in /status meanwhile.

Each write names the message it replaces (the sequence this agent last stored
for the order, 0 for a new one). When the subject holds something else, the
current message decides: the same order (our write whose answer was lost, or a
takeover's final state) is kept or replaced knowingly; another order under the
same serial is never overwritten: a ReplicaConflict, logged and counted, since
it means two agents share a node_id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from agent.base.batching import GroupCommit
from agent.base.tasks import cancel_and_wait, wait_set
from agent.config import ReplicationSection
from agent.errors import ConfigError, ReplicaConflict, ReplicaError
from agent.replica.stream import (
    DELIVERED,
    FINAL,
    PENDING,
    START_LIST_ATTEMPTS,
    Change,
    Publisher,
    SubjectMoved,
    connect,
    ensure_stream,
    last_state,
    same_order,
    states,
)
from agent.spool.record import PendingRecord

log = logging.getLogger("agent.replica")
# A later state is tried this many times (timeout_s each) before it is left to the
# background task.
CHANGE_ATTEMPTS = 3
RETRY_EVERY_S = 1.0
# Batches awaiting their acknowledgements at once: a batch is mostly a wait on the
# cluster, and one slow quorum write must not hold up the orders queued behind it.
IN_FLIGHT = 4


class Replicator:
    """Owns the NATS connection, the publishing group commit and the retry task."""

    def __init__(self, cfg: ReplicationSection, node_id: str) -> None:
        self.cfg = cfg
        self.node_id = node_id
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._publisher: Publisher | None = None
        self._writer = GroupCommit[Change](
            "replica", self._flush, max_batch=256, in_flight=IN_FLIGHT
        )
        self._task: asyncio.Task[None] | None = None
        # serial -> the change the replica still lacks (newest state wins)
        self._owed: dict[str, Change] = {}
        # serial -> the stream sequence of this agent's last write of that order
        self._seqs: dict[str, int] = {}
        # serial -> why the replica cannot take it (another order holds the serial)
        self.conflicts: dict[str, str] = {}
        self._wake = asyncio.Event()
        self.last_error: str | None = None
        self.last_ok: float | None = None
        self._ready = False

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and make sure the stream is there with enough replicas.

        ReplicaTooSmall (a ConfigError: exit 2) if the stream has fewer replicas
        than configured. An unreachable cluster does not stop the agent: it keeps
        connecting, and until then every replica write fails (503 or flagged).
        """
        self._writer.start()
        try:
            await self._connect()
        except ReplicaError as exc:
            self.last_error = str(exc)
            log.error("replica unavailable at start: %s", exc)
        except BaseException:  # ReplicaTooSmall: nothing of ours may outlive the refusal
            await self.stop()
            raise
        self._task = asyncio.create_task(self._retry_loop(), name="replica-retry")

    async def _connect(self) -> None:
        if self._nc is None:
            self._nc = await connect(self.cfg, f"edge-agent-{self.node_id}")
            self._js = self._nc.jetstream(timeout=self.cfg.timeout_s)
            self._publisher = Publisher(self._nc)
        assert self._js is not None and self._publisher is not None
        await ensure_stream(self._js, self.cfg.replicas, self.cfg.timeout_s)
        await self._publisher.start()
        self._ready = True

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        await self._writer.stop()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
            self._nc = self._js = self._publisher = None

    # -- writes -------------------------------------------------------------------------

    async def replicate(self, record: PendingRecord) -> None:
        """Return once JetStream stored the pending record on a quorum; else ReplicaError
        (ReplicaConflict: the serial holds another agent's order)."""
        await self._writer.submit(Change(PENDING, record))

    def owe(self, change: Change) -> None:
        """Write ``change`` later (background), e.g. a 202 given on local durability alone.
        Not an order in conflict: no retry can store it."""
        if change.record.serial in self.conflicts:
            return
        self._owed[change.record.serial] = change
        self._wake.set()

    def unreplicated(self, serial: str) -> bool:
        return serial in self._owed or serial in self.conflicts

    async def change(
        self, record: PendingRecord, state: str, order_id: Any = None, cluster: str | None = None
    ) -> bool:
        """Write a later state, retried a few times; False: left to the background task."""
        change = Change(state, record, order_id, cluster)
        self._owed.pop(record.serial, None)  # the newer state supersedes what was owed
        # While the replica is known down, one try: the drain must not stall on it.
        attempts = 1 if self.last_error else CHANGE_ATTEMPTS
        for attempt in range(attempts):
            try:
                await self._writer.submit(change)
                return True
            except ReplicaConflict:
                return False  # logged and counted where it was found; retrying cannot help
            except ReplicaError as exc:
                if attempt == attempts - 1:
                    log.error("replica: %s; written when the quorum returns", exc)
                else:
                    await asyncio.sleep(min(self.cfg.timeout_s, 0.5))
        self.owe(change)
        return False

    async def _flush(self, changes: list[Change]) -> list[BaseException | None]:
        if self._publisher is None or not self._ready:
            # Connecting is the retry task's job: an order does not wait for it.
            error = ReplicaError(f"not connected to the replica: {self.last_error}")
            return [error] * len(changes)
        publisher = self._publisher
        expects = [self._seqs.get(c.record.serial, 0) for c in changes]
        results = await publisher.publish_all(changes, self.cfg.timeout_s, expects)
        moved = [i for i, r in enumerate(results) if isinstance(r, SubjectMoved)]
        if moved:  # after a restart (sequences unknown), a lost answer, or a conflict
            settled = await asyncio.gather(*(self._settle(publisher, changes[i]) for i in moved))
            for i, result in zip(moved, settled, strict=True):
                results[i] = result
        out: list[BaseException | None] = []
        for change, result in zip(changes, results, strict=True):
            if isinstance(result, BaseException):
                out.append(result)
                continue
            if change.state in FINAL:
                self._seqs.pop(change.record.serial, None)
            else:
                self._seqs[change.record.serial] = result
            out.append(None)
        # A conflict is a configuration fault, not the replica's: counted on its own.
        errors = [r for r in out if r is not None and not isinstance(r, ReplicaConflict)]
        if errors:
            self.last_error = str(errors[0])
        else:
            self.last_error, self.last_ok = None, time.time()
        return out

    async def _settle(self, publisher: Publisher, change: Change) -> int | BaseException:
        """The subject did not hold what the write expected: let its message decide."""
        record = change.record
        assert self._js is not None
        try:
            last = await last_state(self._js, record.node_id, record.serial, self.cfg.timeout_s)
        except ReplicaError as exc:
            return exc
        if last is None:
            expect = 0
        else:
            seq, held = last
            if not same_order(held.record, record):
                return self._conflict(held, change)
            if held.state in FINAL or (
                held.state == change.state and held.record.pinned_to == record.pinned_to
            ):
                return seq  # already there, or final (a takeover delivered it): never undone
            expect = seq
        # SubjectMoved again: a writer raced us; the caller's next try settles it.
        return (await publisher.publish_all([change], self.cfg.timeout_s, [expect]))[0]

    def _conflict(self, held: Change, change: Change) -> ReplicaConflict:
        record = change.record
        why = (
            f"the replica holds another order under serial {record.serial} of node "
            f"{record.node_id} (dedupe key {held.record.dedupe_key!r} received "
            f"{held.record.received_at}, not {record.dedupe_key!r} received "
            f"{record.received_at}): two servers write as agent.node_id = "
            f"{record.node_id!r}; give each server its own node_id. Not overwritten; "
            f"this {change.state} is kept locally only"
        )
        if record.serial not in self.conflicts:
            log.error("replica conflict: %s", why)
        self.conflicts[record.serial] = why
        self._owed.pop(record.serial, None)
        return ReplicaConflict(why)

    async def _retry_loop(self) -> None:
        while True:
            await wait_set(self._wake, RETRY_EVERY_S)
            self._wake.clear()
            if not self._owed and self._ready:
                continue
            if not self._ready:
                try:
                    await self._connect()
                except (ReplicaError, ConfigError) as exc:  # ConfigError: ReplicaTooSmall
                    self.last_error = str(exc)
                    continue
            owed = list(self._owed.values())
            futures = [self._writer.enqueue(c) for c in owed]
            done = await asyncio.gather(*futures, return_exceptions=True)
            for change, result in zip(owed, done, strict=True):
                if result is None and self._owed.get(change.record.serial) is change:
                    del self._owed[change.record.serial]
            if not self._owed:
                log.info("replica: every owed record is written")

    # -- reads --------------------------------------------------------------------------

    async def listing(self) -> dict[str, Change]:
        """Every order of this node in the replica with its latest state, by serial."""
        if self._nc is None or not self._ready:
            await self._connect()
        assert self._nc is not None
        out: dict[str, Change] = {}
        async for batch in states(
            self._nc, self.node_id, self.cfg.timeout_s, attempts=START_LIST_ATTEMPTS
        ):
            for change in batch:
                out[change.record.serial] = change
        return out

    def snapshot(self) -> dict[str, Any]:
        """For /status: is the replica taking writes, and what it still lacks."""
        return {
            "enabled": True,
            "servers": list(self.cfg.servers),
            "replicas": self.cfg.replicas,
            "required": self.cfg.required,
            "connected": bool(self._nc is not None and self._nc.is_connected),
            "healthy": self._ready and self.last_error is None,
            "last_error": self.last_error,
            "last_ok": self.last_ok,
            "unreplicated": self.unreplicated_count,
            "owed_changes": sum(1 for c in self._owed.values() if c.state != PENDING),
            # orders another agent's record holds the serial of: node_id is not unique
            "conflicts": len(self.conflicts),
            "last_conflict": next(reversed(self.conflicts.values()), None),
        }

    @property
    def unreplicated_count(self) -> int:
        owed = sum(1 for c in self._owed.values() if c.state == PENDING)
        return owed + len(self.conflicts)


__all__ = ["DELIVERED", "Replicator"]
