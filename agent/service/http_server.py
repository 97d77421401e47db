"""The listener: aiohttp's server, with a deadline for request heads.

aiohttp closes idle keep-alive connections after ``keepalive_timeout`` but
has no deadline for a request head: a client that sends half a head (or,
before aiohttp 3.14, nothing at all) keeps its connection, and a few hundred
of them take every descriptor. ``HeadBoundHandler`` closes a connection
whose head is not whole ``head_timeout_s`` after the connection opened, or
after the first byte of a later head arrived. The body is not its business:
``agent.intake.body`` reads it under ``agent.body_timeout_s`` and answers 408.

It relies on two attributes of aiohttp's ``RequestHandler`` (3.9 to 3.14):
``_request_count`` (heads parsed on this connection) and ``_waiter`` (set
while the connection waits for its next head), the same test aiohttp's own
keep-alive timer makes; tests/integration/test_connections.py fails if they change.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

log = logging.getLogger("agent.http")


class HeadBoundHandler(web.RequestHandler):
    """A connection that is closed when a request head takes longer than the bound."""

    def __init__(self, manager: web.Server, *, head_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout_s = head_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()  # the first head, counted from the connection

    def data_received(self, data: bytes) -> None:
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:
            self._disarm()  # a head is whole (or answered 400): the handler takes over
        elif data and self._head_timer is None and self._waiting():
            self._arm()  # the first bytes of the next head

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _waiting(self) -> bool:
        """Idle between requests: no head parsed yet, no handler running."""
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self._loop.call_later(self._head_timeout_s, self._overdue)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _overdue(self) -> None:
        self._head_timer = None
        if self._waiting():
            log.debug(
                "closing a connection whose request head did not arrive within "
                "agent.head_timeout_s (%g s)",
                self._head_timeout_s,
            )
            self.force_close()


class HeadBoundServer(web.Server):
    """aiohttp's connection factory, making ``HeadBoundHandler``s."""

    def __init__(self, base: web.Server, head_timeout_s: float, **handler_kwargs: Any) -> None:
        super().__init__(
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            **handler_kwargs,
        )
        self._head_timeout_s = head_timeout_s
        self._handler_kwargs = handler_kwargs

    def __call__(self) -> web.RequestHandler:
        return HeadBoundHandler(
            self,
            loop=asyncio.get_running_loop(),
            head_timeout_s=self._head_timeout_s,
            **self._handler_kwargs,
        )


class BoundedAppRunner(web.AppRunner):
    """``web.AppRunner`` serving through ``HeadBoundServer``.

    ``handler_kwargs`` go to every connection (``keepalive_timeout``,
    ``access_log`` ...), as with ``web.AppRunner``.
    """

    def __init__(
        self,
        app: web.Application,
        *,
        head_timeout_s: float,
        shutdown_timeout: float,
        **handler_kwargs: Any,
    ) -> None:
        super().__init__(app, shutdown_timeout=shutdown_timeout, **handler_kwargs)
        self._head_timeout_s = head_timeout_s
        self._handler_kwargs = handler_kwargs

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()  # runs the app's startup, freezes it
        return HeadBoundServer(base, self._head_timeout_s, **self._handler_kwargs)
