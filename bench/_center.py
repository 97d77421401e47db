"""A minimal order center (CONTRACT section 7) for the benchmarks, run as its own process.

    python bench/_center.py --host 127.0.0.2 --port 18080

``GET /v3/health`` answers 200; ``POST /v3/orders`` answers 201 ``{"order_id": N}``
for a new ``Idempotency-Key`` and 200 ``{"order_id": N, "duplicate": true}`` for a
repeated one (a request without the header always creates). Nothing else: it is
meant to be as cheap as an order center can be, so that what a benchmark sees on
top of it is the caller's own cost. SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal

import orjson
from aiohttp import web

_JSON = "application/json"


class Center:
    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._by_key: dict[str, int] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v3/health", self.health)
        app.router.add_post("/v3/orders", self.orders)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(body=b'{"ok":true}', content_type=_JSON)

    async def orders(self, request: web.Request) -> web.Response:
        await request.read()
        key = request.headers.get("Idempotency-Key")
        if key is not None and key in self._by_key:
            doc = {"order_id": self._by_key[key], "duplicate": True}
            return web.Response(status=200, body=orjson.dumps(doc), content_type=_JSON)
        order_id = next(self._ids)
        if key is not None:
            self._by_key[key] = order_id
        return web.Response(status=201, body=orjson.dumps({"order_id": order_id}),
                            content_type=_JSON)


async def serve(host: str, port: int) -> None:
    runner = web.AppRunner(Center().app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.2")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
