"""When did an aiohttp request fail: before anything was sent, or after?

The one question every client here (order centers, SMS providers) must answer
the same way: before sending, nothing happened at the peer and the call may be
retried or sent elsewhere; after, the peer may have acted on it.
"""

from __future__ import annotations

import asyncio
import enum

import aiohttp

# What a request can raise besides cancellation; catch exactly these.
LIBRARY_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


class Phase(enum.Enum):
    DNS = "dns"  # the host did not resolve: nothing sent
    CONNECT = "connect"  # refused, unreachable, TLS, connect timeout: nothing sent
    INVALID_URL = "invalid"  # never left us
    TIMEOUT = "timeout"  # sent (at least partly), no answer in time
    AFTER_SEND = "after-send"  # reset or broken after sending


def failure_phase(exc: BaseException) -> Phase:
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return Phase.DNS
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return Phase.CONNECT
    if isinstance(exc, aiohttp.InvalidURL):
        return Phase.INVALID_URL
    if isinstance(exc, asyncio.TimeoutError):
        return Phase.TIMEOUT
    return Phase.AFTER_SEND
