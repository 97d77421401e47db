"""Where answered orders end up: checkpoint rows first, then the file moves, in groups.

Workers hand over each settled order without waiting. Groups of everything
queued so far flow through three stages, in order:

1. append the outcomes to the checkpoint (so a crash after this point
   finishes the move on rerun without asking the center again);
2. add order_id and rename each file into merged/, or write new copies
   (``agent.buffer.place_in_merged``);
3. one filesystem sync, then unlink the sources of new copies, quarantine
   refused and corrupt files, release every claim
   (``agent.buffer.complete_merged``).

Stages 2 and 3 are the source's ``Outcomes``: ``FileMoves`` for a buffer
directory; a takeover from the replica marks the orders there instead
(``recovery.replica_source``). Stage 1, the checkpoint, is always first.

Stage 3 of a group overlaps stages 1 and 2 of the next ones. Under load the
groups grow by themselves: one sync covers thousands of files. The queue is
bounded, which also bounds the open claims (file descriptors).

Stage 1 runs on the merge's one file thread (``files``), between the claims;
stage 2 in the mover process (``agent.spool.mover``), and the sync has a
thread of its own. Each of these steps is a run of short system calls, and
CPython hands the GIL over at every one: in three threads side by side
(claims, checkpoint, moves) that cost 10 futex calls per merged file (1.35 on
one thread) and a fifth of the merge's CPU; on that one thread the moves were
a third of its time, which in a process of their own runs on the second core
(docs/performance.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.errors import PersistError
from agent.spool.claims import Claim
from agent.spool.files import quarantine
from agent.spool.mover import MoverProcess
from agent.spool.moves import MergedMove, complete_merged, place_in_merged
from agent.spool.record import BufferDirs
from recovery.checkpoint import Checkpoint, ResultRow

log = logging.getLogger("recovery.finisher")

MERGE, QUARANTINE, LEAVE, NOTE = "merge", "quarantine", "leave", "note"


@dataclass
class Settled:
    """One order whose outcome is known, and what to do with its file."""

    row: ResultRow
    action: str  # MERGE, QUARANTINE, LEAVE or NOTE (no file)
    claim: Claim | None = None
    merged_name: str = ""
    document: bytes | None = None  # MERGE: a new merged/ copy ...
    added: dict[str, Any] | None = None  # ... or move the file, adding these keys
    reason: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # set when the file could not be moved
    unclaimed: str | None = None  # QUARANTINE without a claim: a FIFO, a directory,
    # a file over the cap, moved aside as it is (never opened for reading)


OnSettled = Callable[[list[Settled]], None]


Moved = tuple[list[MergedMove], list[BaseException | None]]


class Outcomes(Protocol):
    """What settles a group of orders where they came from, after the checkpoint has them:
    ``place`` then ``complete`` (each group in order; the next group's ``place`` may
    overlap this one's ``complete``). A failure is set on the item (``error``)."""

    async def place(self, batch: list[Settled]) -> Any: ...

    async def complete(self, batch: list[Settled], placed: Any) -> None: ...

    def close(self) -> None: ...


class Finisher:
    def __init__(
        self,
        dirs: BufferDirs,
        checkpoint: Checkpoint,
        on_settled: OnSettled,
        limit: int = 2048,
        outcomes: Outcomes | None = None,
        files: Executor | None = None,
    ) -> None:
        """``files``: the thread for checkpoint writes and (without ``outcomes``) file
        moves, the caller's (the merge's file thread); without it, threads of its own."""
        self._checkpoint = checkpoint
        self._on_settled = on_settled
        self._outcomes = outcomes if outcomes is not None else FileMoves(dirs, files)
        # Room for ``limit`` unsettled orders (bounding the open claims): counted, not a
        # semaphore acquired and released per order (two event-loop calls each).
        self._limit = limit
        self._roomy = asyncio.Event()
        self._queue: list[Settled | None] = []  # None: end of input
        self._wakeup = asyncio.Event()
        self._unsettled = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._own_pool = files is None
        self._pool = files or ThreadPoolExecutor(1, thread_name_prefix="finisher-checkpoint")
        self._to_move: asyncio.Queue[list[Settled] | None] = asyncio.Queue(2)
        self._to_sync: asyncio.Queue[tuple[list[Settled], Any] | None] = asyncio.Queue(2)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(coro, name=f"finisher-{i}")
            for i, coro in enumerate((self._record(), self._move(), self._sync()))
        ]

    async def put(self, items: list[Settled]) -> None:
        start = 0
        while start < len(items):
            room = self._limit - self._unsettled
            if room <= 0:
                self._wakeup.set()  # let what is queued flow before waiting for room
                self._roomy.clear()
                await self._roomy.wait()
                continue
            part = items[start : start + room]
            self._queue.extend(part)
            self._unsettled += len(part)
            self._idle.clear()
            start += len(part)
        if items:
            self._wakeup.set()

    async def drain(self) -> None:
        """Return once everything handed over so far is settled."""
        await self._idle.wait()

    async def stop(self) -> None:
        await self.drain()
        self._queue.append(None)
        self._wakeup.set()
        await asyncio.gather(*self._tasks)
        if self._own_pool:
            self._pool.shutdown(wait=True)
        self._outcomes.close()

    async def _record(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                queued, self._queue = self._queue, []
                end = queued[-1] is None
                batch = [i for i in queued if i is not None]
                if batch:
                    try:
                        await loop.run_in_executor(
                            self._pool, self._checkpoint.write, [i.row for i in batch]
                        )
                    except Exception as exc:  # e.g. the disk is full: move nothing
                        log.error("cannot record %d outcomes: %s", len(batch), exc)
                        for item in batch:
                            item.error = f"not recorded: {exc}"
                            item.action = LEAVE
                    await self._to_move.put(batch)
                if end:
                    await self._to_move.put(None)
                    return

    async def _move(self) -> None:
        while (batch := await self._to_move.get()) is not None:
            await self._to_sync.put((batch, await self._outcomes.place(batch)))
        await self._to_sync.put(None)

    async def _sync(self) -> None:
        while (moved := await self._to_sync.get()) is not None:
            batch, placed = moved
            try:
                await self._outcomes.complete(batch, placed)
            except Exception as exc:  # never leave a claim or a waiter behind
                log.error("cannot finish %d moves: %s", len(batch), exc)
                for item in batch:
                    item.error = item.error or f"not finished: {exc}"
                    if item.claim is not None:
                        item.claim.release()
            self._on_settled(batch)
            self._unsettled -= len(batch)
            self._roomy.set()
            if not self._unsettled:
                self._idle.set()


class FileMoves:
    """A buffer directory's outcomes: files into merged/ or rejected/, claims released."""

    def __init__(
        self, dirs: BufferDirs, files: Executor | None = None, mover: MoverProcess | None = None
    ) -> None:
        """``files``: the thread for the moves, the caller's (the merge's file thread);
        without it, one of its own. The sync always has its own. ``mover``: a started
        mover process renames the files instead (``agent.spool.mover``; this object closes
        it), and the moves' thread, which only waits for its answers, is its own."""
        self._dirs = dirs
        self._mover = mover
        self._place = place_in_merged if mover is None else mover.place
        self._move_pool: Executor = (
            files
            if files is not None and mover is None
            else ThreadPoolExecutor(1, thread_name_prefix="finisher-move")
        )
        self._own_move_pool = self._move_pool is not files
        self._sync_pool = ThreadPoolExecutor(1, thread_name_prefix="finisher-sync")

    def close(self) -> None:
        if self._own_move_pool:
            self._move_pool.shutdown(wait=True)
        self._sync_pool.shutdown(wait=True)
        if self._mover is not None:
            self._mover.close()

    async def place(self, batch: list[Settled]) -> Moved:
        moves = [
            MergedMove(i.claim, i.merged_name, i.document, i.added)
            for i in batch
            if i.action == MERGE and i.claim is not None
        ]
        results: list[BaseException | None] = []
        if moves:
            results = await asyncio.get_running_loop().run_in_executor(
                self._move_pool, self._place, self._dirs.merged, moves
            )
        return moves, results

    async def complete(self, batch: list[Settled], placed: Moved) -> None:
        await asyncio.get_running_loop().run_in_executor(
            self._sync_pool, self._complete, batch, placed
        )

    def _complete(self, batch: list[Settled], moved: Moved) -> None:
        moves, results = moved
        if moves:
            merges = [i for i in batch if i.action == MERGE and i.claim is not None]
            for item, err in zip(
                merges, complete_merged(self._dirs.merged, moves, results), strict=True
            ):
                if err is not None:
                    item.error = f"left in place: {err}"
                    log.error("%s: confirmed by the center but not moved: %s", item.row.file, err)
        for item in batch:
            if item.action == QUARANTINE and item.unclaimed is not None:
                self._quarantine(item, Path(item.unclaimed))
            elif item.action == QUARANTINE and item.claim is not None:
                claim = item.claim
                try:
                    # Through a link: rejected/ gets the content, only the link goes.
                    self._quarantine(item, claim.path, claim.data if claim.linked else None)
                finally:
                    claim.release()
            elif item.claim is not None:
                item.claim.release()  # LEAVE, or a MERGE whose claim is already released

    def _quarantine(self, item: Settled, path: Path, content: bytes | None = None) -> None:
        try:
            quarantine(self._dirs, path, item.reason, content)
        except (PersistError, OSError) as exc:
            item.error = f"not quarantined: {exc}"
            log.error("%s: cannot quarantine: %s", item.row.file, exc)
