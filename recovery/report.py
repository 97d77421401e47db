"""The summary a merge prints, and the ``--report`` JSON file, written as a stream.

The report file is ``{"summary": {...}, "orders": [ {...}, ... ]}`` with one
entry per order handled by this run (serial, dedupe_key, file, outcome,
order_id or error, duplicate_of); entries come from the checkpoint in chunks,
so a million of them never sit in memory at once.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

OUTCOMES = ("created", "duplicate", "rejected", "conflict", "by_agent", "pending", "unreadable")


@dataclass
class Summary:
    mode: str
    target: str
    total: int = 0
    outcomes: tuple[str, ...] = OUTCOMES
    started: float = field(default_factory=time.monotonic)
    counts: Counter[str] = field(default_factory=Counter)
    extra: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float | None = None

    def add(self, outcome: str, n: int = 1) -> None:
        self.counts[outcome] += n

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    def finish(self) -> None:
        self.elapsed_s = time.monotonic() - self.started

    def as_dict(self) -> dict[str, Any]:
        elapsed = self.elapsed_s if self.elapsed_s is not None else time.monotonic() - self.started
        doc: dict[str, Any] = {"mode": self.mode, "target": self.target, "total": self.total}
        doc.update({name: self.counts.get(name, 0) for name in self.outcomes})
        doc["elapsed_s"] = round(elapsed, 3)
        doc["rate_per_s"] = round(self.done / elapsed, 1) if elapsed > 0 else None
        doc.update(self.extra)
        return doc

    def line(self) -> str:
        d = self.as_dict()
        parts = [f"total {d['total']}"] + [
            f"{name} {d[name]}" for name in self.outcomes if d[name] or name in self.outcomes[:4]
        ]
        rate = f", {d['rate_per_s']:.0f} orders/s" if d["rate_per_s"] else ""
        return f"{', '.join(parts)}; elapsed {d['elapsed_s']:.1f}s{rate}"


def write_report(
    path: Path,
    summary: dict[str, Any],
    key: str,
    entries: Iterable[dict[str, Any]],
    more: dict[str, Iterable[dict[str, Any]]] | None = None,
) -> None:
    """Write ``{"summary": ..., key: [entries], **more}`` via a temp file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(b'{"summary":' + orjson.dumps(summary))
        for name, items in {key: entries, **(more or {})}.items():
            fh.write(b',"' + name.encode() + b'":[')
            first = True
            for entry in items:
                if not first:
                    fh.write(b",\n")
                fh.write(orjson.dumps(entry))
                first = False
            fh.write(b"]")
        fh.write(b"}\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
