"""The HTTP client to the order-center clusters.

This is where HTTP failures become ours: a failure before the request could
reach the center is UpstreamUnavailable (safe to send elsewhere); one after is
UpstreamAmbiguous (the order may exist there). ``POST {base}/orders``, the hot
request, goes through the lean client in ``http1.py``, which classifies its
failures the same way (tests/unit/test_http1.py plays every fault to both); the
rest (health checks, bulk imports, lookups) through aiohttp, translated here.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, quote, urlsplit, urlunsplit

import aiohttp
import orjson

from agent.base.tasks import cancel_and_wait
from agent.errors import DnsError, UpstreamAmbiguous, UpstreamError, UpstreamUnavailable
from agent.upstream.answers import (
    BATCH_UNSUPPORTED_STATUSES,
    Answer,
    BatchItem,
    batch_request,
    parse_batch_results,
    parse_retry_after,
)
from agent.upstream.dns import ClusterResolver
from agent.upstream.http1 import Http1Client, Target
from agent.upstream.http_errors import LIBRARY_ERRORS, Phase, failure_phase


class UpstreamClient:
    """Owns the keep-alive sessions to the clusters, one per host.

    Connections are pooled per host name; when the DNS answer for a host
    drops an address, that host's pool is retired (closed once in-flight
    requests are done) so no request rides a connection to an address that
    left the answer.
    """

    def __init__(
        self,
        node_id: str,
        resolver: ClusterResolver,
        max_connections: int = 100,
        retire_grace_s: float = 30.0,
    ) -> None:
        self._node_id = node_id
        self._resolver = resolver
        self._max_connections = max_connections
        self._retire_grace_s = retire_grace_s
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._hosts: dict[str, str] = {}  # url -> host name, for the few URLs we use
        # POST {base}/orders, the hot request, goes through the lean client (http1.py),
        # its URL parsed once per base.
        self._http1 = Http1Client(resolver, max_connections)
        self._order_targets: dict[str, Target] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._started = False
        resolver.subscribe(self._on_dns_change)

    async def start(self) -> None:
        self._started = True

    async def stop(self) -> None:
        self._started = False
        self._http1.close()
        sessions, self._sessions = list(self._sessions.values()), {}
        await cancel_and_wait(*self._retiring)
        for session in sessions:
            await session.close()

    def session_for(self, url: str) -> aiohttp.ClientSession:
        host = self._hosts.get(url)
        if host is None:
            host = urlsplit(url).hostname or ""
            if len(self._hosts) < 1024:
                self._hosts[url] = host
        return self._session_for_host(host)

    def _session_for_host(self, host: str) -> aiohttp.ClientSession:
        if not self._started:
            raise RuntimeError("UpstreamClient.start() must be awaited before use")
        session = self._sessions.get(host)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, resolver=self._resolver, use_dns_cache=False
            )
            # No cookies: an order center's Set-Cookie must not ride along on other
            # orders, and the jar costs a lookup on every request.
            # No Accept/Accept-Encoding: the answers are small JSON, asking for gzip only
            # costs two header lines each way.
            session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=_SKIP_AUTO_HEADERS,
            )
            self._sessions[host] = session
        return session

    def _on_dns_change(self, host: str, old: tuple[str, ...], new: tuple[str, ...]) -> None:
        if set(old) <= set(new):
            return  # only additions: existing connections are still to valid addresses
        self._http1.retire(host)
        session = self._sessions.pop(host, None)
        if session is not None and self._started:
            task = asyncio.create_task(self._retire(session), name=f"retire-pool:{host}")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _retire(self, session: aiohttp.ClientSession) -> None:
        try:
            await asyncio.sleep(self._retire_grace_s)
        finally:
            await session.close()

    async def post_order(
        self, base: str, body: bytes, dedupe_key: str, serial: str, timeout_s: float
    ) -> Answer:
        headers = {  # Content-Type (and Host, User-Agent) come with the target's head
            "Idempotency-Key": dedupe_key,
            "X-Edge-Serial": serial,
            "X-Edge-Node": self._node_id,
        }
        if not self._started:
            raise RuntimeError("UpstreamClient.start() must be awaited before use")
        target = self._order_targets.get(base)
        if target is None:
            target = Target(f"{base.rstrip('/')}/orders")  # UpstreamUnavailable if invalid
            if len(self._order_targets) < 1024:
                self._order_targets[base] = target
        reply = await self._http1.post(target, headers, body, timeout_s)
        return _answer(reply.status, reply.body, reply.retry_after, reply.problem)

    async def check_health(self, base: str, timeout_s: float) -> dict[str, str | None]:
        """``GET {base}/health`` on every address of the host: {address: error or None}.

        Raises DnsError when the host does not resolve at all.
        """
        parts = urlsplit(f"{base.rstrip('/')}/health")
        host = parts.hostname or ""
        addresses = await self._resolver.addresses(host)
        results = await asyncio.gather(
            *(self._check_address(parts, host, a, timeout_s) for a in addresses)
        )
        return dict(zip(addresses, results, strict=True))

    async def _check_address(
        self, parts: SplitResult, host: str, address: str, timeout_s: float
    ) -> str | None:
        port = f":{parts.port}" if parts.port else ""
        url = urlunsplit((parts.scheme, f"{address}{port}", parts.path, parts.query, ""))
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        headers = {"Host": f"{host}{port}"}
        tls_name = host if parts.scheme == "https" else None
        try:
            async with self.session_for(url).get(
                url, timeout=timeout, headers=headers, server_hostname=tls_name
            ) as resp:
                await resp.read()
                if resp.status != 200:
                    return f"GET {parts.geturl()} via {address} answered HTTP {resp.status}"
                return None
        except _LIBRARY_ERRORS as exc:
            return f"GET {parts.geturl()} via {address}: {_translate(exc, url)}"

    async def post_batch(
        self,
        base: str,
        items: list[BatchItem],
        timeout_s: float,
    ) -> BatchAnswer:
        """``POST {base}/orders:batch``: per-item answers, or the status of the whole.

        ``answers`` is None when the center did not answer per item (unsupported,
        busy, failing); a 200 whose results cannot be read raises UpstreamAmbiguous.
        """
        url = f"{base.rstrip('/')}/orders:batch"
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(timeout_s, 2.0))
        headers = {"Content-Type": "application/json", "X-Edge-Node": self._node_id}
        try:
            async with self.session_for(url).post(
                url, data=batch_request(items), headers=headers, timeout=timeout
            ) as resp:
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
            async with self.session_for(url).get(url, timeout=timeout) as resp:
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


def _answer(status: int, payload: bytes, retry_after: str | None, problem: str = "") -> Answer:
    """What a center answered; ``problem``: why its body could not be read (then only
    the status speaks, and a 2xx is unclear: no order_id could be seen)."""
    if problem:
        return Answer(status, None, parse_retry_after(retry_after), problem)
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


_LIBRARY_ERRORS = LIBRARY_ERRORS
_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding")


def _translate(exc: BaseException, url: str) -> UpstreamError:
    """Map aiohttp/asyncio errors to ours (cancellation is never caught)."""
    phase = failure_phase(exc)
    if phase is Phase.DNS:
        os_error = getattr(exc, "os_error", exc)
        return DnsError(f"cannot resolve the host of {url}: {os_error}")
    if phase is Phase.CONNECT:
        return UpstreamUnavailable(f"cannot connect to {url}: {exc}")
    if phase is Phase.INVALID_URL:
        return UpstreamUnavailable(f"invalid URL {url}: {exc}")
    if phase is Phase.TIMEOUT:
        return UpstreamAmbiguous(f"no answer from {url} in time")
    return UpstreamAmbiguous(f"connection to {url} failed after sending: {exc!r}")
