"""What an order center's answer means (CONTRACT section 7), for every deliverer.

The agent's forward path, its drain and ``edge-recover`` all classify answers
here, so a 409 or a 429 means the same thing whichever of them saw it.
"""

from __future__ import annotations

import email.utils
import enum
import time
from dataclasses import dataclass
from typing import Any


class Outcome(enum.Enum):
    CREATED = "created"        # 201
    DUPLICATE = "duplicate"    # 200: the center had this key already: success
    RETRY = "retry"            # 409, 408, 425, 429: not now, same cluster, later
    CONFLICT = "conflict"      # 422: same key, different body: quarantine
    REJECTED = "rejected"      # other 4xx: permanent: quarantine with reason
    TRANSIENT = "transient"    # 5xx, timeout, connection error: back off, retry

    @property
    def delivered(self) -> bool:
        return self in (Outcome.CREATED, Outcome.DUPLICATE)

    @property
    def permanent(self) -> bool:
        return self in (Outcome.CONFLICT, Outcome.REJECTED)


RETRY_STATUSES = frozenset({408, 409, 425, 429})
# Answers that say "this center is busy or recovering": pace down.
SLOW_DOWN_STATUSES = frozenset({429, 503})


def classify(status: int) -> Outcome:
    if status == 201:
        return Outcome.CREATED
    if status == 200:
        return Outcome.DUPLICATE
    if status in RETRY_STATUSES:
        return Outcome.RETRY
    if status == 422:
        return Outcome.CONFLICT
    if 400 <= status < 500:
        return Outcome.REJECTED
    return Outcome.TRANSIENT


@dataclass(frozen=True)
class Answer:
    """A center's answer to one POST /orders."""

    status: int
    order_id: Any = None
    retry_after_s: float | None = None
    error: str = ""

    @property
    def outcome(self) -> Outcome:
        return classify(self.status)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date; None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
