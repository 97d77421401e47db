"""A lean HTTP/1.1 client for the one hot request: ``POST {base}/orders`` (issue 14).

aiohttp's client costs 100-150 us of CPU per request on the benchmark machine, where
a keep-alive protocol that writes one prepared request and reads one answer costs a
third of that. This one does only what that request needs: keep-alive connections
per host, addresses from the ``ClusterResolver`` (so a DNS switch is followed, as with
aiohttp's connector), happy eyeballs over them, TLS, answers framed by
Content-Length, chunked or the end of the connection. Health checks, bulk imports and
lookups stay on aiohttp (``client.py``).

A failure is classified exactly as ``http_errors.failure_phase`` classifies the aiohttp
exception the same failure raises there (the rule that keeps "never created twice"):

- the host does not resolve (the resolver raises) -> ``DnsError``: nothing was sent;
- no connection to any address (refused, unreachable, TLS handshake or certificate,
  the per-attempt connect timeout ``min(timeout, 2 s)``) -> ``UpstreamUnavailable``:
  nothing was sent;
- the request's whole deadline passes, wherever it is (while connecting too, as
  aiohttp's total timeout does) -> ``UpstreamAmbiguous``;
- anything once a connection is in hand, new or reused (the write fails, the peer
  resets or closes before a whole answer, an unreadable answer) ->
  ``UpstreamAmbiguous``: the request may have reached the center. A reused
  connection that the peer had closed counts so too, like aiohttp's
  ServerDisconnectedError for a POST (never retried).
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
import time
from typing import NamedTuple, cast

import aiohappyeyeballs
from yarl import URL

from agent import __version__
from agent.errors import DnsError, UpstreamAmbiguous, UpstreamUnavailable
from agent.upstream.dns import ClusterResolver

KEEPALIVE_S = 15.0             # an idle connection is not reused after this (aiohttp's default)
HAPPY_EYEBALLS_DELAY_S = 0.25  # aiohttp's default
_MAX_HEAD = 64 * 1024         # status line and headers of one answer
_DEFAULT_PORTS = {"http": 80, "https": 443}


class Reply(NamedTuple):
    status: int
    body: bytes
    retry_after: str | None


class _BadAnswer(Exception):
    """The answer cannot be read (malformed, or the connection ended inside it)."""


class Target:
    """One URL, parsed once: what every request to it needs, the request head prefix."""

    def __init__(self, text: str) -> None:
        self.text = text
        try:
            url = URL(text)
        except ValueError as exc:
            raise UpstreamUnavailable(f"invalid URL {text}: {exc}") from exc
        if url.scheme not in _DEFAULT_PORTS or not url.raw_host:
            raise UpstreamUnavailable(f"invalid URL {text}: {text}")
        self.tls = url.scheme == "https"
        host = url.raw_host
        # A trailing dot is only present for fully-qualified names; as aiohttp does.
        self.host = host.rstrip(".") + "." if host.endswith("..") else host
        self.port = url.port or _DEFAULT_PORTS[url.scheme]
        shown = f"[{host}]" if ":" in host else host
        if url.explicit_port is not None and url.explicit_port != _DEFAULT_PORTS[url.scheme]:
            shown = f"{shown}:{url.explicit_port}"
        self.server_hostname = self.host.rstrip(".") if self.tls else None
        self.pool_key = (self.host, self.port, self.tls)
        self.head = (f"POST {url.raw_path_qs or '/'} HTTP/1.1\r\nHost: {shown}\r\n"
                     f"User-Agent: edge-agent/{__version__}\r\n"
                     "Content-Type: application/json\r\n")


def request_bytes(target: Target, headers: dict[str, str], body: bytes) -> bytes:
    lines = [target.head]
    for name, value in headers.items():
        if "\r" in value or "\n" in value:  # as aiohttp refuses to send them
            raise ValueError(f"Newline or carriage return character detected in HTTP "
                             f"header {name}")
        lines.append(f"{name}: {value}\r\n")
    lines.append(f"Content-Length: {len(body)}\r\n\r\n")
    return "".join(lines).encode("utf-8") + body


class _Conn(asyncio.Protocol):
    """One connection: bytes in a buffer, a waiter woken by data or by the end."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.ended = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream connection's transport (create_connection): always an asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._wake()

    def eof_received(self) -> bool:
        self.ended = True
        self._wake()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def more(self) -> None:
        """Wait for more bytes; _BadAnswer if the connection ended."""
        if self.ended:
            raise _BadAnswer("the connection ended before the whole answer")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def usable(self, now: float) -> bool:
        transport = self.transport
        return (not self.ended and transport is not None and not transport.is_closing()
                and not self.buf and now - self.idle_since <= KEEPALIVE_S)

    def close(self, graceful: bool = False) -> None:
        self.ended = True
        if self.transport is not None:
            if graceful:
                self.transport.close()
            else:
                self.transport.abort()

    async def read_answer(self) -> tuple[Reply, bool]:
        """One answer (1xx ones skipped): (the reply, whether the connection is reusable)."""
        while True:
            end = await self._find(b"\r\n\r\n", "the answer's headers are")
            head = bytes(self.buf[:end]).decode("latin-1")
            del self.buf[:end + 4]
            lines = head.split("\r\n")
            version, _, rest = lines[0].partition(" ")
            code = rest[:3]
            if version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or not code.isdigit():
                raise _BadAnswer(f"not an HTTP/1.x status line: {lines[0][:100]!r}")
            status = int(code)
            fields: dict[str, str] = {}
            for line in lines[1:]:
                name, colon, value = line.partition(":")
                if not colon or not name or name != name.strip():
                    raise _BadAnswer(f"malformed header line: {line[:100]!r}")
                key = name.lower()
                value = value.strip()
                if key not in fields:
                    fields[key] = value  # Retry-After: the first, as aiohttp's .get() gives
                elif key in ("content-length", "transfer-encoding"):
                    raise _BadAnswer(f"{name} given twice")
                elif key == "connection":
                    fields[key] = f"{fields[key]}, {value}"
            if 100 <= status < 200:
                continue  # informational (100 Continue, 103): the real answer follows
            keep = version == "HTTP/1.1" and "close" not in fields.get("connection", "").lower()
            if "chunked" in fields.get("transfer-encoding", "").lower():
                body = await self._read_chunked()
            elif "content-length" in fields:
                text = fields["content-length"]
                if not text.isdigit():
                    raise _BadAnswer(f"bad Content-Length {text[:40]!r}")
                body = await self._read_exactly(int(text))
            elif status in (204, 304):
                body = b""
            else:  # framed by the end of the connection
                while not self.ended:
                    await self.more()
                body, keep = bytes(self.buf), False
                self.buf.clear()
            return Reply(status, body, fields.get("retry-after")), keep and not self.buf

    async def _find(self, delimiter: bytes, what: str) -> int:
        """Where ``delimiter`` starts in the buffer, reading until it comes; _BadAnswer if
        ``what`` (the text before it) grows past the limit first."""
        end = self.buf.find(delimiter)
        while end < 0:
            if len(self.buf) > _MAX_HEAD:
                raise _BadAnswer(f"{what} too long")
            await self.more()
            end = self.buf.find(delimiter)
        return end

    async def _read_exactly(self, size: int) -> bytes:
        while len(self.buf) < size:
            await self.more()
        body = bytes(self.buf[:size])
        del self.buf[:size]
        return body

    async def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            end = await self._find(b"\r\n", "a chunk size line is")
            text = bytes(self.buf[:end]).split(b";", 1)[0].strip()
            del self.buf[:end + 2]
            try:
                size = int(text, 16)
            except ValueError as exc:
                raise _BadAnswer(f"bad chunk size {text[:40]!r}") from exc
            if size < 0:
                raise _BadAnswer("negative chunk size")
            if size == 0:
                while True:  # trailer fields, up to the empty line
                    end = await self._find(b"\r\n", "the trailer is")
                    del self.buf[:end + 2]
                    if end == 0:
                        return b"".join(parts)
            chunk = await self._read_exactly(size + 2)
            if chunk[-2:] != b"\r\n":
                raise _BadAnswer("a chunk does not end with CRLF")
            parts.append(chunk[:-2])


class _Pool:
    """Keep-alive connections to one host; at most ``limit`` in use at once."""

    def __init__(self, limit: int) -> None:
        self.idle: collections.deque[_Conn] = collections.deque()
        self.slots = asyncio.Semaphore(limit)
        self.retired = False

    def take(self) -> _Conn | None:
        now = time.monotonic()
        while self.idle:
            # The most recently used first (aiohttp takes the oldest): the one least
            # likely to have been closed meanwhile by the server's keep-alive timer.
            conn = self.idle.pop()
            if conn.usable(now):
                return conn
            conn.close()
        return None

    def give_back(self, conn: _Conn) -> None:
        if self.retired:
            conn.close(graceful=True)
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def close(self) -> None:
        self.retired = True
        while self.idle:
            self.idle.pop().close(graceful=True)


class Http1Client:
    """``POST`` one prepared request, classify its failure; pools per host."""

    def __init__(self, resolver: ClusterResolver, limit: int = 100) -> None:
        self._resolver = resolver
        self._limit = limit
        # Keyed like aiohttp's connector pools: a host's ports and schemes never share.
        self._pools: dict[tuple[str, int, bool], _Pool] = {}
        self._tls: ssl.SSLContext | None = None  # built at the first https connection

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def retire(self, host: str) -> None:
        """The DNS answer for ``host`` lost an address: no connection of it is reused."""
        for key in [key for key in self._pools if key[0] == host]:
            self._pools.pop(key).close()

    def close(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()

    async def post(self, target: Target, headers: dict[str, str], body: bytes,
                   timeout_s: float) -> Reply:
        data = request_bytes(target, headers, body)
        pool = self._pools.get(target.pool_key)
        if pool is None:
            pool = self._pools[target.pool_key] = _Pool(self._limit)
        conn: _Conn | None = None
        try:
            async with asyncio.timeout(timeout_s):
                async with pool.slots:
                    conn = pool.take()
                    if conn is None:
                        conn = await self._connect(target, min(timeout_s, 2.0))
                    if conn.transport is None:  # never: connection_made sets it
                        raise UpstreamUnavailable(f"no transport to {target.text}")
                    conn.transport.write(data)
                    reply, keep = await conn.read_answer()
        except TimeoutError as exc:  # the whole deadline, wherever it passed
            if conn is not None:
                conn.close()
            raise UpstreamAmbiguous(f"no answer from {target.text} in time") from exc
        except UpstreamUnavailable:
            raise  # no connection: nothing was sent
        except (OSError, _BadAnswer) as exc:
            if conn is not None:
                conn.close()
            raise UpstreamAmbiguous(f"connection to {target.text} failed after sending: "
                                    f"{exc!r}") from exc
        except BaseException:  # cancelled: the connection's state is unknown
            if conn is not None:
                conn.close()
            raise
        if keep:
            pool.give_back(conn)
        else:
            conn.close(graceful=True)
        return reply

    async def _connect(self, target: Target, connect_s: float) -> _Conn:
        """A new connection, or UpstreamUnavailable (DnsError): nothing was sent."""
        try:
            hosts = await self._resolver.resolve(target.host, target.port)
        except OSError as exc:  # DnsError is one; as aiohttp's ClientConnectorDNSError
            raise DnsError(f"cannot resolve the host of {target.text}: {exc}") from exc
        addr_infos: list[aiohappyeyeballs.AddrInfoType] = []
        for h in hosts:
            address = h["host"]
            if ":" in address:
                addr_infos.append((socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP,
                                   "", (address, h["port"], 0, 0)))
            else:
                addr_infos.append((socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP,
                                   "", (address, h["port"])))
        loop = asyncio.get_running_loop()
        last: BaseException | None = None
        while addr_infos:
            try:
                async with asyncio.timeout(connect_s):
                    sock = await aiohappyeyeballs.start_connection(
                        addr_infos, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY_S, loop=loop)
                    try:
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        if target.tls:
                            _, proto = await loop.create_connection(
                                _Conn, sock=sock, ssl=self._tls_context(),
                                server_hostname=target.server_hostname)
                        else:
                            _, proto = await loop.create_connection(_Conn, sock=sock)
                    except BaseException:
                        sock.close()
                        raise
                return proto
            except OSError as exc:  # refused, unreachable, TLS, this attempt's timeout
                last = exc
                aiohappyeyeballs.pop_addr_infos_interleave(addr_infos, None)
        if last is None:
            raise UpstreamUnavailable(f"cannot connect to {target.text}: no address")
        if isinstance(last, TimeoutError) and not str(last):
            raise UpstreamUnavailable(f"cannot connect to {target.text}: connection timeout "
                                      f"to host {target.text}") from last
        raise UpstreamUnavailable(f"cannot connect to {target.text}: {last}") from last
