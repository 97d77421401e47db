"""Live configuration reload: SIGHUP or a change of the config file.

An invalid new file is refused with one log line naming the key, and the
running configuration stays. ``[upstream]``, ``[health]``, ``[sms]`` and
``[auth]`` apply live; a change anywhere else is logged as needing a restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import watchfiles

from .config import Config, load_config
from .errors import ConfigError

log = logging.getLogger("agent.reload")

LIVE_SECTIONS = ("upstream", "health", "sms", "auth")
RESTART_SECTIONS = ("agent", "buffer")

Apply = Callable[[Config], Awaitable[None]]


def merge_live(running: Config, new: Config) -> tuple[Config, list[str]]:
    """The config to run now, and the keys that changed but need a restart."""
    needs_restart = []
    for section in RESTART_SECTIONS:
        old_s, new_s = getattr(running, section), getattr(new, section)
        for f in dataclasses.fields(old_s):
            if getattr(old_s, f.name) != getattr(new_s, f.name):
                needs_restart.append(f"{section}.{f.name}")
    effective = dataclasses.replace(new, agent=running.agent, buffer=running.buffer)
    return effective, needs_restart


class ConfigReloader:
    """Owns the config-file watcher; ``trigger()`` is what SIGHUP calls."""

    def __init__(self, path: str, current: Callable[[], Config], apply: Apply) -> None:
        self._path = Path(path).resolve()
        self._current = current
        self._apply = apply
        self._kick = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.reloads = 0
        self.refused = 0

    def trigger(self) -> None:
        self._kick.set()

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._loop(), name="config-reload"),
                       asyncio.create_task(self._watch(), name="config-watch")]

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _watch(self) -> None:
        target = str(self._path)

        def ours(change: watchfiles.Change, path: str) -> bool:
            return os.path.realpath(path) == target or path == target

        # Watch the directory: editors and config management replace the file by rename.
        async for _ in watchfiles.awatch(self._path.parent, watch_filter=ours,
                                         stop_event=self._stop, recursive=False,
                                         debounce=200, ignore_permission_denied=True):
            self.trigger()

    async def _loop(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            try:
                await self.reload_now()
            except Exception as exc:  # keep running on the old config whatever happens
                log.error("config reload failed, keeping the running config: %s", exc,
                          exc_info=True)

    async def reload_now(self) -> bool:
        try:
            new = await asyncio.to_thread(load_config, str(self._path))
        except ConfigError as exc:
            self.refused += 1
            log.error("config reload refused, keeping the running config: %s", exc)
            return False
        running = self._current()
        effective, needs_restart = merge_live(running, new)
        if needs_restart:
            log.warning("config keys changed that need a restart to apply: %s",
                        ", ".join(needs_restart), extra={"keys": needs_restart})
        if effective == running:
            return False
        await self._apply(effective)
        self.reloads += 1
        changed = [s for s in LIVE_SECTIONS
                   if getattr(effective, s) != getattr(running, s)]
        if effective.tokens != running.tokens:
            changed.append("auth tokens")
        log.info("config reloaded: %s", ", ".join(changed) or "no live change",
                 extra={"sections": changed})
        return True
