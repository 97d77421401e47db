"""Active health checks of the order-center clusters, with hysteresis.

Each round checks every resolved address of a cluster; the round succeeds if
at least one address answers 200. A cluster goes down after
``unhealthy_threshold`` failed rounds in a row and comes back after
``healthy_threshold`` good ones. Listeners are called on every transition
(the drain starts as soon as the primary is back, not at the next rescan).

A cluster whose ``/health`` says 200 can still refuse the agent's orders
(401/403/404/405/407: an expired gateway token, a half-finished deploy). Who
sees such an answer reports it with ``refused()``; the cluster then takes no
orders for ``REFUSAL_HOLD_ROUNDS`` health intervals (then one tries again), and any
other answer from it clears the mark (``accepted()``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from agent.base.tasks import cancel_and_wait
from agent.config import HealthSection
from agent.errors import NoSuchHost, UpstreamError
from agent.upstream.client import UpstreamClient
from agent.upstream.dns import ClusterResolver

log = logging.getLogger("agent.health")
# How long a cluster that refused the agent is left alone before an order tries it
# again, in health intervals (at least a second).
REFUSAL_HOLD_ROUNDS = 5


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
    addresses: dict[str, str | None] = field(default_factory=dict)  # address -> error
    refusing: str | None = None  # why it refuses the agent's orders, while it does
    refusing_since: float | None = None
    refusals: int = 0
    _refused_until: float = 0.0  # monotonic
    _retry_told: bool = False  # listeners heard that the hold ran out
    _fails: int = 0
    _oks: int = 0

    @property
    def host(self) -> str:
        return urlsplit(self.base).hostname or ""

    @property
    def takes_orders(self) -> bool:
        """Healthy, and not refusing the agent (or its hold ran out: time to try again)."""
        return self.healthy and (self.refusing is None or time.monotonic() >= self._refused_until)

    def observe(self, ok: bool, error: str | None, settings: HealthSection) -> bool:
        """Record one round; return True when the healthy flag flipped."""
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
            "addresses": {a: {"healthy": e is None, "error": e} for a, e in self.addresses.items()},
            "takes_orders": self.takes_orders,
            "refusing": self.refusing,
            "refusing_since": self.refusing_since,
            "refusals": self.refusals,
        }


Listener = Callable[[ClusterHealth], None]


def _warn_if_unknown_host(cluster: ClusterHealth, failure: UpstreamError | None) -> None:
    """A first check that met NXDOMAIN: a typo or a missing record, which no "down" line
    shows (a cluster starts down). One warning; the checks go on (DNS may come back)."""
    if isinstance(failure, NoSuchHost):
        log.warning(
            "cluster %s: host %s does not resolve (NXDOMAIN); starting without it and "
            "checking again every health.interval_s: check upstream.%s and the DNS record",
            cluster.name,
            cluster.host,
            cluster.name,
            extra={"cluster": cluster.name, "host": cluster.host, "error": str(failure)},
        )


class HealthMonitor:
    """Owns one checking task per configured cluster."""

    def __init__(
        self,
        client: UpstreamClient,
        resolver: ClusterResolver,
        settings: HealthSection,
        clusters: dict[str, str],
    ) -> None:
        self._client = client
        self._resolver = resolver
        self._settings = settings
        self.clusters = {name: ClusterHealth(name, base) for name, base in clusters.items()}
        self._listeners: list[Listener] = []
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._started = False

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def is_healthy(self, name: str) -> bool:
        cluster = self.clusters.get(name)
        return cluster is not None and cluster.healthy

    def takes_orders(self, name: str) -> bool:
        cluster = self.clusters.get(name)
        return cluster is not None and cluster.takes_orders

    def usable(self) -> dict[str, str]:
        """name -> base URL of every cluster that can take orders now."""
        return {name: c.base for name, c in self.clusters.items() if c.takes_orders}

    def refused(self, name: str, status: int, error: str) -> None:
        """A cluster answered POST /orders with 401/403/404/405/407: it refuses the agent."""
        cluster = self.clusters.get(name)
        if cluster is None:
            return
        first = cluster.refusing is None
        cluster.refusing = f"HTTP {status} to POST /orders: {error or 'no reason given'}"[:300]
        cluster.refusals += 1
        hold = max(1.0, REFUSAL_HOLD_ROUNDS * self._settings.interval_s)
        cluster._refused_until = time.monotonic() + hold
        cluster._retry_told = False
        if first:
            cluster.refusing_since = time.time()
            log.error(
                "cluster %s refuses the agent's orders (%s): orders are kept and go "
                "elsewhere; check its credentials, routes and proxy",
                name,
                cluster.refusing,
                extra={"cluster": name, "status": status},
            )
            self._tell(cluster)

    def accepted(self, name: str) -> None:
        """Any other answer to POST /orders: the cluster takes the agent's orders again."""
        cluster = self.clusters.get(name)
        if cluster is None or cluster.refusing is None:
            return
        log.warning("cluster %s takes the agent's orders again", name, extra={"cluster": name})
        cluster.refusing = cluster.refusing_since = None
        self._tell(cluster)

    async def start(self) -> None:
        """Check every cluster once before returning, so routing starts informed."""
        clusters = list(self.clusters.values())
        failures = await asyncio.gather(*(self._check(c) for c in clusters))
        for cluster, failure in zip(clusters, failures, strict=True):
            _warn_if_unknown_host(cluster, failure)
        self._started = True
        for cluster in self.clusters.values():
            self._spawn(cluster)

    async def stop(self) -> None:
        self._started = False
        tasks = list(self._tasks.values())
        self._tasks.clear()
        await cancel_and_wait(*tasks)

    async def reconfigure(self, settings: HealthSection, clusters: dict[str, str]) -> None:
        """Apply new thresholds/intervals and cluster URLs; unchanged clusters keep state."""
        self._settings = settings
        for name in list(self.clusters):
            if clusters.get(name) != self.clusters[name].base:
                task = self._tasks.pop(name, None)
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                old = self.clusters.pop(name)
                if old.healthy:  # a removed or re-pointed cluster is no longer usable
                    old.healthy = False
                    self._notify(old)
        for name, base in clusters.items():
            if name not in self.clusters:
                cluster = ClusterHealth(name, base)
                self.clusters[name] = cluster
                _warn_if_unknown_host(cluster, await self._check(cluster))
                if self._started:
                    self._spawn(cluster)
        if self._started:  # restart loops so a new interval applies now
            for name, cluster in self.clusters.items():
                task = self._tasks.pop(name, None)
                if task is not None:
                    task.cancel()
                self._spawn(cluster)

    def _spawn(self, cluster: ClusterHealth) -> None:
        self._tasks[cluster.name] = asyncio.create_task(
            self._loop(cluster), name=f"health:{cluster.name}"
        )

    async def _loop(self, cluster: ClusterHealth) -> None:
        interval = self._settings.interval_s
        next_at = time.monotonic() + interval
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at + interval, time.monotonic())  # drift-corrected
            try:
                await self._check(cluster)
            except Exception as exc:  # a check must never end the loop
                log.error("health check of %s crashed: %s", cluster.name, exc, exc_info=True)

    async def _check(self, cluster: ClusterHealth) -> UpstreamError | None:
        """One round; returns why the host did not resolve, if it did not."""
        error: str | None
        failure: UpstreamError | None = None
        try:
            results = await self._client.check_health(cluster.base, self._settings.timeout_s)
        except UpstreamError as exc:  # DNS: no address at all
            results, error, failure = {}, str(exc), exc
        else:
            error = next((e for e in results.values() if e is not None), None)
        for address, err in results.items():
            self._resolver.mark_bad(address, err is not None)
        cluster.addresses = results
        ok = any(e is None for e in results.values())
        if not ok:
            self._resolver.invalidate(cluster.host)  # all failed: ask DNS again next time
        if cluster.observe(ok, error, self._settings):
            self._notify(cluster)
        elif cluster.refusing is not None and cluster.takes_orders and not cluster._retry_told:
            cluster._retry_told = True  # the hold ran out: the drain may try one order now
            self._tell(cluster)
        return failure

    def _notify(self, cluster: ClusterHealth) -> None:
        # Up is good news (and every start brings it): info. Down is what ops must see.
        level = logging.INFO if cluster.healthy else logging.WARNING
        log.log(
            level,
            "cluster %s is now %s",
            cluster.name,
            "up" if cluster.healthy else "down",
            extra={
                "cluster": cluster.name,
                "healthy": cluster.healthy,
                "error": cluster.last_error,
            },
        )
        self._tell(cluster)

    def _tell(self, cluster: ClusterHealth) -> None:
        for listener in self._listeners:
            listener(cluster)
