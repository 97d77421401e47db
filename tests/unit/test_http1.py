"""The lean client for POST /orders (agent/upstream/http1.py) against real sockets.

Every fault is played to it and to aiohttp (the client it replaces on that path, as it
was configured there, its errors judged by http_errors.failure_phase): both must say
the same, "nothing was sent" (may go to the other cluster) or "may have been created"
(pinned) -- the rule that keeps an order from being created twice. Successful answers
(Content-Length, chunked, close-framed, after a 100 Continue) must read the same too.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator

import pytest

from agent.errors import DnsError, UpstreamUnavailable
from agent.upstream.http1 import Http1Client, Target
from tests.support.http1_peers import (
    BODY,
    CREATED,
    HEADERS,
    Resolver,
    closed_port,
    lean,
    unanswered_listener,
    via_aiohttp,
)


class Dribbling:
    """A StreamWriter whose drain() sends what was written one byte per TCP segment, as a
    slow or fragmenting network delivers it (TCP_NODELAY, a pause between bytes)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._pending = bytearray()
        self.transport = writer.transport
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def write(self, data: bytes) -> None:
        self._pending += data

    def get_extra_info(self, name: str) -> object:
        return self._writer.get_extra_info(name)

    async def drain(self) -> None:
        data, self._pending = bytes(self._pending), bytearray()
        for i in range(len(data)):
            self._writer.write(data[i : i + 1])
            await self._writer.drain()
            await asyncio.sleep(0.001)


class Scripted:
    """A TCP server; each connection plays the next behaviour of ``plan`` per request."""

    def __init__(self) -> None:
        self.dribble = False  # answers one byte per segment
        self.plan: list[str] = []
        self.requests: list[bytes] = []
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0
        self.writers: set[asyncio.StreamWriter] = set()
        self.closing = asyncio.Event()

    async def start(self) -> Scripted:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Close the listener and every connection (a silent one too), then let them end."""
        assert self.server is not None
        self.closing.set()
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        await self.server.wait_closed()
        await asyncio.sleep(0.05)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.add(writer)
        try:
            while self.plan:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.decode("latin-1").split("\r\n"):
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                out = Dribbling(writer) if self.dribble else writer
                if not await self._answer(self.plan.pop(0), out):  # type: ignore[arg-type]
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    async def _answer(self, how: str, w: asyncio.StreamWriter) -> bool:
        """Play one behaviour; False ends the connection."""
        if how == "length":
            w.write(
                b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(CREATED), CREATED)
            )
        elif how == "chunked":
            w.write(
                b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5;x=y\r\n"
                + CREATED[:5]
                + b"\r\n"
                + b"%x\r\n" % (len(CREATED) - 5)
                + CREATED[5:]
                + b"\r\n0\r\nX-Trailer: 1\r\n\r\n"
            )
        elif how == "close-framed":
            w.write(b"HTTP/1.1 201 Created\r\nConnection: close\r\n\r\n" + CREATED)
            await w.drain()
            return False
        elif how == "continue":
            w.write(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(CREATED), CREATED)
            )
        elif how == "retry-after":
            w.write(
                b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 7\r\nContent-Length: 0\r\n\r\n"
            )
        elif how == "html":
            page = b"<html><body>maintenance</body></html>"
            w.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n%s"
                % (len(page), page)
            )
        elif how == "keepalive-then-close":
            w.write(
                b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n%s" % (len(CREATED), CREATED)
            )
            await w.drain()
            return False  # the server ends an idle keep-alive connection
        elif how == "close":
            return False  # took the request, no answer
        elif how == "reset":
            sock = w.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()
            return False
        elif how == "partial":
            w.write(b'HTTP/1.1 201 Created\r\nContent-Length: 50\r\n\r\n{"order')
            await w.drain()
            return False
        elif how == "garbage":
            w.write(b"HELLO THERE\r\n\r\n")
            await w.drain()
            return False
        elif how == "silent":
            await self.closing.wait()  # never answers; ends when the server stops
            return False
        await w.drain()
        return True


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    server = await Scripted().start()
    yield server
    await server.stop()


@pytest.mark.parametrize(
    "how", ["length", "chunked", "close-framed", "continue", "retry-after", "html"]
)
async def test_answers_read_the_same_as_aiohttp(scripted: Scripted, how: str):
    url = f"http://orders.test:{scripted.port}/v3/orders"
    results = []
    for client in (lean, via_aiohttp):
        scripted.plan = [how]
        results.append(await client(url, Resolver()))
    assert results[0] == results[1]
    assert results[0][0] == "ok"


@pytest.mark.parametrize(
    "how", ["length", "chunked", "close-framed", "continue", "retry-after", "html"]
)
async def test_answers_split_into_one_byte_segments_read_the_same(scripted: Scripted, how: str):
    """Every boundary the parser looks for (the head's blank line, a chunk size line, the
    trailer) arrives cut in two somewhere."""
    scripted.dribble = True
    url = f"http://orders.test:{scripted.port}/v3/orders"
    results = []
    for client in (lean, via_aiohttp):
        scripted.plan = [how]
        results.append(await client(url, Resolver()))
    assert results[0] == results[1]
    assert results[0][0] == "ok"


@pytest.mark.parametrize("how", ["close", "reset", "partial", "garbage", "silent"])
async def test_failures_after_sending_are_ambiguous_as_with_aiohttp(scripted: Scripted, how: str):
    url = f"http://orders.test:{scripted.port}/v3/orders"
    kinds = []
    for client in (lean, via_aiohttp):
        scripted.plan = [how]
        kinds.append((await client(url, Resolver(), timeout_s=0.5))[0])
    assert kinds == ["ambiguous", "ambiguous"]
    assert len(scripted.requests) == 2  # each request did reach the server


async def test_failures_before_sending_are_clear_as_with_aiohttp():
    cases = [
        (f"http://orders.test:{closed_port()}/v3/orders", Resolver()),  # refused
        ("http://orders.test:1/v3/orders", Resolver(fail=True)),  # DNS
        ("http://[zz/v3/orders", Resolver()),
    ]  # invalid URL
    for url, resolver in cases:
        kinds = []
        for client in (lean, via_aiohttp):
            try:
                kinds.append((await client(url, resolver))[0])
            except UpstreamUnavailable:  # an invalid URL refuses before any client runs
                kinds.append("unavailable")
        assert kinds == ["unavailable", "unavailable"], url


async def test_a_url_that_is_not_http_is_refused_before_sending():
    # aiohttp 3.14 raises NonHttpUrlClientError, a plain ClientError that failure_phase
    # takes for after-send; no such URL gets this far (config and edge-recover --target
    # accept http(s) URLs only), and here it is what it is: nothing was sent.
    with pytest.raises(UpstreamUnavailable, match="invalid URL"):
        Target("ftp://orders.test/v3/orders")


async def test_a_dns_failure_is_a_dns_error():
    client = Http1Client(Resolver(fail=True))  # type: ignore[arg-type]
    with pytest.raises(DnsError, match="cannot resolve the host"):
        await client.post(Target("http://orders.test:1/v3/orders"), dict(HEADERS), BODY, 1.0)


async def test_the_request_goes_out_byte_for_byte_with_the_agent_headers(scripted: Scripted):
    scripted.plan = ["length"]
    await lean(f"http://Orders.Test:{scripted.port}/v3/orders", Resolver())
    head, _, body = scripted.requests[0].partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v3/orders HTTP/1.1"
    fields = dict(line.split(": ", 1) for line in lines[1:])
    assert fields["Host"] == f"orders.test:{scripted.port}"
    assert fields["Content-Type"] == "application/json"
    assert fields["Content-Length"] == str(len(BODY))
    assert {k: fields[k] for k in HEADERS} == HEADERS
    assert body == BODY


async def test_keep_alive_is_reused_and_a_connection_the_server_closed_is_not(scripted: Scripted):
    client = Http1Client(Resolver())  # type: ignore[arg-type]
    url = f"http://orders.test:{scripted.port}/v3/orders"
    try:
        scripted.plan = ["length", "keepalive-then-close"]
        assert (await lean(url, Resolver(), client=client))[0] == "ok"
        assert (await lean(url, Resolver(), client=client))[0] == "ok"
        assert scripted.connections == 1  # the second request rode the first connection
        await asyncio.sleep(0.1)  # the server's close has arrived
        scripted.plan = ["length"]
        assert (await lean(url, Resolver(), client=client))[0] == "ok"
        assert scripted.connections == 2  # not sent on the closed one
    finally:
        client.close()


async def test_a_retired_pool_is_not_reused(scripted: Scripted):
    client = Http1Client(Resolver())  # type: ignore[arg-type]
    url = f"http://orders.test:{scripted.port}/v3/orders"
    try:
        scripted.plan = ["length", "length"]
        assert (await lean(url, Resolver(), client=client))[0] == "ok"
        client.retire("orders.test")  # the DNS answer for the host lost an address
        assert (await lean(url, Resolver(), client=client))[0] == "ok"
        assert scripted.connections == 2
    finally:
        client.close()


async def test_a_header_with_a_newline_is_refused_like_aiohttp():
    client = Http1Client(Resolver())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await client.post(
            Target("http://orders.test:1/v3/orders"),
            {"Idempotency-Key": "a\r\nX-Evil: 1"},
            BODY,
            1.0,
        )


async def test_a_tls_handshake_that_fails_is_clear_as_with_aiohttp():
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()  # a plain TCP peer that ends the connection: no TLS handshake

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        url = f"https://orders.test:{port}/v3/orders"
        kinds = [(await client(url, Resolver()))[0] for client in (lean, via_aiohttp)]
    finally:
        server.close()
        await server.wait_closed()
    assert kinds == ["unavailable", "unavailable"]


async def test_a_connect_that_times_out_is_clear_as_with_aiohttp():
    # A listener whose accept queue is full: the kernel drops further SYNs, so a connect
    # hangs until the connect timeout (min(timeout, 2 s)), well inside the deadline.
    async with unanswered_listener() as port:
        url = f"http://orders.test:{port}/v3/orders"
        kinds = [
            (await client(url, Resolver(), timeout_s=3.0))[0] for client in (lean, via_aiohttp)
        ]
    assert kinds == ["unavailable", "unavailable"]


async def test_one_host_on_two_ports_never_shares_a_connection():
    a, b = await Scripted().start(), await Scripted().start()
    client = Http1Client(Resolver())  # type: ignore[arg-type]
    try:
        a.plan, b.plan = ["length", "length"], ["length", "length"]
        for server in (a, b, a, b):
            url = f"http://orders.test:{server.port}/v3/orders"
            assert (await lean(url, Resolver(), client=client))[0] == "ok"
        assert (len(a.requests), len(b.requests)) == (2, 2)
        assert (a.connections, b.connections) == (1, 1)
    finally:
        client.close()
        await a.stop()
        await b.stop()
