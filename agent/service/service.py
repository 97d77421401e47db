"""The agent: owns every long-lived resource and starts/stops them in order."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from agent import __version__
from agent.base.metrics import Metrics
from agent.chain.enrol import at_the_centers
from agent.chain.verifier import Verifier
from agent.config import Config
from agent.delivery.router import Router
from agent.errors import StartupError
from agent.intake.http_api import HttpApi
from agent.intake.inbox import InboxWatcher
from agent.intake.orders import Intake
from agent.limits import raise_fd_limit
from agent.logs import set_level
from agent.replica.reconcile import StartupReconcile
from agent.replica.replicator import Replicator
from agent.service.accept_errors import AcceptErrorLog
from agent.service.http_server import BoundedAppRunner
from agent.service.reload import ConfigReloader
from agent.sms.outbox import Outbox
from agent.sms.providers import build_provider
from agent.spool.drain import Drainer
from agent.spool.files import remove_stale_temps
from agent.spool.housekeeping import Housekeeper
from agent.spool.reconcile import reconcile
from agent.spool.record import BufferDirs
from agent.spool.rejected import RejectedCount
from agent.spool.writer import PendingSpool
from agent.state.journal import Journal
from agent.state.owner import DirOwner, own_all, unusable_directory
from agent.state.serials import SerialIssuer
from agent.upstream.answers import Answer
from agent.upstream.client import UpstreamClient
from agent.upstream.dns import ClusterResolver
from agent.upstream.health import ClusterHealth, HealthMonitor

log = logging.getLogger("agent.service")
MODES = ("normal", "standby", "offline")
MODE_HISTORY = 20
DRAIN_WINDOW_S = 30.0
RUNNING_MARKER = "agent.running"


def pin_buckets(counts: dict[str, int]) -> dict[str, int]:
    """Buffered orders by pin: the clusters, "none", and "other": pinned by edge-recover to a
    URL that is no configured cluster (only edge-recover with that --target sends them)."""
    out = {name: counts.get(name, 0) for name in ("primary", "standby", "none")}
    out["other"] = sum(n for name, n in counts.items() if name not in out)
    return out


class Service:
    """``start()`` brings the agent up to accepting orders; ``stop()`` drains it down."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.dirs = BufferDirs(Path(cfg.buffer.path))
        # One agent per buffer and per state dir (DESIGN 10): locked before any write.
        self.owners = [
            DirOwner(cfg.buffer.path, "buffer", "buffer.path", cfg.agent.node_id),
            DirOwner(cfg.agent.state_dir, "state dir", "agent.state_dir", cfg.agent.node_id),
        ]
        self._owned: list[DirOwner] = []
        self.metrics = Metrics()
        self.journal = Journal(cfg.agent.state_dir)
        self.serials = SerialIssuer(self.journal, cfg.agent.node_id, self.dirs.root)
        self.spool = PendingSpool(self.dirs, cfg.buffer.max_bytes)
        self.rejected = RejectedCount(self.dirs)
        self.resolver = ClusterResolver(cfg.upstream.nameservers, cfg.health.timeout_s)
        self.upstream = UpstreamClient(cfg.agent.node_id, self.resolver)
        self.health = HealthMonitor(self.upstream, self.resolver, cfg.health, _clusters(cfg))
        self.router = Router(self.health, self.upstream)
        # SMS notices for buffered orders (CONTRACT 9); build_provider reads the secrets.
        self.outbox: Outbox | None = None
        if cfg.sms.enabled:
            self.outbox = Outbox(
                cfg.sms, cfg.agent.state_dir, self.dirs, build_provider(cfg.sms), self.metrics
            )
        # Full-chain verification of outage orders (CONTRACT 10); loads step classes now.
        self.chain: Verifier | None = None
        if cfg.chain.enabled:
            centers = [url for url in (cfg.upstream.primary, cfg.upstream.standby) if url]
            self.chain = Verifier(
                cfg.chain,
                cfg.agent.state_dir,
                self.dirs,
                self.journal,
                cfg.buffer.scan_interval_s,
                at_the_centers(self.upstream, centers, cfg.upstream.timeout_s),
            )
        chain = self.chain
        # The buffer replicated through NATS JetStream (CONTRACT 11); none contacted when off.
        self.replica: Replicator | None = None
        if cfg.replication.enabled:
            self.replica = Replicator(cfg.replication, cfg.agent.node_id)
        replica = self.replica
        self.replica_reconcile: StartupReconcile | None = None
        if replica is not None:
            self.replica_reconcile = StartupReconcile(
                replica, self.spool, self.journal, on_done=self._on_reconciled
            )
        self.intake = Intake(
            cfg,
            self.journal,
            self.serials,
            self.spool,
            self.router,
            self.metrics,
            on_buffered=self.outbox.on_buffered if self.outbox else None,
            on_created=chain.on_created if chain else None,
            replica=replica,
        )
        self.drainer = Drainer(
            cfg.buffer,
            cfg.upstream.timeout_s,
            self.spool,
            self.journal,
            self.upstream,
            self._drain_usable,
            self._on_refusal,
            self.metrics,
            busy=self.intake.writing,
            on_merged=chain.on_merged if chain else None,
            on_change=replica.change if replica else None,
        )
        self.inbox = InboxWatcher(
            self.dirs, self.intake, cfg.agent.max_body_bytes, cfg.buffer.scan_interval_s
        )
        self.housekeeper = Housekeeper(
            self.journal,
            self.dirs,
            cfg.agent.journal_retention_days,
            cfg.buffer.retention_days,
            finished=chain.finished if chain else None,
            prune=chain.prune if chain else None,
        )
        self.api = HttpApi(
            self.intake,
            self.metrics,
            cfg.tokens,
            cfg.agent,
            self.status,
            self.ready,
            self.refresh_metrics,
            sms_lookup=self.outbox.notice if self.outbox else None,
            chain_lookup=chain.chain_of if chain else None,
            chain_problems=(
                functools.partial(chain.ledger.problems, cfg.chain.deadline_s) if chain else None
            ),
        )
        self._runner: web.AppRunner | None = None
        self.accept_errors = AcceptErrorLog()
        self.port: int | None = None
        self.health.subscribe(self._on_health_change)
        self._stack: list[Any] = []
        self.reloader: ConfigReloader | None = None
        self._mode = "offline"
        self._mode_since = time.time()
        # The last mode changes, for /status and the console (bounded, in memory only).
        self.mode_history: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=MODE_HISTORY
        )
        # (monotonic time, orders delivered by the drain so far): the drain rate.
        self._drained: collections.deque[tuple[float, float]] = collections.deque(maxlen=256)
        self._running_marker = Path(cfg.agent.state_dir) / RUNNING_MARKER

    def _on_refusal(self, cluster: str, answer: Answer | None) -> None:
        """The drain saw an answer: a refusal of the agent (401/403/...) or any other."""
        if answer is None:
            self.health.accepted(cluster)
        else:
            self.health.refused(cluster, answer.status, answer.error)

    def _on_health_change(self, cluster: ClusterHealth) -> None:
        if cluster.refusing is not None:
            self.metrics.refusals.labels(cluster=cluster.name).inc()
        state = "up" if cluster.healthy else "down"
        if cluster.healthy and cluster.refusing is not None:
            state = "refusing"
        self.metrics.cluster_transitions.labels(cluster=cluster.name, state=state).inc()
        mode = self.mode()
        if mode != self._mode:
            # Back to normal is good news: info. Away from it is what ops must see.
            log.log(
                logging.INFO if mode == "normal" else logging.WARNING,
                "mode %s -> %s",
                self._mode,
                mode,
                extra={
                    "from": self._mode,
                    "to": mode,
                    "cluster": cluster.name,
                    "last_error": cluster.refusing or cluster.last_error,
                },
            )
            if self._mode == "normal":
                self.metrics.failovers.inc()
            self.metrics.mode_transitions.labels(to=mode).inc()
            self.mode_history.append(
                {
                    "at": time.time(),
                    "from": self._mode,
                    "to": mode,
                    "cluster": cluster.name,
                    "reason": cluster.refusing or cluster.last_error,
                }
            )
            self._mode, self._mode_since = mode, time.time()
        self.drainer.online(bool(self._drain_usable()))

    async def apply_config(self, cfg: Config) -> None:
        """Switch live sections to ``cfg`` without dropping a request.

        Whatever can fail (reading new SMS secrets) happens before anything changes.
        """
        old = self.cfg
        provider = None
        if cfg.sms != old.sms and cfg.sms.enabled:
            provider = build_provider(cfg.sms)  # ConfigError: nothing applied
        if self.outbox is None and cfg.sms.enabled:
            log.warning("sms.enabled was turned on: restart the agent to start the SMS outbox")
        elif self.outbox is not None and cfg.sms != old.sms:
            await self.outbox.reconfigure(cfg.sms, provider)
        self.cfg = cfg
        self.intake.cfg = cfg
        self.api.tokens = cfg.tokens
        if cfg.upstream.nameservers != old.upstream.nameservers:
            self.resolver.configure(cfg.upstream.nameservers)
        if cfg.health != old.health or _clusters(cfg) != _clusters(old):
            await self.health.reconfigure(cfg.health, _clusters(cfg))
        self.drainer.timeout_s = cfg.upstream.timeout_s
        if cfg.log != old.log:
            set_level(cfg.log.level)
        if cfg.chain != old.chain:
            log.warning("[chain] changed: restart the agent to apply it")
        if cfg.replication != old.replication:
            log.warning("[replication] changed: restart the agent to apply it")

    async def start(self, config_path: str | None = None) -> None:
        """Raises DirectoryHeld (nothing written, nothing to stop) if another agent owns
        the buffer or the state dir; StartupError (one line) for a directory it cannot
        use or a port it cannot listen on."""
        self._owned = await own_all(self.owners)
        fd_limit = raise_fd_limit()  # a descriptor per client connection
        await self._start(self.accept_errors)
        try:  # pending/ owned by root after a trial as root: one line, not a traceback
            await asyncio.to_thread(self.dirs.ensure)
            removed = await asyncio.to_thread(remove_stale_temps, self.dirs.pending)
        except OSError as exc:
            where = Path(exc.filename) if exc.filename else self.dirs.root
            raise unusable_directory("buffer", where, "buffer.path", exc, "set up") from exc
        if removed:
            log.info("removed %d unacknowledged temp files from pending/", removed)
        await self._start(self.journal)
        view = await reconcile(self.journal, self.dirs, self.serials.prefix)
        self.serials.raise_floor(view.max_counter)
        await self.serials.start()
        await self._start(self.spool)
        await self._start(self.rejected)
        if self.replica is not None:  # before the drain: what a takeover delivered stays unsent
            await self._start(self.replica)
        if self.replica_reconcile is not None:
            await self._start(self.replica_reconcile)
        if self.outbox is not None:  # before the listener: a 202 may queue an SMS
            await self._start(self.outbox)
        if self.chain is not None:  # before the listener and the drain: both enrol
            await self._start(self.chain)
        await self._start(self.upstream)
        # No cluster checked yet: the agent starts offline until the first checks pass.
        self._mode_since = time.time()
        self.mode_history.append(
            {
                "at": self._mode_since,
                "from": None,
                "to": self._mode,
                "cluster": None,
                "reason": "agent started",
            }
        )
        await self._start(self.health)
        self._mode = self.mode()
        await self._start(self.housekeeper)
        runner = BoundedAppRunner(
            self.api.build_app(),
            access_log=None,
            shutdown_timeout=self.cfg.agent.shutdown_timeout_s,
            head_timeout_s=self.cfg.agent.head_timeout_s,
            keepalive_timeout=self.cfg.agent.keepalive_timeout_s,
        )
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, self.cfg.agent.host, self.cfg.agent.port)
        try:
            await site.start()
        except OSError as exc:
            raise _cannot_listen(self.cfg.agent.listen, exc) from exc
        self.port = _bound_port(runner, self.cfg.agent.port)
        await self._start(self.drainer)
        await self._start(self.inbox)
        if config_path is not None:
            self.reloader = ConfigReloader(config_path, lambda: self.cfg, self.apply_config)
            await self._start(self.reloader)
        for name in self.health.clusters:
            self.metrics.refusing.labels(cluster=name).set_function(
                functools.partial(self._refusing, name)
            )
            self.metrics.cluster_up.labels(cluster=name).set_function(
                functools.partial(self._cluster_up, name)
            )
        self.metrics.build_info.labels(version=__version__).set(1)
        self.metrics.rejected_files.set_function(lambda: self.rejected.count or 0)
        self.metrics.pending.set_function(lambda: self.spool.count)
        self.metrics.pending_bytes.set_function(lambda: self.spool.bytes)
        if self.replica is not None:
            self.metrics.unreplicated.set_function(
                functools.partial(getattr, self.replica, "unreplicated_count")
            )
        for name in MODES:
            self.metrics.mode.labels(mode=name).set_function(functools.partial(self._is_mode, name))
        self.metrics.buffer_max_bytes.set(self.cfg.buffer.max_bytes)
        self.metrics.start_time.set(time.time())
        self.metrics.unclean_start.set(int(await asyncio.to_thread(self._mark_running)))
        log.info(
            "agent accepting orders",
            extra={
                "listen": f"{self.cfg.agent.host}:{self.port}",
                "node_id": self.cfg.agent.node_id,
                "pending": self.spool.count,
                "mode": self.mode(),
                "fd_limit": fd_limit,
            },
        )

    async def _start(self, component: Any) -> None:
        await component.start()
        self._stack.append(component)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, flush, close in reverse order."""
        self.intake.accepting = False
        try:
            async with asyncio.timeout(self.cfg.agent.shutdown_timeout_s):
                await self.intake.wait_idle()
        except TimeoutError:
            log.error("in-flight orders did not finish within agent.shutdown_timeout_s")
        for component in (self.reloader, self.inbox, self.drainer):
            if component is not None and component in self._stack:
                self._stack.remove(component)
                await component.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        while self._stack:
            await self._stack.pop().stop()
        if self._owned:  # never another owner's marker
            with contextlib.suppress(OSError):
                self._running_marker.unlink()
        for owner in reversed(self._owned):
            await owner.stop()
        self._owned = []
        if self.port is not None:  # a start that failed says so itself, in one line
            log.info("agent stopped")

    def _mark_running(self) -> bool:
        """Leave a marker that a clean stop removes; True if the last run left one."""
        unclean = self._running_marker.exists()
        if unclean:
            log.warning(
                "the previous run did not stop cleanly (watchdog, crash, kill -9 or power cut)"
            )
        try:  # durable, so a power cut right after start-up still reads as unclean
            fd = os.open(self._running_marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, f"{os.getpid()}\n".encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            dfd = os.open(self._running_marker.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            log.warning("cannot write %s: %s", self._running_marker, exc)
        return unclean

    # -- views -----------------------------------------------------------------------

    def mode(self) -> str:
        if self.health.takes_orders("primary"):
            return "normal"
        if self.health.takes_orders("standby"):
            return "standby"
        return "offline"

    def _drain_usable(self) -> dict[str, str]:
        """Where the drain may deliver now: nowhere before pending/ was reconciled with
        the replica (a takeover may have delivered any of it meanwhile)."""
        if self.replica_reconcile is not None and not self.replica_reconcile.done:
            return {}
        return self.health.usable()

    def _on_reconciled(self) -> None:
        self.drainer.online(bool(self._drain_usable()))

    def _is_mode(self, name: str) -> int:
        return int(self.mode() == name)

    def _cluster_up(self, name: str) -> int:
        cluster = self.health.clusters.get(name)
        return int(cluster is not None and cluster.healthy)

    def _refusing(self, name: str) -> int:
        cluster = self.health.clusters.get(name)
        return int(cluster is not None and cluster.refusing is not None)

    async def refresh_metrics(self) -> None:
        """Before a scrape: gauges that need a look at the disk or the journal."""
        await self.spool.recount(0)
        self.metrics.oldest_pending_age.set(await self._oldest_age())
        for name, count in pin_buckets(await self.journal.pinned_counts()).items():
            self.metrics.pinned.labels(cluster=name).set(count)
        if self.chain is not None:
            for step, states in (await self.chain.counts()).items():
                for state, n in states.items():
                    self.metrics.chain_steps.labels(step=step, state=state).set(n)

    def ready(self) -> bool:
        """Can persist orders: a load balancer stops sending while the disk fails us."""
        return self.intake.accepting and self.spool.writable and self.intake.failing is None

    async def _oldest_age(self) -> float:
        _, oldest = await self.journal.pending_summary()
        if not oldest:
            return 0.0
        try:
            return max(0.0, time.time() - datetime.fromisoformat(oldest).timestamp())
        except ValueError:
            return 0.0

    def drain_rate(self) -> float:
        """Orders per second the drain delivered over the last DRAIN_WINDOW_S (sampled at
        each /status)."""
        delivered = 0.0
        for metric in self.metrics.deliveries.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.labels.get("outcome") in (
                    "created",
                    "duplicate",
                ):
                    delivered += sample.value
        now = time.monotonic()
        self._drained.append((now, delivered))
        while len(self._drained) > 2 and now - self._drained[0][0] > DRAIN_WINDOW_S:
            self._drained.popleft()
        t0, d0 = self._drained[0]
        return (delivered - d0) / (now - t0) if now - t0 >= 1.0 else 0.0

    async def status(self) -> dict[str, Any]:
        await self.spool.recount(0)  # whoever moved files (edge-recover), count what is there
        count, oldest = await self.journal.pending_summary()
        pinned = await self.journal.pinned_counts()
        age = 0.0
        if oldest:
            try:
                age = max(0.0, time.time() - datetime.fromisoformat(oldest).timestamp())
            except ValueError:
                age = 0.0
        rate = self.drain_rate()
        pending = self.spool.count
        return {
            "mode": self.mode(),
            "mode_since": self._mode_since,
            "node_id": self.cfg.agent.node_id,
            "clusters": {name: c.snapshot() for name, c in self.health.clusters.items()},
            "pending": self.spool.count,
            "pending_bytes": self.spool.bytes,
            "journal_buffered": count,
            "oldest_pending_age_s": round(age, 3),
            "sms_outbox": self.outbox.unfinished if self.outbox is not None else 0,
            "sms": (
                self.outbox.snapshot()
                if self.outbox is not None
                else {"provider": None, "by_state": {}}
            ),
            "pinned": pin_buckets(pinned),
            "accepting": self.intake.accepting,
            "ready": self.ready(),
            "buffer_error": self.spool.last_error,
            "persist_error": self.intake.failing,
            "drain_rate_per_s": round(rate, 2),
            # null: nothing pending, or nothing drains now (no estimate)
            "drain_eta_s": (
                0.0 if pending == 0 else round(pending / rate, 1) if rate > 0 else None
            ),
            "max_bytes": self.cfg.buffer.max_bytes,
            "mode_history": list(self.mode_history),
            # files in rejected/ for ops to review (counted on a timer: may lag a few s)
            "rejected": self.rejected.count,
            "version": __version__,
            # step -> {state: count} for outage orders (CONTRACT 10); null when off
            "chain": await self.chain.counts() if self.chain is not None else None,
            # the replica's health and what it still lacks (CONTRACT 11); null when off
            "replication": (
                {**self.replica.snapshot(), "reconciled": self.replica_reconcile.done}
                if self.replica is not None and self.replica_reconcile is not None
                else None
            ),
            "now": time.time(),
        }


def _clusters(cfg: Config) -> dict[str, str]:
    clusters = {"primary": cfg.upstream.primary}
    if cfg.upstream.standby:
        clusters["standby"] = cfg.upstream.standby
    return clusters


def _cannot_listen(listen: str, exc: OSError) -> StartupError:
    """Port in use: exit 1 (systemd restarts; the holder may be on its way out). A port
    below 1024 or an address not on this host: exit 2, a fix is needed."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)  # not asyncio's long form
    if exc.errno == errno.EADDRINUSE:
        port = listen.rsplit(":", 1)[1]
        return StartupError(
            f"cannot listen on agent.listen {listen}: {reason}; another process holds the "
            f"port (ss -ltnp 'sport = :{port}' names it): stop it or set agent.listen to a "
            "free port"
        )
    return StartupError(
        f"cannot listen on agent.listen {listen}: {reason}; set agent.listen to an address "
        "of this host and a port >= 1024 (or one the agent's user may bind)",
        exit_code=2,
    )


def _bound_port(runner: web.AppRunner, configured: int) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    return configured
