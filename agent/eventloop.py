"""The event loop the commands run on: uvloop when it can be imported, else the stdlib's.

uvloop (libuv, Cython) roughly halves the loop's own CPU per request for the
aiohttp server and client; the behaviour our code relies on (signal handlers,
subprocesses, ``to_thread``, ``run_in_executor``) is the same. ``EDGE_EVENT_LOOP=asyncio``
forces the stdlib loop (to compare, or should uvloop ever misbehave).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's ``new_event_loop`` unless unavailable or turned off; None: the stdlib."""
    if os.environ.get("EDGE_EVENT_LOOP", "").lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the fastest loop available."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
