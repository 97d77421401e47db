"""The agent: owns every long-lived resource and starts/stops them in order."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from .buffer import BufferDirs, remove_stale_temps
from .config import Config
from .drain import Drainer
from .health import ClusterHealth, HealthMonitor
from .housekeeping import Housekeeper
from .http_api import HttpApi
from .inbox import InboxWatcher
from .intake import Intake
from .journal import Journal
from .metrics import Metrics
from .outbox import Outbox
from .reconcile import reconcile
from .serials import SerialIssuer
from .sms_providers import build_provider
from .spool import PendingSpool
from .upstream import UpstreamClient

log = logging.getLogger("agent.service")


class Service:
    """``start()`` brings the agent up to accepting orders; ``stop()`` drains it down."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.dirs = BufferDirs(Path(cfg.buffer.path))
        self.metrics = Metrics()
        self.journal = Journal(cfg.agent.state_dir)
        self.serials = SerialIssuer(self.journal, cfg.agent.node_id)
        self.spool = PendingSpool(self.dirs, cfg.buffer.max_bytes)
        self.upstream = UpstreamClient(cfg.agent.node_id)
        # The standby joins routing with failover; until then only the primary is watched.
        clusters = {"primary": cfg.upstream.primary}
        self.health = HealthMonitor(self.upstream, cfg.health, clusters)
        # SMS notices for buffered orders (CONTRACT 9); build_provider reads the secrets.
        self.outbox: Outbox | None = None
        if cfg.sms.enabled:
            self.outbox = Outbox(cfg.sms, cfg.agent.state_dir, self.dirs,
                                 build_provider(cfg.sms), self.metrics)
        self.intake = Intake(cfg, self.journal, self.serials, self.spool, self.upstream,
                             self.health, self.metrics,
                             on_buffered=self.outbox.on_buffered if self.outbox else None)
        self.drainer = Drainer(cfg.buffer, cfg.upstream.timeout_s, self.dirs, self.journal,
                               self.spool, self.upstream, self._drain_target, self.metrics)
        self.inbox = InboxWatcher(self.dirs, self.intake, cfg.agent.max_body_bytes,
                                  cfg.buffer.scan_interval_s)
        self.housekeeper = Housekeeper(self.journal, self.dirs, cfg.agent.journal_retention_days,
                                       cfg.buffer.retention_days)
        self.api = HttpApi(self.intake, self.journal, self.metrics, cfg.tokens,
                           cfg.agent.max_body_bytes, self.status, self.ready)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self.health.subscribe(self._on_health_change)
        self._stack: list[Any] = []

    def _drain_target(self) -> tuple[str, str] | None:
        if self.health.is_healthy("primary"):
            return "primary", self.cfg.upstream.primary
        return None

    def _on_health_change(self, cluster: ClusterHealth) -> None:
        self.metrics.cluster_transitions.labels(
            cluster=cluster.name, state="up" if cluster.healthy else "down").inc()
        if cluster.name == "primary" and not cluster.healthy:
            self.metrics.failovers.inc()
        if cluster.healthy:
            self.drainer.kick()

    async def start(self) -> None:
        await asyncio.to_thread(self.dirs.ensure)
        removed = await asyncio.to_thread(remove_stale_temps, self.dirs.pending)
        if removed:
            log.info("removed %d unacknowledged temp files from pending/", removed)
        await self._start(self.journal)
        view = await reconcile(self.journal, self.dirs, self.serials.prefix)
        self.serials.raise_floor(view.max_counter)
        await self._start(self.spool)
        if self.outbox is not None:  # before the listener: a 202 may queue an SMS
            await self._start(self.outbox)
        await self._start(self.upstream)
        await self._start(self.health)
        await self._start(self.housekeeper)
        runner = web.AppRunner(self.api.build_app(), access_log=None,
                               shutdown_timeout=self.cfg.agent.shutdown_timeout_s)
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, self.cfg.agent.host, self.cfg.agent.port)
        await site.start()
        self.port = _bound_port(runner, self.cfg.agent.port)
        await self._start(self.drainer)
        await self._start(self.inbox)
        self.metrics.pending.set_function(lambda: self.spool.count)
        self.metrics.pending_bytes.set_function(lambda: self.spool.bytes)
        log.info("agent accepting orders", extra={
            "listen": f"{self.cfg.agent.host}:{self.port}", "node_id": self.cfg.agent.node_id,
            "pending": self.spool.count, "mode": self.mode()})

    async def _start(self, component: Any) -> None:
        await component.start()
        self._stack.append(component)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, flush, close in reverse order."""
        self.intake.accepting = False
        try:
            await asyncio.wait_for(self.intake.wait_idle(), self.cfg.agent.shutdown_timeout_s)
        except TimeoutError:
            log.error("in-flight orders did not finish within agent.shutdown_timeout_s")
        for component in (self.inbox, self.drainer):
            if component in self._stack:
                self._stack.remove(component)
                await component.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        while self._stack:
            await self._stack.pop().stop()
        log.info("agent stopped")

    # -- views -----------------------------------------------------------------------

    def mode(self) -> str:
        if self.health.is_healthy("primary"):
            return "normal"
        if self.health.is_healthy("standby"):
            return "standby"
        return "offline"

    def ready(self) -> bool:
        return self.intake.accepting and self.spool.writable

    async def status(self) -> dict[str, Any]:
        count, oldest = await self.journal.pending_summary()
        age = 0.0
        if oldest:
            try:
                age = max(0.0, time.time() - datetime.fromisoformat(oldest).timestamp())
            except ValueError:
                age = 0.0
        return {
            "mode": self.mode(),
            "node_id": self.cfg.agent.node_id,
            "clusters": {name: c.snapshot() for name, c in self.health.clusters.items()},
            "pending": self.spool.count,
            "pending_bytes": self.spool.bytes,
            "journal_buffered": count,
            "oldest_pending_age_s": round(age, 3),
            "sms_outbox": self.outbox.unfinished if self.outbox is not None else 0,
            "sms": (self.outbox.snapshot() if self.outbox is not None
                    else {"provider": None, "by_state": {}}),
            "accepting": self.intake.accepting,
            "buffer_error": self.spool.last_error,
        }


def _bound_port(runner: web.AppRunner, configured: int) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    return configured
