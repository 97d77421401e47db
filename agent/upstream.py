"""The HTTP client to the order-center clusters.

This is the one place where aiohttp's client errors become ours: a failure
before the request could reach the center is UpstreamUnavailable (safe to
send elsewhere); one after is UpstreamAmbiguous (the order may exist there).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson

from .delivery import Answer, parse_retry_after
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
