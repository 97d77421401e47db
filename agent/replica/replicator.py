"""The agent's side of the replica: one owned connection, group-committed writes.

``replicate`` is the 202 path's step after the local fsync: records from many
concurrent intakes are published as one batch and awaited together (like the
pending files' group commit), so replication adds a wait, not a round trip per
order. ``change`` writes a later state (pinned, delivered, rejected) with a
bounded retry; what could not be written is remembered and written by the
background task when the quorum returns, and shown in /status meanwhile.
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
from agent.config import ReplicationSection
from agent.errors import ConfigError, ReplicaError
from agent.replica.stream import (
    DELIVERED,
    PENDING,
    START_LIST_ATTEMPTS,
    Change,
    connect,
    ensure_stream,
    publish_all,
    states,
)
from agent.spool.record import PendingRecord

log = logging.getLogger("agent.replica")
# A later state is tried this many times (timeout_s each) before it is left to the
# background task.
CHANGE_ATTEMPTS = 3
RETRY_EVERY_S = 1.0


class Replicator:
    """Owns the NATS connection, the publishing group commit and the retry task."""

    def __init__(self, cfg: ReplicationSection, node_id: str) -> None:
        self.cfg = cfg
        self.node_id = node_id
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._writer = GroupCommit[Change]("replica", self._flush, max_batch=256)
        self._task: asyncio.Task[None] | None = None
        # serial -> the change the replica still lacks (newest state wins)
        self._owed: dict[str, Change] = {}
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
        assert self._js is not None
        await ensure_stream(self._js, self.cfg.replicas, self.cfg.timeout_s)
        self._ready = True

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._writer.stop()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
            self._nc = self._js = None

    # -- writes -------------------------------------------------------------------------

    async def replicate(self, record: PendingRecord) -> None:
        """Return once JetStream stored the pending record on a quorum; else ReplicaError."""
        await self._writer.submit(Change(PENDING, record))

    def owe(self, change: Change) -> None:
        """Write ``change`` later (background), e.g. a 202 given on local durability alone."""
        self._owed[change.record.serial] = change
        self._wake.set()

    def unreplicated(self, serial: str) -> bool:
        return serial in self._owed

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
            except ReplicaError as exc:
                if attempt == attempts - 1:
                    log.error("replica: %s; written when the quorum returns", exc)
                else:
                    await asyncio.sleep(min(self.cfg.timeout_s, 0.5))
        self.owe(change)
        return False

    async def _flush(self, changes: list[Change]) -> list[BaseException | None]:
        if self._js is None or not self._ready:
            # Connecting is the retry task's job: an order does not wait for it.
            error = ReplicaError(f"not connected to the replica: {self.last_error}")
            return [error] * len(changes)
        results = await publish_all(self._js, changes, self.cfg.timeout_s)
        errors = [r for r in results if r is not None]
        if errors:
            self.last_error = str(errors[0])
        else:
            self.last_error, self.last_ok = None, time.time()
        return results

    async def _retry_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), RETRY_EVERY_S)
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
        if self._js is None or not self._ready:
            await self._connect()
        assert self._js is not None
        out: dict[str, Change] = {}
        async for batch in states(self._js, self.node_id, self.cfg.timeout_s, START_LIST_ATTEMPTS):
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
            "unreplicated": sum(1 for c in self._owed.values() if c.state == PENDING),
            "owed_changes": sum(1 for c in self._owed.values() if c.state != PENDING),
        }

    @property
    def unreplicated_count(self) -> int:
        return sum(1 for c in self._owed.values() if c.state == PENDING)


__all__ = ["DELIVERED", "Replicator"]
