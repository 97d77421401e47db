"""The merge engine: files streamed in order, claimed in chunks, sent in batches, settled.

Passes, each a bounded pipeline (claim thread -> queue -> ``concurrency``
workers -> finisher), the first one starting as soon as pending/ is listed:

1. pending/ in name (= serial) order, then loose files (record files by
   serial, then raw order objects): each file is claimed and read once; the
   first file of each dedupe key is sent, a later one is deferred
   (``recovery.ranking``);
2. files another process held during pass 1, retried until released or
   ``held_wait_s`` passed (the merge is the one that waits: it never blocks
   the agent's drain; the agent just skips files the merge holds);
3. the deferred losers, now that their winners' outcomes are checkpointed;
4. held losers, as in 2.

Stopping (SIGINT/SIGTERM): no new batches; requests already sent finish and
are settled; claimed but unsent files are released untouched.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from agent.base.tasks import wait_set
from agent.delivery.decide import Action, Caller, Kind, Step
from agent.delivery.decide import decide as decide_answer
from agent.delivery.pacing import delay
from agent.delivery.targets import may_send
from agent.errors import PersistError, ReplicaError, UpstreamError
from agent.spool.record import BufferDirs
from agent.upstream.answers import Answer
from recovery.checkpoint import ResultRow
from recovery.decide import Decision, Held, Opened, Work, decide
from recovery.finisher import NOTE, Finisher, Settled
from recovery.item import Item
from recovery.origin import DirectorySource, Source
from recovery.ranking import Facts, Ranker
from recovery.sender import NotSent, Sender
from recovery.source import Found, rank_key

log = logging.getLogger("recovery.merge")

CHUNK = 256  # files claimed per hop to the claim thread
NO_FACTS = Facts()


@dataclass(frozen=True)
class MergeOptions:
    root: Path
    target: str
    node: str
    concurrency: int = 32
    batch: int = 100
    held_wait_s: float = 30.0
    cluster: str | None = None  # the target's configured cluster, if it is one
    pin: str = ""  # what an unclear answer pins orders to: that cluster, else the target URL


ChunkFn = Callable[[list[Item]], list[Decision]]


class Merger:
    def __init__(
        self,
        opts: MergeOptions,
        ranker: Ranker,
        sender: Sender,
        finisher: Finisher,
        stop: asyncio.Event,
        files: Executor,
        source: Source | None = None,
    ) -> None:
        """``files``: the one thread of the merge's file and checkpoint steps, shared with
        the finisher and owned by the caller (``recovery.app``)."""
        self._opts = opts
        self._source = source if source is not None else DirectorySource(opts.root, opts.node)
        self._dirs = BufferDirs(opts.root)
        self._ranker = ranker
        self._sender = sender
        self._finisher = finisher
        self._stop = stop
        self.transient_failures = 0
        self.gave_up = 0  # orders left because the center kept failing
        self.held_elsewhere: list[Found] = []  # pinned to another cluster: not sent here
        self._pending: Iterable[Item] | None = None
        self._loose: list[Found] = []
        # One thread: files are ranked in the order they are met.
        self._claimer = files

    async def prepare(self) -> int:
        """List pending/ and read the loose files (few, as a rule); the number of files."""
        self._loose, self._pending, count = await asyncio.to_thread(self._list)
        return len(self._loose) + count

    def _list(self) -> tuple[list[Found], Iterable[Item], int]:
        loose, pending, count = self._source.list()
        # Only record files may take a key from pending/: a raw object never outranks
        # an order an agent acknowledged (``rank_key``).
        self._ranker.add_loose(
            [
                (f.key, f.serial, f.file)
                for f in loose
                if f.key is not None
                and f.serial is not None
                and not f.raw
                and self._admitted(f.pinned_to)
            ]
        )
        loose.sort(key=lambda f: rank_key(f.raw, f.serial or "", f.file))
        return loose, pending, count

    async def run(self) -> None:
        if self._pending is None:
            raise RuntimeError("Merger.prepare() must be awaited before run()")
        loose = (Item(f.file, True) for f in self._loose)
        held = await self._pass(_chunks(self._pending), lambda c: self._first(c, True))
        held += await self._pass(_chunks(loose), lambda c: self._first(c, False))
        await self._retry_held(held)
        if self._stop.is_set():
            return
        held = await self._pass(self._ranker.losers(CHUNK), self._again)
        await self._retry_held(held)

    def _admitted(self, pinned_to: str | None) -> bool:
        """Unpinned, or pinned to this target's cluster. An order pinned to another
        cluster may already exist there; sending it here could create it twice."""
        return may_send(pinned_to, self._opts.cluster, self._opts.target)

    def _first(self, items: list[Item], pending: bool) -> list[Decision]:
        """Claim, rank and decide a chunk of files met for the first time."""
        out: list[Decision] = []
        opened = self._open(items, out)
        ranked = [o.row for o in opened if o.row.key is not None and o.row.serial is not None]
        entries = [(r.key or "", r.serial or "", r.file) for r in ranked]
        for row, (winner, wins) in zip(ranked, self._ranker.rank(entries, pending), strict=True):
            row.winner, row.wins = winner, wins
        self._ranker.defer(self._decide(opened, out))
        return out

    def _again(self, items: list[Item]) -> list[Decision]:
        """Claim and decide files already ranked: held ones, deferred losers."""
        out: list[Decision] = []
        for row in self._decide(self._open(items, out), out):
            out.append(
                Settled(
                    ResultRow(
                        row.ref,
                        row.key,
                        row.file,
                        "pending",
                        error=f"waits for serial {row.winner} (same dedupe key) to be confirmed",
                    ),
                    NOTE,
                )
            )
        return out

    def _open(self, items: list[Item], out: list[Decision]) -> list[Opened | Held]:
        """Claim and read each file; settled ones go to ``out``, files pinned to another
        cluster to ``held_elsewhere``."""
        opened: list[Opened | Held] = []
        for item in items:
            o = self._source.open(item)
            if isinstance(o, Settled):
                out.append(o)
            elif self._admitted(item.pinned_to):
                opened.append(o)
            else:
                if isinstance(o, Opened):
                    o.claim.release()
                self.held_elsewhere.append(
                    Found(item.file, item.loose, item.serial, item.key, None, None, item.pinned_to)
                )
        return opened

    def _decide(self, opened: list[Opened | Held], out: list[Decision]) -> list[Item]:
        """Append each decision to ``out``; return the losers whose winner is unconfirmed."""
        rows = [o.row for o in opened]
        by_serial, by_key = self._ranker.facts(
            [r.serial for r in rows if r.serial is not None]
            + [r.winner for r in rows if r.winner is not None and not r.wins],
            [r.key for r in rows if r.key is not None],
        )
        waiting: list[Item] = []
        for o in opened:
            if isinstance(o, Held):
                out.append(o)
                continue
            row = o.row
            winner = by_serial.get(row.winner or "", NO_FACTS) if not row.wins else NO_FACTS
            d = decide(
                self._dirs,
                self._opts.node,
                self._opts.target,
                o,
                by_serial.get(row.serial or "", NO_FACTS),
                by_key.get(row.key or "", NO_FACTS),
                winner.own_outcome,
            )
            if d is None:
                o.claim.release()
                waiting.append(row)
            else:
                out.append(d)
        return waiting

    async def _retry_held(self, items: list[Item]) -> None:
        deadline = time.monotonic() + self._opts.held_wait_s
        while items and not self._stop.is_set():
            if time.monotonic() > deadline:
                await self._finisher.put([_held_too_long(r) for r in items])
                await self._finisher.drain()
                return
            await wait_set(self._stop, 0.2)
            items = await self._pass(_chunks(items), self._again)

    async def _pass(self, chunks: Iterator[list[Item]], decide_chunk: ChunkFn) -> list[Item]:
        """Run one pipeline over ``chunks``; return the files someone else held."""
        # A short queue: enough to keep the workers fed, few claims (open files) waiting.
        queue: asyncio.Queue[list[Work] | None] = asyncio.Queue(max(2, self._opts.concurrency // 4))
        held: list[Item] = []
        batch: list[Work] = []
        loop = asyncio.get_running_loop()
        deciding: deque[asyncio.Future[list[Decision] | None]] = deque()

        def next_chunk() -> list[Decision] | None:
            items = next(chunks, None)
            return None if items is None else decide_chunk(items)

        try:
            # A worker that fails ends the pass: the others are cancelled, not left running.
            async with asyncio.TaskGroup() as workers:
                for i in range(self._opts.concurrency):
                    workers.create_task(self._worker(queue), name=f"merge-worker-{i}")
                try:
                    while not self._stop.is_set():
                        # Two chunks in flight: one claimed while the other's batches are sent.
                        while len(deciding) < 2:
                            deciding.append(loop.run_in_executor(self._claimer, next_chunk))
                        decisions = await deciding.popleft()
                        if decisions is None:
                            break
                        settled = [d for d in decisions if isinstance(d, Settled)]
                        held.extend(d.row for d in decisions if isinstance(d, Held))
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
                        for d in await fut or ():
                            if isinstance(d, Work):
                                d.claim.release()
                            elif isinstance(d, Settled):
                                await self._finisher.put([d])
                for _ in range(self._opts.concurrency):
                    await queue.put(None)
        finally:
            await self._finisher.drain()
        return held

    def _batch_size(self) -> int:
        return self._opts.batch if self._sender.bulk is not False else 1

    async def _worker(self, queue: asyncio.Queue[list[Work] | None]) -> None:
        while (batch := await queue.get()) is not None:
            if self._stop.is_set():
                for w in batch:
                    w.claim.release()  # never sent: left untouched for the next run
                continue
            if len(batch) > 1 and self._sender.bulk is False:
                # Formed before the probe said "no bulk": send them singly, in parallel.
                async with asyncio.TaskGroup() as singles:
                    for w in batch:
                        singles.create_task(self._deliver([w]))
            else:
                await self._deliver(batch)

    async def _deliver(self, todo: list[Work]) -> None:
        rounds = 0
        while todo:
            results = await self._sender.send([w.item for w in todo])
            settled: list[Settled] = []
            again: list[Work] = []
            wait_s = 0.0
            for work, res in zip(todo, results, strict=True):
                if isinstance(res, NotSent):  # stopped before it left: untouched
                    settled.append(work.left("interrupted before it was sent"))
                    continue
                action = decide_answer(res, Caller.RECOVER, self._opts.target, work.attempts)
                work.attempts = work.attempts.after(action)
                if action.kind is Kind.TRANSIENT:
                    self.transient_failures += 1
                if action.pin:
                    await self._pin(work, action.reason)
                verdict = self._judge(work, res, action)
                if isinstance(verdict, Settled):
                    settled.append(verdict)
                else:
                    again.append(work)
                    wait_s = max(wait_s, verdict)
            await self._finisher.put(settled)
            if not again:
                return
            rounds += 1
            if self._stop.is_set() or await self._sleep(delay(rounds, 0.25, 30.0, wait_s)):
                await self._finisher.put(
                    [w.left("interrupted before the center confirmed it") for w in again]
                )
                return
            todo = again

    def _judge(self, work: Work, res: Answer | UpstreamError, action: Action) -> Settled | float:
        """The settled order, or how long to wait before sending it again."""
        if action.step is Step.RETRY:
            return action.wait_s
        if action.step is Step.GIVE_UP:
            if action.kind is Kind.TRANSIENT:
                self.gave_up += 1
            return work.left(action.reason)
        if not isinstance(res, Answer):  # decide() settles only answers
            raise RuntimeError(f"decide() settled a failure: {action}")
        if action.step is Step.MERGE:
            return work.merged(action.outcome, res.order_id, self._opts.target)
        return work.quarantined(
            action.outcome,
            f"HTTP {res.status}: {res.error or 'no reason given'}",
            {"status": res.status, "target": self._opts.target},
        )

    async def _pin(self, work: Work, why: str) -> None:
        """The target may hold this order now: pin the file to it (CONTRACT 5), so nothing
        sends it anywhere else: the target's cluster name, or its URL when it is none."""
        try:
            work.record = await self._source.pin(work, self._opts.pin, why)
        except (PersistError, ReplicaError) as exc:
            log.error("could not pin %s to %s: %s", work.record.serial, self._opts.pin, exc)

    async def _sleep(self, delay_s: float) -> bool:
        """Wait ``delay_s`` unless stopped first; True if stopped."""
        return await wait_set(self._stop, delay_s)


def _chunks(items: Iterable[Item]) -> Iterator[list[Item]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, CHUNK)):
        yield chunk


def _held_too_long(row: Item) -> Settled:
    return Settled(
        ResultRow(
            row.ref,
            row.key,
            row.file,
            "pending",
            error="held by another process (the agent?) for the whole wait; run again",
        ),
        NOTE,
    )
