"""Issue 19: the framing defects the hand parser had, one deterministic test each.

Every answer is played as raw bytes by a socket server on 127.0.0.x to the lean client
(agent/upstream/http1.py) and, where it says something, to aiohttp as the agent used
it, compared on what the agent then does with the order (``verdict``).
"""

from __future__ import annotations

import asyncio
import gzip
import time
import zlib
from collections.abc import AsyncIterator

import orjson
import pytest

from agent.upstream.client import _answer
from agent.upstream.codings import MAX_BODY
from agent.upstream.http1 import Http1Client, Target
from agent.upstream.http1_conn import BadAnswer, Conn
from tests.support.harness import order, wait_for
from tests.support.http1_peers import (
    BODY,
    CREATED,
    HEADERS,
    Play,
    RawCenter,
    Resolver,
    lean,
    unanswered_listener,
    verdict,
    via_aiohttp,
)

HOST = "127.0.0.19"


@pytest.fixture
async def center() -> AsyncIterator[RawCenter]:
    server = await RawCenter(host=HOST).start()
    yield server
    await server.stop()


async def both(
    center: RawCenter,
    play: Play,
    timeout_s: float = 1.0,
) -> tuple[tuple[str, object], tuple[str, object]]:
    """The lean client's result and aiohttp's for the same answer."""
    results = []
    for client in (lean, via_aiohttp):
        center.plays = [play]
        results.append(await client(center.url(), Resolver(address=HOST), timeout_s))
    return results[0], results[1]


def answer(status_line: bytes, headers: list[bytes], body: bytes = b"") -> bytes:
    return status_line + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


def with_length(
    body: bytes,
    *headers: bytes,
    status: bytes = b"HTTP/1.1 201 Created",
) -> bytes:
    return answer(status, [*headers, b"Content-Length: %d" % len(body)], body)


def raw_deflate(data: bytes) -> bytes:
    z = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return z.compress(data) + z.flush()


# ---- defect 3: Content-Encoding ----


@pytest.mark.parametrize(
    "coding,encoded",
    [
        (b"gzip", gzip.compress(CREATED)),
        (b"deflate", zlib.compress(CREATED)),
        (b"deflate", raw_deflate(CREATED)),  # deflate without the zlib header, as aiohttp reads it
    ],
)
async def test_a_compressed_201_reads_as_created_as_with_aiohttp(
    center: RawCenter, coding: bytes, encoded: bytes
):
    play = Play([with_length(encoded, b"Content-Encoding: " + coding)])
    ours, theirs = await both(center, play)
    assert verdict(ours) == verdict(theirs) == ("created", "OC1")


async def test_a_gzipped_chunked_201_split_in_segments_reads_as_created(center: RawCenter):
    encoded = gzip.compress(CREATED)
    head = b"HTTP/1.1 201 Created\r\nContent-Encoding: GZIP\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunks = [
        b"%x\r\n%s\r\n" % (len(encoded[i : i + 7]), encoded[i : i + 7])
        for i in range(0, len(encoded), 7)
    ]
    play = Play([head[:20], head[20:], *chunks, b"0\r\n\r\n"], linger=True)
    ours, theirs = await both(center, play)
    assert verdict(ours) == verdict(theirs) == ("created", "OC1")


async def test_x_gzip_is_gzip(center: RawCenter):
    """RFC 9110 8.4.1.3: a recipient should read x-gzip as gzip (aiohttp reads it as plain
    bytes, so a created order would be unclear there)."""
    center.plays = [Play([with_length(gzip.compress(CREATED), b"Content-Encoding: x-gzip")])]
    assert verdict(await lean(center.url(), Resolver(address=HOST))) == ("created", "OC1")


@pytest.mark.parametrize("coding", [b"br", b"zstd", b"compress", b"gzip, gzip"])
async def test_an_encoding_the_agent_cannot_read_leaves_a_2xx_unclear_naming_it(
    center: RawCenter, coding: bytes
):
    """The body is not guessed at: a 2xx is unclear (the order stays pinned there), and
    the answer's error names the encoding. aiohttp reads an unknown coding as plain
    bytes, so it would call this one created; it refuses br/zstd without their modules."""
    center.plays = [Play([with_length(CREATED, b"Content-Encoding: " + coding)])]
    kind, value = await lean(center.url(), Resolver(address=HOST))
    assert kind == "ok"
    assert verdict((kind, value)) == ("pinned",)
    problem = _answer(*value).error  # type: ignore[misc]
    assert repr(coding.decode()) in problem and "does not decode" in problem


async def test_with_an_encoding_the_agent_cannot_read_the_status_still_speaks(center: RawCenter):
    center.plays = [
        Play(
            [
                with_length(
                    b"\x00\x01busy",
                    b"Content-Encoding: br",
                    b"Retry-After: 3",
                    status=b"HTTP/1.1 503 Service Unavailable",
                )
            ]
        )
    ]
    result = await lean(center.url(), Resolver(address=HOST))
    assert verdict(result) == ("retry",)
    assert _answer(*result[1]).retry_after_s == 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "body",
    [
        gzip.compress(CREATED)[:-4],  # cut inside the trailer: the stream never ends
        gzip.compress(CREATED) + b"tail",  # bytes after the stream's end
        b"not gzip at all",
    ],
)
async def test_a_body_that_is_not_what_its_encoding_says_is_ambiguous(
    center: RawCenter, body: bytes
):
    center.plays = [Play([with_length(body, b"Content-Encoding: gzip")])]
    kind, message = await lean(center.url(), Resolver(address=HOST))
    assert kind == "ambiguous" and "gzip" in str(message)


# ---- defect 4 and the other framing bugs ----


@pytest.mark.parametrize(
    "bad",
    [
        "²".encode("latin-1"),
        "1²".encode("latin-1"),
        "¹⁸".encode(),
        "١٢".encode(),
        b"+18",
        b"18, 18",
        b"0x12",
        b"-1",
    ],
)
async def test_a_content_length_that_is_not_ascii_digits_is_ambiguous_as_with_aiohttp(
    center: RawCenter, bad: bytes
):
    """Defect 4: the head read as latin-1, "²" (byte B2) passed isdigit() and int() raised;
    the ValueError escaped into a 500 although the center had created the order."""
    play = Play([b"HTTP/1.1 201 Created\r\nContent-Length: " + bad + b"\r\n\r\n" + CREATED])
    ours, theirs = await both(center, play)
    assert ours[0] == theirs[0] == "ambiguous"


async def test_a_second_content_length_is_ambiguous_as_with_aiohttp(center: RawCenter):
    play = Play([with_length(CREATED, b"Content-Length: 18")])
    ours, theirs = await both(center, play)
    assert ours[0] == theirs[0] == "ambiguous"


@pytest.mark.parametrize(
    "status_line",
    [b"HTTP/1.1 2000 OK", b"HTTP/1.1 20 OK", b"HTTP/1.1 2O1 Created", b"HTTP/1.1  201 Created"],
)
async def test_a_status_that_is_not_three_digits_is_ambiguous_as_with_aiohttp(
    center: RawCenter, status_line: bytes
):
    """The hand parser took the first three characters: 2000 was a 200 (a duplicate)."""
    play = Play([with_length(CREATED, status=status_line)])
    ours, theirs = await both(center, play)
    assert ours[0] == theirs[0] == "ambiguous"


@pytest.mark.parametrize("size", [b"0x12", b"0_12", b"+12", b"-12", b"12 12"])
async def test_a_chunk_size_that_is_not_hex_digits_is_ambiguous_as_with_aiohttp(
    center: RawCenter, size: bytes
):
    """int(text, 16) takes 0x12 and 0_12 for 18, the length of the created answer."""
    play = Play(
        [
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
            + size
            + b"\r\n"
            + CREATED
            + b"\r\n0\r\n\r\n"
        ]
    )
    ours, theirs = await both(center, play)
    assert ours[0] == theirs[0] == "ambiguous"


@pytest.mark.parametrize(
    "coding,aiohttp_reads",
    [
        (b"chunked, gzip", ("pinned",)),
        (b"xchunked", ("pinned",)),
        (b"gzip, chunked", ("created", "OC1")),
        (b"chunked, chunked", ("created", "OC1")),
    ],
)
async def test_a_transfer_encoding_other_than_chunked_is_ambiguous(
    center: RawCenter, coding: bytes, aiohttp_reads: tuple[str, ...]
):
    """Matched by substring, "chunked, gzip" (framed by the end of the connection) was
    read as chunked and its plain text as a created order. aiohttp reads that one to the
    end of the connection (not JSON: pinned), and where chunked comes last it removes the
    chunking and reads the rest as plain bytes, ignoring the gzip coding the header
    says is there: a deliberate difference, nothing but exactly "chunked" is read here."""
    play = Play(
        [
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: "
            + coding
            + b"\r\n\r\n"
            + b"%x\r\n%s\r\n0\r\n\r\n" % (len(CREATED), CREATED)
        ]
    )
    ours, theirs = await both(center, play)
    assert ours[0] == "ambiguous" and "Transfer-Encoding" in str(ours[1])
    assert verdict(theirs) == aiohttp_reads


@pytest.mark.parametrize(
    "status_line,framing",
    [
        (b"HTTP/1.1 204 No Content", b"Content-Length: 5"),
        (b"HTTP/1.1 304 Not Modified", b"Transfer-Encoding: chunked"),
    ],
)
async def test_a_204_or_304_has_no_body_whatever_its_headers_say(
    center: RawCenter, status_line: bytes, framing: bytes
):
    """The hand parser waited for the 5 bytes (or a chunk) until the deadline."""
    play = Play([answer(status_line, [framing])], linger=True)
    started = time.monotonic()
    ours, theirs = await both(center, play, timeout_s=3.0)
    assert time.monotonic() - started < 2.0  # neither waited for its deadline
    assert ours == theirs
    assert ours[0] == "ok" and ours[1] == (int(status_line.split()[1]), b"", None)


async def test_bytes_after_a_204_keep_its_connection_from_being_reused(center: RawCenter):
    client = Http1Client(Resolver(address=HOST))  # type: ignore[arg-type]
    try:
        center.plays = [
            Play([b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello"], linger=True)
        ]
        assert (await lean(center.url(), Resolver(), client=client))[1][0] == 204
        center.plays = [Play([with_length(CREATED)])]
        assert verdict(await lean(center.url(), Resolver(), client=client)) == ("created", "OC1")
        assert center.connections == 2  # "hello" is nobody's answer: a new connection
    finally:
        client.close()


async def test_interim_answers_are_skipped_and_an_unasked_upgrade_is_ambiguous(center: RawCenter):
    center.plays = [
        Play(
            [
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n"
                b"Link: </a>\r\n\r\n" + with_length(CREATED)
            ]
        )
    ]
    assert verdict(await lean(center.url(), Resolver(address=HOST))) == ("created", "OC1")
    center.plays = [
        Play(
            [
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n"
                b"Connection: upgrade\r\n\r\n" + CREATED
            ]
        )
    ]
    assert verdict(await lean(center.url(), Resolver(address=HOST))) == ("pinned",)


# ---- no body cap ----


@pytest.mark.parametrize("coding", [None, b"br"])  # kept, or only counted
async def test_a_body_over_the_cap_is_ambiguous_and_its_connection_closed(
    center: RawCenter, coding: bytes | None
):
    """An order center's answer is small; the hand parser read any size into memory."""
    big = b'{"order_id":"OC1","pad":"' + b"x" * MAX_BODY + b'"}'
    headers = [] if coding is None else [b"Content-Encoding: " + coding]
    center.plays = [Play([with_length(big, *headers)], linger=True)]
    client = Http1Client(Resolver(address=HOST))  # type: ignore[arg-type]
    try:
        kind, message = await lean(center.url(), Resolver(), client=client)
        assert kind == "ambiguous" and f"over {MAX_BODY} bytes" in str(message)
        # Not read to its end, not pooled: closed at once, while the client lives on.
        await wait_for(
            lambda: center.open_connections() == 0, timeout=2, what="the connection closed"
        )
    finally:
        client.close()


async def test_a_gzip_bomb_is_ambiguous_without_decoding_it_all(center: RawCenter):
    bomb = gzip.compress(b'{"order_id":"OC1","pad":"' + b"0" * (64 * MAX_BODY) + b'"}')
    assert len(bomb) < MAX_BODY
    center.plays = [Play([with_length(bomb, b"Content-Encoding: gzip")])]
    kind, message = await lean(center.url(), Resolver(address=HOST))
    assert kind == "ambiguous" and "decodes (gzip) to over" in str(message)


async def test_a_head_over_64_kib_is_ambiguous(center: RawCenter):
    center.plays = [
        Play(
            [
                b"HTTP/1.1 201 Created\r\n"
                + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"y" * 1000) for i in range(70))
                + b"Content-Length: 18\r\n\r\n"
                + CREATED
            ]
        )
    ]
    kind, message = await lean(center.url(), Resolver(address=HOST))
    assert kind == "ambiguous" and "head is over" in str(message)


# ---- the pool slot: what was sent decides ----


async def test_a_request_that_never_got_a_pool_slot_is_unavailable(center: RawCenter):
    """One connection allowed and held by a request the center never answers: the second
    request's deadline passes while it waits for the slot. Nothing of it was sent, so it
    is UpstreamUnavailable (the other cluster may be tried), not pinned. aiohttp's total
    timeout says "timeout" here (ambiguous): it cannot tell where its deadline struck."""
    client = Http1Client(Resolver(address=HOST), limit=1)  # type: ignore[arg-type]
    center.plays = [Play([], linger=True)]  # takes the first request, never answers
    try:
        first = asyncio.create_task(lean(center.url(), Resolver(), 2.0, client=client))
        while not center.requests:
            await asyncio.sleep(0.01)
        kind, message = await lean(center.url(), Resolver(), 0.3, client=client)
        assert (kind, len(center.requests)) == ("unavailable", 1)
        assert "waiting for a free connection" in str(message)
        assert (await first)[0] == "ambiguous"  # that one was sent
    finally:
        client.close()

    connector_limit_1 = await _aiohttp_waiting_for_a_slot(center)
    assert connector_limit_1 == "ambiguous"


async def _aiohttp_waiting_for_a_slot(center: RawCenter) -> str:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=1, resolver=Resolver(address=HOST), use_dns_cache=False)
    session = aiohttp.ClientSession(connector=connector)
    center.requests.clear()
    center.plays = [Play([], linger=True)]
    try:
        first = asyncio.create_task(via_aiohttp(center.url(), Resolver(), 2.0, session))
        while not center.requests:
            await asyncio.sleep(0.01)
        kind, _ = await via_aiohttp(center.url(), Resolver(), 0.3, session)
        first.cancel()
        return kind
    finally:
        await session.close()


async def test_a_deadline_that_passes_while_connecting_is_unavailable():
    """A connect that hangs past the whole deadline (0.5 s, so the per-attempt connect
    timeout is the same 0.5 s): nothing was sent, not a byte of the request. aiohttp's
    total timeout fires first and says "timeout" (ambiguous): it cannot tell that it
    struck while connecting. The lean client can, and follows what was sent, so the
    order may go to the other cluster instead of being pinned to one that never saw it."""
    async with unanswered_listener(HOST) as port:
        url = f"http://orders.test:{port}/v3/orders"
        ours = await lean(url, Resolver(address=HOST), 0.5)
        theirs = await via_aiohttp(url, Resolver(address=HOST), 0.5)
    assert ours[0] == "unavailable" and "(connecting): nothing was sent" in str(ours[1])
    assert theirs[0] == "ambiguous", theirs  # the deliberate difference


async def test_a_connection_that_ended_before_the_request_fails_at_once():
    """A peer's close that lands between the pool's check and the write: no answer can
    come, so the request fails then (ambiguous: it was handed over), not at its deadline."""
    conn = Conn()
    conn.connection_made(_NullTransport())  # type: ignore[arg-type]
    conn.connection_lost(None)
    conn.send(b"POST /v3/orders HTTP/1.1\r\n\r\n")
    with pytest.raises(BadAnswer, match="ended before the whole answer"):
        await asyncio.wait_for(conn.read_answer(), 1)


class _NullTransport:
    def write(self, data: bytes) -> None:
        pass


async def test_the_request_goes_out_once_per_post(center: RawCenter):
    """Sanity for the verdicts above: each lean request reached the center exactly once."""
    center.plays = [Play([with_length(CREATED)])]
    client = Http1Client(Resolver(address=HOST))  # type: ignore[arg-type]
    try:
        reply = await client.post(Target(center.url()), dict(HEADERS), BODY, 1.0)
    finally:
        client.close()
    assert (reply.status, reply.body, len(center.requests)) == (201, CREATED, 1)


# ---- end to end: a real agent in front of a center that answers like this ----


@pytest.fixture
async def raw_primary() -> AsyncIterator[RawCenter]:
    server = await RawCenter(host="127.0.0.21", health=True).start()
    yield server
    await server.stop()


async def test_a_gzipped_201_is_forwarded_with_its_order_id(make_agent, raw_primary: RawCenter):
    """Defect 3 end to end: the order was created, so the client hears 201 and the
    order_id, and nothing is buffered (no needless SMS, no buffer filling up)."""
    raw_primary.always = Play(
        [with_length(gzip.compress(b'{"order_id":"OC-GZ-1"}'), b"Content-Encoding: gzip")]
    )
    agent = await make_agent(f"http://127.0.0.21:{raw_primary.port}/v3")
    status, body = await agent.post(order("gz-1", customer_phone="13812345678"))
    assert (status, body.get("status"), body.get("order_id")) == (201, "forwarded", "OC-GZ-1")
    assert agent.files("pending") == []
    assert len(raw_primary.requests) == 1


async def test_a_content_length_in_non_ascii_digits_buffers_the_order_pinned(
    make_agent, raw_primary: RawCenter
):
    """Defect 4 end to end: the center may hold the order (it answered, unreadably), so
    the client never gets a 500: the order is buffered pinned to that cluster, and once
    the center answers readably (a duplicate: it had created it) the drain settles it."""
    raw_primary.always = Play(
        [b"HTTP/1.1 201 Created\r\nContent-Length: \xb2\r\n\r\n" + b'{"order_id":"OC-B2"}']
    )
    agent = await make_agent(f"http://127.0.0.21:{raw_primary.port}/v3")
    status, body = await agent.post(order("b2-1"))
    assert (status, body.get("status")) == (202, "buffered"), body
    record = orjson.loads((agent.spool / "pending" / f"{body['serial']}.json").read_bytes())
    assert record["pinned_to"] == "primary"
    duplicate = b'{"order_id":"OC-B2","duplicate":true}'
    raw_primary.always = Play([with_length(duplicate, status=b"HTTP/1.1 200 OK")])
    await wait_for(lambda: agent.files("merged"), timeout=30, what="the drain to settle it")
    assert agent.files("pending") == []
    keys = {r.split(b"Idempotency-Key: ")[1].split(b"\r\n")[0] for r in raw_primary.requests}
    assert keys == {b"douyin:b2-1"}  # every attempt carried the one key
