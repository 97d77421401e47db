"""Ending the background tasks a component owns, the one way every stop() does it.

Cancel, then wait until each task has really ended: a stop() that returned while
its task still ran would let the task write after the files or the database
under it were closed. A task that ended with an error of its own is logged and
not raised, so that stop() still closes what comes after it. If stop() itself
is cancelled while waiting, that cancellation propagates (gather does that;
suppressing CancelledError around ``await task`` would swallow it).
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
