"""The merge engine: plan rows in, claimed batches out to workers, settled orders to the finisher.

Passes, each a bounded pipeline (producer thread -> queue -> ``concurrency``
workers -> finisher):

1. group winners (rank 1 of their dedupe key) and corrupt files;
2. files another process held during pass 1, retried until released or
   ``held_wait_s`` passed (the merge is the one that waits: it never blocks
   the agent's drain; the agent just skips files the merge holds);
3. losers of dedupe groups, now that the winners' outcomes are checkpointed;
4. held losers, as in 2.

Stopping (SIGINT/SIGTERM): no new batches; requests already sent finish and
are settled; claimed but unsent files are released untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from agent.errors import PersistError, UpstreamAmbiguous, UpstreamError
from agent.spool.files import replace_durably
from agent.spool.record import BufferDirs
from agent.upstream.answers import Answer, Outcome
from recovery.checkpoint import ResultRow
from recovery.decide import Decision, Held, Work, decide
from recovery.finisher import NOTE, Finisher, Settled
from recovery.plan import Plan, PlanRow
from recovery.sender import Sender

log = logging.getLogger("recovery.merge")

MAX_TRANSIENT = 8     # 5xx / timeouts per order: ~1 minute of backoff in all
MAX_RETRIES = 30      # 408/409/425/429 per order, each after Retry-After (default 1 s)


@dataclass(frozen=True)
class MergeOptions:
    root: Path
    target: str
    node: str
    concurrency: int = 32
    batch: int = 100
    held_wait_s: float = 30.0
    cluster: str | None = None  # the target's cluster: an unclear answer pins orders to it


class Merger:
    def __init__(self, opts: MergeOptions, plan: Plan, sender: Sender, finisher: Finisher,
                 stop: asyncio.Event) -> None:
        self._opts = opts
        self._dirs = BufferDirs(opts.root)
        self._plan = plan
        self._sender = sender
        self._finisher = finisher
        self._stop = stop
        self.transient_failures = 0
        self.gave_up = 0  # orders left because the center kept failing
        self._claimers = ThreadPoolExecutor(2, thread_name_prefix="claim")

    async def run(self) -> None:
        try:
            for winners in (True, False):
                held = await self._pass(self._plan.rows(winners))
                await self._retry_held(held)
                if self._stop.is_set():
                    return
        finally:
            self._claimers.shutdown(wait=True)

    async def _retry_held(self, ids: list[int]) -> None:
        deadline = time.monotonic() + self._opts.held_wait_s
        while ids and not self._stop.is_set():
            if time.monotonic() > deadline:
                rows = self._plan.rows_by_id(ids)
                await self._finisher.put([_held_too_long(r) for r in rows])
                await self._finisher.drain()
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.2)
            rows = await asyncio.to_thread(self._plan.rows_by_id, ids)
            ids = await self._pass(iter([rows]))

    async def _pass(self, chunks: Iterator[list[PlanRow]]) -> list[int]:
        """Run one pipeline over ``chunks``; return the ids of files someone else held."""
        # A short queue: enough to keep the workers fed, few claims (open files) waiting.
        queue: asyncio.Queue[list[Work] | None] = asyncio.Queue(
            max(2, self._opts.concurrency // 4))
        workers = [asyncio.create_task(self._worker(queue), name=f"merge-worker-{i}")
                   for i in range(self._opts.concurrency)]
        held: list[int] = []
        batch: list[Work] = []
        loop = asyncio.get_running_loop()
        deciding: deque[asyncio.Future[list[Decision]]] = deque()
        try:
            while not self._stop.is_set():
                # Two chunks are claimed at once (claims are mostly syscalls).
                while len(deciding) < 2 and (
                        rows := await asyncio.to_thread(next, chunks, None)) is not None:
                    deciding.append(loop.run_in_executor(self._claimers, self._decide_all,
                                                         rows))
                if not deciding:
                    break
                decisions = await deciding.popleft()
                settled = [d for d in decisions if isinstance(d, Settled)]
                held.extend(d.row.id for d in decisions if isinstance(d, Held))
                await self._finisher.put(settled)
                for d in decisions:
                    if isinstance(d, Work):
                        batch.append(d)
                        if len(batch) >= self._batch_size():
                            await queue.put(batch)
                            batch = []
            if batch:
                await queue.put(batch)
                batch = []
        finally:
            for w in batch:
                w.claim.release()
            for fut in deciding:  # claimed but never queued (stopped): release
                for d in await fut:
                    if isinstance(d, Work):
                        d.claim.release()
                    elif isinstance(d, Settled):
                        await self._finisher.put([d])
            for _ in workers:
                await queue.put(None)
            await asyncio.gather(*workers)
            await self._finisher.drain()
        return held

    def _batch_size(self) -> int:
        return self._opts.batch if self._sender.bulk is not False else 1

    def _decide_all(self, rows: list[PlanRow]) -> list[Decision]:
        one = partial(decide, self._opts.root, self._dirs, self._opts.node, self._opts.target)
        return [one(row) for row in rows]

    async def _worker(self, queue: asyncio.Queue[list[Work] | None]) -> None:
        while (batch := await queue.get()) is not None:
            if self._stop.is_set():
                for w in batch:
                    w.claim.release()  # never sent: left untouched for the next run
                continue
            if len(batch) > 1 and self._sender.bulk is False:
                # Formed before the probe said "no bulk": send them singly, in parallel.
                await asyncio.gather(*(self._deliver([w]) for w in batch))
            else:
                await self._deliver(batch)

    async def _deliver(self, todo: list[Work]) -> None:
        attempt = 0
        while todo:
            results = await self._sender.send([w.item for w in todo])
            settled: list[Settled] = []
            again: list[Work] = []
            wait_s = 0.0
            for work, res in zip(todo, results, strict=True):
                if _unclear(res):
                    await self._pin(work)
                verdict = self._judge(work, res)
                if isinstance(verdict, Settled):
                    settled.append(verdict)
                else:
                    again.append(work)
                    wait_s = max(wait_s, verdict)
            await self._finisher.put(settled)
            if not again:
                return
            attempt += 1
            if self._stop.is_set() or await self._sleep(wait_s, attempt):
                await self._finisher.put([w.left("interrupted before the center confirmed it")
                                          for w in again])
                return
            todo = again

    def _judge(self, work: Work, res: Answer | UpstreamError) -> Settled | float:
        """The settled order, or how long to wait before sending it again."""
        target = self._opts.target
        if isinstance(res, UpstreamError) or res.outcome is Outcome.UNCLEAR:
            work.transient += 1
            self.transient_failures += 1
            error = str(res) if isinstance(res, UpstreamError) else \
                f"HTTP {res.status}: {res.error}"
            if work.transient >= MAX_TRANSIENT:
                self.gave_up += 1
                return work.left(f"center kept failing: {error}")
            if isinstance(res, Answer) and res.retry_after_s is not None:
                return res.retry_after_s
            return 0.0
        outcome = res.outcome
        if outcome.delivered:
            return work.merged(outcome.value, res.order_id, target)
        if outcome.permanent:
            error = f"HTTP {res.status}: {res.error or 'no reason given'}"
            return work.quarantined(outcome.value, error, {"status": res.status,
                                                           "target": target})
        if outcome is Outcome.REFUSED:  # the target refuses us, not the order: keep it
            return work.left(f"the target refuses edge-recover (HTTP {res.status}: "
                             f"{res.error or 'no reason'}); check its credentials and route")
        work.retries += 1  # Outcome.RETRY: 408/425/429/503
        if work.retries >= MAX_RETRIES:
            return work.left(f"center kept answering HTTP {res.status}")
        return res.retry_after_s if res.retry_after_s is not None else 1.0

    async def _pin(self, work: Work) -> None:
        """The target may hold this order now: pin the file to its cluster (CONTRACT 5),
        so the agent's drain never sends it to the other one."""
        cluster = self._opts.cluster
        if cluster is None or work.raw or work.record.pinned_to == cluster:
            return
        record = work.record.pinned(cluster)
        data = record.to_bytes()
        try:
            fd = await asyncio.to_thread(replace_durably, work.claim.path, data)
        except PersistError as exc:
            log.error("could not pin %s to %s: %s", record.serial, cluster, exc)
            return
        work.claim.replaced(fd, data)
        work.record = record

    async def _sleep(self, at_least_s: float, attempt: int) -> bool:
        """Back off (exponential, full jitter, at least Retry-After); True if stopped."""
        delay = max(at_least_s, random.uniform(0, min(30.0, 0.25 * 2 ** attempt)))
        try:
            await asyncio.wait_for(self._stop.wait(), delay)
        except TimeoutError:
            return False
        return True


def _unclear(res: Answer | UpstreamError) -> bool:
    """Sent, and no clear answer: the target may have created the order."""
    if isinstance(res, UpstreamError):
        return isinstance(res, UpstreamAmbiguous)
    return res.outcome.pins


def _held_too_long(row: PlanRow) -> Settled:
    return Settled(ResultRow(row.serial or row.file, row.key, row.file, "pending",
                             error="held by another process (the agent?) for the whole "
                                   "wait; run again"), NOTE)

