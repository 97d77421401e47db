"""A tiny order center (CONTRACT section 7) on the host's loopback, in its own thread, for
tests/system/test_systemd_real.py. The agent in the container reaches it: they share the network.

GET /health -> 200; POST /orders -> 201 {"order_id"} or, for an Idempotency-Key seen before,
200 {"order_id", "duplicate": true}; POST /orders:batch -> 404 (no bulk import: single POSTs);
GET /orders/by-key/{key} -> 200 {"order_id", "body"} or 404. ``up()``/``down()`` start and
stop the listener on the same port; what it holds survives.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

from aiohttp import web


class Center:
    def __init__(self, port: int) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}/v3"
        self.orders: dict[str, tuple[str, str]] = {}  # Idempotency-Key -> (order_id, body)
        self.creates: Counter[str] = Counter()  # Idempotency-Key -> 201s sent
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="fake-center"
        )
        self._thread.start()
        self._runner: web.AppRunner | None = None

    # -- handlers -----------------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def _create(self, request: web.Request) -> web.Response:
        body = await request.text()
        key = request.headers.get("Idempotency-Key", "")
        if not key:
            return web.json_response({"error": "no Idempotency-Key"}, status=400)
        with self._lock:
            if key in self.orders:
                order_id, first = self.orders[key]
                if first != body:
                    return web.json_response({"error": "different body"}, status=422)
                return web.json_response({"order_id": order_id, "duplicate": True}, status=200)
            order_id = f"OC{len(self.orders) + 1:06d}"
            self.orders[key] = (order_id, body)
            self.creates[key] += 1
        return web.json_response({"order_id": order_id}, status=201)

    async def _by_key(self, request: web.Request) -> web.Response:
        with self._lock:
            found = self.orders.get(request.match_info["key"])
        if found is None:
            return web.json_response({"error": "not found"}, status=404)
        return web.json_response({"order_id": found[0], "body": found[1]})

    async def _no_batch(self, request: web.Request) -> web.Response:
        return web.json_response({"error": "no bulk import"}, status=404)

    # -- lifecycle (called from the test's thread) ----------------------------------------
    async def _up(self) -> None:
        app = web.Application()
        app.router.add_get("/v3/health", self._health)
        app.router.add_post("/v3/orders:batch", self._no_batch)
        app.router.add_post("/v3/orders", self._create)
        app.router.add_get("/v3/orders/by-key/{key}", self._by_key)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def _down(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _call(self, coro_fn: object) -> None:
        asyncio.run_coroutine_threadsafe(coro_fn(), self._loop).result(timeout=30)  # type: ignore[operator]

    def up(self) -> None:
        if self._runner is None:
            self._call(self._up)

    def down(self) -> None:
        self._call(self._down)

    def close(self) -> None:
        self.down()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    @property
    def is_up(self) -> bool:
        return self._runner is not None

    def has(self, key: str) -> bool:
        with self._lock:
            return key in self.orders
