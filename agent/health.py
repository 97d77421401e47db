"""Active health checks of the order-center clusters, with hysteresis.

A cluster goes down after ``unhealthy_threshold`` consecutive failed checks
and comes back after ``healthy_threshold`` consecutive good ones. Listeners
are woken on every transition (the drain starts as soon as a cluster is back).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import HealthSection
from .errors import UpstreamError
from .upstream import UpstreamClient

log = logging.getLogger("agent.health")


@dataclass
class ClusterHealth:
    """Health state of one cluster; changed only by ``observe``."""

    name: str
    base: str
    healthy: bool = False
    checked: bool = False
    since: float = field(default_factory=time.time)
    last_error: str | None = None
    last_check: float | None = None
    _fails: int = 0
    _oks: int = 0

    def observe(self, ok: bool, error: str | None, settings: HealthSection) -> bool:
        """Record one check; return True when the healthy flag flipped."""
        self.last_check = time.time()
        first = not self.checked
        self.checked = True
        if ok:
            self._oks, self._fails = self._oks + 1, 0
        else:
            self._fails, self._oks = self._fails + 1, 0
            self.last_error = error
        if first:  # start from the first answer rather than from an assumption
            flip = ok != self.healthy
        elif self.healthy:
            flip = self._fails >= settings.unhealthy_threshold
        else:
            flip = self._oks >= settings.healthy_threshold
        if flip:
            self.healthy = not self.healthy
            self.since = time.time()
        return flip

    def snapshot(self) -> dict[str, Any]:
        return {
            "url": self.base,
            "healthy": self.healthy,
            "since": self.since,
            "last_error": self.last_error,
            "last_check": self.last_check,
        }


Listener = Callable[[ClusterHealth], None]


class HealthMonitor:
    """Owns one checking task per configured cluster."""

    def __init__(self, client: UpstreamClient, settings: HealthSection,
                 clusters: dict[str, str]) -> None:
        self._client = client
        self._settings = settings
        self.clusters = {name: ClusterHealth(name, base) for name, base in clusters.items()}
        self._listeners: list[Listener] = []
        self._tasks: list[asyncio.Task[None]] = []

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def is_healthy(self, name: str) -> bool:
        cluster = self.clusters.get(name)
        return cluster is not None and cluster.healthy

    async def start(self) -> None:
        """Check every cluster once before returning, so routing starts informed."""
        await asyncio.gather(*(self._check(c) for c in self.clusters.values()))
        for cluster in self.clusters.values():
            self._tasks.append(asyncio.create_task(self._loop(cluster),
                                                   name=f"health:{cluster.name}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _loop(self, cluster: ClusterHealth) -> None:
        interval = self._settings.interval_s
        next_at = time.monotonic() + interval
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at + interval, time.monotonic())  # drift-corrected
            await self._check(cluster)

    async def _check(self, cluster: ClusterHealth) -> None:
        try:
            await self._client.check_health(cluster.base, self._settings.timeout_s)
            ok, error = True, None
        except UpstreamError as exc:
            ok, error = False, str(exc)
        if cluster.observe(ok, error, self._settings):
            log.warning(
                "cluster %s is now %s", cluster.name, "up" if cluster.healthy else "down",
                extra={"cluster": cluster.name, "healthy": cluster.healthy, "error": error},
            )
            for listener in self._listeners:
                listener(cluster)
