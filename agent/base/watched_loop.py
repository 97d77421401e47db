"""A unit of work run on demand: when kicked, when a watched directory changes, and
every ``interval_s`` as a safety net. The drain, the inbox and the config reloader
are all this shape; this object owns the two tasks and stops them together.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import watchfiles

from agent.base.tasks import cancel_and_wait, wait_set

log = logging.getLogger("agent.loop")

Accept = Callable[[watchfiles.Change, str], bool]


class WatchedLoop:
    def __init__(
        self,
        name: str,
        body: Callable[[], Awaitable[None]],
        watch: Path,
        accept: Accept,
        interval_s: float | None,
        debounce_ms: int = 300,
    ) -> None:
        self._name = name
        self._body = body
        self._watch_dir = watch
        self._accept = accept
        self._interval = interval_s
        self._debounce = debounce_ms
        self._kick = asyncio.Event()
        self._stop = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._ending: set[asyncio.Task[None]] = set()

    def kick(self) -> None:
        self._kick.set()

    async def start(self, run_now: bool = True, watching: bool = True) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name=self._name)
        self.watching(watching)
        if run_now:
            self.kick()

    def watching(self, on: bool) -> None:
        """Turn the directory watch on or off (the rescan and kicks go on regardless).

        Off spares the CPU of watching a directory while nothing could be done about
        a change anyway, e.g. pending/ while no cluster takes orders.
        """
        if on and self._watch_task is None and not self._stop.is_set():
            self._watch_task = asyncio.create_task(self._watch(), name=f"{self._name}-watch")
        elif not on and self._watch_task is not None:
            task, self._watch_task = self._watch_task, None
            task.cancel()
            self._ending.add(task)  # owned until it has ended; stop() awaits it
            task.add_done_callback(self._ending.discard)

    async def stop(self) -> None:
        self._stop.set()
        await cancel_and_wait(self._loop_task, self._watch_task, *self._ending)
        self._loop_task = self._watch_task = None

    async def _watch(self) -> None:
        async for _ in watchfiles.awatch(
            self._watch_dir,
            watch_filter=self._accept,
            stop_event=self._stop,
            recursive=False,
            debounce=self._debounce,
            step=20,
            ignore_permission_denied=True,
        ):
            self.kick()

    async def _loop(self) -> None:
        while True:
            await wait_set(self._kick, self._interval)
            self._kick.clear()
            try:
                await self._body()
            except Exception as exc:  # the loop must outlive any one bad round
                log.error("%s failed: %s", self._name, exc, exc_info=True)
