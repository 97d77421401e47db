"""The replica's one representation: a JetStream stream with a subject per order.

Each order of node N lives on ``edge.buffer.N.{serial}``; the stream keeps one
message per subject (``max_msgs_per_subject=1``), so the subject holds the
order's latest state: ``pending`` (the record), then ``pinned``, ``delivered``
(with the center's order_id) or ``rejected``. Every message carries the whole
record, so whoever takes over a lost server needs nothing but the replica.
``Nats-Msg-Id`` (node, serial, state, pin) makes a retried publish of the same
change a no-op within the stream's duplicate window.

Everything here talks to nats-py and turns its failures into ReplicaError.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import nats
import orjson
from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from agent.config import ReplicationSection
from agent.errors import ConfigError, CorruptRecordError, ReplicaError, ReplicaTooSmall
from agent.spool.record import PendingRecord

log = logging.getLogger("agent.replica")

STREAM = "EDGE_BUFFER"
SUBJECT_ROOT = "edge.buffer"
PENDING, PINNED, DELIVERED, REJECTED = "pending", "pinned", "delivered", "rejected"
UNDELIVERED = (PENDING, PINNED)
# How many records one listing request asks for at a time.
LIST_BATCH = 1000
# See _listing: 0.25 s, 0.5 s, 1 s, then timeout_s each. A takeover waits out the seconds
# after a node died; an agent's start-up listing (before its listener) gives up sooner.
LIST_ATTEMPTS = 12
START_LIST_ATTEMPTS = 4


def subject(node_id: str, serial: str) -> str:
    return f"{SUBJECT_ROOT}.{node_id}.{serial}"


@dataclass(frozen=True)
class Change:
    """One state of one order, as written to (and read back from) the replica."""

    state: str
    record: PendingRecord
    order_id: Any = None
    cluster: str | None = None

    @property
    def msg_id(self) -> str:
        pin = self.record.pinned_to or "-"
        return f"{self.record.node_id}.{self.record.serial}.{self.state}.{pin}"

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {"state": self.state, "record": self.record.to_dict()}
        if self.state == DELIVERED:
            doc["order_id"] = self.order_id
        if self.cluster is not None:
            doc["cluster"] = self.cluster
        return orjson.dumps(doc)

    @classmethod
    def from_bytes(cls, data: bytes, origin: str) -> Change:
        doc = orjson.loads(data)
        if not isinstance(doc, dict) or doc.get("state") not in (*UNDELIVERED, DELIVERED, REJECTED):
            raise ValueError(f"{origin}: not a replica record")
        return cls(
            doc["state"],
            PendingRecord.from_dict(doc.get("record"), origin),
            doc.get("order_id"),
            doc.get("cluster"),
        )


async def connect(cfg: ReplicationSection, name: str) -> NatsClient:
    """A connection that keeps reconnecting by itself; ReplicaError if none now."""
    options: dict[str, Any] = {
        "servers": list(cfg.servers),
        "name": name,
        "connect_timeout": max(1, int(cfg.timeout_s)),
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "error_cb": _quiet,
        "disconnected_cb": _disconnected,
        "reconnected_cb": _reconnected,
    }
    if cfg.credentials_file:
        options["user_credentials"] = cfg.credentials_file
    try:
        # nats-py retries an unreachable first connection for ever when reconnects are
        # unbounded: the first one is bounded here, the later ones are not.
        return await asyncio.wait_for(nats.connect(**options), cfg.timeout_s * 2)
    except (NatsError, OSError, TimeoutError) as exc:
        raise ReplicaError(f"cannot reach NATS at {', '.join(cfg.servers)}: {why(exc)}") from exc


def why(exc: BaseException) -> str:
    """nats-py's timeouts have no message: say at least what kind of failure it was."""
    return str(exc) or type(exc).__name__


async def _quiet(exc: Exception) -> None:
    log.debug("nats: %s", exc)


async def _disconnected() -> None:
    log.warning("replica: disconnected from NATS")


async def _reconnected() -> None:
    log.info("replica: reconnected to NATS")


async def ensure_stream(js: JetStreamContext, replicas: int, timeout_s: float) -> None:
    """Create the stream with ``replicas`` if missing; ReplicaTooSmall if it has fewer."""
    try:
        info = await asyncio.wait_for(js.stream_info(STREAM), timeout_s)
    except NotFoundError:
        info = None
    except (NatsError, TimeoutError) as exc:
        raise ReplicaError(f"cannot look up stream {STREAM}: {why(exc)}") from exc
    if info is not None:
        have = info.config.num_replicas or 1
        if have < replicas:
            raise ReplicaTooSmall(
                f"replica stream {STREAM} has {have} replicas, replication.replicas is "
                f"{replicas}: raise it (nats stream edit {STREAM} --replicas {replicas}) "
                "or lower replication.replicas"
            )
        return
    config = StreamConfig(
        name=STREAM,
        subjects=[f"{SUBJECT_ROOT}.>"],
        storage=StorageType.FILE,
        num_replicas=replicas,
        max_msgs_per_subject=1,
        discard=DiscardPolicy.OLD,
        duplicate_window=120.0,
        allow_direct=True,
    )
    try:
        await asyncio.wait_for(js.add_stream(config), timeout_s * 5)
    except (NatsError, TimeoutError) as exc:
        raise ReplicaError(
            f"cannot create stream {STREAM} with {replicas} replicas: "
            f"{why(exc)} (are {replicas} JetStream servers up?)"
        ) from exc
    log.info("replica: created stream %s with %d replicas", STREAM, replicas)


async def publish(js: JetStreamContext, change: Change, timeout_s: float) -> None:
    """Return once JetStream stored ``change`` on a quorum; ReplicaError otherwise."""
    try:
        await js.publish(
            subject(change.record.node_id, change.record.serial),
            change.to_bytes(),
            timeout=timeout_s,
            stream=STREAM,
            headers={"Nats-Msg-Id": change.msg_id},
        )
    except (NatsError, TimeoutError, OSError) as exc:
        raise ReplicaError(
            f"replica did not store {change.state} of {change.record.serial} within "
            f"{timeout_s}s: {why(exc)}"
        ) from exc


async def publish_all(
    js: JetStreamContext, changes: list[Change], timeout_s: float
) -> list[BaseException | None]:
    """Publish a batch concurrently, awaited together: one wait for the whole batch."""
    results = await asyncio.gather(
        *(publish(js, c, timeout_s) for c in changes), return_exceptions=True
    )
    return [r if isinstance(r, BaseException) else None for r in results]


async def _listing(
    js: JetStreamContext, node_id: str, timeout_s: float, attempts: int
) -> tuple[JetStreamContext.PullSubscription, int]:
    """An ephemeral consumer on ``node_id``'s subjects and its number of orders.

    JetStream places an ephemeral consumer on one of the stream's peers; placed on a peer
    that is down, its creation is never answered (nats-server 2.9, one of three nodes
    down: about half the attempts time out, and every one for some seconds after the
    node died). That is the takeover's usual case, since a lost server takes its NATS
    node with it, so an attempt that is not answered is retried (placed anew), the first
    ones after a short wait (an answered creation takes milliseconds), the later ones
    after ``timeout_s`` (a slow cluster), ``attempts`` in all. A consumer created
    too late for its attempt ends by itself (``inactive_threshold``)."""
    config = ConsumerConfig(
        filter_subject=f"{SUBJECT_ROOT}.{node_id}.>",
        ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        inactive_threshold=60.0,
    )
    for attempt in range(attempts):
        wait = min(timeout_s, 0.25 * 2**attempt)
        name = f"edge-list-{secrets.token_hex(8)}"
        try:
            info = await js.add_consumer(STREAM, config=config, name=name, timeout=wait)
        except NotFoundError as exc:
            raise ConfigError(f"no replica stream {STREAM} in this NATS cluster") from exc
        except (NatsError, TimeoutError) as exc:
            if attempt == attempts - 1:
                raise ReplicaError(
                    f"cannot list node {node_id} in the replica ({attempts} attempts, "
                    f"the last of {wait}s): {why(exc)}"
                ) from exc
            log.info("replica: listing node %s: %s; trying again", node_id, why(exc))
            continue
        try:
            sub = await js.pull_subscribe_bind(consumer=name, stream=STREAM)
        except (NatsError, TimeoutError) as exc:
            raise ReplicaError(f"cannot list node {node_id} in the replica: {why(exc)}") from exc
        return sub, info.num_pending or 0
    raise AssertionError("unreachable")  # pragma: no cover


async def states(
    js: JetStreamContext, node_id: str, timeout_s: float, attempts: int = LIST_ATTEMPTS
) -> AsyncIterator[list[Change]]:
    """Every order of ``node_id`` in the replica with its latest state, in batches."""
    sub, left = await _listing(js, node_id, timeout_s, attempts)
    try:
        while left > 0:
            try:
                msgs = await sub.fetch(min(LIST_BATCH, left), timeout=timeout_s * 5)
            except (NatsError, TimeoutError) as exc:
                raise ReplicaError(f"listing node {node_id} stopped: {why(exc)}") from exc
            batch: list[Change] = []
            for msg in msgs:
                try:
                    batch.append(Change.from_bytes(msg.data, msg.subject))
                except (ValueError, CorruptRecordError) as exc:
                    log.error("replica: skipping unreadable record %s: %s", msg.subject, exc)
            left = msgs[-1].metadata.num_pending if msgs else 0
            yield batch
    finally:
        with contextlib.suppress(NatsError):
            await sub.unsubscribe()
