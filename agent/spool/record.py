"""The pending record format (CONTRACT section 5) and the buffer's directory layout.

Layout under ``buffer.path``::

    pending/{serial}.json   undelivered orders: the only durable copy
    inbox/*.json            drop zone for raw order objects from local processes
    merged/{serial}.json    delivered, with the center's order_id, kept retention_days
    rejected/{name}         refused or corrupt, with {name}.reason.json beside it
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from agent.delivery.targets import valid_pin
from agent.errors import CorruptRecordError

RECORD_VERSION = 1
REASON_SUFFIX = ".reason.json"


@dataclass(frozen=True)
class PendingRecord:
    """One buffered order, as stored in ``pending/{serial}.json``."""

    serial: str
    node_id: str
    received_at: str
    channel_id: str
    dedupe_key: str
    customer_phone: str | None
    body: str  # the raw order text, verbatim
    # The one cluster that may already hold the order (CONTRACT 5), or None.
    pinned_to: str | None = None

    @property
    def filename(self) -> str:
        return f"{self.serial}.json"

    @property
    def raw_body(self) -> bytes:
        return self.body.encode("utf-8")

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": RECORD_VERSION,
            "serial": self.serial,
            "node_id": self.node_id,
            "received_at": self.received_at,
            "channel_id": self.channel_id,
            "dedupe_key": self.dedupe_key,
            "customer_phone": self.customer_phone,
            "pinned_to": self.pinned_to,
            "body": self.body,
        }

    def to_bytes(self) -> bytes:
        """The file's content; made once per record (the writer needs its size before
        the batch writes it, and the replica sends the same bytes)."""
        data: bytes | None = self.__dict__.get("_bytes")
        if data is None:
            data = orjson.dumps(self.to_dict())
            object.__setattr__(self, "_bytes", data)  # a cache, not a field: frozen stays
        return data

    @classmethod
    def from_bytes(cls, data: bytes, origin: str = "") -> PendingRecord:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise CorruptRecordError(f"{origin}: not JSON ({exc})") from exc
        return cls.from_dict(obj, origin)

    @classmethod
    def from_dict(cls, obj: Any, origin: str = "") -> PendingRecord:
        if not isinstance(obj, dict):
            raise CorruptRecordError(f"{origin}: not a JSON object")
        if obj.get("v") != RECORD_VERSION:
            raise CorruptRecordError(f"{origin}: unsupported record version v={obj.get('v')!r}")
        for key in ("serial", "node_id", "received_at", "channel_id", "dedupe_key", "body"):
            if not isinstance(obj.get(key), str) or not obj[key]:
                raise CorruptRecordError(f"{origin}: field {key!r} missing or not a string")
        phone = obj.get("customer_phone")
        if phone is not None and not isinstance(phone, str):
            raise CorruptRecordError(f"{origin}: field 'customer_phone' is not a string")
        # Written by an agent before pinned_to existed: the primary may hold it.
        pinned = obj.get("pinned_to", "primary")
        if not valid_pin(pinned):
            raise CorruptRecordError(
                f"{origin}: field 'pinned_to' is {pinned!r}, expected "
                "'primary', 'standby', an http(s) URL or null"
            )
        return cls(
            serial=obj["serial"],
            node_id=obj["node_id"],
            received_at=obj["received_at"],
            channel_id=obj["channel_id"],
            dedupe_key=obj["dedupe_key"],
            customer_phone=phone,
            body=obj["body"],
            pinned_to=pinned,
        )

    def pinned(self, cluster: str | None) -> PendingRecord:
        return dataclasses.replace(self, pinned_to=cluster)


@dataclass(frozen=True)
class BufferDirs:
    root: Path

    @property
    def pending(self) -> Path:
        return self.root / "pending"

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def rejected(self) -> Path:
        return self.root / "rejected"

    def where(self, name: str) -> str | None:
        """Which of pending/, merged/, rejected/ holds ``name`` now (blocks: a stat or three)."""
        for sub in ("pending", "merged", "rejected"):
            if (self.root / sub / name).exists():
                return sub
        return None

    def ensure(self) -> None:
        """Create the layout with 0700 directories; fail loudly if we cannot."""
        for d in (self.root, self.pending, self.inbox, self.merged, self.rejected):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)


def is_order_file(name: str) -> bool:
    """Visible *.json files only: temp files and reason files are not orders."""
    return name.endswith(".json") and not name.startswith(".") and not name.endswith(REASON_SUFFIX)


ADDED_KEYS_MARK = b',"order_id":'


def strip_added_keys(data: bytes) -> bytes | None:
    """The record as it was before finish_merged_batch added keys to it, else None.

    A crash can leave a file whose added tail is torn; everything before the
    mark is the original record, so it is never lost.
    """
    at = data.rfind(ADDED_KEYS_MARK)
    return None if at < 0 else data[:at] + b"}"


def parse_tolerant(data: bytes, origin: str) -> PendingRecord:
    """The record, also from a file whose added keys a crash left torn."""
    try:
        return PendingRecord.from_bytes(data, origin=origin)
    except CorruptRecordError:
        original = strip_added_keys(data)
        if original is None:
            raise
        return PendingRecord.from_bytes(original, origin=origin)
