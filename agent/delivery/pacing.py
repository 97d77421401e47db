"""How fast to send, and how long to wait after a failure: one pacer, one backoff.

Every deliverer (the drain, edge-recover, the SMS outbox) waits through these,
so "exponential with jitter, at least Retry-After" means the same everywhere.
The delays come from the ``backoff`` library's generators (``expo`` and
``full_jitter``); only the pacing, which that library does not do, is ours.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Generator

import backoff

from agent.base.tasks import wait_set


def delay(attempt: int, base_s: float, max_s: float, at_least_s: float = 0.0) -> float:
    """The wait before retry number ``attempt`` (1, 2, ...): exponential, full jitter,
    capped at ``max_s``, never shorter than ``at_least_s`` (a Retry-After)."""
    ceiling = min(max_s, base_s * 2 ** max(0, attempt - 1))
    return max(at_least_s, backoff.full_jitter(ceiling))


def jittered(interval_s: float, spread: float = 0.2) -> float:
    """A periodic wait spread by +-``spread``, so rechecks of many items started
    together do not stay in lockstep."""
    return interval_s * random.uniform(1.0 - spread, 1.0 + spread)


class Backoff:
    """Successive waits of one failing loop; ``reset()`` once it succeeds."""

    def __init__(self, base_s: float, max_s: float) -> None:
        self._base_s = base_s
        self._max_s = max_s
        self._gen = self._fresh()

    def _fresh(self) -> Generator[float, None, None]:
        gen: Generator[float, None, None] = backoff.expo(
            base=2, factor=self._base_s, max_value=self._max_s
        )
        next(gen)  # backoff's wait generators yield None first, to be primed
        return gen

    def next(self, at_least_s: float = 0.0) -> float:
        return max(at_least_s, backoff.full_jitter(next(self._gen)))

    def reset(self) -> None:
        self._gen = self._fresh()


class Pacer:
    """Spaces requests at ``rate``/s; halves the rate on 429/503, recovers slowly."""

    def __init__(self, rate: float) -> None:
        self.base_rate = rate
        self.rate = rate
        self._next = time.monotonic()
        self._paused_until = 0.0

    async def wait(self, n: int = 1, stop: asyncio.Event | None = None) -> bool:
        """Wait for the turn of the next request, which carries ``n`` orders; False if
        ``stop`` was set first (then the request must not be sent)."""
        now = time.monotonic()
        at = max(self._next, self._paused_until, now)
        self._next = at + n / self.rate
        if stop is None:
            if at > now:
                await asyncio.sleep(at - now)
            return True
        if at > now and not stop.is_set():
            await wait_set(stop, at - now)
        return not stop.is_set()

    def slow_down(self, retry_after_s: float | None) -> None:
        self.rate = max(1.0, self.rate / 2)
        if retry_after_s:
            self._paused_until = max(self._paused_until, time.monotonic() + retry_after_s)

    def speed_up(self) -> None:
        self.rate = min(self.base_rate, self.rate * 1.02 + 0.5)
