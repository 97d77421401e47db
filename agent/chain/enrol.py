"""Which orders are outage orders, and their facts as the ledger keeps them.

An outage order (CONTRACT 10) reaches the verifier three ways: the standby's
201 in the forward path, the drain's delivery of a buffered order, and a file
in ``merged/`` (delivered by ``edge-recover`` beside the agent, or left behind
by a crash, or read again to rebuild a damaged ledger). The last is read here,
from disk, in a worker thread.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Container
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from agent.chain.steps import ChainOrder
from agent.errors import CorruptRecordError, UpstreamError
from agent.orders import Order
from agent.spool.record import BufferDirs, PendingRecord, is_order_file, parse_tolerant
from agent.upstream.client import UpstreamClient

STANDBY = "standby"
# dedupe key -> the center's order_id, None when no center says (yet)
FindOrderId = Callable[[str], Awaitable[str | None]]


@dataclass(frozen=True)
class Found:
    order: ChainOrder
    delivered_at: float


def channel_order_id(body: str) -> str | None:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    value = doc.get("channel_order_id") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None


def from_record(record: PendingRecord, order_id: Any) -> ChainOrder:
    """A buffered order the center confirmed (the drain, or a merged/ copy)."""
    return ChainOrder(
        serial=record.serial,
        order_id=None if order_id is None else str(order_id),
        dedupe_key=record.dedupe_key,
        channel_id=record.channel_id,
        channel_order_id=channel_order_id(record.body),
        received_at=record.received_at,
        body=record.body,
    )


def from_order(order: Order, serial: str, received_at: str, order_id: Any) -> ChainOrder:
    """An order the forward path had created (at the standby)."""
    return ChainOrder(
        serial=serial,
        order_id=None if order_id is None else str(order_id),
        dedupe_key=order.dedupe_key,
        channel_id=order.channel_id,
        channel_order_id=order.channel_order_id,
        received_at=received_at,
        body=order.raw.decode("utf-8"),
    )


def timestamp(iso: str, default: float) -> float:
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return default


def unknown_merged(
    dirs: BufferDirs, known: Container[str], skip: Container[str], limit: int
) -> list[str]:
    """Names in merged/ whose serial is not in ``known`` (nor in ``skip``), at most
    ``limit``, oldest serial first."""
    try:
        names = sorted(n for n in os.listdir(dirs.merged) if is_order_file(n))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        serial = name.removesuffix(".json")
        if serial not in known and name not in skip:
            out.append(name)
            if len(out) >= limit:
                break
    return out


def read_merged(dirs: BufferDirs, name: str) -> Found:
    """One merged/ copy as an outage order; CorruptRecordError if it is not one."""
    path = dirs.merged / name
    try:
        data = path.read_bytes()
        mtime = path.stat().st_mtime
    except OSError as exc:
        raise CorruptRecordError(f"merged/{name}: {exc.strerror}") from exc
    doc: Any = None
    try:
        doc = orjson.loads(data)
        record = PendingRecord.from_dict(doc, f"merged/{name}")
    except (orjson.JSONDecodeError, CorruptRecordError):
        record, doc = parse_tolerant(data, f"merged/{name}"), {}
    merged_at = doc.get("merged_at") if isinstance(doc, dict) else None
    delivered = float(merged_at) if isinstance(merged_at, int | float) else mtime
    order_id = doc.get("order_id") if isinstance(doc, dict) else None
    return Found(from_record(record, order_id), delivered)


def at_the_centers(client: UpstreamClient, urls: list[str], timeout_s: float) -> FindOrderId:
    """Ask each center ``GET /orders/by-key/{key}`` for an order_id the agent lost (a
    power cut took the merged/ copy's and the journal's last write, not the order)."""

    async def find(key: str) -> str | None:
        for url in urls:
            try:
                status, doc = await client.get_by_key(url, key, timeout_s)
            except UpstreamError:
                continue
            if status == 200 and isinstance(doc, dict) and doc.get("order_id") is not None:
                return str(doc["order_id"])
        return None

    return find
