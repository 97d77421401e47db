"""The per-phone sliding window (``sms.per_phone_per_hour``), kept in memory.

The intake answers ``"sms"`` in its 202 from this, without waiting for the outbox's
SQLite writer: that writer also commits the sender's rounds with ``synchronous=FULL``,
and at 32 clients an order waited 7-9 ms behind them (issue 23). The outbox's
``sms_window`` table stays the durable copy; this is loaded from it at start-up.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

WINDOW_S = 3600.0


class PhoneWindow:
    """When each phone was last given a notice, over the last ``WINDOW_S`` seconds."""

    def __init__(self) -> None:
        self._at: dict[str, deque[float]] = {}

    def load(self, rows: Iterable[tuple[str, float]]) -> None:
        """Rows of (phone, at), oldest first: the notices queued before this start."""
        for phone, at in rows:
            self._at.setdefault(phone, deque()).append(at)

    def admit(self, phone: str, now: float, limit: int) -> bool:
        """Count one more notice for ``phone`` unless it had ``limit`` within the window
        (0: no limit). False: suppressed, and not counted."""
        times = self._at.get(phone)
        if times is None:
            times = self._at[phone] = deque()
        horizon = now - WINDOW_S
        while times and times[0] <= horizon:
            times.popleft()
        if limit > 0 and len(times) >= limit:
            return False
        times.append(now)
        return True

    def prune(self, now: float) -> None:
        """Forget phones with no notice in the window (a peak's phones are mostly new)."""
        horizon = now - WINDOW_S
        for phone in [p for p, t in self._at.items() if not t or t[-1] <= horizon]:
            del self._at[phone]

    def __len__(self) -> int:
        return len(self._at)
