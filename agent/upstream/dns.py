"""DNS for the cluster hosts: dnspython, cached per record TTL, plugged into aiohttp.

Ops switch a cluster by changing its DNS record; the agent follows within one
TTL. When the answer for a host changes, listeners are told so that pooled
keep-alive connections to addresses that left the answer are not reused.
Addresses currently failing health checks are returned last.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver
from aiohttp.abc import AbstractResolver, ResolveResult

from agent.config import nameserver_address
from agent.errors import DnsError, NoSuchHost

log = logging.getLogger("agent.dns")

MIN_TTL_S = 1.0
SYSTEM_TTL_S = 30.0  # getaddrinfo gives no TTL


@dataclass(frozen=True)
class _Cached:
    addresses: tuple[str, ...]
    expires: float


def _nameserver(spec: str) -> dns.nameserver.Nameserver:
    host, port = nameserver_address(spec)  # validated at config load
    return dns.nameserver.Do53Nameserver(host, port)


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class ClusterResolver(AbstractResolver):
    """An aiohttp resolver backed by dnspython, with a TTL cache and change events."""

    def __init__(self, nameservers: tuple[str, ...], timeout_s: float = 2.0) -> None:
        self._timeout = timeout_s
        self._cache: dict[str, _Cached] = {}
        self._bad: set[str] = set()
        self._listeners: list[Callable[[str, tuple[str, ...], tuple[str, ...]], None]] = []
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self.configure(nameservers)

    def configure(self, nameservers: tuple[str, ...]) -> None:
        """(Re)point at these nameservers; empty means the system's resolv.conf."""
        self._nameservers = nameservers
        if nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [_nameserver(ns) for ns in nameservers]
            self._resolver = resolver
        else:
            try:
                self._resolver = dns.asyncresolver.Resolver(configure=True)
            except dns.resolver.NoResolverConfiguration:
                self._resolver = None  # fall back to getaddrinfo
        self._cache.clear()

    def subscribe(self, listener: Callable[[str, tuple[str, ...], tuple[str, ...]], None]) -> None:
        """``listener(host, old_addresses, new_addresses)`` on every change of an answer."""
        self._listeners.append(listener)

    def mark_bad(self, address: str, bad: bool) -> None:
        """Health checks tell us which addresses fail; those are tried last."""
        if bad:
            self._bad.add(address)
        else:
            self._bad.discard(address)

    def invalidate(self, host: str) -> None:
        """Forget the cached answer: all addresses failed, ask DNS again."""
        self._cache.pop(host, None)

    async def addresses(self, host: str) -> tuple[str, ...]:
        if is_ip(host):
            return (host,)
        cached = self._cache.get(host)
        if cached is not None and cached.expires > time.monotonic():
            return cached.addresses
        lock = self._locks.setdefault(host, asyncio.Lock())
        async with lock:
            cached = self._cache.get(host)
            if cached is not None and cached.expires > time.monotonic():
                return cached.addresses
            addresses, ttl = await self._lookup(host)
            self._cache[host] = _Cached(addresses, time.monotonic() + max(ttl, MIN_TTL_S))
            old = cached.addresses if cached is not None else ()
            if old and set(old) != set(addresses):
                log.warning(
                    "DNS answer for %s changed",
                    host,
                    extra={"host": host, "old": list(old), "new": list(addresses)},
                )
                for listener in self._listeners:
                    listener(host, old, addresses)
            return addresses

    async def _lookup(self, host: str) -> tuple[tuple[str, ...], float]:
        if self._resolver is None:
            return await self._system_lookup(host)
        try:
            answer = await self._resolver.resolve(host, "A", lifetime=self._timeout)
        except dns.resolver.NXDOMAIN as exc:
            raise NoSuchHost(f"{host}: no such domain (NXDOMAIN)") from exc
        except dns.resolver.NoAnswer as exc:
            raise DnsError(f"{host}: no A record") from exc
        except dns.resolver.NoNameservers as exc:
            raise DnsError(
                f"{host}: every nameserver failed (SERVFAIL or refused): "
                f"{self._nameservers or 'system'}"
            ) from exc
        except dns.exception.Timeout as exc:
            raise DnsError(
                f"{host}: nameserver timeout after {self._timeout}s "
                f"({self._nameservers or 'system'})"
            ) from exc
        except dns.exception.DNSException as exc:
            raise DnsError(f"{host}: DNS lookup failed: {exc}") from exc
        ttl = float(answer.rrset.ttl) if answer.rrset is not None else MIN_TTL_S
        addresses = tuple(sorted({r.address for r in answer}))
        if not addresses:
            raise DnsError(f"{host}: empty DNS answer")
        return addresses, ttl

    async def _system_lookup(self, host: str) -> tuple[tuple[str, ...], float]:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, None, family=socket.AF_INET, type=socket.SOCK_STREAM
            )
        except socket.gaierror as exc:
            if exc.errno == socket.EAI_NONAME:  # the system resolver's NXDOMAIN
                raise NoSuchHost(f"{host}: no such host ({exc.strerror})") from exc
            raise DnsError(f"{host}: cannot resolve ({exc.strerror})") from exc
        return tuple(sorted({str(info[4][0]) for info in infos})), SYSTEM_TTL_S

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = await self.addresses(host)
        ordered = sorted(addresses, key=lambda a: a in self._bad)  # healthy first, stable
        return [
            ResolveResult(
                hostname=host,
                host=a,
                port=port,
                family=socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for a in ordered
        ]

    async def close(self) -> None:
        self._cache.clear()
