"""Benchmark: what the lean client (agent/upstream/http1.py) costs per POST /orders.

    python -m bench.http1_client [--answers N] [--requests N] [--concurrency C]

Issue 19 gave the answers to llhttp (httptools); the hot path must not get slower.

1. parse: microseconds to read one answer through a connection's parser, no socket:
   the answer the benchmark center (aiohttp's web server) sends to a created order,
   the same chunked, and the same gzip'd; fed whole and in 1-byte pieces (a split head
   must cost linear time).
2. client: a ``bench.center`` process on 127.0.0.2; N POSTs through one Http1Client at
   concurrency 1 (p50 latency) and at concurrency C (requests/s); this process's CPU
   (user + sys) per request covers the request, the parse and the event loop.

Timing goals live here, never in the tests. Both figures are noisy on a shared machine:
compare runs made back to back.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from agent.upstream.http1 import Http1Client, Target
from agent.upstream.http1_conn import Conn

ROOT = Path(__file__).resolve().parent.parent
ORDER = b'{"channel_id":"douyin","channel_order_id":"1","total_amount":"199.10"}'
CREATED = b'{"order_id": "OC000000001"}'
_HEAD = (
    b"HTTP/1.1 201 Created\r\nContent-Type: application/json; charset=utf-8\r\n"
    b"Date: Thu, 03 Dec 2026 14:00:00 GMT\r\nServer: Python/3.11 aiohttp/3.14.5\r\n"
)
ANSWERS = {
    "201 Content-Length": _HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(CREATED), CREATED),
    "201 chunked": _HEAD
    + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(CREATED), CREATED),
    "201 gzip": _HEAD
    + b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
    % (len(gzip.compress(CREATED)), gzip.compress(CREATED)),
}


class _Transport:
    """Takes the request and drops it: the parse is measured alone."""

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False


def _read(conn: Conn, pieces: list[bytes]) -> Any:
    conn.send(b"")
    for piece in pieces:
        conn.data_received(piece)
    coro = conn.read_answer()
    try:
        coro.send(None)  # the answer is complete: it returns without waiting
    except StopIteration as done:
        return done.value
    raise RuntimeError("the answer was not complete")


def parse_bench(n: int) -> None:
    print(f"[1/2] parse: {n} answers each, one keep-alive connection, no socket")
    for name, answer in ANSWERS.items():
        for how, pieces in (
            ("whole", [answer]),
            ("1-byte pieces", [answer[i : i + 1] for i in range(len(answer))]),
        ):
            conn = Conn()
            conn.connection_made(_Transport())  # type: ignore[arg-type]
            reply, keep = _read(conn, pieces)
            assert reply.status == 201 and orjson.loads(reply.body)["order_id"] and keep
            count = n if how == "whole" else max(1, n // 50)
            rounds = []
            for _ in range(5):  # the best of 5: the least disturbed by other processes
                started = time.perf_counter()
                for _ in range(count):
                    _read(conn, pieces)
                rounds.append((time.perf_counter() - started) / count * 1e6)
            print(
                f"    {name:20s} {how:14s} {min(rounds):8.2f} us per answer "
                f"({len(answer)} bytes; best of 5)"
            )


class _Resolver:
    async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[dict[str, Any]]:
        return [{"hostname": host, "host": host, "port": port}]


async def client_bench(base: str, n: int, concurrency: int) -> None:
    print(f"[2/2] client: {n} POSTs at concurrency 1 and at {concurrency} to bench.center")
    client = Http1Client(_Resolver(), concurrency)  # type: ignore[arg-type]
    target = Target(f"{base}/orders")
    counter = iter(range(10**9))

    async def one() -> float:
        i = next(counter)
        headers = {
            "Idempotency-Key": f"bench:{os.getpid()}:{i}",
            "X-Edge-Serial": f"S-{i}",
            "X-Edge-Node": "bench",
        }
        started = time.perf_counter()
        reply = await client.post(target, headers, ORDER, 5.0)
        if reply.status not in (200, 201):
            raise RuntimeError(f"the center answered {reply.status}: {reply.body[:200]!r}")
        return time.perf_counter() - started

    try:
        for _ in range(200):  # warm-up: connections, code paths
            await one()
        cpu, wall = time.process_time(), time.perf_counter()
        latencies = [await one() for _ in range(n)]
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        print(
            f"    concurrency 1   p50 {statistics.median(latencies) * 1e3:6.3f} ms   "
            f"{n / wall:7.0f} req/s   client CPU {cpu / n * 1e6:6.1f} us per request"
        )

        async def worker(count: int) -> None:
            for _ in range(count):
                await one()

        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
        done = n // concurrency * concurrency
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        print(
            f"    concurrency {concurrency:<3d} {done / wall:22.0f} req/s   "
            f"client CPU {cpu / done * 1e6:6.1f} us per request"
        )
    finally:
        client.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--answers", type=int, default=20_000, help="answers per parse case")
    p.add_argument("--requests", type=int, default=5_000, help="POSTs per client run")
    p.add_argument("--concurrency", type=int, default=32)
    args = p.parse_args()
    parse_bench(args.answers)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        port = s.getsockname()[1]
    center = subprocess.Popen(
        [sys.executable, "-m", "bench.center", "127.0.0.2", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert center.stdout is not None
        if b"ready" not in center.stdout.readline():
            raise RuntimeError("bench.center did not start")
        asyncio.run(client_bench(f"http://127.0.0.2:{port}/v3", args.requests, args.concurrency))
    finally:
        center.terminate()
        center.wait(10)


if __name__ == "__main__":
    main()
