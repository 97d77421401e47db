"""Out of descriptors: one log line per interval, not a traceback per failed accept().

When the process runs out of descriptors (EMFILE) or the system does (ENFILE),
asyncio's accept loop reports every failed accept() to the loop's exception
handler, whose default logs a traceback each time; Python 3.11 retries up to
the backlog at once and schedules a retry per failure, so one listener wrote
~1,500 traceback lines a second (9 MB in 12 s) while no order was served.
``AcceptErrorLog`` takes those reports only: the first of a burst is logged at
once, the rest are counted and logged as one line per interval while the burst
lasts. Every other report goes on to the handler that was there before.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from typing import Any

log = logging.getLogger("agent.service")
# What asyncio's accept loop reports as "out of system resource".
ACCEPT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ADVICE = (
    "connections whose head or keep-alive timed out are closed "
    "(agent.head_timeout_s, agent.keepalive_timeout_s); if this lasts, raise "
    "LimitNOFILE= or find who holds the connections"
)


class AcceptErrorLog:
    """Installed on the running loop by ``start()``; the previous handler is back after
    ``stop()``."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self.total = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: Any = None
        self._counted = 0  # since the last line
        self._last: OSError | None = None
        self._flush: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._previous = self._loop.get_exception_handler()
        self._loop.set_exception_handler(self._handle)

    async def stop(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
            self._report()
        if self._loop is not None:
            self._loop.set_exception_handler(self._previous)
            self._loop = None

    def _handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if (
            isinstance(exc, OSError)
            and exc.errno in ACCEPT_ERRNOS
            and "accept" in str(context.get("message", ""))
        ):
            self.total += 1
            self._counted += 1
            self._last = exc
            if self._flush is None:  # the first of a burst: say it now
                self._report(first=True)
                self._flush = loop.call_later(self.interval_s, self._tick)
            return
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def _tick(self) -> None:
        """End of an interval: one line if the burst went on, else the burst is over."""
        self._flush = None
        if self._counted and self._loop is not None:
            self._report()
            self._flush = self._loop.call_later(self.interval_s, self._tick)

    def _report(self, first: bool = False) -> None:
        if not self._counted or self._last is None:
            return
        code = errno.errorcode.get(self._last.errno or 0, str(self._last.errno))
        what = (
            f"further failures are counted and logged every {self.interval_s:g} s"
            if first
            else f"{self._counted} failed accept() calls in the last {self.interval_s:g} s"
        )
        log.error(
            "cannot accept new connections: %s (%s); %s; %s",
            code,
            os.strerror(self._last.errno or 0),
            what,
            ADVICE,
            extra={"errno": code, "count": self._counted},
        )
        self._counted = 0
