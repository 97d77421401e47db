"""Where one new order goes: primary, standby, or the buffer.

The rule ops will ask about: an order is sent to the standby only when the
primary failed *unambiguously* (no connection, DNS or TLS failure, 503, 429,
or an answer that says it is misconfigured for us): nothing was created there.
After an ambiguous outcome (timeout or reset after sending, 500, 502, 504,
409) the primary may hold the order, and the clusters need not share their
idempotency store, so the order is buffered and re-delivered to the primary
with its key. All of it happens inside one deadline (``upstream.timeout_s``).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

from agent.errors import UpstreamAmbiguous, UpstreamUnavailable
from agent.upstream.answers import Answer, Outcome
from agent.upstream.client import UpstreamClient
from agent.upstream.health import HealthMonitor

# Answers that prove the cluster did not take the order: safe to try the other one.
UNAMBIGUOUS_REFUSALS = frozenset({429, 503})
# A center answering these has a problem with us, not with the order.
CLUSTER_PROBLEMS = frozenset({401, 403, 404, 405, 407})
_MIN_ATTEMPT_S = 0.05


class Verdict(enum.Enum):
    CREATED = "created"      # 201/200 from a cluster
    CONFLICT = "conflict"    # 422: the center holds this key with another body
    REJECTED = "rejected"    # a permanent 4xx about the order itself
    BUFFER = "buffer"        # not created (or unknown): keep it on disk


@dataclass(frozen=True)
class Routed:
    verdict: Verdict
    cluster: str | None = None
    answer: Answer | None = None
    reason: str = ""


class Router:
    def __init__(self, health: HealthMonitor, upstream: UpstreamClient) -> None:
        self._health = health
        self._upstream = upstream

    def candidates(self, only: str | None = None) -> list[tuple[str, str]]:
        """Healthy clusters in order of preference, optionally restricted to one."""
        out = []
        for name in ("primary", "standby"):
            cluster = self._health.clusters.get(name)
            if cluster is not None and cluster.healthy and only in (None, name):
                out.append((name, cluster.base))
        return out

    async def forward(self, clusters: list[tuple[str, str]], body: bytes, dedupe_key: str,
                      serial: str, timeout_s: float) -> Routed:
        deadline = time.monotonic() + timeout_s
        reason = "no healthy cluster"
        for name, base in clusters:
            remaining = deadline - time.monotonic()
            if remaining < _MIN_ATTEMPT_S:
                return Routed(Verdict.BUFFER, reason=f"{reason}; deadline reached")
            try:
                answer = await self._upstream.post_order(base, body, dedupe_key, serial,
                                                         remaining)
            except UpstreamUnavailable as exc:
                reason = f"{name}: {exc}"
                continue
            except UpstreamAmbiguous as exc:
                return Routed(Verdict.BUFFER, name, reason=f"{name} ambiguous: {exc}")
            outcome = answer.outcome
            if outcome.delivered:
                return Routed(Verdict.CREATED, name, answer)
            if answer.status in UNAMBIGUOUS_REFUSALS or answer.status in CLUSTER_PROBLEMS:
                reason = f"{name} answered HTTP {answer.status}"
                continue
            if outcome is Outcome.CONFLICT:
                return Routed(Verdict.CONFLICT, name, answer)
            if outcome is Outcome.REJECTED:
                return Routed(Verdict.REJECTED, name, answer)
            # 409/408/425 or 5xx: the cluster may be working on it: stay with it.
            return Routed(Verdict.BUFFER, name, answer,
                          reason=f"{name} answered HTTP {answer.status} (ambiguous)")
        return Routed(Verdict.BUFFER, reason=reason)
