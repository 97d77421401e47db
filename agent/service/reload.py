"""Live configuration reload: SIGHUP or a change of the config file.

An invalid new file is refused with one log line naming the key, and the
running configuration stays. ``[upstream]``, ``[health]``, ``[sms]``,
``[auth]`` and ``[log]`` apply live; a change anywhere else is logged as needing a restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import watchfiles

from agent.base.watched_loop import WatchedLoop
from agent.config import Config, load_config
from agent.errors import ConfigError

log = logging.getLogger("agent.reload")

LIVE_SECTIONS = ("upstream", "health", "sms", "auth", "log")
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
        target = str(self._path)

        def ours(change: watchfiles.Change, path: str) -> bool:
            return os.path.realpath(path) == target or path == target

        # Watch the directory: editors and config management replace the file by rename.
        # A failed reload is logged by the loop and the running config stays.
        self._loop = WatchedLoop(
            "config-reload", self._reload, self._path.parent, ours, interval_s=None, debounce_ms=200
        )
        self.reloads = 0
        self.refused = 0

    def trigger(self) -> None:
        self._loop.kick()

    async def start(self) -> None:
        await self._loop.start(run_now=False)

    async def stop(self) -> None:
        await self._loop.stop()

    async def _reload(self) -> None:
        await self.reload_now()

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
            log.warning(
                "config keys changed that need a restart to apply: %s",
                ", ".join(needs_restart),
                extra={"keys": needs_restart},
            )
        if effective == running:
            return False
        await self._apply(effective)
        self.reloads += 1
        changed = [s for s in LIVE_SECTIONS if getattr(effective, s) != getattr(running, s)]
        if effective.tokens != running.tokens:
            changed.append("auth tokens")
        log.info(
            "config reloaded: %s",
            ", ".join(changed) or "no live change",
            extra={"sections": changed},
        )
        return True
