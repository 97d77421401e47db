"""The replica's one representation: a JetStream stream with a subject per order.

Each order of node N lives on ``edge.buffer.N.{serial}``; the stream keeps one
message per subject (``max_msgs_per_subject=1``), so the subject holds the
order's latest state: ``pending`` (the record), then ``pinned``, ``delivered``
(with the center's order_id) or ``rejected``. Every message carries the whole
record, so whoever takes over a lost server needs nothing but the replica.
``Nats-Msg-Id`` (node, serial, a digest of the order, state, pin) makes a retried
publish of the same change a no-op within the stream's duplicate window.

Every write also says which message it expects to replace
(``Nats-Expected-Last-Subject-Sequence``: 0 for a new order), so a write never
overwrites a record it has not seen: two agents that share a node_id (one
agent.toml copied to every server) would otherwise replace each other's orders
under the same serials, and a takeover would then miss them.

Everything here talks to nats-py and turns its failures into ReplicaError.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import nats
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    DiscardPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from agent.base.tasks import wait_set
from agent.config import ReplicationSection
from agent.errors import ConfigError, CorruptRecordError, ReplicaError, ReplicaTooSmall
from agent.spool.record import PendingRecord

log = logging.getLogger("agent.replica")

STREAM = "EDGE_BUFFER"
SUBJECT_ROOT = "edge.buffer"
PENDING, PINNED, DELIVERED, REJECTED = "pending", "pinned", "delivered", "rejected"
# An order answered 503 (not accepted) whose record may still reach the stream: its
# publish timed out without a quorum, and the leader may commit it once nodes return.
WITHDRAWN = "withdrawn"
UNDELIVERED = (PENDING, PINNED)
FINAL = (DELIVERED, REJECTED, WITHDRAWN)
# JetStream's answer when Nats-Expected-Last-Subject-Sequence did not hold.
WRONG_LAST_SEQUENCE = 10071
# How many records one listing request asks for at a time (~6 MB in the inbox at most).
LIST_BATCH = 5000
# See _listing: 0.25 s, 0.5 s, 1 s, then timeout_s each. A takeover waits out the seconds
# after a node died; an agent's start-up listing (before its listener) gives up sooner.
LIST_ATTEMPTS = 12
START_LIST_ATTEMPTS = 4


def subject(node_id: str, serial: str) -> str:
    return f"{SUBJECT_ROOT}.{node_id}.{serial}"


class SubjectMoved(ReplicaError):
    """The order's subject holds another message than the write expected to replace."""


def same_order(a: PendingRecord, b: PendingRecord) -> bool:
    """One order (maybe in two states), not two orders that happen to share a serial."""
    return (a.serial, a.dedupe_key, a.received_at) == (b.serial, b.dedupe_key, b.received_at)


@dataclass(frozen=True)
class Change:
    """One state of one order, as written to (and read back from) the replica."""

    state: str
    record: PendingRecord
    order_id: Any = None
    cluster: str | None = None

    @property
    def msg_id(self) -> str:
        """The same change of the same order: a retry JetStream may drop as a duplicate.
        The order's identity is in it, not only its serial: two agents sharing a node_id
        issue the same serials, and the second one's record must not pass for a retry."""
        record = self.record
        pin = record.pinned_to or "-"
        order = hashlib.blake2b(
            f"{record.dedupe_key}\n{record.received_at}".encode(), digest_size=8
        ).hexdigest()
        return f"{record.node_id}.{record.serial}.{order}.{self.state}.{pin}"

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
        if not isinstance(doc, dict) or doc.get("state") not in (*UNDELIVERED, *FINAL):
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
        async with asyncio.timeout(cfg.timeout_s * 2):
            return await nats.connect(**options)
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
        async with asyncio.timeout(timeout_s):
            info = await js.stream_info(STREAM)
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
        async with asyncio.timeout(timeout_s * 5):
            await js.add_stream(config)
    except (NatsError, TimeoutError) as exc:
        raise ReplicaError(
            f"cannot create stream {STREAM} with {replicas} replicas: "
            f"{why(exc)} (are {replicas} JetStream servers up?)"
        ) from exc
    log.info("replica: created stream %s with %d replicas", STREAM, replicas)


class Publisher:
    """Publishes to the stream and awaits JetStream's acknowledgements, many at a time.

    ``js.publish`` costs ~100 us of the event loop per message (a request with its own
    reply future and timer, and a PubAck parsed into a dataclass): at 32 clients that
    was a fifth of the agent's loop. Here every publish is a plain ``nc.publish`` with a
    reply subject under one inbox that has one subscription; the acknowledgements are
    matched by token, and a batch has one timeout (~20 us a message). JetStream answers
    such a publish exactly like ``js.publish``'s: a PubAck, an error, or no responders.
    """

    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc
        self._prefix = ""
        self._sub: Any = None
        self._next = 0
        self._waiting: dict[str, asyncio.Future[Msg]] = {}

    async def start(self) -> None:
        """Subscribe the reply inbox (nats-py renews it after every reconnect)."""
        if self._sub is None:
            self._prefix = self._nc.new_inbox()
            try:
                self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._answer)
            except (NatsError, OSError) as exc:
                raise ReplicaError(f"cannot subscribe for acknowledgements: {why(exc)}") from exc

    async def _answer(self, msg: Msg) -> None:
        fut = self._waiting.pop(msg.subject[len(self._prefix) + 1 :], None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    async def publish_all(
        self, changes: list[Change], timeout_s: float, expects: list[int] | None = None
    ) -> list[int | BaseException]:
        """Return once JetStream stored each change on a quorum (its stream sequence) or
        did not (the ReplicaError), within ``timeout_s`` for the whole batch.

        ``expects``: per change, the sequence of the subject's message it replaces (0:
        none); SubjectMoved for a change whose subject holds another.
        """
        await self.start()
        loop = asyncio.get_running_loop()
        sent: list[tuple[str, asyncio.Future[Msg]] | BaseException] = []
        wanted: list[int | None] = list(expects) if expects is not None else [None] * len(changes)
        for change, expect in zip(changes, wanted, strict=True):
            self._next += 1
            token = str(self._next)
            fut: asyncio.Future[Msg] = loop.create_future()
            self._waiting[token] = fut
            headers = {"Nats-Msg-Id": change.msg_id, "Nats-Expected-Stream": STREAM}
            if expect is not None:
                headers["Nats-Expected-Last-Subject-Sequence"] = str(expect)
            try:
                await self._nc.publish(
                    subject(change.record.node_id, change.record.serial),
                    change.to_bytes(),
                    reply=f"{self._prefix}.{token}",
                    headers=headers,
                )
            except (NatsError, OSError) as exc:
                del self._waiting[token]
                sent.append(_failed(change, timeout_s, why(exc)))
                continue
            sent.append((token, fut))
        futures = [s[1] for s in sent if not isinstance(s, BaseException)]
        if futures:
            await asyncio.wait(futures, timeout=timeout_s)
        results: list[int | BaseException] = []
        for change, entry in zip(changes, sent, strict=True):
            if isinstance(entry, BaseException):
                results.append(entry)
                continue
            token, fut = entry
            if not fut.done():
                self._waiting.pop(token, None)
                fut.cancel()
                results.append(_failed(change, timeout_s, "timeout"))
            else:
                results.append(_acknowledged(change, timeout_s, fut.result()))
        return results


def _acknowledged(change: Change, timeout_s: float, msg: Msg) -> int | BaseException:
    """The stored sequence for a PubAck, else why the stream did not store ``change``."""
    status = msg.headers.get("Status") if msg.headers else None
    if status is not None or not msg.data:  # 503: no responders (no stream leader now)
        return _failed(change, timeout_s, f"no responders (status {status})")
    try:
        doc = orjson.loads(msg.data)
    except orjson.JSONDecodeError:
        return _failed(change, timeout_s, f"unreadable acknowledgement {msg.data[:80]!r}")
    error = doc.get("error") if isinstance(doc, dict) else "not an acknowledgement"
    if isinstance(error, dict) and error.get("err_code") == WRONG_LAST_SEQUENCE:
        return SubjectMoved(f"the replica's {change.record.serial} is not the message expected")
    seq = doc.get("seq") if isinstance(doc, dict) else None
    if error is not None or not isinstance(doc, dict) or doc.get("stream") != STREAM:
        text = error.get("description", error) if isinstance(error, dict) else error
        return _failed(change, timeout_s, f"{text or doc}")
    if not isinstance(seq, int):
        return _failed(change, timeout_s, f"an acknowledgement without a sequence: {doc}")
    return seq


def _failed(change: Change, timeout_s: float, reason: str) -> ReplicaError:
    return ReplicaError(
        f"replica did not store {change.state} of {change.record.serial} within "
        f"{timeout_s}s: {reason}"
    )


async def last_state(
    js: JetStreamContext, node_id: str, serial: str, timeout_s: float
) -> tuple[int, Change] | None:
    """The subject's current message (read from the stream leader), or None if empty."""
    where = subject(node_id, serial)
    try:
        async with asyncio.timeout(timeout_s):
            msg = await js.get_last_msg(STREAM, where)
    except NotFoundError:
        return None
    except (NatsError, TimeoutError, OSError) as exc:
        raise ReplicaError(f"cannot read {where} from the replica: {why(exc)}") from exc
    try:
        return msg.seq or 0, Change.from_bytes(msg.data or b"", where)
    except (ValueError, CorruptRecordError) as exc:
        raise ReplicaError(f"{where} in the replica is unreadable: {exc}") from exc


async def _listing(
    js: JetStreamContext, node_id: str, timeout_s: float, attempts: int
) -> ConsumerInfo:
    """An ephemeral consumer on ``node_id``'s subjects (its info: name, orders).

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
        return info
    raise AssertionError("unreachable")  # pragma: no cover


async def states(
    nc: NatsClient,
    node_id: str,
    timeout_s: float,
    batch: int = LIST_BATCH,
    attempts: int = LIST_ATTEMPTS,
) -> AsyncIterator[list[Change]]:
    """Every order of ``node_id`` in the replica with its latest state, in batches.

    A pull consumer (last message per subject, no acks) read with plain requests for
    LIST_BATCH messages at a time into one subscription, the next request sent before
    the batch is parsed: nats-py's ``fetch`` waits on each message with its own timer
    and took twice as long (issue 22).
    """
    js = nc.jetstream(timeout=timeout_s)
    info = await _listing(js, node_id, timeout_s, attempts)
    reader = _BatchReader(nc, f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{info.name}", timeout_s, batch)
    try:
        await reader.start()
        left = info.num_pending or 0
        if left > 0:
            await reader.ask(left)
        while left > 0:
            try:
                msgs, end = await reader.take()
            except ReplicaError as exc:
                raise ReplicaError(f"listing node {node_id} stopped: {exc}") from exc
            left = 0 if end or not msgs else msgs[-1].metadata.num_pending or 0
            if left > 0:
                await reader.ask(left)  # the server sends while this batch is parsed
            changes: list[Change] = []
            for msg in msgs:
                try:
                    changes.append(Change.from_bytes(msg.data, msg.subject))
                except (ValueError, CorruptRecordError) as exc:
                    log.error("replica: skipping unreadable record %s: %s", msg.subject, exc)
            yield changes
    except (NatsError, OSError) as exc:
        raise ReplicaError(f"listing node {node_id} stopped: {why(exc)}") from exc
    finally:
        await reader.stop()
        with contextlib.suppress(NatsError, TimeoutError):
            await js.delete_consumer(STREAM, info.name)


@dataclass
class _Asked:
    want: int
    msgs: list[Msg] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    status: str | None = None  # how the server ended it early (404, 408, 409 ...)


class _BatchReader:
    """Pull requests for a batch of messages at a time, answered into one inbox."""

    def __init__(self, nc: NatsClient, request: str, timeout_s: float, batch: int) -> None:
        self._nc = nc
        self._batch = batch
        self._request = request
        self.wait_s = timeout_s * 5
        self._inbox = nc.new_inbox()
        self._sub: Any = None
        self._asked: list[_Asked] = []

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox, cb=self._arrived)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(NatsError):
                await self._sub.unsubscribe()

    async def ask(self, left: int) -> None:
        want = min(self._batch, left)
        self._asked.append(_Asked(want))
        await self._nc.publish(
            self._request,
            orjson.dumps({"batch": want, "expires": int(self.wait_s * 1e9)}),
            reply=self._inbox,
        )

    async def take(self) -> tuple[list[Msg], bool]:
        """The oldest request's messages once all came, and whether that is all there is:
        the server said it has no more (404/408) before the batch was full. ReplicaError
        if it said something else, or nothing in time."""
        asked = self._asked[0]
        await wait_set(asked.done, self.wait_s + 1)
        self._asked.pop(0)
        if len(asked.msgs) >= asked.want:
            return asked.msgs, False
        if asked.status in ("404", "408"):
            return asked.msgs, True
        raise ReplicaError(
            f"the listing request ended after {len(asked.msgs)} of {asked.want} records: "
            + (f"status {asked.status}" if asked.status else f"no answer within {self.wait_s}s")
        )

    async def _arrived(self, msg: Msg) -> None:
        asked = next((a for a in self._asked if not a.done.is_set()), None)
        if asked is None:
            return
        status = msg.headers.get("Status") if msg.headers else None
        if status:  # the request is over
            asked.status = status
            asked.done.set()
            return
        asked.msgs.append(msg)
        if len(asked.msgs) >= asked.want:
            asked.done.set()
