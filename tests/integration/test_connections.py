"""Connections that never finish their head, idle keep-alives, and running out of descriptors.

Half request heads were kept about an hour: a few hundred of them took every
descriptor, no order was served and asyncio logged ~1,500 traceback lines a
second. Here the agent is a real subprocess and the clients are raw sockets:
every half-sent head is closed after ``agent.head_timeout_s``, an idle
keep-alive connection after ``agent.keepalive_timeout_s``, and with the
agent's descriptors exhausted the log gets one line per interval, not one
traceback per failed accept().
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import resource
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from agent.service.accept_errors import AcceptErrorLog
from tests.support.fakes import FakeCenter
from tests.support.harness import AgentProcess, order, write_config

pytestmark = pytest.mark.slow

HALF_HEAD = b"POST /v1/orders HTTP/1.1\r\nHost"
ACCEPT_LOG = re.compile(r"socket\.accept\(\)|cannot accept new connections")


async def agent_with(
    tmp_path: Path,
    center: FakeCenter,
    http: aiohttp.ClientSession,
    nofile: int | None = None,
    **agent: Any,
) -> AgentProcess:
    await center.go_down()  # orders are buffered: 202
    config = write_config(tmp_path, center.url, agent=agent)
    proc = AgentProcess(config, tmp_path / "agent.log")
    if nofile is not None:
        proc.preexec_fn = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    proc.start()
    await proc.wait_ready(http)
    return proc


@pytest.fixture
async def cleanup() -> AsyncIterator[list[AgentProcess]]:
    procs: list[AgentProcess] = []
    yield procs
    for p in procs:
        p.cleanup()


def port_of(agent: AgentProcess) -> int:
    return int(agent.url.rsplit(":", 1)[1])


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """Reads until the server closes (b'' or a reset); True then."""
    try:
        while await reader.read(4096):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    return True


async def half_heads(
    port: int,
    n: int,
    silent: int = 0,
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``n`` connections that sent half a head, and ``silent`` that sent nothing."""

    async def one(i: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if i >= silent:
            writer.write(HALF_HEAD)
            await writer.drain()
        return reader, writer

    return await asyncio.gather(*(one(i) for i in range(n + silent)))


async def all_closed(
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]], timeout: float
) -> None:
    """Wait until the server closed every one; fails after ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(closed_by_server(r) for r, _ in conns))
    except TimeoutError:
        raise AssertionError(f"the agent still holds connections after {timeout} s") from None
    finally:
        for _, w in conns:
            w.close()


async def post_order(http: aiohttp.ClientSession, url: str, n: int) -> int:
    async with http.post(
        f"{url}/v1/orders",
        data=orjson.dumps(order(n)),
        headers={"Content-Type": "application/json"},
    ) as r:
        return r.status


async def test_half_sent_heads_are_closed_and_orders_served(
    tmp_path: Path, center: FakeCenter, http: aiohttp.ClientSession, cleanup: list[AgentProcess]
):
    agent = await agent_with(tmp_path, center, http, head_timeout_s=1)
    cleanup.append(agent)
    conns = await half_heads(port_of(agent), 60, silent=10)
    await all_closed(conns, timeout=20)  # aiohttp's own bound (keep-alive, 75 s) is far later
    assert await post_order(http, agent.url, 1) == 202


async def test_an_idle_keepalive_connection_is_closed(
    tmp_path: Path, center: FakeCenter, http: aiohttp.ClientSession, cleanup: list[AgentProcess]
):
    agent = await agent_with(tmp_path, center, http, keepalive_timeout_s=1, head_timeout_s=60)
    cleanup.append(agent)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(agent))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])  # type: ignore[index]
    await reader.readexactly(length)
    # Kept alive after the answer, then closed once idle past the bound (the head bound,
    # 60 s, and aiohttp's default, an hour, are far later).
    await all_closed([(reader, writer)], timeout=15)


async def test_a_slow_body_is_not_cut_by_the_head_bound(
    tmp_path: Path, center: FakeCenter, http: aiohttp.ClientSession, cleanup: list[AgentProcess]
):
    """The head bound ends with the head: a body trickling in for 3 s (head_timeout_s 1)
    is still one order (agent.body_timeout_s governs the body)."""
    agent = await agent_with(tmp_path, center, http, head_timeout_s=1)
    cleanup.append(agent)
    body = orjson.dumps(order("slow"))
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(agent))
    writer.write(
        b"POST /v1/orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    await writer.drain()
    step = max(1, len(body) // 10)
    for i in range(0, len(body), step):
        await asyncio.sleep(0.3)
        writer.write(body[i : i + step])
        await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 202"), head


async def test_out_of_descriptors_logs_a_line_per_interval_and_recovers(
    tmp_path: Path, center: FakeCenter, http: aiohttp.ClientSession, cleanup: list[AgentProcess]
):
    """RLIMIT_NOFILE 64/64 and 150 half heads: accept() fails with EMFILE for a while."""
    agent = await agent_with(tmp_path, center, http, nofile=64, head_timeout_s=1)
    cleanup.append(agent)
    t0 = time.monotonic()
    conns = await half_heads(port_of(agent), 150)
    await all_closed(conns, timeout=60)
    status = 0
    async with asyncio.timeout(30):  # the agent's own files and sockets come back too
        while status != 202:
            try:
                status = await post_order(http, agent.url, 2)
            except aiohttp.ClientError:
                status = 0
            if status != 202:
                await asyncio.sleep(0.2)
    elapsed = time.monotonic() - t0
    lines = [ln for ln in agent.log.read_text().splitlines() if ACCEPT_LOG.search(ln)]
    assert lines, "accept() never ran out of descriptors: the test proves nothing"
    assert all("cannot accept new connections: EMFILE" in ln for ln in lines), lines[:3]
    assert len(lines) <= 2 + elapsed / 10, (len(lines), elapsed, lines[:3])


# -- the exception handler alone ------------------------------------------------------


async def test_accept_errors_are_counted_and_others_pass_through(caplog: pytest.LogCaptureFixture):
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: seen.append(ctx))
    limiter = AcceptErrorLog(interval_s=0.2)
    await limiter.start()
    try:
        with caplog.at_level(logging.ERROR, logger="agent.service"):
            for _ in range(500):
                loop.call_exception_handler(
                    {
                        "message": "socket.accept() out of system resource",
                        "exception": OSError(errno.EMFILE, "Too many open files"),
                    }
                )
            loop.call_exception_handler(
                {"message": "something else", "exception": RuntimeError("x")}
            )
            await asyncio.sleep(0.3)  # one interval: the 499 after the first in one line
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 2, lines
        assert "EMFILE" in lines[0] and "499 failed accept() calls" in lines[1]
        assert [c["message"] for c in seen] == ["something else"]
        assert limiter.total == 500
    finally:
        await limiter.stop()
        loop.set_exception_handler(None)
