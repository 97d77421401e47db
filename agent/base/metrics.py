"""Prometheus metrics, in a registry owned by the service (no global registry)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric

CONTENT_TYPE = CONTENT_TYPE_LATEST
ORDER_OUTCOMES = (
    "forwarded",
    "buffered",
    "duplicate",
    "conflict",
    "invalid",
    "in_flight",
    "refused",
    "upstream_conflict",
    "upstream_rejected",
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.orders = Counter(
            "edge_orders", "Orders received, by outcome of the intake.", ["outcome"], registry=r
        )
        # Every outcome from 0, so increase() sees the first one (a new series has no rate).
        for outcome in ORDER_OUTCOMES:
            self.orders.labels(outcome=outcome)
        self.pending = Gauge(
            "edge_pending_orders", "Orders in pending/ awaiting delivery.", registry=r
        )
        self.pending_bytes = Gauge("edge_pending_bytes", "Bytes in pending/.", registry=r)
        self.deliveries = Counter(
            "edge_deliveries",
            "Drain deliveries, by cluster and outcome.",
            ["cluster", "outcome"],
            registry=r,
        )
        self.delivery_latency = Histogram(
            "edge_delivery_latency_seconds",
            "From receipt of a buffered order to the center's confirmation.",
            buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600),
            registry=r,
        )
        self.quarantined = Counter(
            "edge_quarantined_files", "Files moved to rejected/.", ["reason"], registry=r
        )
        self.failovers = Counter(
            "edge_failovers", "Mode transitions away from the primary.", registry=r
        )
        self.mode_transitions = Counter(
            "edge_mode_transitions", "Mode changes, by new mode.", ["to"], registry=r
        )
        self.cluster_transitions = Counter(
            "edge_cluster_transitions",
            "Health transitions, by cluster and new state.",
            ["cluster", "state"],
            registry=r,
        )
        self.pinned = Gauge(
            "edge_pending_pinned",
            "Buffered orders by the cluster they are "
            "pinned to (only it may be sent them; 'none': any).",
            ["cluster"],
            registry=r,
        )
        self.refusing = Gauge(
            "edge_cluster_refusing",
            "1 while a cluster refuses the agent's orders (401/403/404/405/407 to POST /orders).",
            ["cluster"],
            registry=r,
        )
        self.refusals = Counter(
            "edge_cluster_refusals",
            "Answers 401/403/404/405/407 to POST /orders, by cluster.",
            ["cluster"],
            registry=r,
        )
        self.rejected_files = Gauge(
            "edge_rejected_files",
            "Order files in rejected/ waiting for ops to review (whoever moved them there).",
            registry=r,
        )
        self.cluster_up = Gauge(
            "edge_cluster_up",
            "1 while a cluster passes the agent's health checks, 0 while it fails them.",
            ["cluster"],
            registry=r,
        )
        self.build_info = Gauge(
            "edge_build_info", "Always 1; the agent's version as a label.", ["version"], registry=r
        )
        self.sms_sent = Counter("edge_sms_sent", "SMS notices sent.", registry=r)
        self.sms_failed = Counter("edge_sms_failed", "SMS notices given up on.", registry=r)
        self.sms_outbox = Gauge(
            "edge_sms_outbox",
            "SMS outbox rows, by state (queued, sending, "
            "sent, failed, suppressed, skipped, ambiguous).",
            ["state"],
            registry=r,
        )
        self.chain_steps = Gauge(
            "edge_chain_steps",
            "Outage orders' chain verification steps "
            "(CONTRACT 10), by step and state (verified, pending, "
            "failed, overdue).",
            ["step", "state"],
            registry=r,
        )
        # For alerts (ops/prometheus/edge-agent.rules.yml) and the dashboard.
        self.mode = Gauge(
            "edge_mode",
            "1 for the agent's current mode (normal, standby, offline), 0 for the others.",
            ["mode"],
            registry=r,
        )
        self.oldest_pending_age = Gauge(
            "edge_oldest_pending_age_seconds",
            "Age of the oldest buffered order (0: none).",
            registry=r,
        )
        self.buffer_max_bytes = Gauge(
            "edge_buffer_max_bytes", "buffer.max_bytes: past it new orders get 507.", registry=r
        )
        self.start_time = Gauge(
            "edge_agent_start_time_seconds", "Unix time this agent process started.", registry=r
        )
        self.unclean_start = Gauge(
            "edge_agent_unclean_start",
            "1 if the previous run of the "
            "agent did not stop cleanly (watchdog kill, crash, kill -9, "
            "power cut).",
            registry=r,
        )
        self.unreplicated = Gauge(
            "edge_buffer_unreplicated",
            "Buffered orders answered 202 on local durability alone "
            "(replication.required = false) that the replica does not hold yet.",
            registry=r,
        )
        # process_start_time_seconds and friends: a restart shows as a change of it.
        ProcessCollector(registry=r)

    def render(self) -> bytes:
        return bytes(generate_latest(_WithoutCreated(self.registry)))


class _WithoutCreated:
    """The registry minus prometheus-client's ``*_created`` samples (a counter's creation
    time, e.g. ``edge_orders_created 1.79e9``, reads like a count of created orders).

    A view at exposition instead of ``disable_created_metrics()``, which flips a
    process-wide switch for every registry.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for metric in self._registry.collect():
            created = metric.name + "_created"
            metric.samples = [s for s in metric.samples if s.name != created]
            yield metric
