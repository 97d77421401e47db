"""Benchmark: what the HTTP server part of one request costs, aiohttp against bare llhttp.

    python -m bench.http_server_floor [--requests N] [--concurrency C] [--rounds R]

Issue 23, goal 2 asks the agent for <= 2.5x the order center's CPU per request and >= 50%
of its throughput. A forwarded order passes one HTTP server (the agent's) more than a
direct one. This measures how much of that server's cost is aiohttp's and would go with a
server of our own on the hot path: three servers, each in its own process on 127.0.0.2,
each answering ``POST /v1/orders`` with a fixed 201 JSON body after reading the request
body, and nothing else:

- ``aiohttp app``: ``web.Application`` with one route and one middleware, as the agent;
- ``aiohttp server``: aiohttp's low-level ``web.Server`` (no router, no middleware);
- ``llhttp protocol``: an ``asyncio.Protocol`` that feeds ``httptools.HttpRequestParser``
  and answers in a task per request, as uvicorn does: the least a Python server on
  asyncio can cost (no limits, no timeouts, no errors answered: a floor, not a server).

The same aiohttp client sends N requests at concurrency C (an order-sized body) to each,
the three alternated for R rounds; the server's CPU (user + sys, from /proc) per request
is the figure, and the ratio against ``aiohttp app`` in the same round. The difference is
the most a hand-written server could take off the agent's CPU per order.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.intake import free_port, process_cpu

KINDS = ("aiohttp app", "aiohttp server", "llhttp protocol")
ANSWER = b'{"status":"forwarded","serial":"BENCH-00000001","order_id":"OC000000001"}'
BODY = b'{"channel_id":"douyin","channel_order_id":"1","note":"' + b"x" * 680 + b'"}'

SERVER_CODE = r"""
import asyncio, sys
kind, port, answer = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()

async def main() -> None:
    loop = asyncio.get_running_loop()
    if kind == "llhttp protocol":
        import httptools

        class Proto(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport
                self.parser = httptools.HttpRequestParser(self)
                self.chunks = []

            def data_received(self, data):
                self.parser.feed_data(data)

            def on_body(self, body):
                self.chunks.append(body)

            def on_message_complete(self):
                body, self.chunks = b"".join(self.chunks), []
                loop.create_task(self.handle(body))

            async def handle(self, body):
                self.transport.write(
                    b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer)
                )

        server = await loop.create_server(Proto, "127.0.0.2", port)
    else:
        from aiohttp import web

        async def handle(request):
            await request.read()
            return web.Response(status=201, body=answer, content_type="application/json")

        if kind == "aiohttp app":

            @web.middleware
            async def front(request, handler):
                return await handler(request)

            app = web.Application(middlewares=[front])
            app.router.add_post("/v1/orders", handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.2", port).start()
        else:
            low = web.Server(handle, access_log=None)
            server = await loop.create_server(low, "127.0.0.2", port)
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def one_server(kind: str, n: int, concurrency: int) -> tuple[float, float]:
    """(server CPU us per request, requests/s) for one server process."""
    port = free_port("127.0.0.2")
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_CODE, kind, str(port), ANSWER.decode()],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise SystemExit(f"the {kind} server did not start (exit {proc.wait()})")
        url = f"http://127.0.0.2:{port}/v1/orders"
        headers = {"Content-Type": "application/json"}
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def post() -> None:
                async with session.post(url, data=BODY, headers=headers) as resp:
                    if resp.status != 201 or await resp.read() != ANSWER:
                        raise SystemExit(f"{kind}: unexpected answer {resp.status}")

            await asyncio.gather(*(post() for _ in range(concurrency * 10)))  # warm-up
            todo = iter(range(n))

            async def client() -> None:
                for _ in todo:
                    await post()

            cpu0, t0 = sum(process_cpu(proc.pid)), time.perf_counter()
            await asyncio.gather(*(client() for _ in range(concurrency)))
            elapsed, cpu1 = time.perf_counter() - t0, sum(process_cpu(proc.pid))
        return 1e6 * (cpu1 - cpu0) / n, n / elapsed
    finally:
        proc.kill()
        proc.wait()


async def run(n: int, concurrency: int, rounds: int) -> None:
    per_kind: dict[str, list[float]] = {kind: [] for kind in KINDS}
    ratios: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for r in range(rounds):
        order = KINDS if r % 2 == 0 else tuple(reversed(KINDS))
        got = {kind: await one_server(kind, n, concurrency) for kind in order}
        base = got["aiohttp app"][0]
        for kind in KINDS:
            us, rate = got[kind]
            per_kind[kind].append(us)
            ratios[kind].append(us / base)
            print(f"round {r + 1}  {kind:16s} {us:7.1f} us per request  {rate:8.0f} req/s")
    print()
    print(f"median of {rounds} rounds, {n} requests at concurrency {concurrency} each:")
    base = statistics.median(per_kind["aiohttp app"])
    for kind in KINDS:
        us = statistics.median(per_kind[kind])
        print(
            f"  {kind:16s} {us:7.1f} us per request  {statistics.median(ratios[kind]):5.2f}x "
            f"aiohttp app  (saves {base - us:5.1f} us)"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    print(f"Python {sys.version.split()[0]}, aiohttp {aiohttp.__version__}, {os.cpu_count()} CPUs")
    asyncio.run(run(args.requests, args.concurrency, args.rounds))


if __name__ == "__main__":
    main()
