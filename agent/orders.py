"""An order as a channel sends it: validated once, the same way for every way in.

``POST /v1/orders``, the inbox and edge-recover's raw order files all parse an
order here, so a field at fault is named alike wherever it came in.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass
from typing import Any

import orjson

from agent.errors import InvalidOrderError

MAX_ID_CHARS = 256


@dataclass(frozen=True)
class Order:
    raw: bytes
    channel_id: str
    channel_order_id: str
    dedupe_key: str
    customer_phone: str | None
    digest: bytes


def _check_id(value: Any, name: str, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if value is None:
        raise InvalidOrderError(name, f"{name} is required")
    if not isinstance(value, str):
        raise InvalidOrderError(name, f"{name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidOrderError(name, f"{name} must not be blank")
    if len(value) > MAX_ID_CHARS:
        raise InvalidOrderError(name, f"{name} is longer than {MAX_ID_CHARS} characters")
    if value.isascii() and value.isprintable():
        return value  # the usual case, in C: printable ASCII has no Cc/Cf/Zl/Zp character
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in value):
        raise InvalidOrderError(name, f"{name} contains control characters")
    return value


def _required_id(value: Any, name: str) -> str:
    checked = _check_id(value, name)
    if checked is None:
        raise InvalidOrderError(name, f"{name} is required")
    return checked


def parse_order(raw: bytes, idempotency_key: str | None) -> Order:
    """Validate one order body; raise InvalidOrderError naming the field at fault."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidOrderError("body", f"body is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidOrderError("body", f"body must be a JSON object, got {type(doc).__name__}")
    channel_id = _required_id(doc.get("channel_id"), "channel_id")
    channel_order_id = _required_id(doc.get("channel_order_id"), "channel_order_id")
    phone = _check_id(doc.get("customer_phone"), "customer_phone", required=False)
    if idempotency_key is not None:
        key = _required_id(idempotency_key, "Idempotency-Key")
    else:
        key = f"{channel_id}:{channel_order_id}"
    return Order(raw, channel_id, channel_order_id, key, phone, body_digest(raw))


def body_digest(raw: bytes) -> bytes:
    """What "the same body" means for a dedupe key: its bytes, hashed."""
    return hashlib.sha256(raw).digest()
