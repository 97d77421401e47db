"""The drill's channel: sends orders, remembers every answer, retries what was not acked."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import orjson


@dataclass
class Sent:
    key: str
    body: bytes
    status: int | None = None
    serial: str | None = None
    sms: str | None = None
    cluster: str | None = None

    @property
    def acked(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class Load:
    """``n`` orders under ``prefix``; a share of them carry a customer phone."""

    def __init__(
        self,
        url: str,
        prefix: str,
        n: int,
        concurrency: int = 8,
        phone_every: int = 3,
        rate: float | None = None,
    ) -> None:
        self.url = f"{url}/v1/orders"
        self.rate = rate
        self.orders: dict[str, Sent] = {}
        self.concurrency = concurrency
        for i in range(n):
            doc: dict[str, object] = {
                "channel_id": "drill",
                "channel_order_id": f"{prefix}-{i:06d}",
                "amount": "199.10",
                "items": [{"sku": f"SKU-{i % 97}", "qty": 1 + i % 3}],
            }
            if i % phone_every == 0:
                doc["customer_phone"] = f"138{i:08d}"
            key = f"drill:{prefix}-{i:06d}"
            self.orders[key] = Sent(key, orjson.dumps(doc))
        self.acks = 0
        self.sms_queued: dict[str, str] = {}  # serial -> key, for "sms":"queued" answers

    async def run(
        self,
        session: aiohttp.ClientSession,
        only_unacked: bool = False,
        on_ack: Callable[[int], None] | None = None,
    ) -> None:
        todo = [s for s in self.orders.values() if not (only_unacked and s.acked)]
        queue: asyncio.Queue[Sent] = asyncio.Queue()
        for sent in todo:
            queue.put_nowait(sent)

        interval = self.concurrency / self.rate if self.rate else 0.0

        async def worker() -> None:
            while not queue.empty():
                sent = queue.get_nowait()
                started = time.monotonic()
                await self._send(session, sent)
                if interval:  # paced load: spread the orders over time
                    await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
                if sent.acked and on_ack is not None:
                    on_ack(self.acks)

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))

    async def _send(self, session: aiohttp.ClientSession, sent: Sent) -> None:
        try:
            async with session.post(
                self.url, data=sent.body, headers={"Content-Type": "application/json"}
            ) as r:
                doc = await r.json(content_type=None)
                status = r.status
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return  # no answer: not acknowledged; the channel will retry
        if sent.acked:  # a retry of an acked order (should be a duplicate)
            return
        sent.status = status
        if 200 <= status < 300 and isinstance(doc, dict):
            self.acks += 1
            sent.serial = doc.get("serial")
            sent.sms = doc.get("sms")
            sent.cluster = doc.get("cluster")
            if sent.sms == "queued" and sent.serial:
                self.sms_queued[sent.serial] = sent.key

    @property
    def acked_keys(self) -> set[str]:
        return {k for k, s in self.orders.items() if s.acked}

    @property
    def unacked(self) -> int:
        return sum(1 for s in self.orders.values() if not s.acked)
