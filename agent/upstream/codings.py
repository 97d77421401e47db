"""An answer's body as the center meant it: Content-Encoding decoded, size bounded.

A center (or a proxy in front of it) may gzip its answers although the agent never
asks for it. Read as plain bytes, a gzip'd ``201 {"order_id":...}`` is "a 2xx without
an order_id": the created order would be buffered and pinned, never settle (issue 19,
defect 3). So ``gzip`` (and ``x-gzip``, RFC 9110 8.4.1.3) and ``deflate`` are decoded
here with the stdlib's zlib, as aiohttp decodes them (``deflate`` without the zlib
header too). Both the bytes on the wire and the decoded bytes are capped: an order
center's answer to one POST is small, and a zip bomb must not eat the agent's memory.

Any other coding (``br``, ``zstd``, ``compress``, ...) is not guessed at: the body is
set aside with a ``problem`` naming the coding, and the status alone speaks (a 2xx
then has no readable order_id: an unclear answer, the order stays pinned to that
cluster). aiohttp instead reads an unknown coding as if it were plain bytes.
"""

from __future__ import annotations

import zlib

MAX_BODY = 1024 * 1024  # an order center's answer to one POST is a few hundred bytes

_PLAIN = frozenset({"", "identity"})
_ZLIB_MODES = {
    "gzip": 16 + zlib.MAX_WBITS,
    "x-gzip": 16 + zlib.MAX_WBITS,
    "deflate": zlib.MAX_WBITS,
}


class BodyTooLarge(Exception):
    """The answer's body (on the wire or decoded) is over the cap."""


class UndecodableBody(Exception):
    """The body is not valid in the coding its Content-Encoding names."""


def _codings(header: str) -> list[str]:
    """The codings a Content-Encoding value lists, lower-cased, ``identity`` left out."""
    return [c for c in (part.strip().lower() for part in header.split(",")) if c not in _PLAIN]


class Body:
    """Collects one answer's body, decoding it as its Content-Encoding says, within
    ``cap`` bytes both as received and as decoded."""

    __slots__ = ("_cap", "_coding", "_got", "_parts", "_size", "_z", "problem")

    def __init__(self, content_encoding: str | None, cap: int = MAX_BODY) -> None:
        self._cap = cap
        self._got = 0  # bytes received
        self._size = 0  # bytes kept (decoded)
        self._parts: list[bytes] = []
        self._z: zlib._Decompress | None = None
        self._coding = ""
        self.problem = ""  # set when the body is in a coding this client does not read
        codings = _codings(content_encoding) if content_encoding else []
        if len(codings) == 1 and codings[0] in _ZLIB_MODES:
            self._coding = codings[0]
        elif codings:
            self.problem = (
                f"the answer's body is in Content-Encoding "
                f"{content_encoding!r}, which the agent does not decode (only "
                "gzip and deflate): its content is unknown"
            )

    def feed(self, data: bytes) -> None:
        self._got += len(data)
        if self._got > self._cap:
            raise BodyTooLarge(f"the answer's body is over {self._cap} bytes")
        if self.problem:
            return  # not readable: only counted
        if not self._coding:
            self._keep(data)
            return
        if self._z is None:
            if not data:
                return
            wbits = _ZLIB_MODES[self._coding]
            if self._coding == "deflate" and data[0] & 0x0F != 8:
                wbits = -zlib.MAX_WBITS  # raw deflate without the zlib header, as aiohttp reads
            self._z = zlib.decompressobj(wbits)
        if self._z.eof:
            if data:
                raise UndecodableBody(f"bytes after the end of the {self._coding} stream")
            return
        room = self._cap - self._size
        try:
            out = self._z.decompress(data, room + 1)
        except zlib.error as exc:
            raise UndecodableBody(f"the body is not valid {self._coding}: {exc}") from exc
        if len(out) > room or self._z.unconsumed_tail:
            raise BodyTooLarge(
                f"the answer's body decodes ({self._coding}) to over {self._cap} bytes"
            )
        if self._z.unused_data:
            raise UndecodableBody(f"bytes after the end of the {self._coding} stream")
        self._keep(out)

    def _keep(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._cap:
            raise BodyTooLarge(f"the answer's body is over {self._cap} bytes")
        self._parts.append(data)

    def result(self) -> bytes:
        """The whole body, decoded; UndecodableBody if a compressed stream was cut short."""
        if self._z is not None and not self._z.eof:
            raise UndecodableBody(f"the {self._coding} stream ends before its end marker")
        parts = self._parts
        return parts[0] if len(parts) == 1 else b"".join(parts)
