"""The drill sandbox: primary, standby and a spare order center, DNS, an SMS gateway,
and the systems after the center (logistics, invoicing, finance) for chain verification.

All on loopback. The clusters are reached by name (``primary.sandbox.test``,
``standby.sandbox.test``) through the sandbox DNS server with a 1 s TTL, so
a drill can switch the primary by DNS as ops would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.sandbox.dns_server import SandboxDns
from agent.sandbox.downstream import Downstream, chain_steps
from agent.sandbox.servers import SandboxCenter, SandboxSmsGateway, free_port

PRIMARY_NAME = "primary.sandbox.test"
STANDBY_NAME = "standby.sandbox.test"
# Time compressed like the rest of the drill: an invoice lags 2 s, one finance posting in
# 10 is truncated, a step still pending 10.8 s after delivery is overdue.
INVOICE_LAG_S = 2.0
TRUNCATE_EVERY = 10
CHAIN_DEADLINE_H = 0.003
CHAIN_RECHECK_S = 0.3


@dataclass
class Sandbox:
    """Owns the sandbox servers; ``start()``/``stop()``; ``reset()`` between scenarios."""

    port: int = 0
    centers: dict[str, SandboxCenter] = field(default_factory=dict)
    dns: SandboxDns = field(default_factory=lambda: SandboxDns(ttl=1))
    sms: SandboxSmsGateway = field(default_factory=lambda: SandboxSmsGateway(host="127.0.0.4"))
    downstream: Downstream = field(default_factory=lambda: Downstream(host="127.0.0.5"))

    async def start(self) -> Sandbox:
        self.port = self.port or free_port("127.0.0.2")
        for name, host in (
            ("primary", "127.0.0.2"),
            ("standby", "127.0.0.3"),
            ("spare", "127.0.0.6"),
        ):
            center = SandboxCenter(host=host, port=self.port, name=name)
            self.centers[name] = await center.start()
        await self.dns.start("127.0.0.1", 0)
        await self.sms.start()
        self.downstream.centers = list(self.centers.values())
        await self.downstream.start()
        self.reset()
        return self

    async def stop(self) -> None:
        for center in self.centers.values():
            await center.stop()
        await self.dns.stop()
        await self.sms.stop()
        await self.downstream.stop()

    def reset(self) -> None:
        self.dns.records.clear()
        self.dns.mode = "ok"
        self.dns.set(PRIMARY_NAME, self.centers["primary"].host)
        self.dns.set(STANDBY_NAME, self.centers["standby"].host)
        for center in self.centers.values():
            center.reset()
        self.sms.received.clear()
        self.sms.script.clear()
        self.downstream.reset()
        self.downstream.invoice_lag_s = INVOICE_LAG_S
        self.downstream.truncate_every = TRUNCATE_EVERY

    async def restore(self) -> None:
        for center in self.centers.values():
            await center.come_up()

    @property
    def primary_url(self) -> str:
        return f"http://{PRIMARY_NAME}:{self.port}/v3"

    @property
    def standby_url(self) -> str:
        return f"http://{STANDBY_NAME}:{self.port}/v3"

    def creates(self) -> dict[str, int]:
        """Creates per key over every center: more than one anywhere is a duplicate."""
        total: dict[str, int] = {}
        for center in self.centers.values():
            for key, n in center.creates.items():
                total[key] = total.get(key, 0) + n
        return total

    def describe(self) -> list[str]:
        return [
            f"primary  {self.primary_url} -> {self.centers['primary'].host}",
            f"standby  {self.standby_url} -> {self.centers['standby'].host}",
            f"spare    http://{self.centers['spare'].host}:{self.port}/v3 (DNS switch target)",
            f"dns      {self.dns.nameserver} (TTL {self.dns.ttl}s)",
            f"sms      {self.sms.url}",
            f"tms      {self.downstream.url}/tms (tracking appears after a re-push)",
            f"invoice  {self.downstream.url}/inv (issued {INVOICE_LAG_S:g} s after first asked)",
            f"erp      {self.downstream.url}/erp (one posting in {TRUNCATE_EVERY} truncated)",
        ]

    def chain_section(self) -> dict[str, Any]:
        """The agent's ``[chain]`` for these services (the drill's orders carry ``amount``)."""
        return {
            "enabled": True,
            "deadline_h": CHAIN_DEADLINE_H,
            "recheck_interval_s": CHAIN_RECHECK_S,
            "concurrency": 8,
            "timeout_s": 2,
            "step": chain_steps(self.downstream, amount="/amount"),
        }
