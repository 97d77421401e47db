"""Where one new order goes: primary, standby, or the buffer (CONTRACT 5 and 7).

The rule ops will ask about: an order is sent to the next cluster only when the
one before failed *clearly* (no connection, DNS or TLS failure, 503, 429, 408,
425, or 401/403/404/405/407 -- the cluster refusing the agent): nothing was
created there. After an *unclear* outcome (timeout or reset after sending,
500, 502, 504, 409, a 2xx without an order_id) that cluster may hold the
order, and the clusters need not share their idempotency store, so the order
is buffered *pinned* to that cluster: only it will be sent the order again.
Before each send the intake durably notes the cluster actually being tried
(``before_send``), so a retry after a crash goes only there. All of it
happens inside one deadline (``upstream.timeout_s``).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from agent.delivery.decide import Caller, Step, decide
from agent.errors import UpstreamAmbiguous, UpstreamError
from agent.upstream.answers import Answer, Outcome, has_order_id
from agent.upstream.client import UpstreamClient
from agent.upstream.health import HealthMonitor

_MIN_ATTEMPT_S = 0.05
# Awaited before each send with the cluster's name; raising stops the forward (buffer it).
BeforeSend = Callable[[str], Awaitable[None]]


class Verdict(enum.Enum):
    CREATED = "created"  # 201/200 from a cluster
    CONFLICT = "conflict"  # 422: the center holds this key with another body
    REJECTED = "rejected"  # a permanent 4xx about the order itself
    BUFFER = "buffer"  # not created (or unknown): keep it on disk


_QUARANTINE = {Outcome.CONFLICT.value: Verdict.CONFLICT, Outcome.REJECTED.value: Verdict.REJECTED}


@dataclass(frozen=True)
class Routed:
    verdict: Verdict
    cluster: str | None = None
    answer: Answer | None = None
    reason: str = ""
    pinned: str | None = None  # BUFFER: the cluster that may hold the order, if any


class Router:
    def __init__(self, health: HealthMonitor, upstream: UpstreamClient) -> None:
        self._health = health
        self._upstream = upstream

    def candidates(self, only: str | None = None) -> list[tuple[str, str]]:
        """Clusters that take orders, in order of preference, optionally only one."""
        out = []
        for name in ("primary", "standby"):
            cluster = self._health.clusters.get(name)
            if cluster is not None and cluster.takes_orders and only in (None, name):
                out.append((name, cluster.base))
        return out

    async def created(self, cluster: str, dedupe_key: str, timeout_s: float) -> Any | None:
        """Whether ``cluster`` holds ``dedupe_key``: its order_id, or None when it answers
        404 (``GET {base}/orders/by-key/{key}``, CONTRACT 7). Raises UpstreamError when it
        cannot say: unreachable, or any other answer."""
        state = self._health.clusters.get(cluster)
        if state is None:
            raise UpstreamAmbiguous(f"cluster {cluster!r} is not configured any more")
        status, doc = await self._upstream.get_by_key(state.base, dedupe_key, timeout_s)
        if status == 404:
            return None
        order_id = doc.get("order_id") if isinstance(doc, dict) else None
        if status == 200 and has_order_id(order_id):
            return order_id
        raise UpstreamAmbiguous(
            f"GET {state.base}/orders/by-key/{dedupe_key}: HTTP {status} without an order_id"
        )

    async def forward(
        self,
        clusters: list[tuple[str, str]],
        body: bytes,
        dedupe_key: str,
        serial: str,
        timeout_s: float,
        before_send: BeforeSend,
    ) -> Routed:
        deadline = time.monotonic() + timeout_s
        reason = "no cluster takes orders"
        for name, base in clusters:
            remaining = deadline - time.monotonic()
            if remaining < _MIN_ATTEMPT_S:
                return Routed(Verdict.BUFFER, reason=f"{reason}; deadline reached")
            await before_send(name)
            result: Answer | UpstreamError
            try:
                result = await self._upstream.post_order(base, body, dedupe_key, serial, remaining)
            except UpstreamError as exc:
                result = exc
            action = decide(result, Caller.FORWARD, name)
            answer = result if isinstance(result, Answer) else None
            if action.refusing and answer is not None:
                self._health.refused(name, answer.status, answer.error)
            elif answer is not None:
                self._health.accepted(name)
            if action.step is Step.NEXT:
                reason = action.reason
                continue
            if action.step is Step.BUFFER:
                return Routed(
                    Verdict.BUFFER,
                    name,
                    answer,
                    reason=action.reason,
                    pinned=name if action.pin else None,
                )
            if answer is None:  # decide() settles only answers
                raise RuntimeError(f"decide() settled a failure: {action}")
            if action.step is Step.MERGE:
                return Routed(Verdict.CREATED, name, answer)
            return Routed(_QUARANTINE[action.outcome], name, answer)
        return Routed(Verdict.BUFFER, reason=reason)
