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

import orjson


class Outcome(enum.Enum):
    """What one answer means for the order (CONTRACT sections 5 and 7).

    The three kinds of "not created" differ in what may be done next:
    ``RETRY``/``REFUSED`` are *clear*: nothing was created, any cluster may be
    tried; ``UNCLEAR`` may have created the order there, so it pins the order
    to that cluster.
    """

    CREATED = "created"  # 2xx with an order_id
    DUPLICATE = "duplicate"  # 200 with an order_id: the center had this key: success
    RETRY = "retry"  # 408, 425, 429, 503: not taken, try again later
    REFUSED = "refused"  # 401/403/404/405/407: the cluster refuses the agent, not the order
    CONFLICT = "conflict"  # 422: same key, different body: quarantine
    REJECTED = "rejected"  # other 4xx: permanent: quarantine with reason
    UNCLEAR = "unclear"  # 409, other 5xx, 2xx without order_id, timeout after sending

    @property
    def delivered(self) -> bool:
        return self in (Outcome.CREATED, Outcome.DUPLICATE)

    @property
    def permanent(self) -> bool:
        return self in (Outcome.CONFLICT, Outcome.REJECTED)

    @property
    def pins(self) -> bool:
        """The cluster may hold the order now: only it may be sent the order again."""
        return self is Outcome.UNCLEAR


# Not taken, and the center says so: safe to send elsewhere; retry later.
CLEAR_RETRY_STATUSES = frozenset({408, 425, 429, 503})
# A center answering these has a problem with us, not with the order (CONTRACT 7).
REFUSING_STATUSES = frozenset({401, 403, 404, 405, 407})
# Answers that say "this center is busy or recovering": pace down.
SLOW_DOWN_STATUSES = frozenset({429, 503})


def has_order_id(order_id: Any) -> bool:
    return order_id is not None and order_id != "" and not isinstance(order_id, (dict, list))


def classify(status: int, order_id: Any = None) -> Outcome:
    """The one answer policy, used by the forward path, the drain and edge-recover."""
    if 200 <= status < 300:
        if not has_order_id(order_id):
            return Outcome.UNCLEAR  # a maintenance page is no proof of creation
        return Outcome.DUPLICATE if status == 200 else Outcome.CREATED
    if status in CLEAR_RETRY_STATUSES:
        return Outcome.RETRY
    if status in REFUSING_STATUSES:
        return Outcome.REFUSED
    if status == 422:
        return Outcome.CONFLICT
    if 400 <= status < 500 and status != 409:
        return Outcome.REJECTED
    return Outcome.UNCLEAR


@dataclass(frozen=True)
class Answer:
    """A center's answer to one POST /orders."""

    status: int
    order_id: Any = None
    retry_after_s: float | None = None
    error: str = ""

    @property
    def outcome(self) -> Outcome:
        return classify(self.status, self.order_id)


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


# ---- Bulk import (CONTRACT section 7, ``POST {base}/orders:batch``) ----

# The center has no bulk import: fall back to single POSTs.
BATCH_UNSUPPORTED_STATUSES = frozenset({404, 405, 501})


@dataclass(frozen=True)
class BatchItem:
    """One order inside an ``orders:batch`` request."""

    idempotency_key: str
    serial: str
    node_id: str
    body: str  # the raw order text, verbatim


def batch_request(items: list[BatchItem]) -> bytes:
    """The request body; each order travels as its raw text, byte for byte."""
    return orjson.dumps(
        {
            "orders": [
                {
                    "idempotency_key": i.idempotency_key,
                    "serial": i.serial,
                    "node_id": i.node_id,
                    "body": i.body,
                }
                for i in items
            ]
        }
    )


def parse_batch_results(
    payload: bytes, items: list[BatchItem], retry_after_s: float | None = None
) -> list[Answer]:
    """One Answer per item, in request order; ValueError if the answer does not say.

    A malformed answer leaves every item's outcome unknown, so the caller must
    treat it like a timeout (retry the same keys), never as a success.
    """
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"batch answer is not JSON: {exc}") from exc
    results = doc.get("results") if isinstance(doc, dict) else None
    if not isinstance(results, list) or len(results) != len(items):
        raise ValueError(f"batch answer has no 'results' list of {len(items)} entries")
    answers = []
    for item, res in zip(items, results, strict=True):
        if not isinstance(res, dict) or not isinstance(res.get("status"), int):
            raise ValueError("batch result without an integer 'status'")
        key = res.get("idempotency_key")
        if key is not None and key != item.idempotency_key:
            raise ValueError(f"batch results out of order: {key!r} for {item.idempotency_key!r}")
        error = res.get("error")
        answers.append(
            Answer(
                res["status"],
                res.get("order_id"),
                retry_after_s,
                "" if error is None else str(error)[:500],
            )
        )
    return answers
