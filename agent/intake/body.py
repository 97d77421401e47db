"""Reading a request body whole, before anything judges it (CONTRACT section 4).

A body may arrive in many TCP segments, slowly, or chunked; it is the same
order once it has all arrived. Reading stops with ``BodyTooLarge`` one byte
past the limit and with ``BodyTimeout`` when the client stops sending for
good (the whole body must arrive within the deadline).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from agent.errors import EdgeError


class BodyError(EdgeError):
    """The body could not be read as a whole; nothing was kept."""


class BodyTooLarge(BodyError):
    pass


class BodyTimeout(BodyError, TimeoutError):
    pass


async def read_body(request: web.Request, max_bytes: int, timeout_s: float) -> bytes:
    """The whole body (by Content-Length or chunked), at most ``max_bytes``."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise BodyTooLarge(
            f"body is {request.content_length} bytes, larger than "
            f"agent.max_body_bytes ({max_bytes})"
        )
    content = request.content
    if content.is_eof():
        # The usual small order: the whole body came with the headers. Take it as it is,
        # without a task and a timer per request (the same checks as below).
        body = content.read_nowait()
        if len(body) > max_bytes:
            raise BodyTooLarge(f"body is larger than agent.max_body_bytes ({max_bytes})")
        return body
    chunks: list[bytes] = []
    size = 0

    async def read_all() -> None:
        nonlocal size
        while True:
            chunk = await content.readany()
            if not chunk:
                return  # EOF: the whole body is here
            size += len(chunk)
            if size > max_bytes:
                raise BodyTooLarge(f"body is larger than agent.max_body_bytes ({max_bytes})")
            chunks.append(chunk)

    try:
        async with asyncio.timeout(timeout_s):  # no extra task, unlike wait_for
            await read_all()
    except TimeoutError as exc:
        raise BodyTimeout(
            f"the body did not arrive whole within agent.body_timeout_s "
            f"({timeout_s:g} s): {size} bytes came; send it again"
        ) from exc
    return b"".join(chunks)
