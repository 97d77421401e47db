"""Group commit: many callers wait on one expensive flush (an fsync, a COMMIT).

Each caller submits one item and awaits its own result; a single owned task
takes everything queued so far and flushes it as one batch. Under load the
batches grow by themselves, which is what turns per-order fsyncs into
thousands of acknowledged orders per second.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

# A flush returns one entry per item: None for success, or the error for that item.
Flush = Callable[[list[T]], Awaitable[Sequence[BaseException | None]]]


class GroupCommit(Generic[T]):
    """Owns one flushing task; ``submit`` returns once the item's batch is flushed."""

    def __init__(
        self, name: str, flush: Flush[T], max_batch: int = 256, in_flight: int = 1
    ) -> None:
        """``in_flight``: how many batches may be flushing at once. 1 for a flush that
        must not overlap itself (an fsync, a COMMIT); more where a flush is mostly
        waiting on the network and one slow batch must not hold up the next."""
        self._name = name
        self._flush = flush
        self._max_batch = max_batch
        self._slots = asyncio.Semaphore(in_flight)
        self._flushing: set[asyncio.Task[None]] = set()
        self._queue: list[tuple[T, asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"group-commit:{self._name}")

    async def stop(self) -> None:
        """Flush what is queued, then end the task."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def submit(self, item: T) -> None:
        await self._put(item)

    def enqueue(self, item: T) -> asyncio.Future[None]:
        """Queue without waiting; the returned future says when (and if) it was flushed."""
        return self._put(item)

    def _put(self, item: T) -> asyncio.Future[None]:
        if self._task is None or self._closing:
            raise RuntimeError(f"{self._name}: submit() after stop() or before start()")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        self._wakeup.set()
        return fut

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                # The slot first: a batch takes everything queued until a flush may start.
                await self._slots.acquire()
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                task = asyncio.create_task(self._flush_batch(batch))
                self._flushing.add(task)
                task.add_done_callback(self._flushing.discard)
            if self._closing:
                await asyncio.gather(*self._flushing)
                return

    async def _flush_batch(self, batch: list[tuple[T, asyncio.Future[None]]]) -> None:
        try:
            try:
                results: Sequence[BaseException | None] = await self._flush(
                    [item for item, _ in batch]
                )
            except Exception as exc:  # the whole batch failed
                results = [exc] * len(batch)
            for (_, fut), err in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if err is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(err)
        finally:
            self._slots.release()
