"""Real servers on loopback that stand in for our neighbours: an order center."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Received:
    key: str
    body: bytes
    headers: dict[str, str]


@dataclass
class FakeCenter:
    """An order center (CONTRACT section 7) that honors Idempotency-Key.

    ``mode``: "up"; "503" (health and orders answer 503); "down" (the listener is
    closed: connections are refused). ``script``: statuses to answer the next
    POSTs with, before normal handling. ``creates`` counts real creates per key.
    """

    host: str = "127.0.0.2"
    port: int = 0
    mode: str = "up"
    delay_s: float = 0.0
    script: deque[int] = field(default_factory=deque)
    retry_after: str | None = None
    orders: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    creates: Counter[str] = field(default_factory=Counter)
    received: list[Received] = field(default_factory=list)
    health_checks: int = 0
    # orders:batch (CONTRACT section 7): off -> 404; item_script: statuses for the next
    # items (0: handle that one normally)
    batch_enabled: bool = True
    item_script: deque[int] = field(default_factory=deque)
    batch_requests: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v3"

    async def start(self) -> FakeCenter:
        if not self.port:
            self.port = free_port(self.host)
        app = web.Application()
        app.router.add_get("/v3/health", self._health)
        app.router.add_post("/v3/orders", self._post)
        app.router.add_post("/v3/orders:batch", self._batch)
        app.router.add_get("/v3/orders/by-key/{key:.+}", self._by_key)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, reuse_address=True).start()
        self.mode = "up" if self.mode == "down" else self.mode
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def go_down(self) -> None:
        """Refuse connections from now on."""
        await self.stop()
        self.mode = "down"

    async def come_up(self) -> None:
        self.mode = "up"
        if self._runner is None:
            await self.start()

    def created_keys(self) -> set[str]:
        return set(self.creates)

    def sends(self) -> Counter[str]:
        """How often each key reached the center (single POSTs and batch items)."""
        return Counter(r.key for r in self.received)

    def duplicates(self) -> dict[str, int]:
        return {k: n for k, n in self.creates.items() if n > 1}

    async def _health(self, request: web.Request) -> web.Response:
        self.health_checks += 1
        if self.mode != "up":
            return web.json_response({"ok": False}, status=503)
        return web.json_response({"ok": True})

    async def _post(self, request: web.Request) -> web.Response:
        body = await request.read()
        key = request.headers.get("Idempotency-Key", "")
        self.received.append(Received(key, body, dict(request.headers)))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.mode != "up":
            return web.json_response({"error": "unavailable"}, status=503)
        if self.script:
            status = self.script.popleft()
            headers = {"Retry-After": self.retry_after} if self.retry_after else None
            return web.json_response({"error": f"scripted {status}"}, status=status,
                                     headers=headers)
        status, doc = self._create(key, body)
        return web.json_response(doc, status=status)

    def _create(self, key: str, body: bytes) -> tuple[int, dict[str, Any]]:
        if key in self.orders:
            order_id, first = self.orders[key]
            if first != body:
                return 422, {"error": "key reused with another body"}
            return 200, {"order_id": order_id, "duplicate": True}
        order_id = f"OC{next(self._ids):08d}"
        self.orders[key] = (order_id, body)
        self.creates[key] += 1
        return 201, {"order_id": order_id}

    async def _batch(self, request: web.Request) -> web.Response:
        if not self.batch_enabled:
            return web.json_response({"error": "no bulk import here"}, status=404)
        doc = orjson.loads(await request.read())
        self.batch_requests += 1
        self.batch_sizes.append(len(doc["orders"]))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.mode != "up":
            return web.json_response({"error": "unavailable"}, status=503)
        results = []
        for item in doc["orders"]:
            key, body = item["idempotency_key"], item["body"].encode()
            self.received.append(Received(key, body, dict(request.headers)))
            status = self.item_script.popleft() if self.item_script else 0
            if status:  # 0: no script for this item, handle it normally
                results.append({"idempotency_key": key, "status": status,
                                "error": f"scripted {status}"})
                continue
            status, res = self._create(key, body)
            results.append({"idempotency_key": key, "status": status, **res})
        return web.Response(body=orjson.dumps({"results": results}),
                            content_type="application/json")

    async def _by_key(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        if key not in self.orders:
            return web.json_response({"error": "not found"}, status=404)
        order_id, body = self.orders[key]
        return web.Response(body=orjson.dumps({"order_id": order_id, "body": body.decode()}),
                            content_type="application/json")
