"""Bodies are judged only once they have fully arrived, however the network delivers them.

Raw sockets against the real server: split writes, byte-by-byte, chunked, at
the size limit and one byte over, a client that stops mid-body; and header
bytes that are not UTF-8, fuzzed with hypothesis.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import load_config
from tests.support.harness import ROOT, order, write_config


async def raw_request(
    url: str,
    head: bytes,
    parts: list[bytes],
    gap_s: float = 0.0,
    close_after: bool = False,
    timeout: float = 20,
) -> tuple[int, dict]:
    """Send ``head`` then each part as its own write, ``gap_s`` apart; read the answer."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head)
        await writer.drain()
        for part in parts:
            if gap_s:
                await asyncio.sleep(gap_s)
            writer.write(part)
            await writer.drain()
        if close_after:
            writer.write_eof()
        status_line = await asyncio.wait_for(reader.readline(), timeout)
        status = int(status_line.split()[1])
        length = 0
        while (line := await asyncio.wait_for(reader.readline(), timeout)) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value.strip())
        body = await asyncio.wait_for(reader.readexactly(length), timeout)
        return status, orjson.loads(body)
    finally:
        writer.close()


def head(length: int | None, extra: bytes = b"") -> bytes:
    size = (
        b"Transfer-Encoding: chunked\r\n"
        if length is None
        else f"Content-Length: {length}\r\n".encode()
    )
    return (
        b"POST /v1/orders HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
        + size
        + extra
        + b"\r\n"
    )


async def test_a_body_split_over_two_writes_is_one_order(make_agent, center):
    agent = await make_agent(center.url)
    body = orjson.dumps(order("split-1"))
    status, reply = await raw_request(agent.url, head(len(body)), [body[:20], body[20:]], gap_s=0.3)
    assert status == 201, reply
    assert center.orders["douyin:split-1"][1] == body  # byte for byte, whole


async def test_a_body_sent_byte_by_byte_is_one_order(make_agent, center):
    agent = await make_agent(center.url)
    body = orjson.dumps(order("slow-1"))
    status, reply = await raw_request(
        agent.url, head(len(body)), [body[i : i + 1] for i in range(len(body))], gap_s=0.002
    )
    assert status == 201, reply
    assert center.orders["douyin:slow-1"][1] == body


async def test_a_chunked_body_is_one_order(make_agent, center):
    agent = await make_agent(center.url)
    body = orjson.dumps(order("chunked-1"))
    chunks = [body[:7], body[7:30], body[30:]]
    wire = [f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in chunks] + [b"0\r\n\r\n"]
    status, reply = await raw_request(agent.url, head(None), wire, gap_s=0.1)
    assert status == 201, reply
    assert center.orders["douyin:chunked-1"][1] == body


async def test_a_900_kb_order_is_buffered_whole(make_agent, center):
    await center.go_down()
    agent = await make_agent(center.url)
    body = orjson.dumps(order("big-1", note="x" * 900_000))
    status, reply = await raw_request(
        agent.url,
        head(len(body)),
        [body[i : i + 65536] for i in range(0, len(body), 65536)],
        gap_s=0.01,
    )
    assert status == 202, reply
    stored = orjson.loads((agent.spool / "pending" / f"{reply['serial']}.json").read_bytes())
    assert stored["body"].encode() == body


async def test_bodies_at_the_limit_pass_and_one_byte_over_get_413(make_agent, center):
    await center.go_down()
    agent = await make_agent(center.url, agent={"max_body_bytes": 4096})
    base = orjson.dumps(order("limit-1", note=""))
    exact = base.replace(b'"note":""', b'"note":"' + b"y" * (4096 - len(base)) + b'"')
    assert len(exact) == 4096
    status, reply = await raw_request(
        agent.url, head(len(exact)), [exact[:100], exact[100:]], gap_s=0.05
    )
    assert status == 202, reply
    over = exact.replace(b'"note":"', b'"note":"y')
    status, reply = await raw_request(agent.url, head(len(over)), [over])
    assert status == 413, reply
    # Chunked, with no Content-Length to judge by: still 413, nothing kept.
    wire = [f"{len(over):x}\r\n".encode() + over + b"\r\n", b"0\r\n\r\n"]
    status, reply = await raw_request(agent.url, head(None), wire)
    assert status == 413, reply
    assert len(agent.files("pending")) == 1


async def test_a_client_that_stops_mid_body_gets_408_and_nothing_is_kept(make_agent, center):
    await center.go_down()
    agent = await make_agent(center.url, agent={"body_timeout_s": 1})
    body = orjson.dumps(order("stalled-1"))
    status, reply = await raw_request(agent.url, head(len(body)), [body[:25]], timeout=15)
    assert status == 408, reply
    assert "body_timeout_s" in reply["error"]
    assert agent.files("pending") == []
    status, _ = await agent.get("/v1/orders/by-key/douyin:stalled-1")
    assert status == 404


@pytest.mark.parametrize("header", [b"Idempotency-Key", b"Authorization", b"Content-Type"])
async def test_header_bytes_that_are_not_utf8_get_400_naming_the_header(make_agent, center, header):
    agent = await make_agent(center.url)
    body = orjson.dumps(order("hdr-1"))
    extra = header + b": abc\xff\xfe\r\n"
    raw_head = head(len(body), extra)
    if header == b"Content-Type":
        raw_head = raw_head.replace(b"Content-Type: application/json\r\n", b"")
    status, reply = await raw_request(agent.url, raw_head, [body])
    assert status == 400, reply
    assert reply["field"] == header.decode()
    assert center.creates == {}


_header_bytes = st.binary(min_size=1, max_size=40).filter(
    lambda b: b"\r" not in b and b"\n" not in b and b"\x00" not in b
)


def _blocking_request(url: str, raw: bytes) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(raw)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head_, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head_.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return int(head_.split()[1]), rest


@pytest.fixture
def fuzz_agent(tmp_path: Path) -> Iterator[str]:
    """A real agent subprocess whose clusters are unreachable: it buffers what it accepts."""
    config = write_config(tmp_path, "http://127.0.0.9:9/v3")
    url = "http://" + load_config(str(config)).agent.listen
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if (
                    _blocking_request(
                        url, b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
                    )[0]
                    == 200
                ):
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "agent did not start"
            time.sleep(0.05)
        yield url
    finally:
        proc.kill()
        proc.wait(10)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(key=_header_bytes, auth=_header_bytes, ctype=_header_bytes, body=st.binary(max_size=300))
def test_fuzzed_headers_and_bodies_never_get_a_5xx(
    fuzz_agent: str, key: bytes, auth: bytes, ctype: bytes, body: bytes
):
    """Whatever bytes come in the headers we read and the body, the answer is JSON < 500."""
    raw = (
        b"POST /v1/orders HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n"
        b"Content-Type: " + ctype.strip() + b"\r\n"
        b"Idempotency-Key: " + key.strip() + b"\r\n"
        b"Authorization: Bearer "
        + auth.strip()
        + b"\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    status, payload = _blocking_request(fuzz_agent, raw)
    assert status < 500, payload
    if status == 400 and not payload.startswith(b"{"):
        # Control bytes are not HTTP: aiohttp's parser refuses the request before any
        # handler runs (plain text). Everything that is HTTP gets our JSON answer.
        assert any(0x00 < c < 0x20 or c == 0x7F for c in key + auth + ctype), payload
        return
    assert isinstance(orjson.loads(payload), dict)


def test_fuzzing_reaches_the_validation(fuzz_agent: str):
    """The fuzz above would prove little if every request died in the parser: a valid one
    with a non-UTF-8 key is judged by our code (400 naming the header)."""
    body = orjson.dumps(order("fuzz-1"))
    raw = (
        b"POST /v1/orders HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nIdempotency-Key: \xc3\x28\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    status, payload = _blocking_request(fuzz_agent, raw)
    assert (status, orjson.loads(payload)["field"]) == (400, "Idempotency-Key")
