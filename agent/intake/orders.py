"""One order's way in: validate, dedupe, serial, forward or buffer, answer.

Used by ``POST /v1/orders`` and by the inbox drop zone alike. A 2xx reply is
built only after the order is created upstream or durable in pending/.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Any

from agent.base.metrics import Metrics
from agent.config import Config
from agent.delivery.router import Router, Verdict
from agent.errors import (
    BufferFullError,
    InvalidOrderError,
    PersistError,
    ReplicaConflict,
    ReplicaError,
)
from agent.orders import Order, parse_order
from agent.replica.replicator import Replicator
from agent.replica.stream import PENDING, WITHDRAWN, Change
from agent.spool.record import PendingRecord
from agent.spool.writer import PendingSpool
from agent.state.journal import BUFFERED, FORWARDED, FORWARDING, MERGED, REJECTED, Entry, Journal
from agent.state.serials import SerialIssuer
from agent.upstream.answers import Outcome

log = logging.getLogger("agent.intake")
# Told of each order a cluster created: (order, serial, received_at, cluster, order_id).
# Must return at once (the chain verifier queues behind the reply).
CreatedSink = Callable[[Order, str, str, str, Any], None]


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


class LocalClock:
    """Local time with its offset (``received_at``); the zone is looked up once a second,
    not per order, so a DST change or a new TZ shows within a second."""

    def __init__(self) -> None:
        self._checked = -1.0
        self._tz: tzinfo | None = None

    def now_iso(self) -> str:
        now = time.time()
        if self._tz is None or now - self._checked >= 1.0:
            self._tz = datetime.fromtimestamp(now).astimezone().tzinfo
            self._checked = now
        return datetime.fromtimestamp(now, self._tz).isoformat(timespec="milliseconds")


class Intake:
    """Accepts orders; the in-flight map makes concurrent repeats of one key safe."""

    def __init__(
        self,
        cfg: Config,
        journal: Journal,
        serials: SerialIssuer,
        spool: PendingSpool,
        router: Router,
        metrics: Metrics,
        on_buffered: Callable[[PendingRecord], Awaitable[str]] | None = None,
        on_created: CreatedSink | None = None,
        replica: Replicator | None = None,
    ) -> None:
        self.cfg = cfg
        self._journal = journal
        self._serials = serials
        self._spool = spool
        self._router = router
        self._metrics = metrics
        self._on_buffered = on_buffered
        self._on_created = on_created
        self._replica = replica
        self._outcomes: dict[str, Any] = {}
        self._clock = LocalClock()
        self._inflight: dict[str, str | None] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self.accepting = True
        self.failing: str | None = None  # why the last order could not be kept, until one is

    def writing(self, serial: str) -> bool:
        """True while this serial's order is between its pending file and its reply, or
        its journal row (committed behind the 202) is not durable yet."""
        return self._journal.queued(serial) or serial in self._inflight.values()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def submit(self, raw: bytes, idempotency_key: str | None) -> Reply:
        if not self.accepting:
            return self._count("refused", Reply(503, {"error": "agent is shutting down; retry"}))
        try:
            order = parse_order(raw, idempotency_key)
        except InvalidOrderError as exc:
            return self._count("invalid", Reply(400, {"error": str(exc), "field": exc.field}))
        key = order.dedupe_key
        if key in self._inflight:
            return self._count(
                "in_flight",
                Reply(
                    409,
                    {
                        "error": f"an order with dedupe key {key!r} is still being handled; retry",
                        "serial": self._inflight[key],
                    },
                ),
            )
        self._inflight[key] = None
        self._idle.clear()
        try:
            reply = await self._submit(order)
            self.failing = None
            return reply
        except (PersistError, OSError) as exc:
            # The disk or the state under us failed: refuse (not accepted), say why, and
            # let /readyz tell the load balancer until an order goes through again.
            self.failing = f"{type(exc).__name__}: {exc}"
            log.error("order refused, cannot persist: %s", exc)
            return self._count("refused", Reply(503, {"error": f"cannot persist: {exc}; retry"}))
        finally:
            del self._inflight[key]
            if not self._inflight:
                self._idle.set()

    async def lookup(self, dedupe_key: str) -> Entry | None:
        return await self._current(await self._journal.by_key(dedupe_key))

    async def lookup_serial(self, serial: str) -> Entry | None:
        return await self._current(await self._journal.by_serial(serial))

    async def find(self, dedupe_key: str) -> Entry | None:
        """``lookup`` for the API: a send cut short is settled first (``_settled``)."""
        return await self._settled(await self.lookup(dedupe_key))

    async def find_serial(self, serial: str) -> Entry | None:
        return await self._settled(await self.lookup_serial(serial))

    async def _settled(self, entry: Entry | None) -> Entry | None:
        """A "forwarding" row that no request of this process is sending is a send cut
        short by a crash or a power cut, perhaps after its 201 (the "forwarded" row is
        committed behind it): the cluster it went to says whether it holds the order.
        Raises UpstreamError while that cluster cannot say; the row stays as it is."""
        if (
            entry is None
            or entry.state != FORWARDING
            or entry.cluster is None
            or entry.serial in self._inflight.values()
        ):
            return entry
        order_id = await self._router.created(
            entry.cluster, entry.dedupe_key, self.cfg.upstream.timeout_s
        )
        if order_id is None:
            return entry  # not there: never created, so never answered 201
        settled = dataclasses.replace(entry, state=FORWARDED, order_id=str(order_id))
        self._journal.record_update_behind(settled)
        return settled

    async def _current(self, entry: Entry | None) -> Entry | None:
        """A "buffered" row whose file another process (edge-recover) moved: say where
        it is now, and heal the index. The files are the truth."""
        if entry is None or entry.state != BUFFERED or self.writing(entry.serial):
            return entry
        where = await asyncio.to_thread(self._spool.dirs.where, f"{entry.serial}.json")
        if where in (None, "pending"):
            return entry
        state = MERGED if where == "merged" else REJECTED
        with contextlib.suppress(PersistError):
            await self._journal.mark(entry.serial, state)
        return dataclasses.replace(entry, state=state)

    async def _submit(self, order: Order) -> Reply:
        seen = await self.lookup(order.dedupe_key)
        if seen is not None and seen.acknowledged:
            if seen.digest == order.digest:
                return self._count(
                    "duplicate", Reply(200, {"status": "duplicate", "serial": seen.serial})
                )
            return self._count(
                "conflict",
                Reply(
                    422,
                    {
                        "error": f"dedupe key {order.dedupe_key!r} was accepted before with a "
                        "different body; the first order stands",
                        "serial": seen.serial,
                    },
                ),
            )
        # A "forwarding" row is a send cut short by a crash: that cluster may hold the key.
        only = seen.cluster if seen is not None else None
        serial = seen.serial if seen is not None else await self._serials.next()
        self._inflight[order.dedupe_key] = serial
        received_at = self._clock.now_iso()
        clusters = self._router.candidates(only)
        pinned = only
        if clusters:
            resumed = seen is not None  # its intent: a send cut short by a crash
            reply, pinned = await self._forward(order, serial, received_at, clusters, resumed)
            if reply is not None:
                return reply
        return await self._buffer(order, serial, received_at, pinned)

    async def _forward(
        self,
        order: Order,
        serial: str,
        received_at: str,
        clusters: list[tuple[str, str]],
        resumed: bool = False,
    ) -> tuple[Reply | None, str | None]:
        """Try the clusters: (the reply, None) or (None, the cluster it is pinned to).

        ``resumed``: the key's intent was already in the journal (an earlier send cut
        short by a crash or a power cut, perhaps after its 201): when the cluster
        answers "duplicate", this is the retry of an accepted order, and says so.
        """
        intended: list[str] = []

        async def before_send(cluster: str) -> None:
            # The intent, durable before the request leaves: a retry after a crash (or
            # a power cut) must go to this cluster only.
            await self._journal.record(
                Entry(
                    order.dedupe_key, serial, FORWARDING, cluster, None, order.digest, received_at
                )
            )
            intended.append(cluster)

        try:
            routed = await self._router.forward(
                clusters,
                order.raw,
                order.dedupe_key,
                serial,
                self.cfg.upstream.timeout_s,
                before_send,
            )
        except PersistError as exc:
            log.error("journal intent for %s failed, buffering: %s", serial, exc)
            return None, intended[-1] if intended else clusters[0][0]
        answer = routed.answer
        if routed.verdict is Verdict.CREATED and answer is not None and routed.cluster:
            entry = Entry(
                order.dedupe_key,
                serial,
                FORWARDED,
                routed.cluster,
                str(answer.order_id),
                order.digest,
                received_at,
            )
            # Committed behind the 201, like a buffered row: the intent above is durable,
            # so after a crash a lookup finds the serial and its cluster, and a retry of
            # the key goes there under this serial and is answered "duplicate".
            self._journal.record_update_behind(entry)  # the intent's row, now forwarded
            if self._on_created is not None:
                self._on_created(order, serial, received_at, routed.cluster, answer.order_id)
            if resumed and answer.outcome is Outcome.DUPLICATE:
                return self._count(
                    "duplicate", Reply(200, {"status": "duplicate", "serial": serial})
                ), None
            return self._count(
                "forwarded",
                Reply(
                    201,
                    {
                        "status": "forwarded",
                        "serial": serial,
                        "cluster": routed.cluster,
                        "order_id": answer.order_id,
                    },
                ),
            ), None
        if routed.verdict is Verdict.CONFLICT and answer is not None:
            return self._count(
                "upstream_conflict",
                Reply(
                    422,
                    {
                        "error": f"the {routed.cluster} order center already holds this dedupe key "
                        f"with a different body: {answer.error or 'HTTP 422'}",
                        "serial": None,
                    },
                ),
            ), None
        if routed.verdict is Verdict.REJECTED and answer is not None:
            return self._count(
                "upstream_rejected",
                Reply(
                    answer.status,
                    {
                        "error": f"the {routed.cluster} order center rejected the order "
                        f"(HTTP {answer.status}): {answer.error or 'no reason given'}",
                        "field": None,
                    },
                ),
            ), None
        log.info("order %s not created upstream, buffering: %s", serial, routed.reason)
        return None, routed.pinned

    async def _buffer(
        self, order: Order, serial: str, received_at: str, pinned: str | None
    ) -> Reply:
        record = PendingRecord(
            serial=serial,
            node_id=self.cfg.agent.node_id,
            received_at=received_at,
            channel_id=order.channel_id,
            dedupe_key=order.dedupe_key,
            customer_phone=order.customer_phone,
            body=order.raw.decode("utf-8"),
            pinned_to=pinned,
        )
        try:
            await self._spool.write(record)
        except BufferFullError as exc:
            log.error("order refused, buffer full: %s", exc)
            return self._count("refused", Reply(507, {"error": str(exc)}))
        refused = await self._replicate(record)
        if refused is not None:
            return refused
        # The file is durable and is the truth: its journal row is committed behind the
        # 202 (lookups see it at once; a crash that takes it is healed at start-up).
        self._journal.record_behind(
            Entry(order.dedupe_key, serial, BUFFERED, pinned, None, order.digest, received_at)
        )
        sms = "none"
        if self._on_buffered is not None:
            sms = await self._on_buffered(record)
        return self._count(
            "buffered", Reply(202, {"status": "buffered", "serial": serial, "sms": sms})
        )

    async def _replicate(self, record: PendingRecord) -> Reply | None:
        """With [replication]: the record on a JetStream quorum before the 202 (CONTRACT 11).

        No quorum and ``required``: the pending file is unlinked (durably) before the 503,
        so a refused order never reaches the center. While we wait, ``writing()`` keeps
        the drain off the file. A crash before any answer leaves a file that start-up
        replicates and delivers: the client got no 2xx and retries with the same key.
        """
        replica = self._replica
        if replica is None:
            return None
        try:
            await replica.replicate(record)
            return None
        except ReplicaError as exc:
            error = exc
        if not replica.cfg.required:
            log.warning("order %s kept on local durability alone: %s", record.serial, error)
            replica.owe(Change(PENDING, record))
            return None
        try:
            await self._spool.withdraw(record)
        except PersistError as exc:
            # It stays durable here and will be delivered: a 503 would be a lie. Keep it
            # as an order that is not replicated yet, like required = false does.
            log.error("order %s not replicated and its file stays (%s)", record.serial, exc)
            replica.owe(Change(PENDING, record))
            return None
        log.error("order %s refused, not replicated: %s", record.serial, error)
        if not isinstance(error, ReplicaConflict):
            # The publish may still be committed once the quorum is back: a tombstone,
            # written as soon as it can be, keeps a takeover from delivering the order.
            replica.owe(Change(WITHDRAWN, record))
        if isinstance(error, ReplicaConflict):
            why = f"order not accepted: {error}; replication.required is true"
        else:
            why = (
                f"order not accepted: the replica (NATS JetStream) did not store it on a "
                f"quorum ({error}); replication.required is true; retry"
            )
        return self._count("unreplicated", Reply(503, {"error": why}))

    def replicated(self, serial: str) -> bool | None:
        """For lookups: None without [replication], else False while only local."""
        return None if self._replica is None else not self._replica.unreplicated(serial)

    def _count(self, outcome: str, reply: Reply) -> Reply:
        counter = self._outcomes.get(outcome)
        if counter is None:  # the labelled child, looked up once per outcome
            counter = self._outcomes[outcome] = self._metrics.orders.labels(outcome=outcome)
        counter.inc()
        return reply
