"""Threads that fsync many file descriptors at once, for one caller that waits for all.

A batch of pending files is made durable by fsyncing every file in parallel (the
disk merges overlapping fsyncs into few flushes). concurrent.futures costs a
Future, a Condition and a semaphore per file, and the submitting thread fought
the woken workers for the GIL in ``submit()``: ~15% of the GIL's time during
offline intake. Here a file costs one put on a C queue and one lock per result,
and the caller wakes once per batch.
"""

from __future__ import annotations

import os
import queue
import threading


class _Batch:
    """One ``sync_all`` call: what is left, and the error per index."""

    __slots__ = ("done", "errors", "left", "lock")

    def __init__(self, size: int) -> None:
        self.errors: list[Exception | None] = [None] * size
        self.left = size
        self.lock = threading.Lock()
        self.done = threading.Event()


class FsyncPool:
    """Owns ``threads`` daemon-less worker threads until ``shutdown()``."""

    def __init__(self, threads: int, name: str = "fsync") -> None:
        self._queue: queue.SimpleQueue[tuple[_Batch, int, int] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}_{n}", daemon=True)
            for n in range(max(1, threads))
        ]
        for thread in self._threads:
            thread.start()

    def sync_all(self, fds: list[int]) -> list[Exception | None]:
        """fsync every fd, in parallel; block until all are done. The error per fd
        (None: that fd is synced). Blocks: call it from a thread, not the event loop."""
        if not fds:
            return []
        batch = _Batch(len(fds))
        put = self._queue.put
        for i, fd in enumerate(fds):
            put((batch, i, fd))
        batch.done.wait()
        return batch.errors

    def shutdown(self) -> None:
        """End the threads once the work queued so far is done."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> FsyncPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _work(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is None:
                return
            batch, i, fd = item
            try:
                os.fsync(fd)
            except Exception as exc:  # OSError; anything else must not lose the batch
                batch.errors[i] = exc
            with batch.lock:
                batch.left -= 1
                last = batch.left == 0
            if last:
                batch.done.set()
