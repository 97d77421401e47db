"""Ending the background tasks a component owns, the one way every stop() does it.

Cancel, then wait until each task has really ended: a stop() that returned while
its task still ran would let the task write after the files or the database
under it were closed. A task that ended with an error of its own is logged and
not raised, so that stop() still closes what comes after it. If stop() itself
is cancelled while waiting, that cancellation propagates (gather does that;
suppressing CancelledError around ``await task`` would swallow it).

A task can only be ended if it lets its cancellation through. Python 3.11's
``asyncio.wait_for`` does not always: cancelled in the same turn of the loop in
which the awaited event is set, it returns as if nothing happened, and a loop that
waits that way runs on while its stop() waits for it forever. So no code here waits
with ``wait_for``: ``wait_set`` below waits for an event, and ``asyncio.timeout``
bounds anything else (tests/unit/test_tasks.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("agent.tasks")


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel ``tasks`` (None entries are skipped) and return once all have ended."""
    live = [t for t in tasks if t is not None]
    for task in live:
        task.cancel()
    results = await asyncio.gather(*live, return_exceptions=True)
    for task, result in zip(live, results, strict=True):
        if isinstance(result, Exception):
            log.error("background task %s had failed: %r", task.get_name(), result)


async def wait_set(event: asyncio.Event, timeout_s: float | None) -> bool:
    """Wait until ``event`` is set, at most ``timeout_s`` (None: no bound); True if it was.

    A cancellation always goes through, even when the event is set in the same turn
    (module docstring: ``asyncio.wait_for`` would swallow it).
    """
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True
