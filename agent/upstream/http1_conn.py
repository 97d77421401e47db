"""One keep-alive connection of the lean client; llhttp (httptools) reads its answers.

HTTP framing is not ours to write: the hand parser this replaces read ``2000`` as 200,
``0x2`` as a chunk size, ``Transfer-Encoding: chunked, gzip`` as chunked, crashed with
a ValueError on ``Content-Length: ²`` (a 500 to the client although the center had
created the order: issue 19, defect 4) and waited for a body a 204 never has. llhttp,
the parser aiohttp's own C extension and uvicorn (through httptools) use, decides
every framing question; it is set as lenient as aiohttp sets it for answers (bare LF
line ends, spaces after a chunk size, odd bytes in header values), never in what
decides where an answer ends (Content-Length and chunk sizes stay strict).

What this adds on top, each a rule of its own:

- an answer whose head is over 64 KiB, whose body is over ``codings.MAX_BODY`` or
  decodes to more, or whose bytes cannot be parsed or decoded is unreadable
  (``BadAnswer``): the caller calls it ambiguous and closes the connection;
- ``Transfer-Encoding`` must be exactly ``chunked`` (as h11 has it): llhttp would
  frame ``gzip, chunked`` but nothing here removes a gzip transfer coding, and
  ``chunked, gzip`` is framed by the end of the connection;
- interim (1xx) answers are skipped; a 101 (an upgrade nobody asked for) is unreadable;
- a connection is reused only when the answer was complete, the server allows it,
  and no byte came that belongs to no answer.
"""

from __future__ import annotations

import asyncio
from typing import NamedTuple, NoReturn, cast

import httptools

from agent.upstream.codings import Body, BodyTooLarge, UndecodableBody

KEEPALIVE_S = 15.0  # an idle connection is not reused after this (aiohttp's default)
MAX_HEAD = 64 * 1024  # status lines and headers of one answer, interim ones included


# The lengths of the header names on_header reads: a cheap first test for the others.
_WATCHED_LENGTHS = frozenset(
    len(n) for n in (b"retry-after", b"content-length", b"transfer-encoding", b"content-encoding")
)


class Reply(NamedTuple):
    status: int
    body: bytes
    retry_after: str | None
    problem: str = ""  # why the body could not be read although the answer could


class BadAnswer(Exception):
    """The answer cannot be read (malformed, too large, or cut off)."""


class _NotOurs(Exception):
    """Bytes after the complete answer: they belong to no request."""


class Conn(asyncio.Protocol):
    """One connection: the parser is fed as bytes arrive; a waiter is woken by the
    complete answer, an unreadable one, or the end of the connection."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.ended = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._parser.set_dangerous_leniencies(  # what aiohttp sets for answers
            lenient_headers=True,
            lenient_optional_cr_before_lf=True,
            lenient_spaces_after_chunk_size=True,
        )
        self._waiter: asyncio.Future[None] | None = None
        self._busy = False  # a request waits for its answer
        self._stray = False  # bytes came that belong to no answer: never reuse
        self._head_wire = 0  # bytes received while a head was incomplete
        self._head_fields = 0  # bytes of the header fields parsed
        self._in_head = False
        self._interim = False
        self._status = 0
        self._retry_after: str | None = None
        self._encoding: str | None = None
        self._transfer: str | None = None
        self._framed = False  # Content-Length or Transfer-Encoding: not ended by EOF
        self._body: Body | None = None
        self._keep = False
        self._reply: Reply | None = None
        self._error: BadAnswer | None = None

    # ---- asyncio.Protocol ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream connection's transport (create_connection): always an asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self._busy or self._reply is not None or self._error is not None:
            self._stray = True  # the peer is out of step with us
            return
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if self._reply is not None:
                self._stray = True  # bytes after the answer (a 204's "body", say)
            elif self._error is None:
                self._error = BadAnswer(f"unreadable answer: {_describe(exc)}")
        if self._in_head:  # a head that does not end: llhttp keeps no limit of its own
            self._head_wire += len(data)
            if self._head_wire > MAX_HEAD and self._error is None:
                self._error = BadAnswer(f"the answer's head is over {MAX_HEAD} bytes")
        self._wake()

    def eof_received(self) -> bool:
        self._ended()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended()

    def _ended(self) -> None:
        self.ended = True
        if self._busy and self._reply is None and self._error is None:
            if self._body is not None and not self._framed and not self._interim:
                self._finish(keep=False)  # framed by the end of the connection
            else:
                self._error = BadAnswer("the connection ended before the whole answer")
        self._wake()

    # ---- httptools callbacks (llhttp calls them from feed_data) ----

    def on_message_begin(self) -> None:
        if self._reply is not None or self._error is not None:
            raise _NotOurs  # stops the parser; data_received marks the connection
        self._in_head = True
        self._status = 0
        self._retry_after = self._encoding = self._transfer = None
        self._framed = False
        self._body = None

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_fields += len(name) + len(value)  # a head that came in one piece too
        if self._head_fields > MAX_HEAD:
            self._fail(f"the answer's head is over {MAX_HEAD} bytes")
        if b"\x00" in value:  # as aiohttp refuses it (llhttp's lenient mode lets it by)
            self._fail(f"a NUL byte in the header {name[:100]!r}")
        if len(name) not in _WATCHED_LENGTHS:
            return  # most headers: not one of the four read here
        key = name.lower()
        if key == b"retry-after":
            if self._retry_after is None:  # the first, as aiohttp's .get() gives
                self._retry_after = value.decode("latin-1").strip()
        elif key == b"content-length":
            self._framed = True  # llhttp checks its value
        elif key == b"transfer-encoding":
            self._framed = True
            self._transfer = _joined(self._transfer, value)
        elif key == b"content-encoding":
            self._encoding = _joined(self._encoding, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._status = self._parser.get_status_code()
        self._interim = 100 <= self._status < 200
        if self._interim:
            self._in_head = True  # the real answer's head follows, counted with this one
            return
        transfer = self._transfer
        if transfer is not None and transfer.strip().lower() != "chunked":
            self._fail(f"Transfer-Encoding {transfer[:100]!r} (only chunked is read)")
        self._body = Body(self._encoding)

    def on_body(self, data: bytes) -> None:
        assert self._body is not None  # llhttp calls on_body only after the head
        try:
            self._body.feed(data)
        except (BodyTooLarge, UndecodableBody) as exc:
            self._fail(str(exc))

    def on_message_complete(self) -> None:
        if self._interim:
            return  # 100 Continue, 103 Early Hints: the real answer follows
        self._finish(keep=self._parser.should_keep_alive())

    def _finish(self, keep: bool) -> None:
        assert self._body is not None
        try:
            body = self._body.result()
        except UndecodableBody as exc:
            self._error = BadAnswer(str(exc))
            return
        self._keep = keep
        self._reply = Reply(self._status, body, self._retry_after, self._body.problem)

    def _fail(self, why: str) -> NoReturn:
        self._error = BadAnswer(why)
        raise self._error

    # ---- the client's side ----

    def send(self, data: bytes) -> None:
        """Write one request; its answer is read by ``read_answer``."""
        assert self.transport is not None and not self._busy
        self._busy = True
        self._reply = self._error = None
        self._body = None
        self._head_wire = self._head_fields = 0
        self._in_head = True
        self._interim = False
        self.transport.write(data)
        if self.ended:  # closed by the peer since it was checked: no answer will come
            self._error = BadAnswer("the connection ended before the whole answer")

    async def read_answer(self) -> tuple[Reply, bool]:
        """The answer to the request sent (1xx ones skipped): (the reply, whether the
        connection may be reused); BadAnswer if it cannot be read."""
        while self._reply is None:
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self._busy = False
        return self._reply, self._keep and not self._stray and not self.ended

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def usable(self, now: float) -> bool:
        transport = self.transport
        return (
            not self.ended
            and transport is not None
            and not transport.is_closing()
            and not self._stray
            and now - self.idle_since <= KEEPALIVE_S
        )

    def close(self, graceful: bool = False) -> None:
        self.ended = True
        if self.transport is not None:
            if graceful:
                self.transport.close()
            else:
                self.transport.abort()


def _joined(before: str | None, value: bytes) -> str:
    text = value.decode("latin-1")
    return text if before is None else f"{before}, {text}"


def _describe(exc: BaseException) -> str:
    """The parser's reason, or the one a callback gave (it rides as the context)."""
    if isinstance(exc, httptools.HttpParserUpgrade):
        return "101 Switching Protocols (an upgrade nobody asked for)"
    return str(exc) or type(exc).__name__
