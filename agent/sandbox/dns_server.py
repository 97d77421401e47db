"""A tiny authoritative DNS server (dnspython over UDP) for drills and tests.

Serves A records from a dict that the drill changes at will (the "DNS switch"
ops make), with a short TTL; can also answer SERVFAIL or stay silent.
"""

from __future__ import annotations

import asyncio
import logging

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

log = logging.getLogger("agent.sandbox.dns")


class SandboxDns(asyncio.DatagramProtocol):
    """``records``: name -> list of IPv4 addresses. ``mode``: "ok", "servfail" or "silent"."""

    def __init__(self, records: dict[str, list[str]] | None = None, ttl: int = 1) -> None:
        self.records: dict[str, list[str]] = {k.rstrip("."): v for k, v in (records or {}).items()}
        self.ttl = ttl
        self.mode = "ok"
        self.queries = 0
        self._transport: asyncio.DatagramTransport | None = None
        self.address: tuple[str, int] = ("127.0.0.1", 0)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> SandboxDns:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(host, port))
        self._transport = transport
        sockname = transport.get_extra_info("sockname")
        self.address = (sockname[0], sockname[1])
        return self

    async def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    @property
    def nameserver(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def set(self, name: str, *addresses: str) -> None:
        self.records[name.rstrip(".")] = list(addresses)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a datagram endpoint's

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self.queries += 1
        if self.mode == "silent" or self._transport is None:
            return
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if self.mode == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
        else:
            for question in query.question:
                name = question.name.to_text().rstrip(".")
                addresses = self.records.get(name)
                if addresses is None:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                elif question.rdtype == dns.rdatatype.A and addresses:
                    response.answer.append(
                        dns.rrset.from_text_list(
                            question.name, self.ttl, dns.rdataclass.IN, dns.rdatatype.A, addresses
                        )
                    )
        self._transport.sendto(response.to_wire(), addr)
