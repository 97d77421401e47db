"""Sandbox neighbours on loopback: an order center (CONTRACT section 7) and an SMS gateway.

Used by ``edge-agent drill``/``edge-agent sandbox`` and by the tests. They keep
their own records (creates per key, messages per serial), which is what a
drill checks the one promise against.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Listener:
    """start / stop / go_down / come_up for a small aiohttp app on a fixed loopback port."""

    host: str
    port: int
    _runner: web.AppRunner | None

    def _app(self) -> web.Application:  # pragma: no cover - overridden
        raise NotImplementedError

    async def start(self) -> Any:
        if not self.port:
            self.port = free_port(self.host)
        # A fake needs no 60 s of graceful shutdown: a test tearing it down should not wait.
        self._runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, reuse_address=True).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def go_down(self) -> None:
        """Refuse connections from now on."""
        await self.stop()

    async def come_up(self) -> None:
        if self._runner is None:
            await self.start()


@dataclass
class Received:
    key: str
    body: bytes
    headers: dict[str, str]


@dataclass
class SandboxCenter(Listener):
    """An order center that honors Idempotency-Key and counts real creates per key.

    Switches: ``mode`` "up" or "503" (health and orders answer 503); ``go_down()``
    closes the listener (connections refused); ``delay_s`` slows every order
    answer and ``health_delay_s`` every health answer (a hung cluster: both);
    ``script`` holds statuses to answer the next POSTs with. Faults real centers
    show: ``refuse`` answers every POST with that status while /health stays 200
    (401: an expired gateway token; 404: a half-finished deploy); ``page``
    answers every POST with an HTML page of that status (a maintenance page,
    nothing created); ``after_create`` creates the order for real, then answers
    the next statuses (500, 409, or 200 without an order_id); ``late_s`` creates
    the order, then answers only after that many seconds.
    """

    host: str = "127.0.0.2"
    port: int = 0
    mode: str = "up"
    delay_s: float = 0.0
    health_delay_s: float = 0.0
    script: deque[int] = field(default_factory=deque)
    retry_after: str | None = None
    refuse: int | None = None
    page: int | None = None
    after_create: deque[int] = field(default_factory=deque)
    late_s: float = 0.0
    orders: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    creates: Counter[str] = field(default_factory=Counter)
    serials: dict[str, str] = field(default_factory=dict)  # key -> the creating request's serial
    received: list[Received] = field(default_factory=list)
    health_checks: int = 0
    name: str = "center"
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

    async def come_up(self) -> None:
        """Listen and answer normally again (after go_down(), mode "503", a hang or a fault)."""
        self.mode, self.delay_s, self.health_delay_s = "up", 0.0, 0.0
        self.late_s, self.refuse, self.page = 0.0, None, None
        await super().come_up()

    def reset(self) -> None:
        """Forget every order (a new drill scenario starts from an empty center)."""
        self.orders.clear()
        self.creates.clear()
        self.serials.clear()
        self.received.clear()
        self.script.clear()
        self.item_script.clear()
        self.after_create.clear()
        self.refuse = self.page = None
        self.late_s = 0.0
        self.batch_enabled, self.batch_requests = True, 0
        self.batch_sizes.clear()
        self.mode, self.delay_s, self.health_delay_s = "up", 0.0, 0.0

    def created_keys(self) -> set[str]:
        return set(self.creates)

    def duplicates(self) -> dict[str, int]:
        return {k: n for k, n in self.creates.items() if n > 1}

    def sends(self) -> Counter[str]:
        """How often each key reached the center (single POSTs and batch items)."""
        return Counter(r.key for r in self.received)

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_get("/v3/health", self._health)
        app.router.add_post("/v3/orders", self._post)
        app.router.add_post("/v3/orders:batch", self._batch)
        app.router.add_get("/v3/orders/by-key/{key:.+}", self._by_key)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        self.health_checks += 1
        if self.health_delay_s:
            await asyncio.sleep(self.health_delay_s)
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
        if self.refuse is not None:
            return web.json_response(
                {"error": "refused: not authorized or no such route"}, status=self.refuse
            )
        if self.page is not None:
            return web.Response(
                text="<html><body>Down for maintenance</body></html>",
                status=self.page,
                content_type="text/html",
            )
        if self.script:
            status = self.script.popleft()
            headers = {"Retry-After": self.retry_after} if self.retry_after else None
            return web.json_response(
                {"error": f"scripted {status}"}, status=status, headers=headers
            )
        status, doc = self.take(key, body, request.headers.get("X-Edge-Serial", ""))
        if self.late_s:
            await asyncio.sleep(self.late_s)  # created; the answer comes too late
        if self.after_create:
            status = self.after_create.popleft()
            return web.json_response(
                {"error": f"scripted {status} after creating"} if status != 200 else {"ok": True},
                status=status,
            )
        return web.json_response(doc, status=status)

    def take(self, key: str, body: bytes, serial: str = "") -> tuple[int, dict[str, Any]]:
        """The idempotent create: 201 new, 200 replay, 422 same key with another body.
        ``serial``: the agent's serial sent with it (kept for the create only)."""
        if key in self.orders:
            order_id, first = self.orders[key]
            if first != body:
                return 422, {"error": "key reused with another body"}
            return 200, {"order_id": order_id, "duplicate": True}
        order_id = f"{self.name.upper()[:2]}{next(self._ids):08d}"
        self.orders[key] = (order_id, body)
        self.creates[key] += 1
        self.serials[key] = serial
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
                results.append(
                    {"idempotency_key": key, "status": status, "error": f"scripted {status}"}
                )
                continue
            status, res = self.take(key, body, str(item.get("serial", "")))
            results.append({"idempotency_key": key, "status": status, **res})
        return web.Response(
            body=orjson.dumps({"results": results}), content_type="application/json"
        )

    async def _by_key(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        if key not in self.orders:
            return web.json_response({"error": "not found"}, status=404)
        order_id, body = self.orders[key]
        return web.Response(
            body=orjson.dumps({"order_id": order_id, "body": body.decode()}),
            content_type="application/json",
        )


@dataclass
class SmsReceived:
    serial: str
    phone: str
    doc: dict[str, Any]
    headers: dict[str, str]
    at: float


@dataclass
class SandboxSmsGateway(Listener):
    """The ``http`` provider's gateway: JSON {"phone","sign_name","template","params","text"}.

    ``token``: the bearer token it demands (401 otherwise). ``script``: statuses for
    the next requests. ``delay_s``: answer late (to provoke client timeouts).
    """

    host: str = "127.0.0.4"
    port: int = 0
    token: str = ""
    delay_s: float = 0.0
    script: deque[int] = field(default_factory=deque)
    received: list[SmsReceived] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/send"

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/send", self._send)
        return app

    def per_serial(self) -> Counter[str]:
        return Counter(r.serial for r in self.received)

    async def _send(self, request: web.Request) -> web.Response:
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": "bad token"}, status=401)
        doc = orjson.loads(await request.read())
        if self.script:
            status = self.script.popleft()
            return web.json_response({"error": f"scripted {status}"}, status=status)
        # Counted when accepted: what a customer's phone would show.
        self.received.append(
            SmsReceived(
                doc["params"]["SN"], doc["phone"], doc, dict(request.headers), time.monotonic()
            )
        )
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return web.json_response({"id": f"M{len(self.received)}"})
