"""The two clients of POST /orders, side by side, and a center that plays raw bytes.

``lean`` is agent/upstream/http1.py; ``via_aiohttp`` is the same request as the agent
made it with aiohttp before (its errors judged by http_errors.failure_phase). Their
results are compared by tests/unit/test_http1.py fault by fault and by
tests/integration/test_http1_differential.py over generated hostile answers, on ``verdict``: what
the agent does with the order.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from agent.errors import DnsError, UpstreamAmbiguous, UpstreamUnavailable
from agent.upstream.answers import Outcome
from agent.upstream.client import _answer
from agent.upstream.http1 import Http1Client, Target
from agent.upstream.http_errors import LIBRARY_ERRORS, Phase, failure_phase

BODY = b'{"channel_id":"douyin","channel_order_id":"1","total_amount":"199.10"}'
HEADERS = {"Idempotency-Key": "douyin:1", "X-Edge-Serial": "S-1", "X-Edge-Node": "n1"}
CREATED = b'{"order_id":"OC1"}'


class Resolver(AbstractResolver):
    """Resolves every name to ``address``, or fails like the ClusterResolver does."""

    def __init__(self, fail: bool = False, address: str = "127.0.0.1") -> None:
        self.fail = fail
        self.address = address

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self.fail:
            raise DnsError(f"{host}: no such domain (NXDOMAIN)")
        return [
            ResolveResult(
                hostname=host,
                host=self.address,
                port=port,
                family=socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
        ]

    async def close(self) -> None:
        pass


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def unanswered_listener(host: str = "127.0.0.1") -> AsyncIterator[int]:
    """A port whose connects hang: its listener's accept queue is full, so the kernel
    drops further SYNs (a connect then ends only by a timeout)."""
    listener = socket.socket()
    listener.bind((host, 0))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((host, listener.getsockname()[1]))
            fillers.append(s)
        await asyncio.sleep(0.2)
        yield int(listener.getsockname()[1])
    finally:
        for s in fillers:
            s.close()
        listener.close()


async def lean(
    url: str, resolver: Resolver, timeout_s: float = 1.0, client: Http1Client | None = None
) -> tuple[str, Any]:
    """("ok", (status, body, retry_after[, problem])) or ("unavailable"|"ambiguous",
    message); the problem (why the body could not be read) only when there is one."""
    own = client is None
    client = client or Http1Client(resolver)  # type: ignore[arg-type]
    try:
        reply = await client.post(Target(url), dict(HEADERS), BODY, timeout_s)
        if reply.problem:
            return "ok", (reply.status, reply.body, reply.retry_after, reply.problem)
        return "ok", (reply.status, reply.body, reply.retry_after)
    except UpstreamAmbiguous as exc:
        return "ambiguous", str(exc)
    except UpstreamUnavailable as exc:
        return "unavailable", str(exc)
    finally:
        if own:
            client.close()


async def via_aiohttp(
    url: str,
    resolver: Resolver,
    timeout_s: float = 1.0,
    session: aiohttp.ClientSession | None = None,
) -> tuple[str, Any]:
    """The same request as the agent made it with aiohttp, judged by failure_phase."""
    own = session is None
    if session is None:
        connector = aiohttp.TCPConnector(limit=100, resolver=resolver, use_dns_cache=False)
        session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())
    timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(timeout_s, 2.0))
    try:
        async with session.post(
            url, data=BODY, headers={"Content-Type": "application/json", **HEADERS}, timeout=timeout
        ) as resp:
            payload = await resp.read()
            return "ok", (resp.status, payload, resp.headers.get("Retry-After"))
    except LIBRARY_ERRORS as exc:
        phase = failure_phase(exc)
        clear = phase in (Phase.DNS, Phase.CONNECT, Phase.INVALID_URL)
        return ("unavailable" if clear else "ambiguous"), repr(exc)
    finally:
        if own:
            await session.close()


def verdict(result: tuple[str, Any]) -> tuple[str, ...]:
    """What the agent does with the order after this result: ("created"|"duplicate",
    order_id), ("pinned",) (it may be there: an UpstreamAmbiguous or an unclear answer),
    ("unavailable",) (nothing was sent), or the clear outcome (retry, refused, ...)."""
    kind, value = result
    if kind != "ok":
        return ("pinned",) if kind == "ambiguous" else ("unavailable",)
    answer = _answer(*value)
    outcome = answer.outcome
    if outcome.delivered:
        return outcome.value, str(answer.order_id)
    if outcome is Outcome.UNCLEAR:
        return ("pinned",)
    return (outcome.value,)


@dataclass
class Play:
    """One answer as bytes on the wire: ``segments`` each sent as its own TCP segment,
    then the connection is closed, or (``linger``) held open until the client ends it."""

    segments: list[bytes]
    linger: bool = False


_HEALTHY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class RawCenter:
    """A TCP server on a loopback address: reads each request whole (its head and its
    Content-Length body), then plays the next ``Play`` exactly as given, else ``always``
    (if set), else holds the connection without an answer. With ``health``, a GET is
    answered 200 (the agent's health checks) and is not a request."""

    host: str = "127.0.0.1"
    plays: list[Play] = field(default_factory=list)
    always: Play | None = None
    health: bool = False
    requests: list[bytes] = field(default_factory=list)
    port: int = 0
    connections: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> RawCenter:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self) -> str:
        return f"http://orders.test:{self.port}/v3/orders"

    def open_connections(self) -> int:
        return len(self._writers)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        # Each handler ends on its own once its connection is gone; awaited, so that no
        # loop shutdown cancels one mid-play.
        await asyncio.wait_for(asyncio.gather(*self._handlers), 5)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        self.connections += 1
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:  # a lingering play waits here for the next request or the end
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                request = head + await reader.readexactly(length)
                if self.health and head.startswith(b"GET "):
                    writer.write(_HEALTHY)
                    await writer.drain()
                    continue
                self.requests.append(request)
                play = self.plays.pop(0) if self.plays else self.always
                if play is None:
                    await reader.read()  # no answer: held until the client ends it
                    break
                for i, segment in enumerate(play.segments):
                    if i:
                        await asyncio.sleep(0.002)  # a segment of its own
                    writer.write(segment)
                    await writer.drain()
                if not play.linger:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
