"""A lean HTTP/1.1 client for the one hot request: ``POST {base}/orders`` (issue 14).

aiohttp's client costs 100-150 us of CPU per request on the benchmark machine, where
a keep-alive protocol that writes one prepared request and reads one answer costs a
third of that. This one does only what that request needs: keep-alive connections
per host, addresses from the ``ClusterResolver`` (so a DNS switch is followed, as with
aiohttp's connector), happy eyeballs over them, TLS. Answers are read by llhttp
through httptools (``http1_conn.py``), never by hand: hand-written framing broke the
promise twice (issue 19). Health checks, bulk imports and lookups stay on aiohttp
(``client.py``).

A failure is classified by what was actually sent (the rule that keeps "never
created twice"), as ``http_errors.failure_phase`` classifies the aiohttp exception
the same failure raises there, except where aiohttp cannot tell:

- the host does not resolve (the resolver raises) -> ``DnsError``: nothing was sent;
- no connection to any address (refused, unreachable, TLS handshake or certificate,
  the per-attempt connect timeout ``min(timeout, 2 s)``) -> ``UpstreamUnavailable``:
  nothing was sent;
- the request's whole deadline passes before the request was handed to a
  connection (waiting for a free pool slot, or still connecting) ->
  ``UpstreamUnavailable``: nothing was sent. aiohttp's total timeout calls this a
  timeout (ambiguous) because it cannot say where it struck; here it is known;
- the deadline passes once the request was written -> ``UpstreamAmbiguous``;
- anything once the request was handed to a connection, new or reused (the write
  fails, the peer resets or closes before a whole answer, an answer that cannot be
  read: malformed, over the size caps, undecodable) -> ``UpstreamAmbiguous``: the
  request may have reached the center. A reused connection that the peer had closed
  counts so too, like aiohttp's ServerDisconnectedError for a POST (never retried).
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
import time

import aiohappyeyeballs
from yarl import URL

from agent import __version__
from agent.errors import DnsError, UpstreamAmbiguous, UpstreamUnavailable
from agent.upstream.dns import ClusterResolver
from agent.upstream.http1_conn import BadAnswer, Conn, Reply

__all__ = ["Http1Client", "Reply", "Target", "request_bytes"]

HAPPY_EYEBALLS_DELAY_S = 0.25  # aiohttp's default
_DEFAULT_PORTS = {"http": 80, "https": 443}


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
        self.head = (
            f"POST {url.raw_path_qs or '/'} HTTP/1.1\r\nHost: {shown}\r\n"
            f"User-Agent: edge-agent/{__version__}\r\n"
            "Content-Type: application/json\r\n"
        )


def request_bytes(target: Target, headers: dict[str, str], body: bytes) -> bytes:
    lines = [target.head]
    for name, value in headers.items():
        if "\r" in value or "\n" in value:  # as aiohttp refuses to send them
            raise ValueError(f"Newline or carriage return character detected in HTTP header {name}")
        lines.append(f"{name}: {value}\r\n")
    lines.append(f"Content-Length: {len(body)}\r\n\r\n")
    return "".join(lines).encode("utf-8") + body


class _Pool:
    """Keep-alive connections to one host; at most ``limit`` in use at once."""

    def __init__(self, limit: int) -> None:
        self.idle: collections.deque[Conn] = collections.deque()
        self.slots = asyncio.Semaphore(limit)
        self.retired = False

    def take(self) -> Conn | None:
        now = time.monotonic()
        while self.idle:
            # The most recently used first (aiohttp takes the oldest): the one least
            # likely to have been closed meanwhile by the server's keep-alive timer.
            conn = self.idle.pop()
            if conn.usable(now):
                return conn
            conn.close()
        return None

    def give_back(self, conn: Conn) -> None:
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

    async def post(
        self, target: Target, headers: dict[str, str], body: bytes, timeout_s: float
    ) -> Reply:
        data = request_bytes(target, headers, body)
        pool = self._pools.get(target.pool_key)
        if pool is None:
            pool = self._pools[target.pool_key] = _Pool(self._limit)
        conn: Conn | None = None
        # Until the request is handed to the transport, nothing has gone out.
        stage = f"waiting for a free connection (all {self._limit} in use)"
        try:
            async with asyncio.timeout(timeout_s):
                async with pool.slots:
                    conn = pool.take()
                    if conn is None:
                        stage = "connecting"
                        conn = await self._connect(target, min(timeout_s, 2.0))
                    stage = ""
                    conn.send(data)
                    reply, keep = await conn.read_answer()
        except TimeoutError as exc:
            if conn is not None:
                conn.close()
            if stage:
                raise UpstreamUnavailable(
                    f"no connection to {target.text} within "
                    f"{timeout_s:g} s ({stage}): nothing was sent",
                ) from exc
            raise UpstreamAmbiguous(f"no answer from {target.text} in time") from exc
        except UpstreamUnavailable:
            raise  # no connection: nothing was sent
        except (OSError, BadAnswer) as exc:
            if conn is not None:
                conn.close()
            raise UpstreamAmbiguous(
                f"connection to {target.text} failed after sending: {exc}"
            ) from exc
        except BaseException:  # cancelled: the connection's state is unknown
            if conn is not None:
                conn.close()
            raise
        if keep:
            pool.give_back(conn)
        else:
            conn.close(graceful=True)
        return reply

    async def _connect(self, target: Target, connect_s: float) -> Conn:
        """A new connection, or UpstreamUnavailable (DnsError): nothing was sent."""
        try:
            hosts = await self._resolver.resolve(target.host, target.port)
        except OSError as exc:  # DnsError is one; as aiohttp's ClientConnectorDNSError
            raise DnsError(f"cannot resolve the host of {target.text}: {exc}") from exc
        addr_infos: list[aiohappyeyeballs.AddrInfoType] = []
        for h in hosts:
            address = h["host"]
            if ":" in address:
                addr_infos.append(
                    (
                        socket.AF_INET6,
                        socket.SOCK_STREAM,
                        socket.IPPROTO_TCP,
                        "",
                        (address, h["port"], 0, 0),
                    )
                )
            else:
                addr_infos.append(
                    (
                        socket.AF_INET,
                        socket.SOCK_STREAM,
                        socket.IPPROTO_TCP,
                        "",
                        (address, h["port"]),
                    )
                )
        loop = asyncio.get_running_loop()
        last: BaseException | None = None
        while addr_infos:
            try:
                async with asyncio.timeout(connect_s):
                    sock = await aiohappyeyeballs.start_connection(
                        addr_infos, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY_S, loop=loop
                    )
                    try:
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        if target.tls:
                            _, proto = await loop.create_connection(
                                Conn,
                                sock=sock,
                                ssl=self._tls_context(),
                                server_hostname=target.server_hostname,
                            )
                        else:
                            _, proto = await loop.create_connection(Conn, sock=sock)
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
            raise UpstreamUnavailable(
                f"cannot connect to {target.text}: connection timeout to host {target.text}"
            ) from last
        raise UpstreamUnavailable(f"cannot connect to {target.text}: {last}") from last
