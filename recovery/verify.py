"""``--mode verify``: is every order in merged/ really in the center, byte for byte?

For each merged/ file, ``GET {base}/orders/by-key/{key}``; a 404 is "missing",
a body other than the merged copy's is "different", an unreadable merged/
file is "unreadable", and no usable answer after a few tries is "error".
Only problems are kept (spooled to a temp file), so memory stays flat.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from agent.delivery.pacing import delay
from agent.errors import OrderFileError, UpstreamError
from agent.spool.reading import read_order_file
from agent.spool.record import PendingRecord, is_order_file
from agent.upstream.client import UpstreamClient
from recovery.progress import Progress
from recovery.report import Summary

log = logging.getLogger("recovery.verify")

TRIES = 4


def merged_files(merged: Path) -> Iterator[str]:
    """Every entry with an order file's name: one that is no readable regular file is
    reported "unreadable", never passed over."""
    with os.scandir(merged) as it:
        for entry in it:
            if is_order_file(entry.name):
                yield entry.name


def count_merged(merged: Path) -> int:
    return sum(1 for _ in merged_files(merged)) if merged.is_dir() else 0


class Verifier:
    def __init__(
        self,
        merged: Path,
        client: UpstreamClient,
        base: str,
        concurrency: int,
        timeout_s: float,
        summary: Summary,
        progress: Progress,
        stop: asyncio.Event,
    ) -> None:
        self._merged = merged
        self._client = client
        self._base = base
        self._concurrency = concurrency
        self._timeout_s = timeout_s
        self._summary = summary
        self._progress = progress
        self._stop = stop
        self.problems: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed by the caller

    async def run(self) -> None:
        names: asyncio.Queue[str | None] = asyncio.Queue(self._concurrency * 4)
        files = merged_files(self._merged) if self._merged.is_dir() else iter(())
        # A worker that fails ends the run: the others are cancelled, not left running.
        async with asyncio.TaskGroup() as workers:
            for _ in range(self._concurrency):
                workers.create_task(self._worker(names))
            for name in files:
                if self._stop.is_set():
                    break
                await names.put(name)
            for _ in range(self._concurrency):
                await names.put(None)

    def problem_entries(self) -> Iterator[dict[str, Any]]:
        self.problems.seek(0)
        for line in self.problems:
            yield orjson.loads(line)

    async def _worker(self, names: asyncio.Queue[str | None]) -> None:
        while (name := await names.get()) is not None:
            if self._stop.is_set():
                continue
            status, details = await self._check(name)
            self._summary.add(status)
            self._progress.update(1)
            if status != "ok":
                self.problems.write(
                    orjson.dumps({"file": f"merged/{name}", "status": status, **details}) + b"\n"
                )

    async def _check(self, name: str) -> tuple[str, dict[str, Any]]:
        try:
            data = await asyncio.to_thread(read_order_file, self._merged / name)
            doc = orjson.loads(data)
            record = PendingRecord.from_dict(
                {k: v for k, v in doc.items() if k in _RECORD_KEYS}
                if isinstance(doc, dict)
                else doc,
                origin=f"merged/{name}",
            )
        except FileNotFoundError:
            return "ok", {}  # expired by the agent's housekeeping meanwhile
        except (OSError, orjson.JSONDecodeError, OrderFileError) as exc:
            return "unreadable", {"error": str(exc)}
        ids = {
            "serial": record.serial,
            "dedupe_key": record.dedupe_key,
            "order_id": doc.get("order_id"),
        }
        error = ""
        for attempt in range(TRIES):
            try:
                status, found = await self._client.get_by_key(
                    self._base, record.dedupe_key, self._timeout_s
                )
            except UpstreamError as exc:
                error = str(exc)
            else:
                if status == 404:
                    return "missing", ids
                if status == 200 and isinstance(found, dict):
                    if found.get("body") != record.body:
                        return "different", {**ids, "center_order_id": found.get("order_id")}
                    return "ok", {}
                error = f"HTTP {status}"
            await asyncio.sleep(delay(attempt + 1, 0.2, 5.0))
        return "error", {**ids, "error": error}


_RECORD_KEYS = frozenset(
    {"v", "serial", "node_id", "received_at", "channel_id", "dedupe_key", "customer_phone", "body"}
)
