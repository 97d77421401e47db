"""Re-delivery of pending/ files once a cluster is back.

Woken by a health transition, by a new file in pending/ (watchfiles), by the
intake, and by a periodic rescan. Each file is claimed (flock) before it is
delivered, so the agent and ``edge-recover`` never race on one order. Paced by
``buffer.drain_rate_per_s``; slows down on 429/503; backs off with jitter
while the center keeps failing; oldest serial first.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Generator
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import backoff
import watchfiles

from agent.config import BufferSection
from agent.errors import CorruptRecordError, UpstreamError
from agent.service.metrics import Metrics
from agent.service.watched_loop import WatchedLoop
from agent.spool.buffer import (
    BufferDirs,
    PendingRecord,
    already_merged,
    drop_pending_copy,
    finish_merged,
    is_order_file,
    list_pending,
    quarantine,
    strip_added_keys,
    try_claim,
)
from agent.spool.writer import PendingSpool
from agent.state.journal import MERGED, REJECTED, Journal
from agent.upstream.answers import SLOW_DOWN_STATUSES, Outcome
from agent.upstream.client import UpstreamClient

log = logging.getLogger("agent.drain")
T = TypeVar("T")

# Returns (cluster name, base URL) to deliver to, or None while none is usable.
TargetPicker = Callable[[], tuple[str, str] | None]
# True for a serial the intake is still writing (its journal row is not there yet).
BusyCheck = Callable[[str], bool]


async def _finish_in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run a file move in a thread; on cancellation wait for it before unwinding.

    A move must never be half-abandoned by a cancelled task: the claim (the fd
    holding the flock) is released only after the thread is done with it.
    """
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait({fut})
        raise


def _added_order(change: watchfiles.Change, path: str) -> bool:
    return change == watchfiles.Change.added and is_order_file(os.path.basename(path))


def _parse(data: bytes, name: str) -> PendingRecord:
    """The record, also from a file whose keys edge-recover was adding when it died."""
    try:
        return PendingRecord.from_bytes(data, origin=f"pending/{name}")
    except CorruptRecordError:
        original = strip_added_keys(data)
        if original is None:
            raise
        return PendingRecord.from_bytes(original, origin=f"pending/{name}")


class Result(enum.Enum):
    DONE = "done"            # left pending/ (merged or quarantined)
    SKIPPED = "skipped"      # gone, or claimed by another process
    RETRY = "retry"          # 409/429/...: this file later
    FAILING = "failing"      # the center is failing: stop this pass, back off


def _delays() -> Generator[float, None, None]:
    """Exponential backoff between failing passes: 0.5 s doubling to 60 s."""
    gen: Generator[float, None, None] = backoff.expo(base=2, factor=0.5, max_value=60)
    next(gen)  # backoff's wait generators yield None first, to be primed
    return gen


class Pacer:
    """Spaces requests at ``rate``/s; halves the rate on 429/503, recovers slowly."""

    def __init__(self, rate: float) -> None:
        self.base_rate = rate
        self.rate = rate
        self._next = time.monotonic()
        self._paused_until = 0.0

    async def wait(self, n: int = 1) -> None:
        """Wait for the turn of the next request, which carries ``n`` orders."""
        now = time.monotonic()
        at = max(self._next, self._paused_until, now)
        self._next = at + n / self.rate
        if at > now:
            await asyncio.sleep(at - now)

    def slow_down(self, retry_after_s: float | None) -> None:
        self.rate = max(1.0, self.rate / 2)
        if retry_after_s:
            self._paused_until = max(self._paused_until, time.monotonic() + retry_after_s)

    def speed_up(self) -> None:
        self.rate = min(self.base_rate, self.rate * 1.02 + 0.5)


class Drainer:
    """Owns the drain loop and the pending/ watcher."""

    def __init__(self, settings: BufferSection, timeout_s: float, dirs: BufferDirs,
                 journal: Journal, spool: PendingSpool, upstream: UpstreamClient,
                 pick_target: TargetPicker, metrics: Metrics,
                 busy: BusyCheck = lambda serial: False) -> None:
        self._settings = settings
        self.timeout_s = timeout_s
        self._dirs = dirs
        self._journal = journal
        self._spool = spool
        self._upstream = upstream
        self._pick_target = pick_target
        self._busy = busy
        self._metrics = metrics
        self._pacer = Pacer(settings.drain_rate_per_s)
        self._active: set[str] = set()
        self._delays = _delays()
        self._loop = WatchedLoop("drain", self._round, dirs.pending, _added_order,
                                 settings.scan_interval_s)
        self.passes = 0

    def kick(self) -> None:
        self._loop.kick()

    def online(self, on: bool) -> None:
        """A cluster to deliver to came or went: watch pending/ only while one is there
        (the agent's own writes while offline would wake the watch for nothing)."""
        self._loop.watching(on)
        if on:
            self.kick()

    async def start(self) -> None:
        await self._loop.start(watching=self._pick_target() is not None)

    async def stop(self) -> None:
        await self._loop.stop()

    async def _round(self) -> None:
        target = self._pick_target()
        if target is None:
            return  # a health transition kicks us when the primary is back
        try:
            clean = await self._pass(*target)
        finally:
            self.passes += 1
        if clean:
            self._delays = _delays()
            return
        await asyncio.sleep(backoff.full_jitter(next(self._delays)))
        self.kick()

    async def _pass(self, cluster: str, base: str) -> bool:
        """Deliver every pending file once; False if some must be tried again."""
        queue = deque(await asyncio.to_thread(list_pending, self._dirs))
        if not queue:
            return True
        log.info("drain pass to %s: %d pending", cluster, len(queue))
        failing = False
        clean = True

        async def worker() -> None:
            nonlocal failing, clean
            while queue and not failing:
                name, size = queue.popleft()
                if name in self._active:
                    continue
                await self._pacer.wait()
                result = await self.deliver(name, size, cluster, base)
                if result is Result.FAILING:
                    failing, clean = True, False
                elif result is Result.RETRY:
                    clean = False

        workers = min(self._settings.drain_concurrency, len(queue))
        await asyncio.gather(*(worker() for _ in range(workers)))
        return clean

    async def deliver(self, name: str, size: int, cluster: str, base: str) -> Result:
        path = self._dirs.pending / name
        if self._busy(name.removesuffix(".json")):
            return Result.RETRY
        claim = await asyncio.to_thread(try_claim, path)
        if claim is None:
            return Result.SKIPPED
        self._active.add(name)
        try:
            merged = await asyncio.to_thread(already_merged, self._dirs, name)
            if merged is not None:  # a crash came between the merged/ copy and the unlink
                await _finish_in_thread(drop_pending_copy, claim)
                self._spool.released(size)
                await self._journal.mark(name.removesuffix(".json"), MERGED,
                                         merged.get("cluster"), merged.get("order_id"))
                return Result.DONE
            try:
                record = _parse(claim.data, name)
            except CorruptRecordError as exc:
                await self._quarantine(path, size, "corrupt", {"error": str(exc)})
                return Result.DONE
            try:
                answer = await self._upstream.post_order(
                    base, record.raw_body, record.dedupe_key, record.serial, self.timeout_s
                )
            except UpstreamError as exc:
                log.info("delivery of %s failed: %s", record.serial, exc)
                self._metrics.deliveries.labels(cluster=cluster, outcome="transient").inc()
                return Result.FAILING
            outcome = answer.outcome
            self._metrics.deliveries.labels(cluster=cluster, outcome=outcome.value).inc()
            if answer.status in SLOW_DOWN_STATUSES:
                self._pacer.slow_down(answer.retry_after_s)
            if outcome.delivered:
                await _finish_in_thread(finish_merged, self._dirs, claim, record,
                                        answer.order_id, cluster)
                self._spool.released(size)
                self._pacer.speed_up()
                self._observe_latency(record.received_at)
                await self._journal.mark(record.serial, MERGED, cluster, answer.order_id)
                return Result.DONE
            if outcome.permanent:
                await self._quarantine(path, size, outcome.value, {
                    "status": answer.status, "error": answer.error, "serial": record.serial,
                    "dedupe_key": record.dedupe_key, "cluster": cluster,
                })
                await self._journal.mark(record.serial, REJECTED, cluster)
                return Result.DONE
            if outcome is Outcome.RETRY:
                return Result.RETRY
            return Result.FAILING
        finally:
            claim.release()
            self._active.discard(name)

    async def _quarantine(self, path: Path, size: int, reason: str,
                          details: dict[str, object]) -> None:
        await _finish_in_thread(quarantine, self._dirs, path, {"reason": reason, **details})
        self._spool.released(size)
        self._metrics.quarantined.labels(reason=reason).inc()
        log.warning("quarantined %s to rejected/: %s", path.name, reason,
                    extra={"file": path.name, "reason": reason})

    def _observe_latency(self, received_at: str) -> None:
        try:
            received = datetime.fromisoformat(received_at).timestamp()
        except ValueError:
            return
        self._metrics.delivery_latency.observe(max(0.0, time.time() - received))
