"""A small standalone order center for benchmarks (CONTRACT section 7), run as its own process.

    python -m bench.center HOST PORT

Honors Idempotency-Key (one create per key), has ``orders:batch``, and
``GET /admin/stats`` / ``POST /admin/reset`` for the benchmark driver.
Prints "ready" on stdout once listening. Not imported by the tests.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections import Counter
from typing import Any

import orjson
from aiohttp import web


class Center:
    def __init__(self) -> None:
        self.orders: dict[str, tuple[str, bytes]] = {}
        self.creates: Counter[str] = Counter()
        self.ids = itertools.count(1)
        self.requests = 0
        self.first_create_at: float | None = None  # wall clock, for "first order delivered"

    def create(self, key: str, body: bytes) -> tuple[int, dict[str, Any]]:
        seen = self.orders.get(key)
        if seen is not None:
            if seen[1] != body:
                return 422, {"error": "key reused with another body"}
            return 200, {"order_id": seen[0], "duplicate": True}
        if self.first_create_at is None:
            self.first_create_at = time.time()
        order_id = f"OC{next(self.ids):09d}"
        self.orders[key] = (order_id, body)
        self.creates[key] += 1
        return 201, {"order_id": order_id}

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(body=b'{"ok":true}', content_type="application/json")

    async def post(self, request: web.Request) -> web.Response:
        self.requests += 1
        status, doc = self.create(request.headers.get("Idempotency-Key", ""), await request.read())
        return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json")

    async def batch(self, request: web.Request) -> web.Response:
        self.requests += 1
        doc = orjson.loads(await request.read())
        results = []
        for item in doc["orders"]:
            key = item["idempotency_key"]
            status, res = self.create(key, item["body"].encode())
            results.append({"idempotency_key": key, "status": status, **res})
        return web.Response(
            body=orjson.dumps({"results": results}), content_type="application/json"
        )

    async def by_key(self, request: web.Request) -> web.Response:
        seen = self.orders.get(request.match_info["key"])
        if seen is None:
            return web.Response(
                status=404, body=b'{"error":"not found"}', content_type="application/json"
            )
        return web.Response(
            body=orjson.dumps({"order_id": seen[0], "body": seen[1].decode()}),
            content_type="application/json",
        )

    async def stats(self, request: web.Request) -> web.Response:
        return web.Response(
            body=orjson.dumps(
                {
                    "orders": len(self.orders),
                    "creates": sum(self.creates.values()),
                    "duplicated_keys": sum(1 for n in self.creates.values() if n > 1),
                    "requests": self.requests,
                    "first_create_at": self.first_create_at,
                }
            ),
            content_type="application/json",
        )

    async def reset(self, request: web.Request) -> web.Response:
        self.__init__()  # type: ignore[misc]
        return web.Response(body=b"{}", content_type="application/json")


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    assert host.startswith("127."), "benchmark traffic stays on loopback"
    c = Center()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/v3/health", c.health)
    app.router.add_post("/v3/orders", c.post)
    app.router.add_post("/v3/orders:batch", c.batch)
    app.router.add_get("/v3/orders/by-key/{key:.+}", c.by_key)
    app.router.add_get("/admin/stats", c.stats)
    app.router.add_post("/admin/reset", c.reset)
    web.run_app(
        app, host=host, port=port, access_log=None, print=lambda *_: print("ready", flush=True)
    )


if __name__ == "__main__":
    main()
