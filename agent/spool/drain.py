"""Re-delivery of pending/ files once a cluster can take orders.

Woken by a health transition, by a new file in pending/ (watchfiles), by the
intake, and by a periodic rescan. Each file is claimed before it is delivered
(the spool's ``claim()``), so the agent and ``edge-recover`` never race on one
order. Where a file goes follows CONTRACT 5: a pinned order only to its
cluster; an unpinned one to the primary, else to the standby when
``buffer.drain_to_standby``. Before an unpinned order is sent, the journal
durably notes the cluster (a crash mid-send pins it at start-up); an attempt
that ends unclear pins the file itself. Paced by ``buffer.drain_rate_per_s``;
slows down on 429/503; backs off with jitter while a cluster keeps failing;
oldest serial first. A failure to move one file never stops the others.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import watchfiles

from agent.base.metrics import Metrics
from agent.base.tasks import wait_set
from agent.base.watched_loop import WatchedLoop
from agent.config import BufferSection
from agent.delivery.decide import Caller, Step, decide
from agent.delivery.pacing import Backoff, Pacer
from agent.delivery.targets import same_target
from agent.errors import PersistError, UnreadableFile, UpstreamError
from agent.spool.moves import MergedState
from agent.spool.record import PendingRecord, is_order_file
from agent.spool.writer import Held, PendingSpool
from agent.state.journal import MERGED, REJECTED, Journal
from agent.upstream.answers import Answer
from agent.upstream.client import UpstreamClient

log = logging.getLogger("agent.drain")
PASS_BACKOFF_BASE_S = 0.5  # between failing passes: 0.5 s doubling to 60 s, full jitter
PASS_BACKOFF_MAX_S = 60.0

# The clusters that can take orders now: name -> base URL.
Usable = Callable[[], dict[str, str]]
# Told when a cluster refuses the agent (401/403/404/405/407) or takes an order again.
RefusalSink = Callable[[str, Answer | None], None]
# True for a serial the intake is still writing (its journal row is not there yet).
BusyCheck = Callable[[str], bool]
# Writes an order's later state to the replica before it is final here (CONTRACT 11):
# (record, "pinned" | "delivered" | "rejected", order_id, cluster) -> written now?
ChangeSink = Callable[[PendingRecord, str, Any, str | None], Awaitable[bool]]
# Told of each order delivered (record, order_id, cluster); returns at once.
MergedSink = Callable[[PendingRecord, Any, str], None]


def _added_order(change: watchfiles.Change, path: str) -> bool:
    return change == watchfiles.Change.added and is_order_file(os.path.basename(path))


class Result(enum.Enum):
    DONE = "done"  # left pending/ (merged or quarantined)
    SKIPPED = "skipped"  # gone, claimed by another process, or waiting for its cluster
    RETRY = "retry"  # 409/429/...: this file later
    FAILING = "failing"  # the cluster is failing or refusing us: stop sending to it


class Drainer:
    """Owns the drain loop and the pending/ watcher."""

    def __init__(
        self,
        settings: BufferSection,
        timeout_s: float,
        spool: PendingSpool,
        journal: Journal,
        upstream: UpstreamClient,
        usable: Usable,
        refusals: RefusalSink,
        metrics: Metrics,
        busy: BusyCheck = lambda serial: False,
        on_merged: MergedSink | None = None,
        on_change: ChangeSink | None = None,
    ) -> None:
        self._settings = settings
        self.timeout_s = timeout_s
        self._spool = spool
        self._journal = journal
        self._upstream = upstream
        self._usable = usable
        self._refusals = refusals
        self._busy = busy
        self._on_merged = on_merged
        self._on_change = on_change
        self._metrics = metrics
        self._pacer = Pacer(settings.drain_rate_per_s)
        self._active: set[str] = set()
        self._pins: dict[str, str] = {}  # pins the file could not take (disk full)
        self._unreadable: dict[str, str] = {}  # name -> the trouble already logged
        self._wake = asyncio.Event()  # a cluster came back: cut the backoff short
        self._backoff = Backoff(PASS_BACKOFF_BASE_S, PASS_BACKOFF_MAX_S)
        self._loop = WatchedLoop(
            "drain", self._round, spool.dirs.pending, _added_order, settings.scan_interval_s
        )
        self.passes = 0

    def kick(self) -> None:
        self._loop.kick()

    def online(self, on: bool) -> None:
        """A cluster to deliver to came or went: watch pending/ only while one is there
        (the agent's own writes while offline would wake the watch for nothing)."""
        self._loop.watching(on)
        if on:
            self._wake.set()
            self.kick()

    async def start(self) -> None:
        await self._loop.start(watching=bool(self._usable()))

    async def stop(self) -> None:
        await self._loop.stop()

    def target(self, record: PendingRecord, usable: dict[str, str]) -> str | None:
        """Where this order may go now (CONTRACT 5), or None: it waits."""
        pinned = record.pinned_to or self._pins.get(record.serial)
        if pinned is not None:  # only its own target; a URL pin names one, if it is ours
            return next(
                (name for name, url in usable.items() if same_target(pinned, name, url)), None
            )
        if "primary" in usable:
            return "primary"
        if self._settings.drain_to_standby and "standby" in usable:
            return "standby"
        return None

    async def _round(self) -> None:
        if not self._usable():
            await self._spool.listing()  # keep the count true while nothing drains
            return  # a health transition kicks us when a cluster is back
        try:
            clean = await self._pass()
        finally:
            self.passes += 1
        if clean:
            self._backoff.reset()
            return
        self._wake.clear()
        await wait_set(self._wake, self._backoff.next())
        self.kick()

    async def _pass(self) -> bool:
        """Deliver every pending file once; False if some must be tried again soon."""
        queue = deque(await self._spool.listing())
        if not queue:
            return True
        log.info("drain pass: %d pending", len(queue))
        failing: set[str] = set()
        clean = True

        async def worker() -> None:
            nonlocal clean
            while queue:
                name, size = queue.popleft()
                if name in self._active:
                    continue
                try:
                    result = await self.deliver(name, size, failing)
                except PersistError as exc:  # one file's trouble never stops the others
                    log.error("could not finish %s: %s; it stays in pending/", name, exc)
                    result = Result.RETRY
                if result in (Result.RETRY, Result.FAILING):
                    clean = False

        async with asyncio.TaskGroup() as group:  # one worker failing stops the others
            for _ in range(min(self._settings.drain_concurrency, len(queue))):
                group.create_task(worker())
        return clean

    async def deliver(self, name: str, size: int, failing: set[str] | None = None) -> Result:
        failing = set() if failing is None else failing
        if self._busy(name.removesuffix(".json")):
            return Result.RETRY
        try:
            async with self._spool.claim(name, size) as held:
                if held is None:
                    return Result.SKIPPED
                self._unreadable.pop(name, None)
                self._active.add(name)
                try:
                    return await self._deliver_held(held, failing)
                finally:
                    self._active.discard(name)
        except UnreadableFile as exc:
            # Not ours to move (it may be an order): it stays, said once per trouble.
            if self._unreadable.get(name) != str(exc):
                self._unreadable[name] = str(exc)
                log.error("pending file not delivered: %s", exc, extra={"file": name})
            return Result.SKIPPED

    async def _deliver_held(self, held: Held, failing: set[str]) -> Result:
        state = await held.merged_copy()
        if state is MergedState.OTHER:
            await held.quarantined(
                "name_clash",
                {
                    "error": f"merged/{held.name} holds a different order; this one was "
                    "never confirmed by the center",
                    "corrupt": held.corrupt,
                },
            )
            return Result.DONE
        if held.record is None:
            await held.quarantined(held.problem, {"error": held.corrupt})
            return Result.DONE
        record = held.record
        if state is MergedState.SAME:  # a crash came between the merged/ copy and the unlink
            await self._changed(record, "delivered", None, "unknown")
            await held.delivered(None, "unknown")
            await self._journal.mark(record.serial, MERGED)
            return Result.DONE
        usable = self._usable()
        cluster = self.target(record, usable)
        if cluster is None:
            return Result.SKIPPED  # its cluster is down: a health transition kicks us
        if cluster in failing:
            return Result.FAILING
        if record.pinned_to is None and record.serial not in self._pins:
            # A crash mid-send must leave it pinned: note the cluster durably first.
            await self._journal.intend(record.serial, cluster)
        await self._pacer.wait()
        result: Answer | UpstreamError
        try:
            result = await self._upstream.post_order(
                usable[cluster], record.raw_body, record.dedupe_key, record.serial, self.timeout_s
            )
        except UpstreamError as exc:
            result = exc
        return await self._settle(held, record, cluster, result, failing)

    async def _settle(
        self,
        held: Held,
        record: PendingRecord,
        cluster: str,
        result: Answer | UpstreamError,
        failing: set[str],
    ) -> Result:
        action = decide(result, Caller.DRAIN, cluster)
        self._metrics.deliveries.labels(cluster=cluster, outcome=action.outcome).inc()
        answer = result if isinstance(result, Answer) else None
        if action.slow_down and answer is not None:
            self._pacer.slow_down(answer.retry_after_s)
        if action.refusing:
            self._refusals(cluster, answer)
        elif answer is not None:
            self._refusals(cluster, None)  # it answered: it takes orders again
        if action.pin:
            await self._pin(held, cluster, action.reason)
        elif action.created_nothing:
            self._unintend(record)
        if action.step is Step.MERGE and answer is not None:
            await self._changed(record, "delivered", answer.order_id, cluster)
            await held.delivered(answer.order_id, cluster)
            self._pacer.speed_up()
            self._observe_latency(record.received_at)
            await self._journal.mark(record.serial, MERGED, cluster, answer.order_id)
            if self._on_merged is not None:
                self._on_merged(record, answer.order_id, cluster)
            return Result.DONE
        if action.step is Step.QUARANTINE and answer is not None:
            self._metrics.quarantined.labels(reason=action.outcome).inc()
            await self._changed(record, "rejected", None, cluster)
            await held.quarantined(
                action.outcome,
                {
                    "status": answer.status,
                    "error": answer.error,
                    "serial": record.serial,
                    "dedupe_key": record.dedupe_key,
                    "cluster": cluster,
                },
            )
            await self._journal.mark(record.serial, REJECTED, cluster)
            return Result.DONE
        log.info("delivery of %s to %s: %s", record.serial, cluster, action.reason)
        if action.hold:
            failing.add(cluster)
            return Result.FAILING
        return Result.RETRY

    def _unintend(self, record: PendingRecord) -> None:
        """A clear refusal: the note written before the send pins nothing (a pinned
        order keeps its pin: only a clear answer from its own cluster frees it)."""
        if record.pinned_to is None and record.serial not in self._pins:
            self._journal.intend_soon(record.serial, None)

    async def _pin(self, held: Held, cluster: str, why: str) -> None:
        """Rewrite the record pinned to ``cluster``; the journal intent covers a failure."""
        serial = held.name.removesuffix(".json")
        try:
            await held.pin(cluster, why)
            if held.record is not None:
                await self._changed(held.record, "pinned", None, cluster)
        except PersistError as exc:
            self._pins[serial] = cluster
            log.error(
                "could not pin %s to %s in its file (%s); held in memory and in the journal",
                serial,
                cluster,
                exc,
            )
        await self._journal.intend(serial, cluster)

    async def _changed(
        self, record: PendingRecord, state: str, order_id: Any, cluster: str | None
    ) -> None:
        """The replica learns the new state first; one it could not take now is written
        later by the replicator (shown in /status), and the local step goes ahead."""
        if self._on_change is not None:
            await self._on_change(record, state, order_id, cluster)

    def _observe_latency(self, received_at: str) -> None:
        try:
            received = datetime.fromisoformat(received_at).timestamp()
        except ValueError:
            return
        self._metrics.delivery_latency.observe(max(0.0, time.time() - received))
