"""The HTTP client to the order-center clusters.

This is the one place where aiohttp's client errors become ours: a failure
before the request could reach the center is UpstreamUnavailable (safe to
send elsewhere); one after is UpstreamAmbiguous (the order may exist there).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from .delivery import (
    BATCH_UNSUPPORTED_STATUSES,
    Answer,
    BatchItem,
    batch_request,
    parse_batch_results,
    parse_retry_after,
)
from .errors import UpstreamAmbiguous, UpstreamError, UpstreamUnavailable


class UpstreamClient:
    """Owns the keep-alive ClientSession used for forwarding, draining and health checks."""

    def __init__(self, node_id: str, max_connections: int = 100) -> None:
        self._node_id = node_id
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=1)
        self._session = aiohttp.ClientSession(
            connector=connector,
            json_serialize=lambda obj: orjson.dumps(obj).decode(),
            auto_decompress=True,
        )

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("UpstreamClient.start() must be awaited before use")
        return self._session

    async def post_order(
        self, base: str, body: bytes, dedupe_key: str, serial: str, timeout_s: float
    ) -> Answer:
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": dedupe_key,
            "X-Edge-Serial": serial,
            "X-Edge-Node": self._node_id,
        }
        url = f"{base.rstrip('/')}/orders"
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(timeout_s, 2.0))
        try:
            async with self.session.post(url, data=body, headers=headers,
                                         timeout=timeout) as resp:
                payload = await resp.read()
                return _answer(resp.status, payload, resp.headers.get("Retry-After"))
        except _LIBRARY_ERRORS as exc:
            raise _translate(exc, url) from exc

    async def check_health(self, base: str, timeout_s: float) -> None:
        """Raise UpstreamError unless ``GET {base}/health`` answers 200 in time."""
        url = f"{base.rstrip('/')}/health"
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with self.session.get(url, timeout=timeout) as resp:
                await resp.read()
        except _LIBRARY_ERRORS as exc:
            raise _translate(exc, url) from exc
        if resp.status != 200:
            raise UpstreamUnavailable(f"GET {url} answered HTTP {resp.status}")

    async def post_batch(self, base: str, items: list[BatchItem], timeout_s: float,
                         ) -> BatchAnswer:
        """``POST {base}/orders:batch``: per-item answers, or the status of the whole.

        ``answers`` is None when the center did not answer per item (unsupported,
        busy, failing); a 200 whose results cannot be read raises UpstreamAmbiguous.
        """
        url = f"{base.rstrip('/')}/orders:batch"
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(timeout_s, 2.0))
        headers = {"Content-Type": "application/json", "X-Edge-Node": self._node_id}
        try:
            async with self.session.post(url, data=batch_request(items), headers=headers,
                                         timeout=timeout) as resp:
                payload = await resp.read()
                status, retry_after = resp.status, resp.headers.get("Retry-After")
        except _LIBRARY_ERRORS as exc:
            raise _translate(exc, url) from exc
        retry_after_s = parse_retry_after(retry_after)
        if status != 200:
            whole = _answer(status, payload, retry_after)
            return BatchAnswer(status, None, retry_after_s, whole.error)
        try:
            answers = parse_batch_results(payload, items, retry_after_s)
        except ValueError as exc:
            raise UpstreamAmbiguous(f"POST {url}: unreadable answer: {exc}") from exc
        return BatchAnswer(status, answers, retry_after_s)

    async def get_by_key(self, base: str, key: str, timeout_s: float) -> tuple[int, Any]:
        """``GET {base}/orders/by-key/{key}``: (status, parsed JSON body or None)."""
        url = f"{base.rstrip('/')}/orders/by-key/{quote(key, safe='')}"
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(timeout_s, 2.0))
        try:
            async with self.session.get(url, timeout=timeout) as resp:
                payload = await resp.read()
                status = resp.status
        except _LIBRARY_ERRORS as exc:
            raise _translate(exc, url) from exc
        try:
            return status, orjson.loads(payload) if payload else None
        except orjson.JSONDecodeError:
            return status, None


@dataclass(frozen=True)
class BatchAnswer:
    """A center's answer to one ``orders:batch`` request."""

    status: int
    answers: list[Answer] | None  # one per item, in request order, when status is 200
    retry_after_s: float | None = None
    error: str = ""

    @property
    def unsupported(self) -> bool:
        return self.status in BATCH_UNSUPPORTED_STATUSES


def _answer(status: int, payload: bytes, retry_after: str | None) -> Answer:
    order_id: Any = None
    error = ""
    try:
        doc = orjson.loads(payload) if payload else None
    except orjson.JSONDecodeError:
        doc = None
        error = payload[:200].decode("utf-8", "replace")
    if isinstance(doc, dict):
        order_id = doc.get("order_id")
        if doc.get("error") is not None:
            error = str(doc["error"])[:500]
    return Answer(status, order_id, parse_retry_after(retry_after), error)


_LIBRARY_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


def _translate(exc: BaseException, url: str) -> UpstreamError:
    """Map aiohttp/asyncio errors to ours (cancellation is never caught)."""
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return UpstreamUnavailable(f"cannot connect to {url}: {exc}")
    if isinstance(exc, aiohttp.InvalidURL):
        return UpstreamUnavailable(f"invalid URL {url}: {exc}")
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamAmbiguous(f"no answer from {url} in time")
    return UpstreamAmbiguous(f"connection to {url} failed after sending: {exc!r}")
